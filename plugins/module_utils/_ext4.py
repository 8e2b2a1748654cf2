# -*- coding: utf-8 -*-
# Copyright: (c) 2026, microvm.firecracker contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Reading and writing an ext4 image without mounting it (e2fsprogs ``debugfs``, ``e2fsck``).

Nothing here mounts the image or attaches it to a loop device: ``debugfs``
edits the filesystem structures directly, so a symlink inside the image is
only ever resolved inside the image, never on the host.

``debugfs`` exits 0 after most failed commands and prints its errors among
its normal output. Every batch is therefore run with ``-f -`` (commands on
stdin), stdout and stderr merged into one pipe (``debugfs`` unbuffers both in
this mode, so their order is kept), and the transcript is split on the
``debugfs: <command>`` line it echoes before each command. Each command's
output is then checked against what that command prints on success; anything
else is an error. The only text from the image that reaches the transcript in
batches with more than one command is a symlink target (``stat``), which is
consumed by its length, so a crafted name or target cannot fake an echo line.

Also here: the checks that an image is safe to touch (regular file, not open
by any process, not attached to a loop device, superblock clean, no journal
waiting for recovery) and ``e2fsck -fn``.
"""
from __future__ import annotations

import errno
import fcntl
import os
import re
import stat as stat_mod
import struct
import subprocess
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

# debugfs 1.46.2 is the first whose ``write`` accepts a path as destination
# (older versions create an entry whose *name* contains the slashes).
MIN_DEBUGFS_VERSION = (1, 46, 2)
# source_file() in debugfs reads command lines with fgets(buf, BUFSIZ).
MAX_COMMAND_LENGTH = 8000

TOOL_ENV = {
    "LC_ALL": "C",
    "LANG": "C",
    "DEBUGFS_PAGER": "__none__",
    "PAGER": "__none__",
}

S_IFMT = 0o170000
S_IFREG = 0o100000
S_IFDIR = 0o040000
S_IFLNK = 0o120000

KIND_REGULAR = "regular"
KIND_DIRECTORY = "directory"
KIND_SYMLINK = "symlink"

_LOOP_GET_STATUS64 = 0x4C05
_LOOP_INFO64_SIZE = 232

_BANNER_RE = re.compile(rb"^debugfs \d+\.\d+(?:\.\d+)?[^\n]*\n?$")
_VERSION_RE = re.compile(rb"debugfs (\d+)\.(\d+)(?:\.(\d+))?")
_INODE_RE = re.compile(rb"^Inode: (\d+)\s+Type: ([A-Za-z ]+?)\s+Mode:\s+(\d+)\s", re.M)
_OWNER_RE = re.compile(rb"^User:\s+(\d+)\s+Group:\s+(\d+)(?:\s+Project:\s+\d+)?\s+Size: (\d+)\s*$", re.M)
_LINKS_RE = re.compile(rb"^Links: (\d+)", re.M)
_SIZE_IN_LINE_RE = re.compile(rb"^User:.*\sSize: (\d+)\s*$")
_FAST_LINK = b'Fast link dest: "'
_ALLOCATED_RE = re.compile(rb"^Allocated inode: \d+\n$")
# "Not a directory" and "Too many symbolic links" come from a path's parents, which callers check
# themselves (and refuse, naming the parent); for the path itself they mean "not there".
_NOT_FOUND_MARKERS = (b"File not found by ext2_lookup", b"Ext2 inode is not a directory", b"Too many symbolic links")


class Ext4Error(Exception):
    """A debugfs/e2fsck failure or an image that must not be touched."""


class ImageInUseError(Ext4Error):
    """The image is open by a process or attached to a loop device."""


@dataclass(frozen=True)
class Inode:
    """What ``debugfs stat`` reports about one path (the path itself, never its link target)."""

    number: int
    kind: str  # regular, directory, symlink, or debugfs' own word for others (FIFO, socket, ...)
    mode: int  # permission bits (07777)
    uid: int
    gid: int
    size: int
    links: int
    target: Optional[bytes] = None  # symlink target when debugfs shows it (fast/inline symlinks)


@dataclass(frozen=True)
class FsckResult:
    ok: bool
    returncode: int
    summary: str
    problems: Tuple[str, ...]

    def describe(self, limit: int = 25) -> str:
        lines = list(self.problems[:limit])
        if len(self.problems) > limit:
            lines.append("... (%d more lines)" % (len(self.problems) - limit))
        if self.summary:
            lines.append(self.summary)
        return "; ".join(lines) if lines else "no output"


@dataclass(frozen=True)
class SuperblockInfo:
    magic_ok: bool
    clean: bool
    has_errors: bool
    needs_recovery: bool


# --------------------------------------------------------------------------
# Command construction


def quote(arg: str) -> str:
    """Quote one argument for debugfs' command parser (libss): ``"`` doubles inside quotes."""
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in arg):
        raise Ext4Error("argument %r contains a control character debugfs cannot take" % arg)
    return '"' + arg.replace('"', '""') + '"'


def command(name: str, *args: str) -> str:
    line = " ".join([name] + [quote(arg) for arg in args])
    if len(line.encode("utf-8")) > MAX_COMMAND_LENGTH:
        raise Ext4Error("debugfs command too long (%d bytes): %s ..." % (len(line), line[:80]))
    return line


# --------------------------------------------------------------------------
# Transcript parsing


def split_transcript(output: bytes, commands: Sequence[str]) -> Tuple[bytes, List[bytes]]:
    """Split merged debugfs ``-f`` output into the preamble and one chunk per command.

    A ``Fast link dest: "..."`` line is consumed by the symlink size printed
    just before it, so a target holding a newline and a fake echo line cannot
    move a chunk boundary.
    """
    markers = [b"debugfs: " + cmd.encode("utf-8") + b"\n" for cmd in commands]
    if not markers:
        return output, []
    first = output.find(markers[0])
    if first < 0 or (first > 0 and output[first - 1:first] != b"\n"):
        raise Ext4Error("debugfs did not run the commands: %s" % _text(output).strip())
    preamble = output[:first]
    pos = first + len(markers[0])
    chunks: List[bytes] = []
    for index in range(len(markers)):
        following = markers[index + 1] if index + 1 < len(markers) else None
        start = pos
        size: Optional[int] = None
        while pos < len(output):
            if following is not None and output.startswith(following, pos):
                break
            end = output.find(b"\n", pos)
            end = len(output) if end < 0 else end + 1
            line = output[pos:end]
            match = _SIZE_IN_LINE_RE.match(line)
            if match:
                size = int(match.group(1))
            if line.startswith(_FAST_LINK) and size is not None:
                pos = min(len(output), pos + len(_FAST_LINK) + size)
                end = output.find(b"\n", pos)
                pos = len(output) if end < 0 else end + 1
                continue
            pos = end
        chunks.append(output[start:pos])
        if following is not None:
            if pos >= len(output):
                raise Ext4Error("debugfs stopped before %r; output: %s" % (commands[index + 1], _text(output[start:]).strip()))
            pos += len(following)
    return preamble, chunks


def check_preamble(preamble: bytes) -> Tuple[int, ...]:
    """Return debugfs' version from its banner; any other preamble text is an error (open failed)."""
    version: Tuple[int, ...] = ()
    problems = []
    for line in preamble.splitlines(keepends=True):
        if _BANNER_RE.match(line):
            match = _VERSION_RE.search(line)
            if match:
                version = tuple(int(part or 0) for part in match.groups())
        elif line.strip():
            problems.append(_text(line).strip())
    if problems:
        raise Ext4Error("debugfs cannot open the image: %s" % "; ".join(problems))
    return version


def is_not_found(chunk: bytes) -> bool:
    return any(marker in chunk for marker in _NOT_FOUND_MARKERS)


def parse_stat(chunk: bytes, path: str) -> Optional[Inode]:
    """Parse the output of ``stat PATH``; None when PATH does not exist."""
    inode = _INODE_RE.search(chunk)
    if inode is None or not chunk.startswith(b"Inode: "):
        if is_not_found(chunk) and not chunk.startswith(b"Inode: "):
            return None
        raise Ext4Error("debugfs stat %s failed: %s" % (path, _text(chunk).strip() or "no output"))
    owner = _OWNER_RE.search(chunk)
    links = _LINKS_RE.search(chunk)
    if owner is None or links is None:
        raise Ext4Error("debugfs stat %s: unexpected output: %s" % (path, _text(chunk).strip()[:300]))
    kind = inode.group(2).decode("ascii").strip()
    size = int(owner.group(3))
    target = None
    if kind == KIND_SYMLINK:
        at = chunk.find(b"\n" + _FAST_LINK)
        if at >= 0:
            begin = at + 1 + len(_FAST_LINK)
            target = chunk[begin:begin + size]
            if len(target) != size or chunk[begin + size:begin + size + 1] != b'"':
                raise Ext4Error("debugfs stat %s: cannot read the symlink target" % path)
    return Inode(
        number=int(inode.group(1)),
        kind=kind,
        mode=int(inode.group(3), 8) & 0o7777,
        uid=int(owner.group(1)),
        gid=int(owner.group(2)),
        size=size,
        links=int(links.group(1)),
        target=target,
    )


def parse_ls(chunk: bytes) -> Optional[List[str]]:
    """Names in a directory from ``ls -p DIR``; None when a line cannot be parsed (an odd name)."""
    names = []
    for line in chunk.splitlines():
        if not line.strip():
            continue
        parts = line.split(b"/")
        if len(parts) != 8 or parts[0] != b"" or parts[7] != b"" or not parts[1].isdigit():
            return None
        names.append(parts[5].decode("utf-8", "surrogateescape"))
    return names


def check_write_chunks(commands: Sequence[str], chunks: Sequence[bytes]) -> None:
    """Fail on the first command whose output is not what it prints on success."""
    for cmd, chunk in zip(commands, chunks):
        name = cmd.split(" ", 1)[0]
        if name == "write":
            if _ALLOCATED_RE.match(chunk):
                continue
        elif chunk.strip() == b"":  # rm prints an empty line on success
            continue
        raise Ext4Error("debugfs %s failed: %s" % (cmd, _text(chunk).strip() or "no output"))


def _text(data: bytes) -> str:
    return data.decode("utf-8", "replace")


def version_ok(version: Tuple[int, ...]) -> bool:
    return tuple(version[:3]) >= MIN_DEBUGFS_VERSION


# --------------------------------------------------------------------------
# Running the tools


def _run(argv: Sequence[str], stdin: Optional[bytes] = None) -> Tuple[int, bytes]:
    env = dict(os.environ)
    env.update(TOOL_ENV)
    try:
        proc = subprocess.run(  # noqa: S603 - fixed argv, no shell
            list(argv), input=stdin if stdin is not None else b"", stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, env=env, check=False,
        )
    except OSError as exc:
        raise Ext4Error("cannot run %s: %s" % (argv[0], exc.strerror or exc))
    return proc.returncode, proc.stdout


class Debugfs:
    """One image, driven by batched ``debugfs -f -`` runs."""

    def __init__(self, image: str, debugfs: str = "debugfs") -> None:
        self.image = image
        self.debugfs = debugfs
        self.version: Tuple[int, ...] = ()
        self.runs = 0

    def run(self, commands: Sequence[str], write: bool = False) -> List[bytes]:
        if not commands:
            return []
        argv = [self.debugfs]
        if write:
            argv.append("-w")
        argv += ["-f", "-", self.image]
        script = "".join(cmd + "\n" for cmd in commands).encode("utf-8")
        self.runs += 1
        returncode, output = _run(argv, script)
        preamble, chunks = split_transcript(output, commands)
        self.version = check_preamble(preamble) or self.version
        if self.version and not version_ok(self.version):
            raise Ext4Error("debugfs %s is too old; rootfs_inject needs e2fsprogs >= %s"
                            % (".".join(map(str, self.version)), ".".join(map(str, MIN_DEBUGFS_VERSION))))
        if returncode not in (0, 1):
            # 1 only counts commands debugfs did not know; a crash or signal is worse.
            raise Ext4Error("debugfs exited with %d: %s" % (returncode, _text(output[-500:]).strip()))
        if returncode == 1:
            raise Ext4Error("debugfs rejected a command: %s" % _text(output[-500:]).strip())
        return chunks

    def stat_many(self, paths: Iterable[str]) -> Dict[str, Optional[Inode]]:
        paths = list(dict.fromkeys(paths))
        chunks = self.run([command("stat", path) for path in paths])
        return {path: parse_stat(chunk, path) for path, chunk in zip(paths, chunks)}

    def dump_many(self, wanted: Dict[str, str]) -> Dict[str, bool]:
        """``dump`` each image path to the host path it maps to; False where it does not exist."""
        items = list(wanted.items())
        chunks = self.run([command("dump", path, host) for path, host in items])
        result = {}
        for (path, _host), chunk in zip(items, chunks):
            if chunk == b"":
                result[path] = True
            elif is_not_found(chunk):
                result[path] = False
            else:
                raise Ext4Error("debugfs dump %s failed: %s" % (path, _text(chunk).strip()))
        return result

    def list_many(self, paths: Iterable[str]) -> Dict[str, Optional[List[str]]]:
        paths = list(dict.fromkeys(paths))
        chunks = self.run([command("ls", "-p", path) for path in paths])
        result: Dict[str, Optional[List[str]]] = {}
        for path, chunk in zip(paths, chunks):
            if is_not_found(chunk) and not chunk.startswith(b"/"):
                raise Ext4Error("debugfs ls %s: no such directory" % path)
            result[path] = parse_ls(chunk)
        return result

    def apply(self, commands: Sequence[str]) -> None:
        chunks = self.run(commands, write=True)
        check_write_chunks(commands, chunks)


def parse_e2fsck(returncode: int, output: bytes) -> FsckResult:
    lines = [line.strip() for line in _text(output).splitlines() if line.strip()]
    summary = ""
    for line in reversed(lines):
        if re.search(r"\d+/\d+ files", line):
            summary = line
            break
    if not summary and lines:
        summary = lines[-1]
    problems = tuple(
        line for line in lines
        if line != summary and not line.startswith(("e2fsck ", "Pass ")) and "WARNING: Filesystem still has errors" not in line
    )
    return FsckResult(ok=returncode == 0, returncode=returncode, summary=summary, problems=problems)


def e2fsck(image: str, e2fsck_bin: str = "e2fsck") -> FsckResult:
    """``e2fsck -fn``: a forced, read-only check. Exit 0 is the only clean result."""
    return parse_e2fsck(*_run([e2fsck_bin, "-fn", image]))


class BackgroundFsck:
    """``e2fsck -fn`` started now and collected later, so it overlaps with other read-only work."""

    def __init__(self, image: str, e2fsck_bin: str = "e2fsck") -> None:
        env = dict(os.environ)
        env.update(TOOL_ENV)
        try:
            self.proc: Optional[subprocess.Popen] = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
                [e2fsck_bin, "-fn", image], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, env=env,
            )
        except OSError as exc:
            raise Ext4Error("cannot run %s: %s" % (e2fsck_bin, exc.strerror or exc))
        self._result: Optional[FsckResult] = None

    def result(self) -> FsckResult:
        if self._result is None:
            if self.proc is None:
                raise Ext4Error("e2fsck was cancelled")
            output, _unused = self.proc.communicate()
            self._result = parse_e2fsck(self.proc.returncode, output or b"")
            self.proc = None
        return self._result

    def cancel(self) -> None:
        """Stop the check if it is still running (our own child, by its handle)."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.communicate()
            self.proc = None


# --------------------------------------------------------------------------
# Image safety checks


def read_superblock(image: str) -> SuperblockInfo:
    """The primary superblock's magic, state and needs_recovery flag, read directly."""
    try:
        with open(image, "rb") as handle:
            handle.seek(1024)
            block = handle.read(1024)
    except OSError as exc:
        raise Ext4Error("cannot read the superblock: %s" % (exc.strerror or exc))
    if len(block) < 1024:
        return SuperblockInfo(magic_ok=False, clean=False, has_errors=False, needs_recovery=False)
    magic, state = struct.unpack_from("<HH", block, 0x38)
    (incompat,) = struct.unpack_from("<I", block, 0x60)
    return SuperblockInfo(
        magic_ok=magic == 0xEF53,
        clean=bool(state & 0x1),
        has_errors=bool(state & 0x2),
        needs_recovery=bool(incompat & 0x4),
    )


def image_identity(image: str) -> os.stat_result:
    try:
        info = os.stat(image)
    except FileNotFoundError:
        raise Ext4Error("no such file")
    except OSError as exc:
        raise Ext4Error("cannot stat: %s" % (exc.strerror or exc))
    if not stat_mod.S_ISREG(info.st_mode):
        raise Ext4Error("not a regular file")
    return info


def processes_holding(info: os.stat_result, proc: str = "/proc", own_pid: Optional[int] = None) -> Tuple[List[str], int]:
    """Processes with a file descriptor on the image's inode (any path, any mount namespace).

    Returns ``(["pid 123 (firecracker) fd 5", ...], unreadable)`` where
    ``unreadable`` counts processes whose descriptors could not be inspected.
    """
    own = os.getpid() if own_pid is None else own_pid
    holders: List[str] = []
    unreadable = 0
    try:
        entries = os.listdir(proc)
    except OSError as exc:
        raise Ext4Error("cannot list %s to check whether the image is in use: %s" % (proc, exc.strerror or exc))
    for entry in entries:
        if not entry.isdigit() or int(entry) == own:
            continue
        fd_dir = os.path.join(proc, entry, "fd")
        try:
            fds = os.listdir(fd_dir)
        except FileNotFoundError:
            continue
        except PermissionError:
            unreadable += 1
            continue
        except OSError:
            continue
        for fd in fds:
            link = os.path.join(fd_dir, fd)
            try:
                if not os.readlink(link).startswith("/"):
                    continue  # socket:[...], pipe:[...], anon_inode:...
                target = os.stat(link)
            except OSError:
                continue
            if target.st_ino == info.st_ino and target.st_dev == info.st_dev:
                holders.append("pid %s (%s) fd %s" % (entry, _comm(proc, entry), fd))
    return holders, unreadable


def _comm(proc: str, pid: str) -> str:
    try:
        with open(os.path.join(proc, pid, "comm"), encoding="utf-8", errors="replace") as handle:
            return handle.read().strip()
    except OSError:
        return "?"


def _decode_kernel_dev(value: int) -> Tuple[int, int]:
    """Major/minor of a dev_t as the loop driver encodes it (huge_encode_dev)."""
    major = (value & 0xFFF00) >> 8
    minor = (value & 0xFF) | ((value >> 12) & 0xFFF00)
    return major, minor


def loop_devices_of(info: os.stat_result, sys_block: str = "/sys/block", dev: str = "/dev") -> List[str]:
    """Loop devices whose backing file is the image (by device and inode, as ``losetup -j``)."""
    found: List[str] = []
    try:
        names = sorted(name for name in os.listdir(sys_block) if name.startswith("loop"))
    except OSError:
        return found
    want = (os.major(info.st_dev), os.minor(info.st_dev), info.st_ino)
    for name in names:
        backing_path = os.path.join(sys_block, name, "loop", "backing_file")
        try:
            with open(backing_path, encoding="utf-8", errors="surrogateescape") as handle:
                backing = handle.read().rstrip("\n")
        except OSError:
            continue  # not attached
        matched = False
        try:
            fd = os.open(os.path.join(dev, name), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            fd = -1
        if fd >= 0:
            try:
                raw = fcntl.ioctl(fd, _LOOP_GET_STATUS64, bytes(_LOOP_INFO64_SIZE))
                lo_device, lo_inode = struct.unpack_from("=QQ", raw)
                matched = _decode_kernel_dev(lo_device) + (lo_inode,) == want
            except OSError:
                pass
            finally:
                os.close(fd)
        if not matched:
            path = backing[:-len(" (deleted)")] if backing.endswith(" (deleted)") else backing
            try:
                other = os.stat(path)
                matched = (other.st_dev, other.st_ino) == (info.st_dev, info.st_ino)
            except OSError:
                pass
        if matched:
            found.append("/dev/%s (backing file %s)" % (name, backing))
    return found


class ImageLock:
    """An exclusive, non-blocking ``flock`` on the image for the duration of a run."""

    def __init__(self, image: str) -> None:
        self.image = image
        self.fd = -1

    def __enter__(self) -> "ImageLock":
        try:
            self.fd = os.open(self.image, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise Ext4Error("cannot open: %s" % (exc.strerror or exc))
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self.fd)
            self.fd = -1
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise ImageInUseError("locked by another process (another rootfs_inject run?)")
            raise Ext4Error("cannot lock: %s" % (exc.strerror or exc))
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def ensure_not_in_use(image: str, info: os.stat_result) -> List[str]:
    """Raise ImageInUseError when a process or loop device holds the image; return warnings."""
    holders, unreadable = processes_holding(info)
    if holders:
        raise ImageInUseError("open by %s; refusing to modify an image in use" % ", ".join(holders))
    loops = loop_devices_of(info)
    if loops:
        raise ImageInUseError("attached to loop device %s; detach it (losetup -d) first" % ", ".join(loops))
    warnings = []
    if unreadable:
        warnings.append("could not inspect the open files of %d process(es) (not root?); "
                        "the check that the image is not in use is incomplete" % unreadable)
    return warnings

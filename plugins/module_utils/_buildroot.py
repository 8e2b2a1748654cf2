# -*- coding: utf-8 -*-
# Copyright: (c) 2026, microvm.firecracker contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""A build tree on the host that commands run in with ``chroot``, and the mounts they need.

Mount safety, in three layers:

1. ``private_mount_namespace()`` moves the calling process (and so every
   child: mmdebstrap, debootstrap, apt, ``chroot``) into a mount namespace of
   its own with private propagation. Mounts made for the build are never
   visible in the host's mount table, and the kernel removes them all when the
   last process of the namespace exits, even after a crash or ``kill -9``.
2. ``ChrootMounts`` mounts proc, sysfs (read-only), a tmpfs ``/dev`` with the
   usual device nodes and a private devpts, a tmpfs ``/run`` and, optionally,
   the package cache; it unmounts them in reverse order on exit (lazily as a
   last resort) and then verifies with ``/proc/self/mountinfo`` that nothing
   is mounted under the tree any more.
3. ``remove_tree()`` refuses to delete a directory with anything mounted below
   it, and never crosses into another filesystem.

Processes a build leaves running inside the tree (an agent a package
started despite ``policy-rc.d``) are found by their root directory and killed
by PID (``kill_processes_in``).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shutil
import signal
import stat as stat_mod
import subprocess
import time
from typing import Dict, List, Optional, Sequence, Tuple

CLONE_NEWNS = 0x00020000
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MNT_DETACH = 0x2

# Device nodes of the build's /dev: (name, mode, major, minor).
DEVICE_NODES = (
    ("null", 0o666, 1, 3),
    ("zero", 0o666, 1, 5),
    ("full", 0o666, 1, 7),
    ("random", 0o666, 1, 8),
    ("urandom", 0o666, 1, 9),
    ("tty", 0o666, 5, 0),
)
DEVICE_LINKS = (
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
    ("ptmx", "pts/ptmx"),
)

CHROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class BuildrootError(Exception):
    """A mount, unmount or chroot step that failed."""


_LIBC = None


def _libc():
    global _LIBC  # pylint: disable=global-statement
    if _LIBC is None:
        _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _LIBC.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
        _LIBC.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
        _LIBC.unshare.argtypes = [ctypes.c_int]
    return _LIBC


def _enc(value: Optional[str]) -> Optional[bytes]:
    return None if value is None else os.fsencode(value)


def _errno_text() -> Tuple[int, str]:
    err = ctypes.get_errno()
    return err, os.strerror(err)


def private_mount_namespace() -> None:
    """Give this process its own mount namespace with private propagation (needs CAP_SYS_ADMIN)."""
    libc = _libc()
    if libc.unshare(CLONE_NEWNS) != 0:
        err, text = _errno_text()
        raise BuildrootError("cannot create a private mount namespace for the build (unshare: %s%s)"
                             % (text, "; run as root" if err in (errno.EPERM, errno.EACCES) else ""))
    if libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        raise BuildrootError("cannot make the build's mounts private: %s" % _errno_text()[1])


def mount(source: str, target: str, fstype: Optional[str], flags: int = 0, data: Optional[str] = None) -> None:
    if _libc().mount(_enc(source), _enc(target), _enc(fstype), flags, _enc(data)) != 0:
        raise BuildrootError("cannot mount %s (%s) on %s: %s" % (source, fstype or "bind", target, _errno_text()[1]))


def umount(target: str, lazy: bool = False) -> None:
    if _libc().umount2(_enc(target), MNT_DETACH if lazy else 0) != 0:
        err, text = _errno_text()
        if err == errno.EINVAL and not is_mount_point(target):
            return
        raise BuildrootError("cannot unmount %s: %s" % (target, text))


# --------------------------------------------------------------------------
# /proc/self/mountinfo


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo."""
    out = []
    index = 0
    while index < len(field):
        if field[index] == "\\" and field[index + 1:index + 4].isdigit() and len(field[index + 1:index + 4]) == 3:
            out.append(chr(int(field[index + 1:index + 4], 8)))
            index += 4
        else:
            out.append(field[index])
            index += 1
    return "".join(out)


def mount_points(mountinfo: str = "/proc/self/mountinfo") -> List[str]:
    points = []
    with open(mountinfo, encoding="utf-8", errors="surrogateescape") as handle:
        for line in handle:
            fields = line.split(" ")
            if len(fields) > 4:
                points.append(_unescape(fields[4]))
    return points


def mounts_under(path: str, mountinfo: str = "/proc/self/mountinfo") -> List[str]:
    """Mount points at or below ``path`` (deepest last in mount order)."""
    root = os.path.realpath(path).rstrip("/") or "/"
    prefix = root + "/"
    return [point for point in mount_points(mountinfo) if point == root or point.startswith(prefix)]


def is_mount_point(path: str) -> bool:
    return os.path.realpath(path) in mount_points()


# --------------------------------------------------------------------------
# Mounts for chroot work


class ChrootMounts:
    """proc, sys (read-only), /dev (tmpfs with nodes and devpts), /run (tmpfs) and optional binds under ``tree``."""

    def __init__(self, tree: str, binds: Sequence[Tuple[str, str]] = ()) -> None:
        self.tree = os.path.realpath(tree)
        self.binds = list(binds)  # (host directory, path inside the tree)
        self.mounted: List[str] = []

    def _target(self, inner: str) -> str:
        target = os.path.join(self.tree, inner.lstrip("/"))
        # A directory the tree itself provides; a symlink here could point the mount at the host.
        try:
            info = os.lstat(target)
        except FileNotFoundError:
            os.makedirs(target, mode=0o755)
            info = os.lstat(target)
        if not stat_mod.S_ISDIR(info.st_mode):
            raise BuildrootError("%s in the build tree is not a directory; refusing to mount on it" % inner)
        if os.path.realpath(target) != target:
            raise BuildrootError("%s in the build tree has a symlinked parent; refusing to mount on it" % inner)
        return target

    def _mount(self, source: str, inner: str, fstype: Optional[str], flags: int = 0, data: Optional[str] = None) -> str:
        target = self._target(inner)
        mount(source, target, fstype, flags, data)
        self.mounted.append(target)
        return target

    def __enter__(self) -> "ChrootMounts":
        try:
            self._mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
            self._mount("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY)
            dev = self._mount("microvm-golden-dev", "/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755,size=16m")
            for name, mode, major, minor in DEVICE_NODES:
                path = os.path.join(dev, name)
                os.mknod(path, stat_mod.S_IFCHR | mode, os.makedev(major, minor))
                os.chmod(path, mode)
            for name, target in DEVICE_LINKS:
                os.symlink(target, os.path.join(dev, name))
            os.mkdir(os.path.join(dev, "shm"), 0o1777)
            os.chmod(os.path.join(dev, "shm"), 0o1777)
            self._mount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620")
            self._mount("microvm-golden-run", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=64m")
            for host_dir, inner in self.binds:
                self._mount(host_dir, inner, None, MS_BIND)
        except BaseException:
            self.unmount_all()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.unmount_all()

    def unmount_all(self) -> None:
        """Unmount everything this object mounted, then anything else left under the tree; verify."""
        problems = []
        for target in reversed(self.mounted):
            try:
                umount(target)
            except BuildrootError as exc:
                problems.append(str(exc))
        self.mounted = []
        for target in reversed(mounts_under(self.tree)):
            if target == self.tree:
                continue
            try:
                umount(target)
            except BuildrootError:
                try:
                    umount(target, lazy=True)
                except BuildrootError as exc:
                    problems.append(str(exc))
        left = [point for point in mounts_under(self.tree) if point != self.tree]
        if left:
            raise BuildrootError("mounts left under the build tree: %s (%s)" % (", ".join(left), "; ".join(problems)))


# --------------------------------------------------------------------------
# Commands in the tree


def chroot_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = {
        "PATH": CHROOT_PATH,
        "HOME": "/root",
        "LC_ALL": "C",
        "LANG": "C",
        "DEBIAN_FRONTEND": "noninteractive",
        "DEBCONF_NONINTERACTIVE_SEEN": "true",
        "TERM": "dumb",
    }
    if extra:
        env.update(extra)
    return env


class CommandLog:
    """Collects the output of every build step in one log file; failures quote the step's tail."""

    def __init__(self, path: str, chroot_bin: str = "chroot") -> None:
        self.path = path
        self.chroot_bin = chroot_bin
        self.handle = open(path, "ab")  # pylint: disable=consider-using-with

    def close(self) -> None:
        if not self.handle.closed:
            self.handle.close()

    def note(self, text: str) -> None:
        self.handle.write(("# %s\n" % text).encode("utf-8", "replace"))
        self.handle.flush()

    def run(self, argv: Sequence[str], what: str, env: Optional[Dict[str, str]] = None, cwd: Optional[str] = None,
            timeout: Optional[float] = None, input_data: Optional[bytes] = None,
            ok_codes: Sequence[int] = (0,)) -> Tuple[int, bytes]:
        """Run ``argv`` with its output appended to the log; raise BuildrootError unless the exit code is ok."""
        self.note("%s: %s" % (what, " ".join(argv)))
        started = time.monotonic()
        try:
            proc = subprocess.run(list(argv), input=input_data if input_data is not None else b"",
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                  timeout=timeout, check=False)
        except subprocess.TimeoutExpired as exc:
            self.handle.write(exc.output or b"")
            raise BuildrootError("%s: timed out after %ds" % (what, int(timeout or 0)))
        except OSError as exc:
            raise BuildrootError("%s: cannot run %s: %s" % (what, argv[0], exc.strerror or exc))
        self.handle.write(proc.stdout)
        self.note("%s: exit %d after %.1fs" % (what, proc.returncode, time.monotonic() - started))
        if proc.returncode not in ok_codes:
            raise BuildrootError("%s failed (exit %d): %s" % (what, proc.returncode, tail(proc.stdout)))
        return proc.returncode, proc.stdout

    def chroot(self, tree: str, argv: Sequence[str], what: str, env: Optional[Dict[str, str]] = None,
               **kwargs) -> Tuple[int, bytes]:
        return self.run([self.chroot_bin, tree] + list(argv), what, env=chroot_env(env), cwd="/", **kwargs)


def tail(output: bytes, lines: int = 25) -> str:
    text = output.decode("utf-8", "replace").rstrip().splitlines()
    shown = text[-lines:]
    return ("... " if len(text) > lines else "") + " | ".join(line.strip() for line in shown if line.strip())


# --------------------------------------------------------------------------
# Leftover processes and removal


def processes_in(tree: str, proc: str = "/proc") -> List[int]:
    """PIDs whose root directory is ``tree`` or below it (processes started inside the chroot)."""
    root = os.path.realpath(tree).rstrip("/")
    found = []
    for entry in os.listdir(proc):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            link = os.readlink(os.path.join(proc, entry, "root"))
        except OSError:
            continue
        if link == root or link.startswith(root + "/"):
            found.append(int(entry))
    return found


def kill_processes_in(tree: str, timeout: float = 10.0) -> List[int]:
    """SIGTERM, then SIGKILL, every process running inside ``tree``; returns their PIDs."""
    pids = processes_in(tree)
    if not pids:
        return []
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout / 2
    while time.monotonic() < deadline and processes_in(tree):
        time.sleep(0.05)
    for pid in processes_in(tree):
        _signal(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout / 2
    while time.monotonic() < deadline and processes_in(tree):
        time.sleep(0.05)
    left = processes_in(tree)
    if left:
        raise BuildrootError("processes still running inside the build tree: %s" % ", ".join(map(str, left)))
    return pids


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def remove_tree(path: str) -> None:
    """``rm -rf`` that refuses while anything is mounted below ``path`` and never leaves its filesystem."""
    if not os.path.lexists(path):
        return
    left = mounts_under(path)
    if left:
        raise BuildrootError("not removing %s: still mounted below it: %s" % (path, ", ".join(left)))
    top = os.lstat(path)
    if not stat_mod.S_ISDIR(top.st_mode):
        os.unlink(path)
        return

    def walk(directory: str) -> None:
        with os.scandir(directory) as entries:
            for entry in entries:
                info = entry.stat(follow_symlinks=False)
                if stat_mod.S_ISDIR(info.st_mode):
                    if info.st_dev != top.st_dev:
                        raise BuildrootError("not removing %s: another filesystem is there" % entry.path)
                    walk(entry.path)
                    os.rmdir(entry.path)
                else:
                    os.unlink(entry.path)

    try:
        walk(path)
        os.rmdir(path)
    except OSError as exc:
        raise BuildrootError("cannot remove %s: %s" % (path, exc))


def copy_file(src: str, dst: str) -> None:
    """Copy a regular file's content (not following a symlink at ``dst``)."""
    if os.path.lexists(dst) and not os.path.isdir(dst):
        os.unlink(dst)
    shutil.copyfile(src, dst, follow_symlinks=False)

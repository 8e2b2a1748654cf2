"""jailer-standin behaves like Firecracker v1.10.1's jailer (and says it is a stand-in).

Run as root.  Every test builds its jails under its own tmp_path, stops the
processes it started by PID (with the QEMU children they started), removes the
cgroup directories it made and the network namespaces it added.
"""
from __future__ import annotations

import ast
import errno
import http.client
import json
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

from standin_support import (JAILER, STANDIN, children_of, kill_pid, pid_alive, wait_for)

UID = 61234
GID = 61235
JAIL_ROOT_ENV = "FC_STANDIN_JAIL_ROOT"


# -- helpers -------------------------------------------------------------------

def run_jailer(*args: str, env: dict[str, str] | None = None,
               timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([str(JAILER), *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, check=False, env=env)


def proc_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return {k: v.strip() for k, v in (line.split(":", 1) for line in f if ":" in line)}


def proc_limits(pid: int) -> dict[str, tuple[str, str]]:
    limits = {}
    with open(f"/proc/{pid}/limits") as f:
        for line in f.readlines()[1:]:
            m = re.match(r"^(.+?)\s{2,}(\S+)\s+(\S+)", line)
            if m:
                limits[m.group(1)] = (m.group(2), m.group(3))
    return limits


def cgroup_mounts() -> list[tuple[str, str, str]]:
    """(fstype, mount point, options) of the cgroup mounts in /proc/mounts."""
    out = []
    with open("/proc/mounts") as f:
        for line in f:
            fields = line.split()
            if fields[2] in ("cgroup", "cgroup2"):
                out.append((fields[2], fields[1], fields[3]))
    return out


def cgroup2_mount() -> Path:
    found = [Path(m) for fstype, m, _options in cgroup_mounts() if fstype == "cgroup2"]
    assert found, "no cgroup2 hierarchy in /proc/mounts"
    return found[0]


def hugetlb_max_file() -> str:
    """hugetlb.<size>.max for the smallest huge page size of this host."""
    sizes_kb = sorted(int(re.match(r"hugepages-(\d+)kB", d).group(1))
                      for d in os.listdir("/sys/kernel/mm/hugepages"))
    assert sizes_kb, "no huge page sizes in /sys/kernel/mm/hugepages"
    kb = sizes_kb[0]
    name = f"{kb // 1024 // 1024}GB" if kb >= 1024 * 1024 else f"{kb // 1024}MB"
    return f"hugetlb.{name}.max"


def userfaultfd_minor() -> int | None:
    with open("/proc/misc") as f:
        for line in f:
            minor, name = line.split()
            if name == "userfaultfd":
                return int(minor)
    return None


class UnixHTTP(http.client.HTTPConnection):
    """HTTP over a Unix socket reached through an O_PATH descriptor of its
    directory, so that deep tmp_path directories do not hit the 108-byte limit."""

    def __init__(self, socket_path: Path, timeout: float = 30.0):
        super().__init__("localhost", timeout=timeout)
        self._socket_path = socket_path

    def connect(self) -> None:
        dir_fd = os.open(self._socket_path.parent, os.O_PATH | os.O_DIRECTORY)
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            sock.connect(f"/proc/self/fd/{dir_fd}/{self._socket_path.name}")
        finally:
            os.close(dir_fd)
        self.sock = sock


def api(socket_path: Path, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    conn = UnixHTTP(socket_path)
    try:
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=data,
                     headers={"Content-Type": "application/json"} if data else {})
        r = conn.getresponse()
        raw = r.read()
        return r.status, json.loads(raw) if raw else None
    finally:
        conn.close()


class JailerProcess:
    def __init__(self, popen: subprocess.Popen, stdout: Path, stderr: Path):
        self.popen = popen
        self.pid = popen.pid
        self.stdout_path = stdout
        self.stderr_path = stderr

    def output(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def errors(self) -> str:
        return self.stderr_path.read_text(errors="replace")


class Jails:
    """Starts jailer-standin runs under one tmp_path and cleans up after them."""

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.base = tmp_path / "j"
        self.base.mkdir()
        # the stand-in VMM under a name containing "firecracker", as installed
        bindir = tmp_path / "bin"
        bindir.mkdir()
        self.exec_file = bindir / "firecracker"
        shutil.copy2(STANDIN, self.exec_file)
        self.procs: list[JailerProcess] = []
        self.extra_pids: set[int] = set()
        self.cgroup_dirs: list[Path] = []     # removed in this order

    def root(self, ident: str) -> Path:
        return self.base / "firecracker" / ident / "root"

    def args(self, ident: str, *extra: str) -> list[str]:
        return ["--id", ident, "--exec-file", str(self.exec_file), "--uid", str(UID),
                "--gid", str(GID), "--chroot-base-dir", str(self.base), *extra]

    def start(self, args: list[str], env: dict[str, str] | None = None,
              pass_fds: tuple[int, ...] = ()) -> JailerProcess:
        tag = secrets.token_hex(3)
        out, err = self.tmp_path / f"jailer-{tag}.out", self.tmp_path / f"jailer-{tag}.err"
        with open(out, "wb") as fo, open(err, "wb") as fe:
            popen = subprocess.Popen([str(JAILER), *args], stdout=fo, stderr=fe,
                                     stdin=subprocess.DEVNULL, env=env, pass_fds=pass_fds)
        p = JailerProcess(popen, out, err)
        self.procs.append(p)
        return p

    def wait_api(self, p: JailerProcess, socket_path: Path, vmm_pid: int | None = None,
                 timeout: float = 15) -> None:
        """Wait for the jailed VMM's socket (the VMM is the jailer's process
        unless --daemonize/--new-pid-ns made it another one: vmm_pid)."""
        def vmm_alive() -> bool:
            return p.popen.poll() is None if vmm_pid is None else pid_alive(vmm_pid)
        wait_for(lambda: socket_path.exists() or not vmm_alive(), timeout,
                 f"the API socket {socket_path}")
        assert socket_path.exists(), (f"the VMM exited before creating the socket: "
                                      f"{p.output()} {p.errors()}")

    def track_pid_file(self, ident: str) -> int:
        pid = int(wait_for(lambda: self._read_pid(ident), 15, "the jail's pid file"))
        self.extra_pids.add(pid)
        return pid

    def _read_pid(self, ident: str) -> str:
        try:
            return (self.root(ident) / "firecracker.pid").read_text()
        except OSError:
            return ""

    def cleanup(self) -> None:
        pids = [p.pid for p in self.procs] + sorted(self.extra_pids)
        victims: set[int] = set()
        for pid in pids:
            victims.update(children_of(pid))
        for pid in pids:
            kill_pid(pid)
        for p in self.procs:
            try:
                p.popen.wait(10)
            except subprocess.TimeoutExpired:
                pass
        for pid in victims:
            kill_pid(pid)
        wait_for(lambda: not any(pid_alive(p) for p in pids + sorted(victims)), 15,
                 "the jailed processes to exit")
        for d in self.cgroup_dirs:
            if d.exists():
                # a cgroup can be removed once its last task is gone
                wait_for(lambda: self._rmdir(d), 15, f"removing {d}")

    @staticmethod
    def _rmdir(d: Path) -> bool:
        try:
            d.rmdir()
            return True
        except OSError as err:
            if err.errno == errno.EBUSY:
                return False
            raise


@pytest.fixture
def jails(tmp_path: Path) -> Iterator[Jails]:
    if os.geteuid() != 0:
        pytest.fail("the jailer tests need root")
    j = Jails(tmp_path)
    yield j
    j.cleanup()


def assert_nothing_created(j: Jails) -> None:
    assert list(j.base.iterdir()) == []


def assert_aborted_with(r: subprocess.CompletedProcess, message: str) -> None:
    """The jailer panics (panic = "abort") on every error after argument parsing."""
    assert r.returncode == -signal.SIGABRT, (r.returncode, r.stderr)
    assert f"Jailer error: {message}\n" in r.stderr, r.stderr


# -- identification ------------------------------------------------------------

def test_version_names_the_stand_in_and_the_emulated_jailer_version():
    r = run_jailer("--version")
    assert r.returncode == 0
    first = r.stdout.splitlines()[0]
    assert first == "Jailer v1.10.1 compatible stand-in (jailer-standin 0.1.0; not Firecracker's jailer)"
    # a client parsing "Jailer vX.Y.Z" finds the emulated version
    assert re.match(r"^Jailer v(\d+\.\d+\.\d+)\b", first).group(1) == "1.10.1"
    assert r.stdout.endswith("\n\n")


def test_help_says_it_is_a_stand_in_and_lists_the_jailer_flags():
    r = run_jailer("--help")
    assert r.returncode == 0
    assert "stand-in" in r.stdout and "not Firecracker's jailer" in r.stdout
    assert "does not chroot" in r.stdout
    for flag in ("--id <id>", "--exec-file <exec-file>", "--uid <uid>", "--gid <gid>",
                 "--chroot-base-dir <chroot-base-dir>", "--netns <netns>", "--daemonize",
                 "--new-pid-ns", "--cgroup <cgroup>", "--cgroup-version <cgroup-version>",
                 "--parent-cgroup <parent-cgroup>", "--resource-limit <resource-limit>",
                 "--version", "--help"):
        assert flag in r.stdout, flag
    assert '[default: "/srv/jailer"]' in r.stdout and '[default: "1"]' in r.stdout
    assert "Any arguments after the -- separator will be supplied to the jailed binary." in r.stdout


def test_script_is_python39_stdlib_only_and_executable():
    text = JAILER.read_text()
    assert text.startswith("#!/usr/bin/env python3\n")
    assert "not firecracker's jailer" in text.split('"""')[1].lower()
    imports = set(re.findall(r"^(?:import|from) ([a-zA-Z_]+)", text, re.M)) - {"__future__"}
    assert imports <= set(sys.stdlib_module_names), imports - set(sys.stdlib_module_names)
    ast.parse(text, filename=str(JAILER), feature_version=(3, 9))
    assert os.access(JAILER, os.X_OK)


# -- validation: non-zero exit, the real message, nothing created --------------

def test_argument_parsing_errors_exit_1_like_the_jailer(jails):
    cases = [
        (["--id", "a", "--exec-file", str(jails.exec_file), "--gid", "1"],
         "Argument 'uid' required, but not found.", 'MissingArgument("uid")'),
        (["--id", "a", "--exec-file", str(jails.exec_file), "--uid", "1"],
         "Argument 'gid' required, but not found.", 'MissingArgument("gid")'),
        # required arguments are checked in name order, as the real parser's BTreeMap
        (["--id", "a"], "Argument 'exec-file' required, but not found.",
         'MissingArgument("exec-file")'),
        (jails.args("a", "--frobnicate"),
         "Found argument 'frobnicate' which wasn't expected, or isn't valid in this context.",
         'UnexpectedArgument("frobnicate")'),
        (jails.args("a", "--id", "b"), "The argument 'id' was provided more than once.",
         'DuplicateArgument("id")'),
        (jails.args("a", "--netns"), "The argument 'netns' requires a value, but none was supplied.",
         'MissingValue("netns")'),
    ]
    for args, display, debug in cases:
        r = run_jailer(*args)
        assert r.returncode == 1, (args, r)
        assert r.stderr == f"Failed to parse arguments: {display}\nError: ArgumentParsing({debug})\n"
        assert_nothing_created(jails)


def test_validation_errors_abort_before_creating_anything(jails, tmp_path):
    not_named = tmp_path / "bin" / "vmm-standin"
    shutil.copy2(STANDIN, not_named)
    # a link named "firecracker" is canonicalized first: its target's name counts
    link = tmp_path / "bin" / "firecracker-link"
    link.symlink_to(not_named)
    missing = tmp_path / "nope" / "firecracker"
    controllers = (cgroup2_mount() / "cgroup.controllers").read_text().split()
    unavailable = next(c for c in ("cpu", "memory", "io", "pids", "cpuset") if c not in controllers)
    cases = [
        (jails.args("bad_id"), "Invalid instance ID: Invalid char (_) at position 3"),
        (jails.args("x" * 65), "Invalid instance ID: Invalid len (65);  the length must be between 1 and 64"),
        (["--id", "a", "--exec-file", str(missing), "--uid", "1", "--gid", "1",
          "--chroot-base-dir", str(jails.base)],
         f"Failed to canonicalize path {missing}: No such file or directory (os error 2)"),
        (["--id", "a", "--exec-file", str(tmp_path / "bin"), "--uid", "1", "--gid", "1",
          "--chroot-base-dir", str(jails.base)], f"{tmp_path / 'bin'} is not a file"),
        (["--id", "a", "--exec-file", str(not_named), "--uid", "1", "--gid", "1",
          "--chroot-base-dir", str(jails.base)],
         'Invalid filename. The filename of `--exec-file` option must contain "firecracker": vmm-standin'),
        (["--id", "a", "--exec-file", str(link), "--uid", "1", "--gid", "1",
          "--chroot-base-dir", str(jails.base)],
         'Invalid filename. The filename of `--exec-file` option must contain "firecracker": vmm-standin'),
        (["--id", "a", "--exec-file", str(jails.exec_file), "--uid", "1", "--gid", "1",
          "--chroot-base-dir", str(tmp_path / "nobase")],
         f"Failed to canonicalize path {tmp_path / 'nobase'}: No such file or directory (os error 2)"),
        (["--id", "a", "--exec-file", str(jails.exec_file), "--uid", "1", "--gid", "1",
          "--chroot-base-dir", str(jails.exec_file)], f"{jails.exec_file} is not a directory"),
        (["--id", "a", "--exec-file", str(jails.exec_file), "--uid", "abc", "--gid", "1",
          "--chroot-base-dir", str(jails.base)], "Invalid uid: abc"),
        (["--id", "a", "--exec-file", str(jails.exec_file), "--uid", "1", "--gid", "-1",
          "--chroot-base-dir", str(jails.base)], "Invalid gid: -1"),
        (jails.args("a", "--parent-cgroup", "../up"),
         "Parent cgroup path is invalid. Path should not be absolute or contain '..' or '.'"),
        (jails.args("a", "--parent-cgroup", "/abs"),
         "Parent cgroup path is invalid. Path should not be absolute or contain '..' or '.'"),
        (jails.args("a", "--cgroup-version", "x"), "x is an invalid cgroup version specifier"),
        (jails.args("a", "--cgroup-version", "2", "--cgroup", "hugetlb.2MB.max"),
         "Invalid format for cgroups: hugetlb.2MB.max"),
        (jails.args("a", "--cgroup-version", "2", "--cgroup", "a.b=1=2"),
         "Invalid format for cgroups: a.b=1=2"),
        (jails.args("a", "--cgroup-version", "2", "--cgroup", "a.max="), "Invalid format for cgroups: a.max="),
        (jails.args("a", "--cgroup-version", "2", "--cgroup", "../hugetlb.x=1"),
         "Cgroup invalid file: ../hugetlb.x=1"),
        (jails.args("a", "--cgroup-version", "2", "--cgroup", "nodot=1"), "Cgroup invalid file: nodot"),
        (jails.args("a", "--cgroup-version", "2", "--cgroup", f"{unavailable}.max=1"),
         f"Controller {unavailable} is unavailable"),
        (jails.args("a", "--cgroup", "nosuchcontroller.max=1"),
         "Controller nosuchcontroller is unavailable"),
        (jails.args("a", "--resource-limit", "fsize"), "Invalid format for resources limits: fsize"),
        (jails.args("a", "--resource-limit", "fsize=abc"),
         "Invalid limit value for resource: abc: invalid digit found in string"),
        (jails.args("a", "--resource-limit", "no-file="),
         "Invalid limit value for resource: : cannot parse integer from empty string"),
        (jails.args("a", "--resource-limit", "cpu=10"), "Invalid resource argument: cpu"),
    ]
    for args, message in cases:
        r = run_jailer(*args)
        assert_aborted_with(r, message)
        assert_nothing_created(jails)


# -- a jail ------------------------------------------------------------------------

def test_jail_layout_process_identity_and_limits(jails, tmp_path):
    ident = "layout-1"
    root = jails.root(ident)
    # files the operator placed in the jail beforehand are kept
    root.mkdir(parents=True)
    (root / "kept.txt").write_text("mine")
    inherited_r, inherited_w = os.pipe()
    inherited_pipe = f"pipe:[{os.fstat(inherited_w).st_ino}]"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "FC_STANDIN_TEST_MARK": "kept",
           "SOME_OTHER_VARIABLE": "dropped"}
    try:
        p = jails.start(jails.args(ident, "--resource-limit", "fsize=123456789",
                                   "--resource-limit", "no-file=1024",
                                   "--", "--api-sock", "/run/firecracker.socket", "--level", "Debug"),
                        env=env, pass_fds=(inherited_w,))
        jails.wait_api(p, root / "run" / "firecracker.socket")
    finally:
        os.close(inherited_r)
        os.close(inherited_w)
    pid = p.pid
    assert p.popen.poll() is None

    # the layout
    assert (root / "kept.txt").read_text() == "mine"
    copy = root / "firecracker"
    assert copy.read_bytes() == jails.exec_file.read_bytes()
    assert stat.S_IMODE(copy.stat().st_mode) == stat.S_IMODE(jails.exec_file.stat().st_mode)
    expected_nodes = {"dev/net/tun": (10, 200), "dev/kvm": (10, 232), "dev/urandom": (1, 9)}
    minor = userfaultfd_minor()
    if minor is not None:
        expected_nodes["dev/userfaultfd"] = (10, minor)
    nodes = {str(f.relative_to(root)) for f in root.rglob("*") if f.is_char_device()}
    assert nodes == set(expected_nodes)
    for rel, (major, minor_) in expected_nodes.items():
        st = (root / rel).lstat()
        assert stat.S_ISCHR(st.st_mode), rel
        assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == (major, minor_), rel
        assert stat.S_IMODE(st.st_mode) == 0o600, rel
        assert (st.st_uid, st.st_gid) == (UID, GID), rel
    for rel in (".", "dev", "dev/net", "run"):
        st = (root / rel).stat()
        assert stat.S_IMODE(st.st_mode) == 0o700, rel
        assert (st.st_uid, st.st_gid) == (UID, GID), rel
    assert (root / "firecracker.pid").read_text() == str(pid)

    # exec without fork: the VMM has the jailer's PID, the dropped ids and the limits
    status = proc_status(pid)
    assert status["Uid"].split() == [str(UID)] * 4
    assert status["Gid"].split() == [str(GID)] * 4
    assert status["Groups"] == ""
    limits = proc_limits(pid)
    assert limits["Max open files"] == ("1024", "1024")
    assert limits["Max file size"] == ("123456789", "123456789")
    assert os.readlink(f"/proc/{pid}/cwd") == str(root)
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        cmdline = f.read().decode().split("\0")[:-1]
    args = cmdline[cmdline.index("/proc/self/cwd/firecracker") + 1:]
    assert args[:2] == ["--id", ident]
    assert args[2] == "--start-time-us" and args[3].isdigit()
    assert args[4:6] == ["--start-time-cpu-us", "0"]
    assert args[6] == "--parent-cpu-time-us" and args[7].isdigit()
    assert args[8:] == ["--api-sock", "/run/firecracker.socket", "--level", "Debug"]
    with open(f"/proc/{pid}/environ", "rb") as f:
        environ = dict(kv.split("=", 1) for kv in f.read().decode().split("\0") if kv)
    assert environ == {JAIL_ROOT_ENV: str(root), "FC_STANDIN_TEST_MARK": "kept"}
    # inherited descriptors are closed
    fd_targets = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    assert inherited_pipe not in fd_targets, fd_targets
    # what the VMM writes belongs to the dropped uid
    sock = (root / "run" / "firecracker.socket").lstat()
    assert stat.S_ISSOCK(sock.st_mode) and (sock.st_uid, sock.st_gid) == (UID, GID)
    status_code, body = api(root / "run" / "firecracker.socket", "GET", "/")
    assert status_code == 200 and body["id"] == ident


def test_default_resource_limits_and_umask_independent_nodes(jails):
    ident = "defaults-1"
    root = jails.root(ident)
    old_umask = os.umask(0o077)
    try:
        p = jails.start(jails.args(ident))
    finally:
        os.umask(old_umask)
    jails.wait_api(p, root / "run" / "firecracker.socket")
    limits = proc_limits(p.pid)
    assert limits["Max open files"] == ("2048", "2048")
    with open("/proc/self/limits") as f:
        own_fsize = next(l for l in f if l.startswith("Max file size")).split()[3:5]
    assert list(limits["Max file size"]) == own_fsize       # not set without --resource-limit
    assert stat.S_IMODE((root / "dev/net/tun").lstat().st_mode) == 0o600


def test_rerunning_in_an_existing_jail_fails_on_mknod_like_the_jailer(jails):
    ident = "rerun-1"
    first = jails.start(jails.args(ident))
    jails.wait_api(first, jails.root(ident) / "run" / "firecracker.socket")
    kill_pid(first.pid)
    first.popen.wait(10)
    r = run_jailer(*jails.args(ident))
    assert_aborted_with(r, "Failed to create /dev/net/tun via mknod inside the jail: File exists (os error 17)")


def test_netns_is_joined(jails_in_netns):
    jails, netns_name = jails_in_netns
    ident = "netns-1"
    netns_file = Path("/run/netns") / netns_name
    p = jails.start(jails.args(ident, "--netns", str(netns_file)))
    jails.wait_api(p, jails.root(ident) / "run" / "firecracker.socket")
    assert os.stat(f"/proc/{p.pid}/ns/net").st_ino == netns_file.stat().st_ino
    assert os.stat(f"/proc/{p.pid}/ns/net").st_ino != os.stat("/proc/self/ns/net").st_ino


@pytest.fixture
def jails_in_netns(netns, tmp_path) -> Iterator[tuple[Jails, str]]:
    # requested after `netns`, so the processes stop before the namespace goes
    if os.geteuid() != 0:
        pytest.fail("the jailer tests need root")
    j = Jails(tmp_path)
    yield j, netns
    j.cleanup()


def test_a_missing_netns_aborts(jails, tmp_path):
    missing = tmp_path / "no-such-netns"
    r = run_jailer(*jails.args("netns-2", "--netns", str(missing)))
    assert_aborted_with(r, f"Failed to open file {missing}: No such file or directory (os error 2)")


@pytest.fixture
def subtree_control_restored() -> Iterator[None]:
    """The jailer enables controllers in the hierarchy root's
    cgroup.subtree_control; put it back as it was."""
    control = cgroup2_mount() / "cgroup.subtree_control"
    before = set(control.read_text().split())
    yield
    for controller in set(control.read_text().split()) - before:
        try:
            control.write_text(f"-{controller}\n")
        except OSError as err:
            if err.errno != errno.EBUSY:    # still used by someone else's cgroup
                raise


def test_cgroup_v2(subtree_control_restored, jails):
    mount = cgroup2_mount()
    assert "hugetlb" in (mount / "cgroup.controllers").read_text().split(), \
        "this test needs the hugetlb controller in the cgroup2 hierarchy"
    ident = "cg2-1"
    parent = f"jailer-standin-test-{secrets.token_hex(3)}"
    cgroup = mount / parent / ident
    jails.cgroup_dirs += [cgroup, mount / parent]
    max_file = hugetlb_max_file()
    value = str(2 * 1024 * 1024 * 1024)
    p = jails.start(jails.args(ident, "--cgroup-version", "2", "--parent-cgroup", parent,
                               "--cgroup", f"{max_file}={value}"))
    jails.wait_api(p, jails.root(ident) / "run" / "firecracker.socket")
    assert (cgroup / max_file).read_text().strip() == value
    assert str(p.pid) in (cgroup / "cgroup.procs").read_text().split()
    assert "hugetlb" in (mount / parent / "cgroup.subtree_control").read_text().split()
    with open(f"/proc/{p.pid}/cgroup") as f:
        assert f"0::/{parent}/{ident}\n" in f.read()


def test_cgroup_v2_without_cgroup_flags_moves_into_an_existing_parent(jails):
    mount = cgroup2_mount()
    parent = mount / f"jailer-standin-test-{secrets.token_hex(3)}"
    parent.mkdir()
    jails.cgroup_dirs.append(parent)
    ident = "cg2-2"
    p = jails.start(jails.args(ident, "--cgroup-version", "2", "--parent-cgroup", parent.name))
    jails.wait_api(p, jails.root(ident) / "run" / "firecracker.socket")
    assert str(p.pid) in (parent / "cgroup.procs").read_text().split()
    assert not (parent / ident).exists()


def test_cgroup_v1(jails):
    mounts = [m for fstype, m, opts in cgroup_mounts() if fstype == "cgroup" and "pids" in opts.split(",")]
    assert mounts, "this test needs the cgroup v1 pids hierarchy"
    hierarchy = Path(mounts[0])
    ident = "cg1-1"
    parent = f"jailer-standin-test-{secrets.token_hex(3)}"
    jails.cgroup_dirs += [hierarchy / parent / ident, hierarchy / parent]
    p = jails.start(jails.args(ident, "--parent-cgroup", parent, "--cgroup", "pids.max=4242"))
    jails.wait_api(p, jails.root(ident) / "run" / "firecracker.socket")
    cgroup = hierarchy / parent / ident
    assert (cgroup / "pids.max").read_text().strip() == "4242"
    assert str(p.pid) in (cgroup / "tasks").read_text().split()


def test_daemonize(jails):
    ident = "daemon-1"
    p = jails.start(jails.args(ident, "--daemonize"))
    assert p.popen.wait(15) == 0
    pid = jails.track_pid_file(ident)
    assert pid != p.pid
    jails.wait_api(p, jails.root(ident) / "run" / "firecracker.socket", vmm_pid=pid)
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    session = int(fields[3])
    assert session != os.getsid(0) and session != pid      # new session, not its leader
    for fd in (0, 1, 2):
        assert os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/null"
    assert proc_status(pid)["Uid"].split() == [str(UID)] * 4


def test_new_pid_ns(jails):
    ident = "pidns-1"
    p = jails.start(jails.args(ident, "--new-pid-ns"))
    assert p.popen.wait(15) == 0
    pid = jails.track_pid_file(ident)
    jails.wait_api(p, jails.root(ident) / "run" / "firecracker.socket", vmm_pid=pid)
    # PID 1 of its own PID namespace
    assert proc_status(pid)["NSpid"].split() == [str(pid), "1"]
    assert os.stat(f"/proc/{pid}/ns/pid").st_ino != os.stat("/proc/self/ns/pid").st_ino


# -- the jailed VMM sees the jail's paths ------------------------------------------

def test_jailed_api_uses_paths_inside_the_jail(jails, tmp_path):
    ident = "e2e-1"
    root = jails.root(ident)
    p = jails.start(jails.args(ident, "--", "--api-sock", "/run/firecracker.socket"))
    sock = root / "run" / "firecracker.socket"
    jails.wait_api(p, sock)
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"not really a kernel")
    kernel.chmod(0o644)
    os.link(kernel, root / "vmlinux")
    disk = root / "rootfs.ext4"
    disk.write_bytes(b"\0" * 4096)
    os.chown(disk, UID, GID)
    log = root / "fc.log"
    log.write_text("")
    os.chown(log, UID, GID)

    assert api(sock, "PUT", "/boot-source", {"kernel_image_path": "/vmlinux",
                                             "boot_args": "console=ttyS0"}) == (204, None)
    assert api(sock, "PUT", "/drives/rootfs", {"drive_id": "rootfs", "path_on_host": "/rootfs.ext4",
                                               "is_root_device": True, "is_read_only": False}) == (204, None)
    # relative paths start at the jail root, as with chroot
    assert api(sock, "PUT", "/logger", {"log_path": "fc.log", "level": "Info"}) == (204, None)
    assert api(sock, "PUT", "/vsock", {"guest_cid": 3, "uds_path": "/run/v.sock"}) == (204, None)
    status, config = api(sock, "GET", "/vm/config")
    assert status == 200
    assert config["boot-source"]["kernel_image_path"] == "/vmlinux"
    assert config["drives"][0]["path_on_host"] == "/rootfs.ext4"
    assert config["vsock"]["uds_path"] == "/run/v.sock"
    vsock = (root / "run" / "v.sock").lstat()
    assert stat.S_ISSOCK(vsock.st_mode) and (vsock.st_uid, vsock.st_gid) == (UID, GID)
    wait_for(lambda: "The API server received a Get request on \"/vm/config\"" in log.read_text(),
             10, "the API log line in the jail's log file")
    # an absolute symlink target inside the jail is taken from the jail root
    (root / "kernel-link").symlink_to("/vmlinux")
    assert api(sock, "PUT", "/boot-source", {"kernel_image_path": "/kernel-link"}) == (204, None)


def test_command_line_paths_are_inside_the_jail(jails):
    ident = "cli-1"
    root = jails.root(ident)
    root.mkdir(parents=True)
    for name, content in (("fc.log", ""), ("metrics.json", ""), ("mmds.json", '{"latest": {"a": 1}}')):
        (root / name).write_text(content)
        os.chown(root / name, UID, GID)
    p = jails.start(jails.args(ident, "--", "--log-path", "/fc.log", "--metrics-path", "metrics.json",
                               "--metadata", "/../mmds.json"))
    sock = root / "run" / "firecracker.socket"
    jails.wait_api(p, sock)
    assert api(sock, "GET", "/mmds") == (200, {"latest": {"a": 1}})
    assert "Running fc-standin" in (root / "fc.log").read_text()
    assert p.output() == ""     # the log went to the jail's file, not to stdout
    assert api(sock, "PUT", "/metrics", {"metrics_path": "/metrics.json"})[0] == 400   # already set


def test_paths_cannot_escape_the_jail(jails):
    ident = "escape-1"
    root = jails.root(ident)
    p = jails.start(jails.args(ident))
    sock = root / "run" / "firecracker.socket"
    jails.wait_api(p, sock)
    assert Path("/etc/passwd").is_file()
    (root / "hostetc").symlink_to("/etc")
    (root / "up").symlink_to("../../../../../../../../etc")
    (root / "loop").symlink_to("loop")
    enoent = "No such file or directory (os error 2)"
    for escaping in ("../../etc/passwd", "/../../../etc/passwd", "/hostetc/passwd", "/up/passwd",
                     "hostetc/../../etc/passwd"):
        status, body = api(sock, "PUT", "/boot-source", {"kernel_image_path": escaping})
        assert (status, body) == (400, {"fault_message": "Boot source error: The kernel file cannot "
                                                         "be opened: " + enoent}), escaping
        status, body = api(sock, "PUT", "/drives/d1", {"drive_id": "d1", "path_on_host": escaping,
                                                       "is_root_device": False, "is_read_only": True})
        assert status == 400 and enoent in body["fault_message"] and escaping in body["fault_message"]
        status, body = api(sock, "PUT", "/logger", {"log_path": escaping})
        assert status == 400 and enoent in body["fault_message"], body
    status, body = api(sock, "PUT", "/boot-source", {"kernel_image_path": "/loop"})
    assert (status, body) == (400, {"fault_message": "Boot source error: The kernel file cannot be "
                                                     "opened: Too many levels of symbolic links (os error 40)"})
    # a file at the same place inside the jail is what the VMM gets
    (root / "etc").mkdir()
    (root / "etc" / "passwd").write_text("jail's own")
    assert api(sock, "PUT", "/boot-source", {"kernel_image_path": "/hostetc/passwd"}) == (204, None)


def test_jailed_guest_boots_writes_its_disk_and_snapshots_inside_the_jail(jails, guest, tmp_path):
    ident = "boot-1"
    root = jails.root(ident)
    p = jails.start(jails.args(ident))
    sock = root / "run" / "firecracker.socket"
    jails.wait_api(p, sock)
    for src, name in ((guest.bzimage, "vmlinuz"), (guest.initrd, "initrd.cpio")):
        os.link(src, root / name)
        assert os.stat(root / name).st_mode & 0o004, f"{name} must be readable by the jail's uid"
    for name in ("root.img", "data.img"):
        with open(root / name, "wb") as f:
            f.truncate(1 << 20)
        os.chmod(root / name, 0o644)
    data = root / "data.img"
    os.chown(data, UID, GID)
    source = guest.boot_source("tick")
    source.update(kernel_image_path="/vmlinuz", initrd_path="/initrd.cpio")
    assert api(sock, "PUT", "/boot-source", source) == (204, None)
    assert api(sock, "PUT", "/drives/rootfs", {"drive_id": "rootfs", "path_on_host": "/root.img",
                                               "is_root_device": True, "is_read_only": True}) == (204, None)
    assert api(sock, "PUT", "/drives/data", {"drive_id": "data", "path_on_host": "/data.img",
                                             "is_root_device": False, "is_read_only": False}) == (204, None)
    assert api(sock, "PUT", "/actions", {"action_type": "InstanceStart"}) == (204, None)
    qemu = wait_for(lambda: children_of(p.pid), 10, "QEMU")
    assert all(proc_status(q)["Uid"].split() == [str(UID)] * 4 for q in qemu)
    wait_for(lambda: "FCSI-TICK 2" in p.output(), 60, "the guest ticking on the console")
    # QEMU writes the drive inside the jail
    wait_for(lambda: re.match(rb"FCSI-DISK-TICK (\d{8})", data.read_bytes()[:32]), 20,
             "the guest writing /data.img in the jail")
    assert api(sock, "PATCH", "/vm", {"state": "Paused"}) == (204, None)
    assert api(sock, "PUT", "/snapshot/create", {"snapshot_path": "/vm.snap",
                                                 "mem_file_path": "vm.mem"}) == (204, None)
    for name in ("vm.snap", "vm.mem"):
        st = (root / name).stat()
        assert st.st_size > 0 and (st.st_uid, st.st_gid) == (UID, GID), name
    assert api(sock, "PATCH", "/vm", {"state": "Resumed"}) == (204, None)
    assert api(sock, "PUT", "/actions", {"action_type": "SendCtrlAltDel"}) == (204, None)
    assert p.popen.wait(60) == 0, p.output()
    assert "FCSI-CTRL-ALT-DEL" in p.output()

"""Helpers for fc-standin's tests (processes, API client, guest image building).

Kept out of conftest.py under a unique module name so that test modules can
import them without depending on which `conftest` module pytest loaded last.
"""
from __future__ import annotations

import glob
import http.client
import importlib.machinery
import importlib.util
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
STANDIN = REPO / "standin" / "fc-standin"
JAILER = REPO / "standin" / "jailer-standin"
DATA = HERE / "data"


# -- helpers ----------------------------------------------------------------

def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``condition`` until it returns a truthy value; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value: {last!r}")


def load_standin_module():
    """Import standin/fc-standin (a script without .py suffix) as a module."""
    loader = importlib.machinery.SourceFileLoader("fc_standin", str(STANDIN))
    spec = importlib.util.spec_from_loader("fc_standin", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 60.0):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


class Response:
    def __init__(self, status: int, body: bytes, headers: dict[str, str]):
        self.status = status
        self.raw = body
        self.headers = headers

    @property
    def json(self) -> Any:
        return json.loads(self.raw) if self.raw else None

    @property
    def fault(self) -> str:
        return self.json["fault_message"]

    def __repr__(self) -> str:
        return f"Response({self.status}, {self.raw!r})"


def children_of(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc/PID/task/*/children)."""
    kids: list[int] = []
    for path in glob.glob(f"/proc/{pid}/task/*/children"):
        try:
            with open(path) as f:
                kids += [int(x) for x in f.read().split()]
        except OSError:
            pass
    return kids


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except (OSError, IndexError):
        return False


def kill_pid(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class StandinProcess:
    """One fc-standin process (its stdout/stderr go to files)."""

    def __init__(self, workdir: Path, args: list[str], netns: str | None = None,
                 env: dict[str, str] | None = None, use_shebang: bool = False):
        self.workdir = workdir
        self.stdout_path = workdir / f"standin-{secrets.token_hex(3)}.out"
        self.stderr_path = self.stdout_path.with_suffix(".err")
        # FC_STANDIN_PYTHON runs the stand-in under another interpreter (it
        # must work on Python >= 3.9, e.g. a Debian 11 lab host).
        python = os.environ.get("FC_STANDIN_PYTHON", sys.executable)
        cmd = [str(STANDIN)] if use_shebang else [python, str(STANDIN)]
        cmd += args
        if netns:
            cmd = ["ip", "netns", "exec", netns] + cmd
        full_env = dict(os.environ)
        full_env.update(env or {})
        self._out = open(self.stdout_path, "wb")
        self._err = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._out, stderr=self._err,
                                     stdin=subprocess.DEVNULL, cwd=workdir, env=full_env)
        self.pid = self.proc.pid
        self.known_children: set[int] = set()
        self.api_sock: str | None = None
        if "--api-sock" in args:
            self.api_sock = args[args.index("--api-sock") + 1]

    # process state
    def poll(self) -> int | None:
        self.remember_children()
        return self.proc.poll()

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.remember_children()
            rc = self.proc.poll()
            if rc is not None:
                return rc
            time.sleep(0.05)
        raise AssertionError(f"fc-standin (pid {self.pid}) still running after {timeout}s; "
                             f"output tail: {self.output()[-2000:]}")

    def remember_children(self) -> None:
        if self.proc.poll() is None:
            self.known_children.update(children_of(self.pid))

    def output(self) -> str:
        self._out.flush()
        return self.stdout_path.read_text(errors="replace")

    def errors(self) -> str:
        self._err.flush()
        return self.stderr_path.read_text(errors="replace")

    def wait_output(self, text: str, timeout: float, count: int = 1) -> str:
        return wait_for(lambda: self.output().count(text) >= count and self.output(),
                        timeout, f"{text!r} x{count} on fc-standin's stdout")

    def wait_socket(self, timeout: float = 10.0) -> None:
        assert self.api_sock
        wait_for(lambda: os.path.exists(self.api_sock) or self.proc.poll() is not None,
                 timeout, "the API socket")
        if not os.path.exists(self.api_sock):
            raise AssertionError(f"fc-standin exited ({self.proc.returncode}) before creating "
                                 f"its socket: {self.output()} {self.errors()}")

    def qemu_pids(self) -> list[int]:
        self.remember_children()
        return [p for p in self.known_children if pid_alive(p)]

    # API
    def request(self, method: str, path: str, body: Any = None, raw: bytes | None = None,
                timeout: float = 120.0) -> Response:
        assert self.api_sock
        conn = _UnixHTTPConnection(self.api_sock, timeout=timeout)
        headers = {}
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
        if data is not None:
            headers["Content-Type"] = "application/json"
        try:
            conn.request(method, path, body=data, headers=headers)
            r = conn.getresponse()
            resp = Response(r.status, r.read(), {k.lower(): v for k, v in r.getheaders()})
        finally:
            conn.close()
        self.remember_children()
        return resp

    def get(self, path: str) -> Response:
        return self.request("GET", path)

    def put(self, path: str, body: Any = None, raw: bytes | None = None) -> Response:
        return self.request("PUT", path, body, raw)

    def patch(self, path: str, body: Any = None, raw: bytes | None = None) -> Response:
        return self.request("PATCH", path, body, raw)

    def ok(self, method: str, path: str, body: Any = None) -> Response:
        r = self.request(method, path, body)
        assert r.status in (200, 204), f"{method} {path} -> {r!r}"
        return r

    # teardown
    def stop(self) -> None:
        self.remember_children()
        victims = set(self.known_children)
        if self.proc.poll() is None:
            kill_pid(self.pid)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        for pid in victims:
            if pid_alive(pid):
                kill_pid(pid)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(pid_alive(p) for p in victims):
            time.sleep(0.05)
        self._out.close()
        self._err.close()


# -- guest artifacts -----------------------------------------------------------

GUEST_INIT = r"""#!/bin/busybox sh
# fc-standin test guest: behaviour chosen with fcsi.mode= on the kernel command line.
B=/bin/busybox
$B mount -t proc proc /proc
$B mount -t sysfs sys /sys
$B mount -t devtmpfs dev /dev
for m in virtio_ring virtio virtio_mmio virtio_blk failover net_failover virtio_net; do
    $B insmod /lib/fcsi/$m.ko 2>/dev/null
done
arg() { for kv in $($B cat /proc/cmdline); do case "$kv" in "$1"=*) echo "${kv#*=}";; esac; done; }
mode=$(arg fcsi.mode)
echo "FCSI-BOOTED mode=$mode"
case "$mode" in
  poweroff)
    $B poweroff -f ;;
  reboot)
    $B reboot -f ;;
  disks)
    $B sleep 0.2
    for d in /sys/block/vd*; do
      n=${d##*/}
      echo "FCSI-DISK $n size=$($B cat $d/size) ro=$($B cat $d/ro) head=$($B head -c 12 /dev/$n)"
    done
    echo "FCSI-CMDLINE $($B cat /proc/cmdline)"
    $B poweroff -f ;;
  tick)
    # like systemd: ctrl-alt-del is delivered to init as SIGINT
    echo 0 > /proc/sys/kernel/ctrl-alt-del
    trap 'echo FCSI-CTRL-ALT-DEL; $B sync; $B reboot -f' INT
    i=0
    while true; do
      i=$((i+1))
      echo "FCSI-TICK $i"
      if [ -b /dev/vdb ]; then
        printf 'FCSI-DISK-TICK %08d\n' $i | $B dd of=/dev/vdb bs=512 count=1 conv=sync,fsync 2>/dev/null
      fi
      $B sleep 1 &
      wait $!
    done ;;
  net)
    ip=$(arg fcsi.ip); gw=$(arg fcsi.gw)
    $B ip link set lo up
    $B ip addr add "$ip" dev eth0
    $B ip link set eth0 up
    echo "FCSI-MAC $($B cat /sys/class/net/eth0/address)"
    if $B ping -c 3 -W 5 "$gw" >/dev/null 2>&1; then echo FCSI-PING-OK; else echo FCSI-PING-FAIL; fi
    $B poweroff -f ;;
  *)
    echo "FCSI-UNKNOWN-MODE"; $B poweroff -f ;;
esac
"""


def _cpio_newc(entries: list[tuple[str, int, bytes]]) -> bytes:
    out = bytearray()
    for ino, (name, mode, data) in enumerate(entries + [("TRAILER!!!", 0, b"")], start=1):
        nb = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(nb), 0)
        out += b"070701" + "".join("%08X" % v for v in fields).encode() + nb
        out += b"\0" * (-len(out) % 4)
        out += data
        out += b"\0" * (-len(out) % 4)
    return bytes(out)


class GuestArtifacts:
    def __init__(self, kernel_bzimage: Path, vmlinux: Path, initrd: Path):
        self.bzimage = kernel_bzimage
        self.vmlinux = vmlinux
        self.initrd = initrd

    def boot_source(self, mode: str, extra: str = "", elf: bool = False) -> dict:
        return {"kernel_image_path": str(self.vmlinux if elf else self.bzimage),
                "initrd_path": str(self.initrd),
                "boot_args": f"console=ttyS0 reboot=k panic=1 i8042.noaux i8042.nomux "
                             f"i8042.nopnp i8042.dumbkbd fcsi.mode={mode} {extra}".strip()}


def _apt_download(names: list[str], dest: Path) -> None:
    cmd = ["apt-get", "download", "-o", "APT::Sandbox::User=root"] + names
    r = subprocess.run(cmd, cwd=dest, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, text=True, check=False)
        r = subprocess.run(cmd, cwd=dest, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        pytest.fail(f"apt-get download {names} failed: {r.stderr}")

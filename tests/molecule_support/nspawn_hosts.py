"""Debian bookworm hosts booted with systemd-nspawn, reached over real SSH: the test "VPS" fleet.

Used by the Molecule scenarios in extensions/molecule/ (their shared create.yml and destroy.yml); usable
from pytest as well. As root:

  python3 nspawn_hosts.py build --cache DIR     the host tree, built once per content digest (path printed)
  python3 nspawn_hosts.py up --state DIR --cache DIR --hosts JSON
                                                boot the hosts at once, wait for their sshd, print JSON
  python3 nspawn_hosts.py reboot --state DIR --host NAME
                                                after `systemctl reboot` inside NAME: wait for it to go
                                                down, boot the same host again, wait for its sshd
  python3 nspawn_hosts.py down --state DIR      stop and remove everything `up` recorded (repeatable)
  python3 nspawn_hosts.py proxy --netns NAME HOST PORT
                                                ssh ProxyCommand: TCP to HOST:PORT made inside NAME

Shape of one run (nothing is configured in the machine's root network namespace, nothing mounted in its
mount namespace):

  fabric   network namespace mfc-<run>-fabric with the bridge fabric0 (198.18.100.1/24) and nothing else.
  host     systemd-nspawn --register=no --keep-unit --boot, systemd as PID 1, on an overlay of the cached
           tree (read-only lower) and the host's own upper directory. The overlay is mounted in a private
           mount namespace that only nspawn (and so the container) sees, and ends with it. nspawn runs in
           cgroups of its own (see start_host) and inside the fabric namespace, with --private-network
           --network-veth --network-bridge=fabric0: the host gets a network namespace of its own (gone
           with the container), CAP_NET_ADMIN and a writable /proc/sys/net, like a VPS. Its end of the
           veth, host0, gets 198.18.100.1x/24 from systemd-networkd (10-host0.network, written per host).
           /dev/net/tun is bound in for the VMs' TAPs.
  ssh      ssh -F <state>/ssh_config HOST. The ProxyCommand runs `proxy`, which enters the fabric namespace
           and connects to HOST:22; the host key must match <state>/known_hosts (keys generated per host
           here), and root logs in with the run's key only.

Everything `up` creates is recorded in <state>/state.json *before* it is created, so `down` can undo a
partial `up`. Processes are stopped by their PID; every wait polls with a deadline.
"""
from __future__ import annotations

import argparse
import ctypes
import errno
import fcntl
import glob
import hashlib
import inspect
import ipaddress
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

SUITE = "bookworm"
VARIANT = "apt"
# What a Firecracker host of this collection needs, plus sshd and Python for Ansible. qemu-system-x86
# is there because the Firecracker stand-in boots guests with QEMU TCG inside the host.
PACKAGES = (
    "systemd", "systemd-sysv", "dbus", "openssh-server", "python3", "iproute2", "nftables", "iptables",
    "dnsmasq-base", "dnsmasq-utils", "e2fsprogs", "qemu-system-x86", "procps", "busybox", "kmod",
    "util-linux",
)
FABRIC_CIDR = "198.18.100.1/24"
FIRST_HOST_OFFSET = 11          # hosts get .11, .12, ... unless a platform names its address
SSH_DEADLINE = 120.0            # boot to sshd answering
STOP_DEADLINE = 30.0            # orderly shutdown (SIGTERM to nspawn = SIGRTMIN+3 to the container's systemd)
KILL_DEADLINE = 10.0
CLONE_NEWNET = 0x40000000
CLONE_NEWNS = 0x00020000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,30}$")


class HostError(Exception):
    """A host could not be built, booted, reached or removed; the message says which and why."""


# --- small utilities -----------------------------------------------------------------------------------

def log(message: str) -> None:
    print(f"nspawn_hosts: {message}", file=sys.stderr, flush=True)


def run(*argv: str, check: bool = True, quiet: bool = False) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise HostError(f"{' '.join(argv)}: exit {proc.returncode}: {(proc.stderr or proc.stdout).strip()}")
    if not quiet and proc.returncode != 0:
        log(f"{' '.join(argv)}: exit {proc.returncode}: {(proc.stderr or proc.stdout).strip()}")
    return proc


def wait_until(condition: Callable[[], Any], deadline: float, interval: float = 0.05) -> Any:
    """Poll ``condition`` until truthy or ``deadline`` (time.monotonic()) passes; return its last value."""
    while True:
        value = condition()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def pid_alive(pid: Optional[int]) -> bool:
    """A live process; a zombie counts as gone."""
    if not pid:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(errors="replace")
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def atomic_write(path: Path, text: str, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def setns(fd: int) -> None:
    """Move the calling thread into the network namespace open at ``fd``."""
    if hasattr(os, "setns"):
        os.setns(fd, CLONE_NEWNET)  # Python >= 3.12
        return
    if _libc().setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def netns_socket(netns: str, family: int = socket.AF_INET) -> socket.socket:
    """A TCP socket created inside the named network namespace (it stays there after we return)."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        setns(target)
        try:
            return socket.socket(family, socket.SOCK_STREAM)
        finally:
            setns(own)
    finally:
        os.close(target)
        os.close(own)


# --- apt sources of this machine (never a hard-coded mirror) -------------------------------------------

def host_apt_sources() -> list[tuple[str, str, tuple[str, ...]]]:
    """(uri, suite, components) of every ``deb`` entry apt on this machine uses, in apt's order."""
    found: list[tuple[str, str, tuple[str, ...]]] = []
    files = ["/etc/apt/sources.list"] + sorted(glob.glob("/etc/apt/sources.list.d/*.list")
                                               + glob.glob("/etc/apt/sources.list.d/*.sources"))
    for name in files:
        try:
            text = Path(name).read_text()
        except OSError:
            continue
        if name.endswith(".sources"):
            for stanza in re.split(r"\n\s*\n", text):
                fields: dict[str, str] = {}
                key = None
                for line in stanza.splitlines():
                    if line.startswith("#") or not line.strip():
                        continue
                    if line[0].isspace() and key:
                        fields[key] += " " + line.strip()
                        continue
                    key, _sep, value = line.partition(":")
                    key = key.strip().lower()
                    fields[key] = value.strip()
                if fields.get("enabled", "yes").lower() in ("no", "false", "0"):
                    continue
                if "deb" not in fields.get("types", "").split():
                    continue
                for uri in fields.get("uris", "").split():
                    for suite in fields.get("suites", "").split():
                        found.append((uri, suite, tuple(fields.get("components", "").split())))
        else:
            for raw in text.splitlines():
                line = re.sub(r"^(deb(?:-src)?)\s+\[[^\]]*\]", r"\1 ", raw.split("#", 1)[0].strip())
                words = line.split()
                if len(words) >= 3 and words[0] == "deb":
                    found.append((words[1], words[2], tuple(words[3:])))
    return found


def mirror_lines(suite: str = SUITE) -> list[str]:
    """One-line apt sources for SUITE, SUITE-updates and SUITE-security from this machine's apt sources."""
    lines = []
    for wanted in (suite, f"{suite}-updates", f"{suite}-security"):
        for uri, entry_suite, _components in host_apt_sources():
            if entry_suite == wanted:
                lines.append(f"deb {uri} {wanted} main")
                break
    if not lines or not lines[0].endswith(f" {suite} main"):
        raise HostError(f"this machine's apt sources name no mirror for {suite}: add one to /etc/apt/sources.list.d")
    return lines


# --- the host tree -------------------------------------------------------------------------------------

SSHD_CONFIG = """\
# Test host (microvm.firecracker Molecule scenarios): root logs in with the run's key only.
HostKey /etc/ssh/ssh_host_ed25519_key
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UseDNS no
"""


def customize_tree(root: Path) -> None:
    """Turn the bootstrapped tree into a host template: no identity of its own (hostname, machine-id
    and host keys are per host), sshd for root with keys only, nothing that reaches for the internet."""
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    (root / "etc/ssh/sshd_config.d").mkdir(exist_ok=True)
    (root / "etc/ssh/sshd_config.d/50-microvm-test.conf").write_text(SSHD_CONFIG)
    (root / "etc/machine-id").write_text("")
    (root / "etc/hostname").write_text("localhost\n")
    resolv = root / "etc/resolv.conf"
    if resolv.is_symlink() or resolv.exists():
        resolv.unlink()
    resolv.write_text("# test host: no resolver (no route out of the test network)\n")
    # Timers that would reach for the network or churn the disk during a test.
    wants = root / "etc/systemd/system/timers.target.wants"
    for timer in ("apt-daily.timer", "apt-daily-upgrade.timer", "dpkg-db-backup.timer", "e2scrub_all.timer",
                  "fstrim.timer"):
        (wants / timer).unlink(missing_ok=True)
    # The container's only console is nspawn's output; no getty to wait on it.
    (root / "etc/systemd/system/console-getty.service").symlink_to("/dev/null")
    root_ssh = root / "root/.ssh"
    root_ssh.mkdir(mode=0o700, exist_ok=True)
    # The host configures its own address at boot (the network file is written per host).
    run("systemctl", f"--root={root}", "enable", "systemd-networkd.service")


def tree_digest(mirrors: list[str]) -> str:
    recipe = {
        "suite": SUITE, "variant": VARIANT, "packages": sorted(PACKAGES), "mirrors": mirrors,
        "customize": inspect.getsource(customize_tree), "sshd": SSHD_CONFIG,
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def build_tree(cache: Path) -> Path:
    """The host tree for the current recipe, built once (cached by its digest) under ``cache``/hosts."""
    mirrors = mirror_lines()
    digest = tree_digest(mirrors)
    base = cache / "hosts"
    tree = base / f"bookworm-{digest}"
    if (tree / ".complete").exists():
        return tree
    base.mkdir(parents=True, exist_ok=True)
    with open(base / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another run may be building the same tree
        if (tree / ".complete").exists():
            return tree
        work = Path(tempfile.mkdtemp(prefix=f".build-{digest}-", dir=base))
        try:
            rootfs = work / "rootfs"
            started = time.monotonic()
            log(f"building the host tree {tree.name} (mmdebstrap {SUITE}, {len(PACKAGES)} packages)")
            proc = subprocess.run(
                ["mmdebstrap", f"--variant={VARIANT}", "--include=" + ",".join(PACKAGES),
                 SUITE, str(rootfs), *mirrors],
                capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise HostError(f"mmdebstrap failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
            customize_tree(rootfs)
            (work / ".complete").write_text(json.dumps({"mirrors": mirrors, "packages": PACKAGES}) + "\n")
            os.rename(work, tree)
            log(f"host tree built in {time.monotonic() - started:.1f} s")
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        # Trees of older recipes go, unless a running host still has one as its overlay's lower layer.
        for other in base.glob("bookworm-*"):
            if other != tree and not tree_in_use(other):
                shutil.rmtree(other, ignore_errors=True)
    return tree


def tree_in_use(tree: Path) -> bool:
    """Whether any process's mount namespace has an overlay with this tree as a lower layer (the hosts'
    overlays are only visible in their nspawn's own mount namespace)."""
    needle = f"lowerdir={tree / 'rootfs'}"
    for mountinfo in glob.glob("/proc/[0-9]*/mountinfo"):
        try:
            if needle in Path(mountinfo).read_text(errors="replace"):
                return True
        except OSError:
            continue
    return False


# --- the run's state -----------------------------------------------------------------------------------

class State:
    """<state>/state.json: every resource of the run, recorded before it is created."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory.resolve()
        self.file = self.dir / "state.json"
        run_id = hashlib.sha256(str(self.dir).encode()).hexdigest()[:6]
        self.data: dict[str, Any] = {"run": run_id, "fabric": None, "hosts": {}}
        if self.file.exists():
            self.data = json.loads(self.file.read_text())

    @property
    def run_id(self) -> str:
        return self.data["run"]

    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write(self.file, json.dumps(self.data, indent=2, sort_keys=True) + "\n", 0o600)


def cgroup_roots() -> list[Path]:
    """The cgroup directories this process is in, for the hierarchies nspawn and systemd use: the unified
    (v2) one and, on hybrid hosts, the v1 name=systemd one."""
    found = []
    v2_mount = Path("/sys/fs/cgroup")
    if not (v2_mount / "cgroup.controllers").exists():
        v2_mount = Path("/sys/fs/cgroup/unified")
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        hier, controllers, path = line.split(":", 2)
        if hier == "0" and (v2_mount / "cgroup.procs").exists():
            found.append(v2_mount / path.lstrip("/"))
        elif controllers == "name=systemd" and Path("/sys/fs/cgroup/systemd/cgroup.procs").exists():
            found.append(Path("/sys/fs/cgroup/systemd") / path.lstrip("/"))
    return found


def ssh_banner(netns: str, address: str, port: int = 22) -> bool:
    try:
        sock = netns_socket(netns)
    except OSError:
        return False
    try:
        sock.settimeout(1.0)
        sock.connect((address, port))
        return sock.recv(64).startswith(b"SSH-2.0-")
    except OSError:
        return False
    finally:
        sock.close()


# --- up ------------------------------------------------------------------------------------------------

def plan_hosts(platforms: list[dict[str, Any]], cache: Path) -> list[dict[str, Any]]:
    """Names, addresses and bind mounts of the hosts. A platform's ``volumes`` are ``SRC:DEST[:ro]``; a
    relative SRC is a directory under the cache dir (created when missing), so scenarios can share
    artifacts the controller builds (a golden image, ...) without naming the cache's location."""
    network = ipaddress.ip_interface(FABRIC_CIDR).network
    gateway = ipaddress.ip_interface(FABRIC_CIDR).ip
    planned, seen = [], set()
    for index, platform in enumerate(platforms):
        name = platform["name"]
        if not NAME_RE.match(name):
            raise HostError(f"platform name {name!r}: use lower-case letters, digits and '-' (at most 31)")
        address = ipaddress.ip_address(platform.get("address") or network.network_address + FIRST_HOST_OFFSET + index)
        if address not in network or address == gateway or address in seen:
            raise HostError(f"platform {name}: address {address} is not a free address of {network}")
        seen.add(address)
        volumes = []
        for volume in platform.get("volumes") or []:
            parts = volume.split(":")
            if len(parts) not in (2, 3) or not parts[1].startswith("/") or parts[2:] not in ([], ["ro"], ["rw"]):
                raise HostError(f"platform {name}: volume {volume!r} is not SRC:DEST[:ro|:rw] with DEST absolute")
            src = cache / parts[0]
            src.mkdir(parents=True, exist_ok=True)
            volumes.append({"src": str(src), "dest": parts[1], "ro": parts[2:] == ["ro"]})
        planned.append({"name": name, "address": str(address), "volumes": volumes})
    return planned


class Upper:
    """Writes into a host's overlay upper directory. A directory created there shows in the merged tree
    with the upper's owner and mode, so each parent is created with the lower tree's."""

    def __init__(self, upper: Path, lower: Path) -> None:
        self.upper, self.lower = upper, lower

    def path(self, relative: str) -> Path:
        parts = Path(relative).parts
        for depth in range(1, len(parts)):
            rel = Path(*parts[:depth])
            target = self.upper / rel
            if not target.is_dir():
                info = (self.lower / rel).stat()
                target.mkdir()
                os.chown(target, info.st_uid, info.st_gid)
                os.chmod(target, info.st_mode & 0o7777)
        return self.upper / relative

    def write(self, relative: str, text: str, mode: int = 0o644) -> None:
        atomic_write(self.path(relative), text, mode)


def personalize(upper: Upper, host: dict[str, Any], pubkey: str, peers: list[dict[str, Any]]) -> list[str]:
    """Hostname, machine-id, /etc/hosts, the fabric address, a fresh ED25519 host key and root's
    authorized key, written into the host's upper directory; returns the public host key as
    [type, base64]."""
    upper.write("etc/hostname", host["name"] + "\n")
    upper.write("etc/machine-id", host["machine_id"] + "\n", 0o444)
    hosts = ["127.0.0.1\tlocalhost", f"127.0.1.1\t{host['name']}", "::1\tlocalhost ip6-localhost ip6-loopback"]
    hosts += [f"{peer['address']}\t{peer['name']}" for peer in peers if peer["name"] != host["name"]]
    upper.write("etc/hosts", "\n".join(hosts) + "\n")
    upper.write("etc/systemd/network/10-host0.network",
                "# The test fabric (no gateway: nothing outside the test network is reachable).\n"
                f"[Match]\nName=host0\n\n[Network]\nAddress={host['address']}/{host['prefix']}\n"
                "LinkLocalAddressing=no\nIPv6AcceptRA=no\n")
    key = upper.path("etc/ssh/ssh_host_ed25519_key")
    run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"root@{host['name']}", "-f", str(key))
    upper.write("root/.ssh/authorized_keys", pubkey, 0o600)
    return key.with_suffix(".pub").read_text().split()[0:2]


def start_host(state: State, host: dict[str, Any]) -> None:
    """Start systemd-nspawn for one host (does not wait for it).

    nspawn with --keep-unit stays in the cgroup it was started in and, on the unified hierarchy, moves
    itself to <cgroup>/supervisor and the container to <cgroup>/payload. Started from the machine's root
    cgroup, every host would share /payload and their systemds would manage the same cgroups. So each
    nspawn first moves into a cgroup of its own (removed by `down`). Where systemd is PID 1 it owns the
    cgroup tree: there each nspawn runs in a transient scope with delegation instead (systemd-run
    --scope, the use --keep-unit is made for; not exercised on the CI machines, which have no systemd
    as PID 1)."""
    record = state.data["hosts"][host["name"]]
    overlay = f"lowerdir={record['lower']},upperdir={record['upper']},workdir={record['work']}"
    for cg in record["cgroups"]:
        Path(cg).mkdir(exist_ok=True)
    scope = []
    if record.get("scope"):
        scope = ["systemd-run", "--quiet", "--scope", "--collect", "--property=Delegate=yes",
                 f"--unit={record['scope']}", "--"]
    argv = [
        *scope, "systemd-nspawn", "--quiet", "--register=no", "--keep-unit", "--boot",
        f"--directory={record['root']}", f"--machine={record['machine']}", f"--uuid={host['machine_id']}",
        "--private-network", "--network-veth", f"--network-bridge={state.data['fabric']['bridge']}",
        "--console=read-only", "--link-journal=no", "--resolv-conf=off", "--timezone=off",
        # The VMM opens /dev/net/tun for its TAPs. No device cgroup applies to a container started this way
        # (no scope is registered), so binding the node is enough.
        "--bind=/dev/net/tun",
    ]
    for volume in host["volumes"]:
        argv.append(f"--bind{'-ro' if volume['ro'] else ''}={volume['src']}:{volume['dest']}")
    console = open(record["console"], "ab")  # pylint: disable=consider-using-with
    procs_files = [str(Path(cg) / "cgroup.procs") for cg in record["cgroups"]]
    fabric = os.open(f"/run/netns/{state.data['fabric']['netns']}", os.O_RDONLY)
    libc = _libc()

    def prepare_child() -> None:
        # In the child, before exec: own session, own cgroups, a private mount namespace holding the
        # host's overlay (so no mount ever appears in the machine's namespace, and it ends with nspawn),
        # then the fabric network namespace.
        os.setsid()
        for procs in procs_files:
            with open(procs, "w") as handle:
                handle.write("0")
        if libc.unshare(CLONE_NEWNS) != 0:
            raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS)")
        if libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
            raise OSError(ctypes.get_errno(), "mount --make-rprivate /")
        if libc.mount(b"overlay", record["root"].encode(), b"overlay", 0, overlay.encode()) != 0:
            raise OSError(ctypes.get_errno(), f"mount overlay on {record['root']}")
        setns(fabric)

    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
                                preexec_fn=prepare_child, close_fds=True,
                                pass_fds=(fabric,))  # pylint: disable=subprocess-popen-preexec-fn
    except (OSError, subprocess.SubprocessError) as exc:
        raise HostError(f"host {host['name']}: cannot start systemd-nspawn: {exc}") from None
    finally:
        console.close()
        os.close(fabric)
    record["pid"] = proc.pid
    record["started_at"] = time.time()
    state.save()


def console_tail(path: str, lines: int = 25) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return "(no console output)"
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)
    return "\n".join(text.splitlines()[-lines:])


def up(state: State, cache: Path, platforms: list[dict[str, Any]], script: Path) -> dict[str, Any]:
    if state.data["hosts"] or state.data["fabric"]:
        log("state of an earlier run found: removing it first")
        down(state)
        state = State(state.dir)
    planned = plan_hosts(platforms, cache)
    t0 = time.monotonic()
    tree = build_tree(cache)
    rid = state.run_id
    fabric = f"mfc-{rid}-fabric"
    state.data["fabric"] = {"netns": fabric, "bridge": "fabric0", "cidr": FABRIC_CIDR}
    state.data["tree"] = str(tree)
    state.save()

    run("ip", "netns", "add", fabric)
    run("ip", "-n", fabric, "link", "set", "lo", "up")
    run("ip", "-n", fabric, "link", "add", "fabric0", "type", "bridge", "stp_state", "0", "forward_delay", "0")
    run("ip", "-n", fabric, "addr", "add", FABRIC_CIDR, "dev", "fabric0")
    run("ip", "-n", fabric, "link", "set", "fabric0", "up")

    key = state.dir / "id_ed25519"
    for old in (key, key.with_suffix(".pub")):
        old.unlink(missing_ok=True)
    run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"molecule-{rid}", "-f", str(key))
    pubkey = key.with_suffix(".pub").read_text()
    prefix = ipaddress.ip_interface(FABRIC_CIDR).network.prefixlen
    systemd_pid1 = os.path.isdir("/run/systemd/system")
    roots = [] if systemd_pid1 else cgroup_roots()

    known_hosts, ssh_config = [], []
    for host in planned:
        name = host["name"]
        host["machine_id"] = uuid.uuid4().hex
        hostdir = state.dir / "hosts" / name
        host["prefix"] = prefix
        record = {
            "name": name, "address": host["address"], "machine": f"mfc-{rid}-{name}", "dir": str(hostdir),
            "root": str(hostdir / "root"), "lower": str(tree / "rootfs"), "upper": str(hostdir / "upper"),
            "work": str(hostdir / "work"), "console": str(hostdir / "console.log"),
            "cgroups": [str(r / f"mfc-{rid}-{name}") for r in roots], "pid": None, "leader": None,
            "scope": f"mfc-{rid}-{name}.scope" if systemd_pid1 else None,
            # What `reboot` needs to start the same host again.
            "boot": {"machine_id": host["machine_id"], "volumes": host["volumes"]},
        }
        state.data["hosts"][name] = record
        state.save()
        if hostdir.exists():
            remove_tree(hostdir)
        for part in ("root", "upper", "work"):
            (hostdir / part).mkdir(parents=True)
        # nspawn locks its directory with /run/systemd/nspawn/locks/inode-<dev>:<inode>; on an overlay the
        # inode is the upper directory's. A killed nspawn leaves that file behind: `down` removes it.
        record["upper_inode"] = (hostdir / "upper").stat().st_ino
        state.save()
        hostkey = personalize(Upper(Path(record["upper"]), Path(record["lower"])), host, pubkey, planned)
        known_hosts.append(f"{host['address']} {hostkey[0]} {hostkey[1]}")
        ssh_config.append("\n".join([
            f"Host {name} {host['address']}",
            f"  HostName {host['address']}",
        ]))

    # The ProxyCommand runs a copy of this script kept with the run's state, so that ssh keeps working
    # while the hosts live even if the file it was started from goes away (a temporary collection tree).
    proxy_script = state.dir / "nspawn_hosts.py"
    shutil.copyfile(script, proxy_script)
    proxy = f"{sys.executable} {proxy_script} proxy --netns {fabric} %h %p"
    atomic_write(state.dir / "known_hosts", "\n".join(known_hosts) + "\n")
    atomic_write(state.dir / "ssh_config", "\n\n".join(ssh_config) + "\n\n" + "\n".join([
        "Host *",
        "  User root",
        "  Port 22",
        f"  IdentityFile {key}",
        "  IdentitiesOnly yes",
        f"  UserKnownHostsFile {state.dir / 'known_hosts'}",
        "  GlobalKnownHostsFile /dev/null",
        "  StrictHostKeyChecking yes",
        "  CheckHostIP no",
        "  PasswordAuthentication no",
        "  BatchMode yes",
        "  LogLevel ERROR",
        f"  ProxyCommand {proxy}",
        "",
    ]))

    # Every host boots at once; then all are awaited together.
    for host in planned:
        start_host(state, host)
    deadline = time.monotonic() + SSH_DEADLINE
    pending = {host["name"] for host in planned}
    while pending:
        for name in sorted(pending):
            record = state.data["hosts"][name]
            if not pid_alive(record["pid"]):
                raise HostError(f"host {name}: systemd-nspawn (pid {record['pid']}) exited during boot; "
                                f"console:\n{console_tail(record['console'])}")
            if ssh_banner(fabric, record["address"]):
                record["ssh_ready_at"] = time.time()
                record["leader"] = next(iter(children(record["pid"])), None)
                pending.discard(name)
        if pending and time.monotonic() >= deadline:
            name = sorted(pending)[0]
            raise HostError(f"host {name}: sshd did not answer on {state.data['hosts'][name]['address']}:22 within "
                            f"{SSH_DEADLINE:g} s; console:\n{console_tail(state.data['hosts'][name]['console'])}")
        if pending:
            time.sleep(0.1)
    state.save()
    return {
        "run": rid, "fabric": fabric, "tree": str(tree), "ssh_config": str(state.dir / "ssh_config"),
        "identity_file": str(key), "known_hosts": str(state.dir / "known_hosts"),
        "seconds": round(time.monotonic() - t0, 2),
        "hosts": [{k: state.data["hosts"][h["name"]][k] for k in
                   ("name", "address", "pid", "leader", "machine", "started_at", "ssh_ready_at")}
                  for h in planned],
    }


# --- reboot --------------------------------------------------------------------------------------------

def reboot(state: State, name: str) -> dict[str, Any]:
    """The second half of a host restart: after `systemctl reboot` inside the host, systemd-nspawn exits
    (with status 133, "reboot requested", seen only by its parent); wait for that, then boot the same host
    again (same tree and upper directory, machine id, fabric address, host key) and wait for its sshd."""
    record = state.data["hosts"].get(name)
    if not record or not record.get("boot"):
        raise HostError(f"host {name}: not in {state.file} (or booted by an older nspawn_hosts.py)")
    old = record["pid"]
    if not wait_until(lambda: not is_our_nspawn(old, record["machine"]), time.monotonic() + STOP_DEADLINE + 30):
        raise HostError(f"host {name}: systemd-nspawn (pid {old}) still runs {STOP_DEADLINE + 30:g} s later: "
                        f"was `systemctl reboot` run inside the host? console:\n{console_tail(record['console'])}")
    down_at = time.time()
    if record.get("upper_inode"):
        remove_stale_locks(record["upper_inode"])
    start_host(state, {"name": name, **record["boot"]})
    fabric = state.data["fabric"]["netns"]
    deadline = time.monotonic() + SSH_DEADLINE
    while not ssh_banner(fabric, record["address"]):
        if not pid_alive(record["pid"]):
            raise HostError(f"host {name}: systemd-nspawn (pid {record['pid']}) exited during boot; "
                            f"console:\n{console_tail(record['console'])}")
        if time.monotonic() >= deadline:
            raise HostError(f"host {name}: sshd did not answer on {record['address']}:22 within {SSH_DEADLINE:g} s "
                            f"of the restart; console:\n{console_tail(record['console'])}")
        time.sleep(0.1)
    record["ssh_ready_at"] = time.time()
    record["leader"] = next(iter(children(record["pid"])), None)
    state.save()
    return {"name": name, "old_pid": old, "pid": record["pid"], "down_at": down_at,
            "started_at": record["started_at"], "ssh_ready_at": record["ssh_ready_at"]}


# --- down ----------------------------------------------------------------------------------------------

def netns_exists(name: str) -> bool:
    return os.path.exists(f"/run/netns/{name}")


def netns_pids(name: str) -> list[int]:
    if not netns_exists(name):
        return []
    proc = run("ip", "netns", "pids", name, check=False, quiet=True)
    return [int(p) for p in proc.stdout.split()]


def delete_netns(name: str) -> None:
    run("ip", "netns", "delete", name)


def is_our_nspawn(pid: Optional[int], machine: str) -> bool:
    return pid_alive(pid) and any(arg == f"--machine={machine}" for arg in cmdline(pid))  # type: ignore[arg-type]


def stop_hosts(records: list[dict[str, Any]], removed: list[str]) -> list[str]:
    """All at once: orderly first (SIGTERM to nspawn, which sends SIGRTMIN+3 to the container's systemd: halt),
    then SIGKILL to each survivor's container PID 1 (which ends its whole PID namespace) and to nspawn.
    Returns the hosts that survived even that."""
    live = {}
    for record in records:
        pid = record.get("pid")
        if is_our_nspawn(pid, record["machine"]):
            leader = record.get("leader")
            if not leader or leader not in children(pid):
                leader = next(iter(children(pid)), None)
            live[record["name"]] = (pid, leader)
            kill(pid, signal.SIGTERM)
    if not live:
        return []
    wait_until(lambda: not any(pid_alive(pid) for pid, _leader in live.values()), time.monotonic() + STOP_DEADLINE)
    killed = []
    for name, (pid, leader) in live.items():
        if not pid_alive(pid):
            removed.append(f"host {name}: stopped (orderly shutdown)")
            continue
        log(f"host {name}: no orderly shutdown within {STOP_DEADLINE:g} s; killing it")
        if leader and pid_alive(leader):
            kill(leader, signal.SIGKILL)
        kill(pid, signal.SIGKILL)
        killed.append(name)
    wait_until(lambda: not any(pid_alive(live[name][0]) for name in killed), time.monotonic() + KILL_DEADLINE)
    survivors = [name for name in killed if pid_alive(live[name][0])]
    removed.extend(f"host {name}: killed" for name in killed if name not in survivors)
    return survivors


def remove_cgroup(path: Path) -> None:
    """Remove a cgroup tree of ours, deepest first, killing what is left in it (by PID)."""
    if not path.exists():
        return
    for procs in sorted(path.rglob("cgroup.procs"), key=lambda p: len(p.parts), reverse=True):
        for pid in procs.read_text().split():
            kill(int(pid), signal.SIGKILL)
    dirs = sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True)
    for directory in [*dirs, path]:
        def gone(d: Path = directory) -> bool:
            try:
                d.rmdir()
            except FileNotFoundError:
                return True
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    raise
                return False
            return True
        if not wait_until(gone, time.monotonic() + KILL_DEADLINE):
            raise HostError(f"cannot remove cgroup {directory}: still busy")


def mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve())
    points = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    return [p for p in points if p == prefix or p.startswith(prefix + "/")]


def remove_tree(path: Path) -> None:
    """A host's directory; refused while anything is mounted below it (nspawn's mounts live in its own
    mount namespace and end with it, so there should never be one)."""
    mounted = mounts_under(path)
    if mounted:
        raise HostError(f"{path}: still mounted: {', '.join(mounted)}")
    shutil.rmtree(path)


def remove_stale_locks(inode: int) -> None:
    """nspawn's image lock files for a directory with this inode that no process holds any more."""
    held = {int(match.group(1)) for match in
            re.finditer(r"\s[0-9a-f]+:[0-9a-f]+:(\d+)\s", Path("/proc/locks").read_text())}
    for lock in glob.glob(f"/run/systemd/nspawn/locks/inode-*:{inode}"):
        try:
            if os.stat(lock).st_ino not in held:
                os.unlink(lock)
        except FileNotFoundError:
            pass


def down(state: State) -> dict[str, Any]:
    removed: list[str] = []
    errors: list[str] = []
    hosts = state.data.get("hosts", {})

    def attempt(what: str, action: Callable[[], None]) -> None:
        try:
            action()
        except (HostError, OSError) as exc:
            errors.append(f"{what}: {exc}")

    for name in stop_hosts(list(hosts.values()), removed):
        errors.append(f"host {name}: systemd-nspawn (pid {hosts[name]['pid']}) survived SIGKILL")
    for record in hosts.values():
        name = record["name"]
        for cg in record.get("cgroups", []):
            attempt(f"host {name}: cgroup", lambda c=cg: remove_cgroup(Path(c)))
        if record.get("upper_inode"):
            remove_stale_locks(record["upper_inode"])
        propagate = Path("/run/systemd/nspawn/propagate") / record["machine"]
        if propagate.exists():
            shutil.rmtree(propagate, ignore_errors=True)
        if Path(record["dir"]).exists():
            attempt(f"host {name}: tree", lambda r=record: remove_tree(Path(r["dir"])))
            removed.append(f"host {name}: tree")
    # nspawn leaves these (empty) behind on a machine whose /run is not a tmpfs it may clean.
    for directory in ("/run/systemd/nspawn/propagate", "/run/systemd/nspawn/locks", "/run/systemd/nspawn"):
        try:
            os.rmdir(directory)
        except OSError:
            pass
    fabric = (state.data.get("fabric") or {}).get("netns")
    if fabric:
        # Left in the fabric namespace once the hosts are gone: the ssh ProxyCommands of this run.
        for pid in netns_pids(fabric):
            kill(pid, signal.SIGTERM)
        if netns_exists(fabric):
            attempt("fabric netns", lambda: delete_netns(fabric))
            removed.append(f"netns {fabric}")
    if errors:
        state.save()
        raise HostError("; ".join(errors))
    for name in ("id_ed25519", "id_ed25519.pub", "known_hosts", "ssh_config", "nspawn_hosts.py", "state.json"):
        (state.dir / name).unlink(missing_ok=True)
    shutil.rmtree(state.dir / "hosts", ignore_errors=True)
    return {"removed": removed}


# --- proxy ---------------------------------------------------------------------------------------------

def proxy(netns: str, host: str, port: int) -> int:
    """Copy stdin -> TCP and TCP -> stdout; the connection is made inside ``netns``."""
    try:
        sock = netns_socket(netns)
        sock.connect((host, port))
    except OSError as exc:
        print(f"nspawn_hosts proxy: cannot connect to {host}:{port} in network namespace {netns}: {exc}",
              file=sys.stderr)
        return 255
    inp, out = sys.stdin.fileno(), sys.stdout.fileno()
    open_in = True
    while True:
        readers = [sock] + ([inp] if open_in else [])
        ready = select.select(readers, [], [])[0]
        if inp in ready:
            data = os.read(inp, 65536)
            if data:
                sock.sendall(data)
            else:
                open_in = False
                sock.shutdown(socket.SHUT_WR)
        if sock in ready:
            data = sock.recv(65536)
            if not data:
                return 0
            view = memoryview(data)
            while view:
                view = view[os.write(out, view):]


# --- command line --------------------------------------------------------------------------------------

def main(argv: Optional[Iterable[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_build = sub.add_parser("build", help="build (or find) the cached host tree and print its path")
    p_build.add_argument("--cache", required=True, type=Path)
    p_up = sub.add_parser("up", help="boot hosts")
    p_up.add_argument("--state", required=True, type=Path)
    p_up.add_argument("--cache", required=True, type=Path)
    p_up.add_argument("--hosts", required=True, help="JSON list of {name, address?, volumes?}")
    p_down = sub.add_parser("down", help="remove everything a run created")
    p_down.add_argument("--state", required=True, type=Path)
    p_reboot = sub.add_parser("reboot", help="after `systemctl reboot` inside a host: wait for it to go down, boot it again")
    p_reboot.add_argument("--state", required=True, type=Path)
    p_reboot.add_argument("--host", required=True)
    p_proxy = sub.add_parser("proxy", help="ssh ProxyCommand through a network namespace")
    p_proxy.add_argument("--netns", required=True)
    p_proxy.add_argument("host")
    p_proxy.add_argument("port", type=int)
    args = parser.parse_args(list(argv) if argv is not None else None)

    if args.command == "proxy":
        return proxy(args.netns, args.host, args.port)
    if os.geteuid() != 0:
        print("nspawn_hosts: must run as root (network namespaces, systemd-nspawn)", file=sys.stderr)
        return 2
    try:
        if args.command == "build":
            print(build_tree(args.cache.resolve()))
        elif args.command == "up":
            result = up(State(args.state), args.cache.resolve(), json.loads(args.hosts),
                        Path(__file__).resolve())
            print(json.dumps(result, indent=2))
        elif args.command == "reboot":
            print(json.dumps(reboot(State(args.state), args.host), indent=2))
        elif args.command == "down":
            print(json.dumps(down(State(args.state)), indent=2))
    except HostError as exc:
        print(f"nspawn_hosts: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

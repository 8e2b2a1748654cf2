# -*- coding: utf-8 -*-
# Copyright: (c) 2026, microvm.firecracker contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Find, and on request remove, what VM lifecycles leaked: TAPs, VM dirs, DHCP leases, allocations, VMMs.

The host's allocations (``allocations.json``) and VM directories (``<state_dir>/vms/<name>``) say which
VMs exist. A VM is *live* when it has a directory and an allocation (or is listed in ``vms``). Everything
else is judged against the live VMs by pure functions over a ``Snapshot``, so the classification is
unit-testable and check mode predicts the real run. Removal re-checks every object just before it
touches it (pid start time, TAP index and holders, directory type) and goes in the order that frees what
the next step needs: VMM processes, then TAPs, leases, directories, and allocations last.

Nothing belonging to a live VM is ever an orphan: not its directory, its allocation, its VMM, the TAP
and MAC of its allocation or of its ``config.json``, nor a TAP that its VMM holds open.

A VM that fc_vm runs under the jailer keeps its directory (marker, launch script, console log) but its
``config.json`` and API socket are in its jail, ``<chroot base>/<exec name>/<id>/root``, which the marker
records. Its VMM's ``--api-sock`` is a path inside the jail, so the VMM is mapped to its VM through its jail
root (``/proc/<pid>/root`` when chrooted, ``/proc/<pid>/cwd`` under the jailer stand-in).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

from ansible_collections.microvm.firecracker.plugins.module_utils import _jail
from ansible_collections.microvm.firecracker.plugins.module_utils._allocator import (
    STATE_FILE,
    AllocationError,
    Allocator,
    make_pool,
)
from ansible_collections.microvm.firecracker.plugins.module_utils._dnsmasq import Lease, parse_leases, still_leased
from ansible_collections.microvm.firecracker.plugins.module_utils._fc_config import marker_jail, read_marker
from ansible_collections.microvm.firecracker.plugins.module_utils._netlink import Link, Netlink, NetlinkOperationError
from ansible_collections.microvm.firecracker.plugins.module_utils._procs import argv_of, start_time, wait_until

# Also the removal order: a VMM holds its TAP and its directory, an allocation must outlive its leftovers.
KINDS = ("processes", "taps", "leases", "vm_dirs", "allocations")
VMS_SUBDIR = "vms"
KILL_SECONDS = 5.0
RELEASE_SECONDS = 5.0
POLL_SECONDS = 0.02
# Entries of <state_dir>/vms that are never VM directories.
NOT_VM_DIRS = ("lost+found",)
# Only used to construct the Allocator (for its lock and its reader); a rewrite uses the stored network.
_PLACEHOLDER_CIDR = "198.18.0.0/15"
_UNIT = re.compile(r"/(firecracker@[^/]+\.service)(?:/|$)")


class ReconcileError(Exception):
    """Invalid settings, or state that cannot be read; nothing has been removed when raised."""


# --- the snapshot --------------------------------------------------------------


@dataclass(frozen=True)
class VMDir:
    name: str
    path: str
    # From its config.json (fc_vm's rendered Firecracker config): the TAPs and MACs the VM uses.
    taps: tuple[str, ...] = ()
    macs: tuple[str, ...] = ()
    disk_bytes: Optional[int] = None  # what its files occupy on disk (sparse images count what they hold)
    # A jailed VM's jail directory and cgroups, as its marker records them (removed with the directory).
    jail_dir: Optional[str] = None
    cgroup_dirs: tuple[str, ...] = ()


@dataclass(frozen=True)
class VMMProcess:
    pid: int
    vm: str  # the directory name under <state_dir>/vms its API socket (or launch script, or jail) belongs to
    start_time: int  # /proc/<pid>/stat field 22: tells a recycled pid from this process
    argv: tuple[str, ...]
    vm_id: Optional[str] = None  # its --id
    unit: Optional[str] = None  # the systemd unit it runs in, if any

    @property
    def cmdline(self) -> str:
        return " ".join(self.argv)


@dataclass(frozen=True)
class TapDevice:
    name: str
    index: int
    bridge: Optional[str]
    attached: bool  # the kernel's view (carrier / queue count): some process holds it open
    holders: tuple[int, ...] = ()  # pids in this network namespace with the TAP open


@dataclass
class Snapshot:
    vms_dir: str
    allocations: dict[str, dict[str, Any]]
    vm_dirs: dict[str, VMDir]
    processes: list[VMMProcess] = field(default_factory=list)
    taps: list[TapDevice] = field(default_factory=list)
    leases: list[Lease] = field(default_factory=list)
    # Command lines of every process holding a candidate TAP (VMMs or not), for messages.
    holder_cmdlines: dict[int, str] = field(default_factory=dict)
    # TAP holders that are descendants of a VMM (its helpers, such as the stand-in's QEMU, which dies with it):
    # holder pid -> (the VMM's pid, the holder's start time). Such a TAP is the VMM's.
    helpers: dict[int, tuple[int, int]] = field(default_factory=dict)
    vms: Optional[frozenset[str]] = None


@dataclass
class Orphan:
    kind: str
    name: str
    detail: str
    data: dict[str, Any] = field(default_factory=dict)
    # Why it will be left in place even with remove=true (None: it will be removed).
    blocked: Optional[str] = None
    ref: Any = None  # the snapshot object (VMMProcess, TapDevice, Lease, VMDir, allocation entry)

    def report(self, **extra: Any) -> dict[str, Any]:
        return {"name": self.name, "detail": self.detail, **self.data, **extra}


# --- classification (pure) -------------------------------------------------------


def _listed(snap: Snapshot, name: str) -> bool:
    return snap.vms is not None and name in snap.vms


def live_vms(snap: Snapshot) -> set[str]:
    """VMs that exist: a directory, and an allocation or a place in ``vms``."""
    return {name for name in snap.vm_dirs if name in snap.allocations or _listed(snap, name)}


def kept_allocations(snap: Snapshot) -> dict[str, dict[str, Any]]:
    """Allocations that stay: the VM has a directory, or ``vms`` says it should exist."""
    return {name: entry for name, entry in snap.allocations.items()
            if name in snap.vm_dirs or _listed(snap, name)}


def _pids(pids: Iterable[int]) -> str:
    return ", ".join(str(pid) for pid in sorted(pids))


def _human_bytes(value: int) -> str:
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{value} B"


def classify(snap: Snapshot, kinds: Iterable[str]) -> dict[str, list[Orphan]]:
    """The orphans of each asked kind, with the reason removal would be refused where it would be."""
    kinds = tuple(kinds)
    live = live_vms(snap)
    kept = kept_allocations(snap)
    stale = {name: entry for name, entry in snap.allocations.items() if name not in kept}
    stale_taps = {entry.get("tap"): name for name, entry in stale.items()}
    stale_macs = {str(entry.get("mac", "")).lower(): name for name, entry in stale.items()}
    protected_taps = {entry.get("tap") for entry in kept.values()}
    protected_macs = {str(entry.get("mac", "")).lower() for entry in kept.values()}
    for name in live:
        protected_taps.update(snap.vm_dirs[name].taps)
        protected_macs.update(mac.lower() for mac in snap.vm_dirs[name].macs)
    live_pids = {proc.pid for proc in snap.processes if proc.vm in live}
    orphan_procs = {proc.pid: proc for proc in snap.processes if proc.vm not in live}

    def vmm_pid(pid: int) -> int:
        return snap.helpers[pid][0] if pid in snap.helpers else pid
    stopping = "processes" in kinds

    def vmm_block(vm: str, what: str) -> Optional[str]:
        running = [proc.pid for proc in orphan_procs.values() if proc.vm == vm]
        if running and not stopping:
            return (f"{what}: the VMM (pid {_pids(running)}) of VM {vm} still runs; "
                    "add 'processes' to kinds to stop it first")
        return None

    result: dict[str, list[Orphan]] = {kind: [] for kind in KINDS if kind in kinds}

    if "processes" in result:
        for proc in sorted(orphan_procs.values(), key=lambda p: p.pid):
            if proc.vm not in snap.vm_dirs:
                why = f"its VM directory {os.path.join(snap.vms_dir, proc.vm)} does not exist"
            else:
                why = f"VM {proc.vm} has no allocation"
            detail = f"VMM pid {proc.pid} of VM {proc.vm}: {why}; command line: {proc.cmdline}"
            if proc.unit:
                detail += f"; systemd unit {proc.unit}"
            result["processes"].append(Orphan(
                "processes", str(proc.pid), detail, ref=proc,
                data={"pid": proc.pid, "vm": proc.vm, "vm_id": proc.vm_id, "cmdline": proc.cmdline,
                      "unit": proc.unit}))

    if "taps" in result:
        for tap in sorted(snap.taps, key=lambda t: t.name):
            if tap.name in protected_taps or any(vmm_pid(pid) in live_pids for pid in tap.holders):
                continue
            if tap.name in stale_taps:
                why = f"the TAP of VM {stale_taps[tap.name]}, whose allocation is stale (no VM directory)"
            else:
                why = "not the TAP of any allocated VM"
            detail = f"TAP {tap.name}: {why}"
            if tap.bridge:
                detail += f"; port of bridge {tap.bridge}"
            for pid in tap.holders:
                owner = orphan_procs.get(vmm_pid(pid))
                detail += f"; held open by pid {pid}"
                if owner and owner.pid != pid:
                    detail += f" (a child of the VMM, pid {owner.pid}, of VM {owner.vm})"
                elif owner:
                    detail += f" (the VMM of VM {owner.vm})"
            strangers = [pid for pid in tap.holders if vmm_pid(pid) not in orphan_procs]
            blocked = None
            if strangers:
                blocked = "held open by " + "; ".join(
                    f"pid {pid} ({snap.holder_cmdlines.get(pid, '?')})" for pid in sorted(strangers)
                ) + ", which is not a VMM of a removed VM; refusing to delete a TAP in use"
            elif tap.holders and not stopping:
                owners = sorted({orphan_procs[vmm_pid(pid)].vm for pid in tap.holders})
                vmms = {vmm_pid(pid) for pid in tap.holders}
                blocked = (f"held open by the VMM (pid {_pids(vmms)}) of VM {', '.join(owners)}; "
                           "add 'processes' to kinds to stop it first")
            elif tap.attached and not tap.holders:
                blocked = ("held open by a process not found in /proc of this host's network namespace "
                           "(another PID namespace?); refusing to delete a TAP in use")
            result["taps"].append(Orphan(
                "taps", tap.name, detail, blocked=blocked, ref=tap,
                data={"bridge": tap.bridge, "holders": sorted(tap.holders)}))

    if "leases" in result:
        for lease in snap.leases:
            mac = lease.mac.lower()
            if mac in protected_macs:
                continue
            if mac in stale_macs:
                why = f"the MAC of VM {stale_macs[mac]}, whose allocation is stale (no VM directory)"
            else:
                why = "the MAC is not allocated to any VM"
            host = f" ({lease.hostname})" if lease.hostname not in ("", "*") else ""
            result["leases"].append(Orphan(
                "leases", lease.ip, f"DHCP lease of {lease.ip} to {lease.mac}{host}: {why}", ref=lease,
                data={"ip": lease.ip, "mac": lease.mac, "hostname": lease.hostname, "expiry": lease.expiry}))

    if "vm_dirs" in result:
        for name in sorted(snap.vm_dirs):
            if name in snap.allocations or _listed(snap, name):
                continue
            vm_dir = snap.vm_dirs[name]
            detail = f"VM directory {vm_dir.path}: VM {name} has no allocation"
            if vm_dir.jail_dir:
                detail += f"; its jail {vm_dir.jail_dir} goes with it"
            if vm_dir.disk_bytes is not None:
                detail += f"; {_human_bytes(vm_dir.disk_bytes)} on disk"
            data: dict[str, Any] = {"vm": name, "disk_bytes": vm_dir.disk_bytes}
            if vm_dir.jail_dir:
                data["jail_dir"] = vm_dir.jail_dir
            blocked = vmm_block(name, f"VM directory {vm_dir.path}")
            sharing = sorted(other for other, d in snap.vm_dirs.items()
                             if other != name and vm_dir.jail_dir and d.jail_dir == vm_dir.jail_dir)
            if sharing and not blocked:
                blocked = _shared_jail(vm_dir, sharing)
            result["vm_dirs"].append(Orphan("vm_dirs", vm_dir.path, detail, blocked=blocked, ref=vm_dir, data=data))

    if "allocations" in result:
        for name in sorted(stale):
            entry = stale[name]
            why = f"its VM directory {os.path.join(snap.vms_dir, name)} does not exist"
            if snap.vms is not None:
                why += " and it is not in vms"
            detail = (f"allocation of VM {name} ({entry.get('ip')}, MAC {entry.get('mac')}, "
                      f"TAP {entry.get('tap')}): {why}")
            result["allocations"].append(Orphan(
                "allocations", name, detail, blocked=vmm_block(name, f"allocation of VM {name}"), ref=entry,
                data={"ip": entry.get("ip"), "mac": entry.get("mac"), "tap": entry.get("tap")}))
    return result


def _shared_jail(vm_dir: VMDir, sharing: Iterable[str]) -> str:
    return (f"VM directory {vm_dir.path}: its jail {vm_dir.jail_dir} is also recorded by VM directory "
            f"{', '.join(sharing)}; left alone")


def unlisted_vms(snap: Snapshot) -> list[str]:
    """Live VMs (directory and allocation) that ``vms`` does not list: reported, never removed."""
    if snap.vms is None:
        return []
    return sorted(name for name in live_vms(snap) if name not in snap.vms)


# --- reading the host (parsers pure, scanners take their roots as arguments) ------------------


def read_leases(path: str) -> Optional[list[Lease]]:
    """The lease file's IPv4 leases; None when the file does not exist."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return parse_leases(handle.read())
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ReconcileError(f"dhcp_leasefile {path}: cannot read it: {exc.strerror}") from None


def _config_interfaces(path: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    try:
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, ValueError):
        return (), ()
    interfaces = config.get("network-interfaces") if isinstance(config, dict) else None
    if not isinstance(interfaces, list):
        return (), ()
    taps = tuple(i["host_dev_name"] for i in interfaces if isinstance(i, dict) and isinstance(i.get("host_dev_name"), str))
    macs = tuple(i["guest_mac"] for i in interfaces if isinstance(i, dict) and isinstance(i.get("guest_mac"), str))
    return taps, macs


def disk_usage(*paths: str) -> int:
    """Bytes allocated on disk under ``paths`` (like ``du``), never following symlinks; a file with several
    hard links among them (a jailed VM's drive linked into its jail) counts once."""
    total = 0
    seen: set[tuple[int, int]] = set()
    for path in paths:
        for top, dirs, files in os.walk(path):
            for name in dirs + files:
                try:
                    info = os.lstat(os.path.join(top, name))
                except OSError:
                    continue
                if info.st_nlink > 1 and not stat.S_ISDIR(info.st_mode):
                    if (info.st_dev, info.st_ino) in seen:
                        continue
                    seen.add((info.st_dev, info.st_ino))
                total += info.st_blocks * 512
    return total


def read_vm_dirs(vms_dir: str) -> dict[str, VMDir]:
    """Real directories (never symlinks) under ``vms_dir``; hidden entries and lost+found are not VMs. A jailed
    VM's config is read from its jail (``<jail_dir>/root/config.json``) and the jail's files count in its disk
    usage."""
    try:
        entries = sorted(os.scandir(vms_dir), key=lambda e: e.name)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ReconcileError(f"{vms_dir}: cannot list the VM directories: {exc.strerror}") from None
    result = {}
    for entry in entries:
        if entry.name.startswith(".") or entry.name in NOT_VM_DIRS or not entry.is_dir(follow_symlinks=False):
            continue
        jail_dir, cgroup_dirs = marker_jail(read_marker(entry.path))
        config_dir = os.path.join(jail_dir, "root") if jail_dir else entry.path
        taps, macs = _config_interfaces(os.path.join(config_dir, "config.json"))
        counted = [entry.path] + ([jail_dir] if jail_dir and os.path.isdir(jail_dir) else [])
        result[entry.name] = VMDir(name=entry.name, path=entry.path, taps=taps, macs=macs,
                                   disk_bytes=disk_usage(*counted), jail_dir=jail_dir, cgroup_dirs=cgroup_dirs)
    return result


def _option(argv: tuple[str, ...], name: str) -> Optional[str]:
    """The value of ``--name VALUE`` or ``--name=VALUE`` (the last one given)."""
    value = None
    for index, arg in enumerate(argv):
        if arg == name and index + 1 < len(argv):
            value = argv[index + 1]
        elif arg.startswith(name + "="):
            value = arg[len(name) + 1:]
    return value


def vmm_of(argv: tuple[str, ...], vms_dirs: Iterable[str]) -> Optional[tuple[str, Optional[str]]]:
    """(VM directory name, --id) when ``argv`` is a VMM whose API socket lies in a VM directory under one of
    ``vms_dirs`` -- as fc_vm's launch script execs it, directly or through ``nsenter`` -- or the shell still
    running that launch script; None otherwise."""
    roots = {os.path.normpath(path) for path in vms_dirs}
    candidates = []
    sock = _option(argv, "--api-sock")
    if sock:
        candidates.append(sock)
    # The launch stage: /bin/sh <vms>/<name>/launch, before its exec.
    candidates += [arg for arg in argv[:2] if os.path.basename(arg) == "launch"]
    for path in candidates:
        if not os.path.isabs(path):
            continue
        parent = os.path.dirname(os.path.normpath(path))
        name = os.path.basename(parent)
        if os.path.dirname(parent) in roots and name and not name.startswith(".") and name not in NOT_VM_DIRS:
            return name, _option(argv, "--id")
    return None


def _before_separator(argv: tuple[str, ...]) -> tuple[str, ...]:
    return argv[:argv.index("--")] if "--" in argv else argv


def _in_vm_dir(path: str, vms_dirs: set[str], name: str) -> bool:
    """Whether ``path`` (a /proc fd link, maybe ``... (deleted)``) is a file directly in ``<vms_dir>/<name>``."""
    if path.endswith(" (deleted)"):
        path = path[:-len(" (deleted)")]
    return os.path.isabs(path) and os.path.dirname(os.path.normpath(path)) in {
        os.path.join(root, name) for root in vms_dirs}


def jailed_vmm_of(argv: tuple[str, ...], vms_dirs: Iterable[str], jails: dict[str, str], places: Iterable[str],
                  outputs: Iterable[str]) -> Optional[tuple[str, Optional[str]]]:
    """(VM directory name, --id) when ``argv`` is a jailed VMM (or the jailer about to exec it) of a VM under
    ``vms_dirs``; None otherwise.

    ``jails`` maps the jail directories the VM directories' markers record to their VM names; ``places`` are the
    process's root and working directory (/proc/<pid>/root, /proc/<pid>/cwd), ``outputs`` its stdout and stderr
    (/proc/<pid>/fd/1, 2). A VMM (``--api-sock`` and ``--id`` in its argv; the socket a path inside its jail) is a
    VM's when its root or working directory is ``<jail_dir>/root`` of a recorded jail whose id is its ``--id``.
    The jailer itself (``--id``, ``--exec-file`` and ``--chroot-base-dir`` before ``--``) is when a recorded jail
    is ``<chroot base>/<any exec name>/<id>``. A jailed process whose jail no marker records (its VM directory
    was deleted) is VM ``--id``'s only when its jail is ``.../<exec name>/<id>`` and its stdout or stderr is a
    file directly in ``<vms_dir>/<id>`` (the console log fc_vm's launch script appends to, even deleted): a
    jailed VMM of another state directory or of another tool is never taken for one of these VMs."""
    roots = {os.path.normpath(path) for path in vms_dirs}
    jail_ids = {os.path.normpath(path): name for path, name in jails.items()}
    vm_id = _option(argv, "--id")
    if not vm_id or vm_id in (".", "..") or "/" in vm_id:
        return None
    own = any(_in_vm_dir(path, roots, vm_id) for path in outputs)
    head = _before_separator(argv)
    base = _option(head, "--chroot-base-dir")
    if _option(head, "--id") and _option(head, "--exec-file") and base and os.path.isabs(base):
        # The jailer, before it execs the VMM: where the jail will be.
        base = os.path.normpath(base)
        for jail_dir, name in jail_ids.items():
            if os.path.basename(jail_dir) == vm_id and os.path.dirname(os.path.dirname(jail_dir)) == base:
                return name, vm_id
        return (vm_id, vm_id) if own else None
    sock = _option(argv, "--api-sock")
    if not sock or (os.path.isabs(sock) and os.path.dirname(os.path.dirname(os.path.normpath(sock))) in roots):
        return None  # not a VMM, or one vmm_of maps by its socket
    for place in places:
        if not os.path.isabs(place) or os.path.basename(place) != "root":
            continue
        jail_dir = os.path.dirname(os.path.normpath(place))
        if os.path.basename(jail_dir) != vm_id:
            continue
        if jail_dir in jail_ids:
            return jail_ids[jail_dir], vm_id
        exec_name = os.path.basename(os.path.dirname(jail_dir))
        # The VMM binary the jailer copied into the jail (argv[0] /<name>, or the stand-in's interpreter's
        # script /proc/self/cwd/<name>): the jail is named after it.
        if own and exec_name and any(os.path.basename(arg) == exec_name for arg in argv[:2]):
            return vm_id, vm_id
    return None


def unit_of(cgroup_text: str) -> Optional[str]:
    match = _UNIT.search(cgroup_text)
    return match.group(1) if match else None


def _read(path: str) -> Optional[str]:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except (OSError, UnicodeDecodeError):
        return None


def _readlink(path: str) -> Optional[str]:
    try:
        return os.readlink(path)
    except OSError:
        return None


def _short(text: str, limit: int = 160) -> str:
    """A command line fit for one line of a message."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _pids_in(proc_root: str) -> list[int]:
    try:
        return sorted(int(entry) for entry in os.listdir(proc_root) if entry.isdigit())
    except OSError as exc:
        raise ReconcileError(f"{proc_root}: cannot list processes: {exc.strerror}") from None


def jail_records(vms_dir: str) -> dict[str, set[str]]:
    """Jail directory -> the VM directories under ``vms_dir`` whose markers record it."""
    records: dict[str, set[str]] = {}
    try:
        entries = list(os.scandir(vms_dir))
    except OSError:
        return records
    for entry in entries:
        if entry.name.startswith(".") or entry.name in NOT_VM_DIRS or not entry.is_dir(follow_symlinks=False):
            continue
        jail_dir = marker_jail(read_marker(entry.path))[0]
        if jail_dir:
            records.setdefault(jail_dir, set()).add(entry.name)
    return records


def recorded_jails(vms_dir: str) -> dict[str, str]:
    """Jail directory -> VM name, for every VM directory under ``vms_dir`` whose marker records a jail (both the
    recorded path and, when it differs, the path with symlinks resolved, as /proc shows it)."""
    jails: dict[str, str] = {}
    for jail_dir, names in sorted(jail_records(vms_dir).items()):
        name = min(names)
        jails[jail_dir] = name
        jails.setdefault(os.path.realpath(jail_dir), name)
    return jails


def find_vmm_processes(vms_dir: str, proc_root: str = "/proc") -> list[VMMProcess]:
    """Live VMM processes (any network namespace) whose API socket or launch script is under ``vms_dir``, or
    that run in the jail of a VM under ``vms_dir`` (see ``jailed_vmm_of``)."""
    roots = {os.path.normpath(os.path.abspath(vms_dir)), os.path.realpath(vms_dir)}
    jails = recorded_jails(vms_dir)
    own = os.getpid()
    found = []
    for pid in _pids_in(proc_root):
        if pid == own:
            continue
        argv = argv_of(pid, proc_root)
        match = vmm_of(argv, roots) if argv else None
        if match is None and argv and "--id" in " ".join(argv):
            places = [_readlink(f"{proc_root}/{pid}/{link}") for link in ("root", "cwd")]
            outputs = [_readlink(f"{proc_root}/{pid}/fd/{fd}") for fd in (1, 2)]
            match = jailed_vmm_of(argv, roots, jails, [p for p in places if p and p != "/"],
                                  [o for o in outputs if o])
        if match is None:
            continue
        started = start_time(pid, proc_root)
        if started is None:
            continue
        found.append(VMMProcess(pid=pid, vm=match[0], start_time=started, argv=argv, vm_id=match[1],
                                unit=unit_of(_read(f"{proc_root}/{pid}/cgroup") or "")))
    return found


def _netns_id(path: str) -> Optional[tuple[int, int]]:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def _is_tun_path(link: str) -> bool:
    if link.endswith(" (deleted)"):
        link = link[:-len(" (deleted)")]
    return link == "/dev/net/tun" or link.endswith("/dev/net/tun") and os.path.isabs(link)


def find_tap_holders(proc_root: str = "/proc") -> tuple[dict[str, list[int]], dict[int, str]]:
    """TAP name -> pids holding it open through /dev/net/tun, or a jail's (its fdinfo says ``iff: NAME``), for
    processes in the caller's network namespace; and those processes' command lines."""
    own_netns = _netns_id(f"{proc_root}/self/ns/net")
    holders: dict[str, list[int]] = {}
    cmdlines: dict[int, str] = {}
    for pid in _pids_in(proc_root):
        fd_dir = f"{proc_root}/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        names = set()
        for fd in fds:
            # A jailed VMM opened its jail's node: <jail root>/dev/net/tun (as seen from here, chrooted or not).
            # Only the tun driver writes an iff: line in fdinfo, which is what names the TAP.
            if not _is_tun_path(_readlink(f"{fd_dir}/{fd}") or ""):
                continue
            for line in (_read(f"{proc_root}/{pid}/fdinfo/{fd}") or "").splitlines():
                if line.startswith("iff:") and line[4:].strip():
                    names.add(line[4:].strip())
        if not names or (own_netns is not None and _netns_id(f"{proc_root}/{pid}/ns/net") != own_netns):
            continue
        if start_time(pid, proc_root) is None:
            continue
        for name in names:
            holders.setdefault(name, []).append(pid)
        cmdlines[pid] = _short(" ".join(argv_of(pid, proc_root)))
    return holders, cmdlines


def _ppid(pid: int, proc_root: str) -> Optional[int]:
    raw = _read(f"{proc_root}/{pid}/stat")
    fields = raw.rsplit(")", 1)[-1].split() if raw else []
    try:
        return int(fields[1]) if len(fields) > 1 else None
    except ValueError:
        return None


def vmm_helpers(holders: Iterable[int], vmms: set[int], proc_root: str = "/proc",
                depth: int = 4) -> dict[int, tuple[int, int]]:
    """TAP holders that descend from one of the ``vmms`` (within ``depth`` generations): holder pid -> (VMM pid,
    holder start time). The Firecracker stand-in's QEMU holds the TAP that the stand-in opened."""
    helpers = {}
    for pid in holders:
        if pid in vmms:
            continue
        parent: Optional[int] = pid
        for _generation in range(depth):
            parent = _ppid(parent, proc_root) if parent else None
            if not parent or parent <= 1:
                break
            if parent in vmms:
                started = start_time(pid, proc_root)
                if started is not None:
                    helpers[pid] = (parent, started)
                break
    return helpers


def tap_candidates(links: dict[str, Link], prefix: str, bridge: Optional[str],
                   holders: dict[str, list[int]], where: str = "") -> list[TapDevice]:
    """TAP devices named ``prefix``..., only the ports of ``bridge`` when it is given."""
    by_index = {link.index: link for link in links.values()}
    bridge_index = None
    if bridge:
        link = links.get(bridge)
        if link is None:
            raise ReconcileError(f"bridge {bridge}: no such device{where}")
        if link.kind != "bridge":
            raise ReconcileError(f"bridge {bridge}: is a {link.kind or 'plain'} link, not a bridge{where}")
        bridge_index = link.index
    result = []
    for link in links.values():
        if not link.name.startswith(prefix) or link.kind != "tun" or link.tun is None or link.tun.mode != "tap":
            continue
        if bridge_index is not None and link.master != bridge_index:
            continue
        master = by_index.get(link.master) if link.master else None
        result.append(TapDevice(name=link.name, index=link.index, bridge=master.name if master else None,
                                attached=link.attached, holders=tuple(sorted(holders.get(link.name, ())))))
    return result


# --- settings --------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    state_dir: str
    tap_prefix: str = "fc-"
    netns: Optional[str] = None
    bridge: Optional[str] = None
    dhcp_leasefile: Optional[str] = None
    dhcp_interface: Optional[str] = None
    vms: Optional[frozenset[str]] = None
    remove: bool = False
    kinds: tuple[str, ...] = KINDS
    stop_timeout: float = 10.0
    dhcp_release: Optional[str] = None  # path of dnsmasq-utils' dhcp_release, when found
    proc_root: str = "/proc"

    @property
    def vms_dir(self) -> str:
        return os.path.join(self.state_dir, VMS_SUBDIR)

    @property
    def where(self) -> str:
        return f" in netns {self.netns}" if self.netns else ""

    @property
    def releasing(self) -> bool:
        return self.remove and "leases" in self.kinds and bool(self.dhcp_leasefile)


def settings_from(params: dict[str, Any], dhcp_release: Optional[str]) -> Settings:
    """Validated settings from module parameters; every problem named at once."""
    problems = []
    kinds = tuple(kind for kind in KINDS if kind in (params.get("kinds") or KINDS))
    unknown = sorted(set(params.get("kinds") or ()) - set(KINDS))
    if unknown:
        problems.append(f"kinds: unknown {', '.join(unknown)} (choose from {', '.join(KINDS)})")
    prefix = params.get("tap_prefix")
    if not prefix:
        problems.append("tap_prefix: must not be empty (it limits which TAPs may be deleted)")
    if params.get("stop_timeout") is not None and params["stop_timeout"] < 0:
        problems.append(f"stop_timeout: {params['stop_timeout']} is negative")
    if not os.path.isabs(params.get("state_dir") or ""):
        problems.append(f"state_dir: {params.get('state_dir')!r} is not an absolute path")
    settings = Settings(
        state_dir=os.path.normpath(params.get("state_dir") or "/"), tap_prefix=prefix or "",
        netns=params.get("netns"), bridge=params.get("bridge"),
        dhcp_leasefile=params.get("dhcp_leasefile"), dhcp_interface=params.get("dhcp_interface"),
        vms=frozenset(params["vms"]) if params.get("vms") is not None else None,
        remove=bool(params.get("remove")), kinds=kinds,
        stop_timeout=float(params.get("stop_timeout") if params.get("stop_timeout") is not None else 10),
        dhcp_release=dhcp_release,
    )
    if settings.releasing:
        if not settings.dhcp_interface:
            problems.append("dhcp_interface: required to release leases (remove=true, kinds has leases and "
                            "dhcp_leasefile is set): dhcp_release sends the release to dnsmasq on that interface")
        if not dhcp_release:
            problems.append("dhcp_release: not found; releasing DHCP leases needs it (Debian/Ubuntu package "
                            "dnsmasq-utils)")
    if problems:
        raise ReconcileError("; ".join(problems))
    return settings


# --- the run ----------------------------------------------------------------------


@dataclass
class Outcome:
    orphans: dict[str, list[Orphan]]
    removed: dict[str, list[dict[str, Any]]]
    left_in_place: dict[str, list[dict[str, Any]]]
    unlisted: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return any(self.removed.values())

    def report(self) -> dict[str, Any]:
        return {
            "changed": self.changed,
            "orphans": {kind: [o.report() for o in items] for kind, items in self.orphans.items()},
            "removed": self.removed,
            "left_in_place": self.left_in_place,
            "unlisted_vms": self.unlisted,
        }

    def done(self, orphan: Orphan, note: Optional[str] = None) -> None:
        self.removed[orphan.kind].append(orphan.report(**({"note": note} if note else {})))

    def skip(self, orphan: Orphan, reason: str) -> None:
        self.left_in_place[orphan.kind].append(orphan.report(reason=reason))


def take_snapshot(settings: Settings, allocations: dict[str, dict[str, Any]], warnings: list[str]) -> Snapshot:
    snap = Snapshot(vms_dir=settings.vms_dir, allocations=allocations, vm_dirs=read_vm_dirs(settings.vms_dir),
                    vms=settings.vms)
    kinds = settings.kinds
    # Processes decide what is blocked (and which TAPs a live VM holds), whatever kinds are asked.
    snap.processes = find_vmm_processes(settings.vms_dir, settings.proc_root)
    if "taps" in kinds:
        holders, snap.holder_cmdlines = find_tap_holders(settings.proc_root)
        snap.helpers = vmm_helpers({pid for pids in holders.values() for pid in pids},
                                   {proc.pid for proc in snap.processes}, settings.proc_root)
        try:
            with Netlink() as netlink:
                links = netlink.links()
        except (OSError, NetlinkOperationError) as exc:
            raise ReconcileError(f"cannot list network links{settings.where}: {exc}") from None
        snap.taps = tap_candidates(links, settings.tap_prefix, settings.bridge, holders, settings.where)
    if "leases" in kinds and settings.dhcp_leasefile:
        leases = read_leases(settings.dhcp_leasefile)
        if leases is None:
            warnings.append(f"dhcp_leasefile {settings.dhcp_leasefile} does not exist; no leases checked")
        snap.leases = leases or []
    return snap


def run(settings: Settings, check_mode: bool) -> Outcome:
    """Snapshot, classify, and (remove=true) remove or, in check mode, predict; under the allocations lock."""
    try:
        allocator = Allocator(settings.state_dir, make_pool(_PLACEHOLDER_CIDR), settings.tap_prefix)
    except AllocationError as exc:
        raise ReconcileError(str(exc)) from None
    if settings.remove and not os.path.isdir(settings.state_dir):
        raise ReconcileError(f"state_dir {settings.state_dir} does not exist; refusing to remove anything "
                             "without the host's allocations (wrong state_dir?)")
    if settings.releasing:
        try:
            socket.if_nametoindex(settings.dhcp_interface or "")
        except OSError:
            raise ReconcileError(f"dhcp_interface {settings.dhcp_interface}: no such interface"
                                 f"{settings.where}") from None
    warnings: list[str] = []
    exclusive = settings.remove and not check_mode
    # Exclusive while removing: no allocation is handed out or released while we judge and remove.
    with allocator.locked(exclusive=exclusive):
        try:
            allocations = allocator.read()
        except AllocationError as exc:
            raise ReconcileError(str(exc)) from None
        snap = take_snapshot(settings, allocations, warnings)
        orphans = classify(snap, settings.kinds)
        outcome = Outcome(orphans=orphans, removed={k: [] for k in orphans}, left_in_place={k: [] for k in orphans},
                          unlisted=unlisted_vms(snap), warnings=warnings)
        if not settings.remove:
            return outcome
        for items in orphans.values():
            for orphan in items:
                if orphan.blocked:
                    outcome.skip(orphan, orphan.blocked)
                elif check_mode:
                    outcome.done(orphan)
        if not check_mode:
            Remover(settings, allocator, snap, outcome).remove_all()
    return outcome


# --- removal ------------------------------------------------------------------------


class Remover:
    """Carries out the removable orphans of one classification, re-checking each object first."""

    def __init__(self, settings: Settings, allocator: Allocator, snap: Snapshot, outcome: Outcome) -> None:
        self.settings = settings
        self.allocator = allocator
        self.snap = snap
        self.outcome = outcome

    def _todo(self, kind: str) -> list[Orphan]:
        return [orphan for orphan in self.outcome.orphans.get(kind, []) if not orphan.blocked]

    def remove_all(self) -> None:
        self.processes(self._todo("processes"))
        self.taps(self._todo("taps"))
        self.leases(self._todo("leases"))
        self.vm_dirs(self._todo("vm_dirs"))
        self.allocations(self._todo("allocations"))

    def _alive(self, proc: VMMProcess) -> bool:
        return start_time(proc.pid, self.settings.proc_root) == proc.start_time

    def _signal(self, proc: VMMProcess, sig: int) -> Optional[str]:
        if not self._alive(proc):
            return None
        try:
            os.kill(proc.pid, sig)
        except ProcessLookupError:
            return None
        except OSError as exc:
            return f"VMM pid {proc.pid} of VM {proc.vm}: cannot send {signal.Signals(sig).name}: {exc.strerror}"
        return None

    def processes(self, todo: list[Orphan]) -> None:
        """SIGTERM every orphan VMM, wait; SIGKILL the survivors, wait; each step with a deadline."""
        pending = list(todo)
        for sig, seconds in ((signal.SIGTERM, self.settings.stop_timeout), (signal.SIGKILL, KILL_SECONDS)):
            if not pending:
                break
            for orphan in list(pending):
                error = self._signal(orphan.ref, sig)
                if error:
                    self.outcome.failures.append(error)
                    pending.remove(orphan)
            wait_until(lambda: not any(self._alive(o.ref) for o in pending), seconds, POLL_SECONDS)
            for orphan in list(pending):
                if not self._alive(orphan.ref):
                    self.outcome.done(orphan, note=f"stopped ({signal.Signals(sig).name})")
                    pending.remove(orphan)
        # Its helpers holding a TAP (the stand-in's QEMU dies with it) go too, before the TAPs are deleted.
        stopped = {orphan.ref.pid for orphan in todo if not self._alive(orphan.ref)}
        helpers = [(pid, started) for pid, (vmm, started) in self.snap.helpers.items() if vmm in stopped]
        wait_until(lambda: not any(start_time(pid, self.settings.proc_root) == started for pid, started in helpers),
                   KILL_SECONDS, POLL_SECONDS)
        for orphan in pending:
            self.outcome.failures.append(f"VMM pid {orphan.ref.pid} of VM {orphan.ref.vm}: still alive "
                                         f"{KILL_SECONDS:g} s after SIGKILL (uninterruptible sleep?)")

    def taps(self, todo: list[Orphan]) -> None:
        if not todo:
            return
        where = self.settings.where
        holders, cmdlines = find_tap_holders(self.settings.proc_root)
        try:
            with Netlink() as netlink:
                links = netlink.links()
                queued = []
                for orphan in todo:
                    tap: TapDevice = orphan.ref
                    link = links.get(tap.name)
                    if link is None:
                        self.outcome.done(orphan, note="already gone")
                        continue
                    if link.index != tap.index:
                        self.outcome.skip(orphan, f"TAP {tap.name} was recreated since the scan (ifindex "
                                                  f"{tap.index} -> {link.index}); left alone")
                        continue
                    now = holders.get(tap.name, [])
                    if now or link.attached:
                        users = "; ".join(f"pid {pid} ({cmdlines.get(pid, '?')})" for pid in now) or "a process"
                        self.outcome.skip(orphan, f"TAP {tap.name} is held open by {users}; refusing to delete "
                                                  "a TAP in use")
                        continue
                    netlink.delete_link(f"TAP {tap.name}: cannot delete{where}", link.index)
                    queued.append(orphan)
                try:
                    netlink.commit()
                except NetlinkOperationError as exc:
                    self.outcome.failures.append(str(exc))
                left = netlink.links() if queued else {}
        except (OSError, NetlinkOperationError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            self.outcome.failures.append(f"cannot list or delete network links{where}: {reason}")
            return
        for orphan in queued:
            link = left.get(orphan.ref.name)
            if link is None or link.index != orphan.ref.index:
                self.outcome.done(orphan)

    def leases(self, todo: list[Orphan]) -> None:
        """``dhcp_release IFACE IP MAC [CLIENT-ID]`` each, then wait for dnsmasq to drop them from its file."""
        if not todo:
            return
        path = self.settings.dhcp_leasefile or ""
        iface = self.settings.dhcp_interface or ""
        sent = []
        for orphan in todo:
            lease: Lease = orphan.ref
            argv = lease.release_argv(self.settings.dhcp_release or "dhcp_release", iface)
            try:
                proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)
            except (OSError, subprocess.TimeoutExpired) as exc:
                self.outcome.failures.append(f"lease {lease.ip} ({lease.mac}): cannot run dhcp_release: {exc}")
                continue
            if proc.returncode != 0:
                self.outcome.failures.append(
                    f"lease {lease.ip} ({lease.mac}): dhcp_release on {iface}{self.settings.where} failed "
                    f"(exit {proc.returncode}): {(proc.stderr or proc.stdout).strip()}")
                continue
            sent.append(orphan)

        def left() -> list[Lease]:
            return still_leased([orphan.ref for orphan in sent], read_leases(path) or [])

        wait_until(lambda: not left(), RELEASE_SECONDS, POLL_SECONDS)
        remaining = left()
        for orphan in sent:
            if orphan.ref in remaining:
                self.outcome.failures.append(
                    f"lease {orphan.ref.ip} ({orphan.ref.mac}): dnsmasq did not drop it from {path} within "
                    f"{RELEASE_SECONDS:g} s of dhcp_release on {iface}{self.settings.where} (is dnsmasq running, "
                    f"serving {iface}, with a dhcp-range that covers {orphan.ref.ip}?)")
            else:
                self.outcome.done(orphan)

    def _running_from(self, vm: str) -> list[int]:
        return [proc.pid for proc in find_vmm_processes(self.settings.vms_dir, self.settings.proc_root)
                if proc.vm == vm]

    def vm_dirs(self, todo: list[Orphan]) -> None:
        for orphan in todo:
            vm_dir: VMDir = orphan.ref
            try:
                info = os.lstat(vm_dir.path)
            except FileNotFoundError:
                self.outcome.done(orphan, note="already gone")
                continue
            except OSError as exc:
                self.outcome.failures.append(f"VM directory {vm_dir.path}: cannot inspect it: {exc.strerror}")
                continue
            if not stat.S_ISDIR(info.st_mode):
                self.outcome.skip(orphan, f"{vm_dir.path} is no longer a directory; left alone")
                continue
            running = self._running_from(vm_dir.name)
            if running:
                self.outcome.skip(orphan, f"VM directory {vm_dir.path}: a VMM (pid {_pids(running)}) of VM "
                                          f"{vm_dir.name} runs from it; left alone")
                continue
            sharing = sorted(jail_records(self.settings.vms_dir).get(vm_dir.jail_dir or "", set()) - {vm_dir.name})
            if sharing:
                self.outcome.skip(orphan, _shared_jail(vm_dir, sharing))
                continue
            try:
                # The jail first: the marker in the VM directory is the only record of where it is.
                _jail.remove_recorded(vm_dir.jail_dir, list(vm_dir.cgroup_dirs))
            except (_jail.JailError, OSError) as exc:
                reason = f"{exc.filename}: {exc.strerror}" if isinstance(exc, OSError) and exc.strerror else str(exc)
                self.outcome.failures.append(f"VM directory {vm_dir.path}: cannot remove its jail "
                                             f"{vm_dir.jail_dir}: {reason}; the directory is kept")
                continue
            try:
                shutil.rmtree(vm_dir.path)
            except OSError as exc:
                self.outcome.failures.append(f"VM directory {vm_dir.path}: cannot remove "
                                             f"{exc.filename or vm_dir.path}: {exc.strerror or exc}")
                continue
            self.outcome.done(orphan)

    def allocations(self, todo: list[Orphan]) -> None:
        """Rewrite allocations.json without the stale entries, under the lock held since the scan."""
        if not todo:
            return
        try:
            current = self.allocator.read()
        except AllocationError as exc:
            self.outcome.failures.append(str(exc))
            return
        drop = []
        for orphan in todo:
            name = orphan.name
            if name not in current:
                self.outcome.done(orphan, note="already gone")
            elif os.path.isdir(os.path.join(self.settings.vms_dir, name)):
                self.outcome.skip(orphan, f"allocation of VM {name}: its VM directory appeared since the scan; kept")
            elif self._running_from(name):
                self.outcome.skip(orphan, f"allocation of VM {name}: a VMM of VM {name} still runs; kept")
            else:
                drop.append(orphan)
        if not drop:
            return
        path = os.path.join(self.settings.state_dir, STATE_FILE)
        try:
            with open(path, encoding="utf-8") as handle:
                network = json.load(handle).get("network")
            self.allocator.pool = make_pool(str(network))
            names = {orphan.name for orphan in drop}
            # The allocator's own writer (atomic replace, mode 0600), called under the lock we hold.
            self.allocator._write({name: entry for name, entry in current.items() if name not in names})
        except (OSError, ValueError, AllocationError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            self.outcome.failures.append(f"{path}: cannot rewrite the allocations without "
                                         f"{', '.join(sorted(o.name for o in drop))}: {reason}")
            return
        for orphan in drop:
            self.outcome.done(orphan)

# -*- coding: utf-8 -*-
# Copyright: (c) 2026, microvm.firecracker contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""A VMM under Firecracker's jailer: the jail's layout, the files placed in it, the config as the jailed
VMM sees it (paths inside its chroot) and the jailer's command line.

The jailer (docs/jailer.md in Firecracker's repository) makes ``<chroot_base>/<exec file name>/<id>/root``,
copies the VMM binary there, creates ``/dev/net/tun`` and ``/dev/kvm``, joins the network namespace, sets
up the cgroup, chroots, drops to ``--uid``/``--gid`` and execs the VMM (same pid). Everything the VMM opens
must therefore be inside the jail root, readable or writable by that uid: fc_vm hard-links the kernel,
initrd and drives there before it starts the jailer.
"""
from __future__ import annotations

import copy
import errno
import os
import re
import shutil
from dataclasses import dataclass, field
from typing import Any, Optional

JAIL_SOCKET = "/run/firecracker.socket"
JAIL_CONFIG = "/config.json"
JAIL_METADATA = "/mmds.json"
JAIL_LOG = "/vmm.log"
JAIL_SNAPSHOT_DIR = "/snapshot"
JAIL_VSOCK = "/vsock.sock"
JAIL_MARKER = ".fc_vm_jail"
UNIX_PATH_MAX = 107
RESOURCE_LIMITS = {"fsize": "fsize", "no_file": "no-file"}
_CGROUP_FILE = re.compile(r"^[a-z_]+\.[A-Za-z0-9_.]+$")


class JailError(Exception):
    """The jail cannot be built as asked; raised before anything is created."""


@dataclass
class Placement:
    """A host file the jailed VMM needs, and where it appears inside the jail."""

    source: str
    jail_path: str
    writable: bool


@dataclass
class Jail:
    jailer_bin: str
    uid: int
    gid: int
    chroot_base_dir: str
    exec_file: str
    exec_name: str
    vm_id: str
    cgroups: dict[str, str]
    parent_cgroup: Optional[str]
    resource_limits: dict[str, int]
    placements: list[Placement] = field(default_factory=list)

    @property
    def jail_dir(self) -> str:
        return os.path.join(self.chroot_base_dir, self.exec_name, self.vm_id)

    @property
    def root(self) -> str:
        return os.path.join(self.jail_dir, "root")

    def host_path(self, jail_path: str) -> str:
        """Where a path the jailed VMM sees lives on the host."""
        return os.path.join(self.root, jail_path.lstrip("/"))

    def jail_path(self, host_path: str) -> str:
        """How the jailed VMM sees a host path inside its root."""
        relative = os.path.relpath(host_path, self.root)
        if relative.startswith(".."):
            raise JailError(f"{host_path} is outside the jail {self.root}")
        return "/" + relative

    def made_by_jailer(self) -> list[str]:
        """What the jailer creates in the root at each start and refuses to find there (its device nodes, its
        copy of the binary, its pidfile): the launch script removes them first, so a restart works."""
        return ["dev", self.exec_name, f"{self.exec_name}.pid"]

    def cgroup_dirs(self) -> list[str]:
        """The cgroup v2 directories the jailer makes for this VM (when it is given cgroup files): the VM's,
        then the default parent (the binary's name), which is removed with the last VM; a parent_cgroup of
        the operator's is theirs."""
        mount = cgroup2_mount()
        if mount is None or not self.cgroups:
            return []
        parent = os.path.join(mount, self.parent_cgroup or self.exec_name)
        return [os.path.join(parent, self.vm_id)] + ([parent] if not self.parent_cgroup else [])

    def argv(self, netns_file: Optional[str], vmm_args: list[str]) -> list[str]:
        """The jailer's command line; it appends ``--id`` to the VMM's own arguments itself."""
        args = [self.jailer_bin, "--id", self.vm_id, "--exec-file", self.exec_file,
                "--uid", str(self.uid), "--gid", str(self.gid), "--chroot-base-dir", self.chroot_base_dir,
                "--cgroup-version", "2"]
        if self.parent_cgroup:
            args += ["--parent-cgroup", self.parent_cgroup]
        for name, value in sorted(self.cgroups.items()):
            args += ["--cgroup", f"{name}={value}"]
        for name, value in sorted(self.resource_limits.items()):
            args += ["--resource-limit", f"{RESOURCE_LIMITS[name]}={value}"]
        if netns_file:
            args += ["--netns", netns_file]
        return args + ["--", *vmm_args]


def recorded_jail(jail_dir: str) -> Jail:
    """Enough of a jail to find and stop its VMM and remove it, from the jail directory fc_vm recorded."""
    exec_dir = os.path.dirname(jail_dir.rstrip("/"))
    return Jail(jailer_bin="", uid=0, gid=0, chroot_base_dir=os.path.dirname(exec_dir), exec_file="",
                exec_name=os.path.basename(exec_dir), vm_id=os.path.basename(jail_dir.rstrip("/")), cgroups={},
                parent_cgroup=None, resource_limits={})


def cgroup2_mount() -> Optional[str]:
    """The cgroup v2 hierarchy's mount point, found as the jailer finds it (/proc/mounts)."""
    try:
        with open("/proc/mounts", encoding="utf-8") as handle:
            for line in handle:
                fields = line.split()
                if len(fields) > 2 and fields[2] == "cgroup2":
                    return fields[1]
    except OSError:
        return None
    return None


def _id(field_name: str, value: Any, problems: list[str]) -> int:
    if isinstance(value, bool) or not isinstance(value, int) and not (isinstance(value, str) and value.isdigit()):
        problems.append(f"{field_name}: {value!r} is not a whole number")
        return -1
    number = int(value)
    if number <= 0 or number >= 2 ** 32 - 1:
        problems.append(f"{field_name}: {number} is not allowed (the jailed VMM must not run as root; 1..4294967294)")
        return -1
    return number


def build_jail(options: dict[str, Any], vm_id: str, firecracker_bin: str, problems: list[str]) -> Optional[Jail]:
    """Validate the ``jailer`` option; problems are appended, nothing is touched."""
    uid = _id("jailer.uid", options.get("uid"), problems)
    gid = _id("jailer.gid", options.get("gid"), problems)
    base = options.get("chroot_base_dir") or "/srv/jailer"
    if not os.path.isabs(base):
        problems.append(f"jailer.chroot_base_dir: {base} is not an absolute path")
    parent = options.get("parent_cgroup")
    if parent is not None and (not re.fullmatch(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*", parent)
                               or ".." in parent.split("/")):
        problems.append(f"jailer.parent_cgroup: {parent!r} is not a relative cgroup path")
    cgroups: dict[str, str] = {}
    for name, value in (options.get("cgroups") or {}).items():
        if not _CGROUP_FILE.match(str(name)):
            problems.append(f"jailer.cgroups: {name!r} is not a cgroup v2 file name (such as cpu.max or memory.max)")
        elif not str(value).strip() or "\n" in str(value):
            problems.append(f"jailer.cgroups.{name}: {value!r} is not a value")
        else:
            cgroups[str(name)] = str(value).strip()
    limits: dict[str, int] = {}
    for name, value in (options.get("resource_limits") or {}).items():
        if name not in RESOURCE_LIMITS:
            problems.append(f"jailer.resource_limits: {name!r} is not one of {', '.join(RESOURCE_LIMITS)}")
        elif isinstance(value, bool) or not str(value).isdigit():
            problems.append(f"jailer.resource_limits.{name}: {value!r} is not a whole number")
        else:
            limits[name] = int(value)
    # The jailer names the jail after the binary it copies, with symlinks resolved.
    exec_name = os.path.basename(os.path.realpath(firecracker_bin))
    if "firecracker" not in exec_name:
        problems.append(f"jailer: the jailer only runs a binary whose file name contains 'firecracker'; "
                        f"{firecracker_bin} resolves to {exec_name}")
    jail = Jail(jailer_bin=options.get("jailer_bin") or "/usr/local/bin/jailer", uid=uid, gid=gid,
                chroot_base_dir=base, exec_file=firecracker_bin, exec_name=exec_name, vm_id=vm_id,
                cgroups=cgroups, parent_cgroup=parent, resource_limits=limits)
    socket_path = jail.host_path(JAIL_SOCKET)
    if len(socket_path.encode()) > UNIX_PATH_MAX:
        problems.append(f"jailer.chroot_base_dir: the API socket path {socket_path} exceeds {UNIX_PATH_MAX} bytes")
    return jail


def jail_config(config: dict[str, Any], jail: Jail) -> dict[str, Any]:
    """The config with every host path replaced by where the jailed VMM finds it; records the placements."""
    jailed = copy.deepcopy(config)
    boot = jailed["boot-source"]
    jail.placements = [Placement(boot["kernel_image_path"], "/boot/kernel", False)]
    boot["kernel_image_path"] = "/boot/kernel"
    if boot.get("initrd_path"):
        jail.placements.append(Placement(boot["initrd_path"], "/boot/initrd", False))
        boot["initrd_path"] = "/boot/initrd"
    for drive in jailed["drives"]:
        target = f"/drives/{drive['drive_id']}"
        jail.placements.append(Placement(drive["path_on_host"], target, not drive["is_read_only"]))
        drive["path_on_host"] = target
    jailed["logger"]["log_path"] = JAIL_LOG
    if "vsock" in jailed:
        jailed["vsock"]["uds_path"] = JAIL_VSOCK
    return jailed


def check_placements(jail: Jail, problems: list[str]) -> None:
    """Hard links need the jail on the drives' filesystem: say so before anything is made."""
    probe = jail.chroot_base_dir
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    jail_device = os.stat(probe).st_dev
    for placement in jail.placements:
        if placement.writable and os.stat(placement.source).st_dev != jail_device:
            problems.append(f"jailer: drive {placement.source} is on another filesystem than "
                            f"{jail.chroot_base_dir}; the jail hard-links writable drives (a copy would fork the "
                            "disk), so put the drives and the chroot base on one filesystem")


def _make_dir(path: str, mode: int, uid: int = 0, gid: int = 0) -> None:
    os.makedirs(path, mode=mode, exist_ok=True)
    os.chown(path, uid, gid)
    os.chmod(path, mode)


def prepare(jail: Jail) -> bool:
    """Make the jail root and place every file; True when something changed."""
    changed = not os.path.isdir(jail.root)
    _make_dir(os.path.join(jail.chroot_base_dir, jail.exec_name), 0o755)
    _make_dir(jail.jail_dir, 0o750, 0, jail.gid)
    marker = os.path.join(jail.jail_dir, JAIL_MARKER)
    if not os.path.exists(marker):
        with open(marker, "w", encoding="utf-8") as handle:
            handle.write(jail.vm_id + "\n")
    # The jailer itself gives the root and /run to the VMM's uid, mode 0700, at each start.
    _make_dir(jail.root, 0o700, jail.uid, jail.gid)
    _make_dir(jail.host_path("/run"), 0o700, jail.uid, jail.gid)
    _make_dir(jail.host_path("/boot"), 0o750, 0, jail.gid)
    _make_dir(jail.host_path("/drives"), 0o750, 0, jail.gid)
    for placement in jail.placements:
        changed |= _place(jail, placement)
    log = jail.host_path(JAIL_LOG)
    if not os.path.exists(log):
        os.close(os.open(log, os.O_WRONLY | os.O_CREAT, 0o600))
        changed = True
    os.chown(log, jail.uid, jail.gid)
    return changed


def _place(jail: Jail, placement: Placement) -> bool:
    target = jail.host_path(placement.jail_path)
    source_stat = os.stat(placement.source)
    try:
        current = os.stat(target)
    except FileNotFoundError:
        current = None
    if current is not None and (current.st_dev, current.st_ino) == (source_stat.st_dev, source_stat.st_ino):
        changed = False
    else:
        temp = f"{target}.tmp-{os.getpid()}"
        try:
            os.link(placement.source, temp)
        except OSError as exc:
            if exc.errno != errno.EXDEV or placement.writable:
                raise
            # A read-only file (kernel, initrd) from another filesystem: a copy serves as well.
            shutil.copyfile(placement.source, temp)
        os.replace(temp, target)
        changed = True
    if placement.writable:
        os.chown(target, jail.uid, jail.gid)
    elif not _readable_by(os.stat(target), jail.uid, jail.gid):
        raise JailError(f"{placement.source} is not readable by the jailed VMM (uid {jail.uid}, gid {jail.gid}); "
                        "make it readable by others or by that group")
    return changed


def _readable_by(stat: os.stat_result, uid: int, gid: int) -> bool:
    if stat.st_uid == uid:
        return bool(stat.st_mode & 0o400)
    if stat.st_gid == gid:
        return bool(stat.st_mode & 0o040)
    return bool(stat.st_mode & 0o004)


def owned_for_vmm(jail: Jail, host_path: str, mode: int) -> None:
    """A file fc_vm writes for the VMM to read: root-owned, readable by the VMM's group only."""
    os.chown(host_path, 0, jail.gid)
    os.chmod(host_path, mode)


def remove_recorded(jail_dir: Optional[str], cgroup_dirs: list[str]) -> None:
    """Delete a VM's jail directory (only one fc_vm made: it carries the marker) and its cgroups."""
    if jail_dir and os.path.isdir(jail_dir):
        if not os.path.exists(os.path.join(jail_dir, JAIL_MARKER)):
            raise JailError(f"{jail_dir} has no {JAIL_MARKER} marker; refusing to delete a jail fc_vm did not make")
        shutil.rmtree(jail_dir)
    for position, cgroup in enumerate(cgroup_dirs):
        if not os.path.isdir(cgroup):
            continue
        try:
            os.rmdir(cgroup)
        except OSError as exc:
            if position == 0:
                raise JailError(f"cannot remove the VM's cgroup {cgroup}: {exc.strerror}") from None
            # A shared parent still holding other VMs' cgroups stays.

# -*- coding: utf-8 -*-
# Copyright: (c) 2026, microvm.firecracker contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""A microVM's spec: validated from module parameters, rendered to Firecracker's config-file format,
and compared with what a running VMM reports (``GET /vm/config``)."""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any, Optional

from ansible_collections.microvm.firecracker.plugins.module_utils._jail import (
    JAIL_LOG,
    UNIX_PATH_MAX,
    Jail,
    JailError,
    build_jail,
    check_placements,
    jail_config,
    recorded_jail,
)

# A Debian guest with systemd and a service needs more than this; the replaced system's
# 256 MiB guests died of OOM at boot.
MIN_MEM_MIB = 512
MAX_VCPUS = 32
DEFAULT_VMS_DIR = "/var/lib/firecracker/vms"
# fc_vm's record in a VM's state dir (its name and, when jailed, where its jail is).
MARKER = ".fc_vm"
DEFAULT_BOOT_ARGS = "console=ttyS0 reboot=k panic=1"
CPU_TEMPLATES = ("None", "C3", "T2", "T2S", "T2CL", "T2A", "V1N1")
LOG_LEVELS = ("Error", "Warning", "Info", "Debug", "Trace", "Off")
_VM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,63}$")
_DEVICE_ID = re.compile(r"^[A-Za-z0-9_]{1,64}$")
_MAC = re.compile(r"^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$")
_CREDENTIAL_PATTERNS = (
    (re.compile(r"[^\s:/@=]+:[^\s@/]+@"), "user:password@"),
    (re.compile(r"(?i)(^|[\s.])(password|passwd|pass|secret|token|api[_-]?key|access[_-]?key)="), "a secret-named key"),
)


class SpecError(Exception):
    """The requested VM is invalid; raised before anything is started or written."""


@dataclass
class VMSpec:
    name: str
    config: dict[str, Any]
    mmds_metadata: Optional[Any]
    state_dir: str
    console_log: str
    log_path: str
    jail: Optional[Jail] = None


def _whole_number(field: str, value: Any, low: int, high: Optional[int] = None) -> int:
    if isinstance(value, bool) or value is None:
        raise SpecError(f"{field}: {value!r} is not a whole number")
    if isinstance(value, float):
        if not value.is_integer():
            raise SpecError(f"{field}: {value} is not a whole number (fractional values are not accepted)")
        value = int(value)
    if isinstance(value, str):
        text = value.strip()
        if not re.fullmatch(r"[0-9]+", text):
            raise SpecError(f"{field}: {value!r} is not a whole number")
        value = int(text)
    if not isinstance(value, int):
        raise SpecError(f"{field}: {value!r} is not a whole number")
    if value < low or (high is not None and value > high):
        limit = f"{low}..{high}" if high is not None else f"at least {low}"
        raise SpecError(f"{field}: {value} is out of range ({limit})")
    return value


def _rate_limiter(field: str, value: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
    if not value:
        return None
    result: dict[str, Any] = {}
    for bucket in ("bandwidth", "ops"):
        if value.get(bucket) is None:
            continue
        spec = value[bucket]
        result[bucket] = {
            "size": _whole_number(f"{field}.{bucket}.size", spec.get("size"), 0),
            "refill_time": _whole_number(f"{field}.{bucket}.refill_time", spec.get("refill_time"), 0),
        }
        if spec.get("one_time_burst") is not None:
            burst_field = f"{field}.{bucket}.one_time_burst"
            result[bucket]["one_time_burst"] = _whole_number(burst_field, spec["one_time_burst"], 0)
    unknown = set(value) - {"bandwidth", "ops"}
    if unknown:
        raise SpecError(f"{field}: unknown keys {', '.join(sorted(unknown))} (bandwidth and ops only)")
    return result or None


def _unique_ids(section: str, key: str, entries: Optional[list[dict[str, Any]]],
                problems: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """(id, entry) for the entries whose id is valid and not a repeat; the others become problems."""
    result = []
    seen: set[str] = set()
    for index, entry in enumerate(entries or []):
        item_id = entry.get(key)
        if not isinstance(item_id, str) or not _DEVICE_ID.match(item_id):
            problems.append(f"{section}[{index}].{key}: {item_id!r} is not a valid id (letters, digits, '_')")
        elif item_id in seen:
            problems.append(f"{section}[{item_id}]: {key} {item_id} is used twice")
        else:
            seen.add(item_id)
            result.append((item_id, entry))
    return result


def credential_in_boot_args(boot_args: str) -> Optional[str]:
    for pattern, what in _CREDENTIAL_PATTERNS:
        if pattern.search(boot_args):
            return what
    return None


def _absolute_path(field: str, path: Optional[str]) -> str:
    if not path:
        raise SpecError(f"{field}: a path is required")
    if not os.path.isabs(path):
        raise SpecError(f"{field}: {path} is not an absolute path")
    return path


def _readable_file(field: str, path: Optional[str]) -> str:
    path = _absolute_path(field, path)
    if not os.path.isfile(path):
        raise SpecError(f"{field}: {path} does not exist or is not a regular file")
    if not os.access(path, os.R_OK):
        raise SpecError(f"{field}: {path} is not readable")
    return path


def _name_and_state_dir(params: dict[str, Any]) -> tuple[str, str]:
    name = params["name"]
    if not isinstance(name, str) or not _VM_NAME.match(name):
        raise SpecError(f"name: {name!r} is not a valid VM id (letters, digits and '-', starting with a "
                        "letter or digit, at most 64 characters)")
    state_dir = params.get("state_dir") or os.path.join(DEFAULT_VMS_DIR, name)
    if not os.path.isabs(state_dir):
        raise SpecError(f"VM {name}: state_dir {state_dir} is not an absolute path")
    socket_path = os.path.join(state_dir, "api.sock")
    if len(socket_path.encode()) > UNIX_PATH_MAX:
        raise SpecError(f"VM {name}: state_dir is too long: the API socket path {socket_path} exceeds "
                        f"{UNIX_PATH_MAX} bytes (a Unix socket limit)")
    return name, state_dir


def read_marker(state_dir: str) -> dict[str, Any]:
    """fc_vm's marker in a VM's state dir: {} when it is missing or not JSON (older fc_vm, not fc_vm's)."""
    try:
        with open(os.path.join(state_dir, MARKER), encoding="utf-8") as handle:
            marker = json.load(handle)
    except (OSError, ValueError):
        return {}
    return marker if isinstance(marker, dict) else {}


def marker_jail(marker: dict[str, Any]) -> tuple[Optional[str], tuple[str, ...]]:
    """(jail directory, cgroup directories) a marker records; (None, ()) for a VM that is not jailed."""
    jail_dir = marker.get("jail_dir")
    if not isinstance(jail_dir, str) or not os.path.isabs(jail_dir):
        return None, ()
    cgroups = marker.get("cgroup_dirs")
    if not isinstance(cgroups, list):
        return os.path.normpath(jail_dir), ()
    return os.path.normpath(jail_dir), tuple(c for c in cgroups if isinstance(c, str) and os.path.isabs(c))


def removal_spec(params: dict[str, Any]) -> VMSpec:
    """Removing a VM needs only its name and where its files are, not a valid full spec. Where a jailed VM's
    jail is comes from what fc_vm recorded at launch."""
    name, state_dir = _name_and_state_dir(params)
    log_path = params.get("log_path") or os.path.join(state_dir, "vmm.log")
    jail = None
    jail_dir = marker_jail(read_marker(state_dir))[0]
    if jail_dir:
        jail = recorded_jail(jail_dir)
        log_path = jail.host_path(JAIL_LOG)
    return VMSpec(name=name, config={}, mmds_metadata=None, state_dir=state_dir,
                  console_log=params.get("console_log") or os.path.join(state_dir, "console.log"),
                  log_path=log_path, jail=jail)


def build_spec(params: dict[str, Any], tap_problem: Any, drives_pending: bool = False) -> VMSpec:
    """Validate every field and render the config. ``tap_problem(name)`` says why a TAP is unusable, or None.

    With ``drives_pending`` (check mode, for a VM whose disk an earlier task would create) a drive's file need
    not exist yet; its path must still be absolute.
    """
    name, state_dir = _name_and_state_dir(params)
    label = f"VM {name}"
    problems: list[str] = []

    def check(call: Any, *args: Any) -> Any:
        try:
            return call(*args)
        except SpecError as exc:
            problems.append(str(exc))
            return None

    vcpus = check(_whole_number, "vcpu_count", params.get("vcpu_count"), 1, MAX_VCPUS)
    memory = check(_whole_number, "mem_size_mib", params.get("mem_size_mib"), MIN_MEM_MIB)
    kernel = check(_readable_file, "kernel", params.get("kernel"))
    initrd = params.get("initrd")
    if initrd:
        check(_readable_file, "initrd", initrd)
    boot_args = params.get("boot_args") or DEFAULT_BOOT_ARGS
    credential = credential_in_boot_args(boot_args)
    if credential:
        problems.append(f"boot_args: contains what looks like a credential ({credential}); the kernel command "
                        "line is readable by every process in the guest and logged by the VMM. Pass secrets "
                        "with mmds_metadata or a secret file injected by rootfs_inject")
    template = params.get("cpu_template")
    if template is not None and template not in CPU_TEMPLATES:
        problems.append(f"cpu_template: {template!r} is not one of {', '.join(CPU_TEMPLATES)}")

    drives = []
    roots = []
    for drive_id, drive in _unique_ids("drives", "drive_id", params.get("drives"), problems):
        field = f"drives[{drive_id}]"
        path = check(_absolute_path if drives_pending else _readable_file, f"{field}.path", drive.get("path"))
        if drive.get("root"):
            roots.append(drive_id)
        rendered: dict[str, Any] = {
            "drive_id": drive_id,
            "path_on_host": path,
            "is_root_device": bool(drive.get("root")),
            "is_read_only": bool(drive.get("read_only")),
            "cache_type": drive.get("cache_type") or "Unsafe",
            "io_engine": drive.get("io_engine") or "Sync",
        }
        limiter = check(_rate_limiter, f"{field}.rate_limiter", drive.get("rate_limiter"))
        if limiter:
            rendered["rate_limiter"] = limiter
        drives.append(rendered)
    if len(roots) > 1:
        problems.append(f"drives: more than one root drive ({', '.join(roots)}); exactly one may have root=true")
    if not roots:
        problems.append("drives: no root drive; mark one drive root=true")

    interfaces = []
    seen_taps: set[str] = set()
    for iface_id, iface in _unique_ids("network_interfaces", "iface_id", params.get("network_interfaces"), problems):
        field = f"network_interfaces[{iface_id}]"
        tap = iface.get("tap")
        if tap in seen_taps:
            problems.append(f"{field}.tap: TAP {tap} is used by two interfaces")
        seen_taps.add(tap)
        why = tap_problem(tap)
        if why:
            problems.append(f"{field}.tap: {why}")
        rendered = {"iface_id": iface_id, "host_dev_name": tap}
        mac = iface.get("guest_mac")
        if mac is not None:
            if not _MAC.match(mac):
                problems.append(f"{field}.guest_mac: {mac!r} is not a MAC address (six hex pairs separated by ':')")
            elif int(mac[:2], 16) & 1:
                problems.append(f"{field}.guest_mac: {mac} is a multicast address; a guest needs a unicast MAC")
            elif mac.replace(":", "") == "000000000000":
                problems.append(f"{field}.guest_mac: the all-zero MAC is not usable")
            else:
                rendered["guest_mac"] = mac.lower()
        for direction in ("rx_rate_limiter", "tx_rate_limiter"):
            limiter = check(_rate_limiter, f"{field}.{direction}", iface.get(direction))
            if limiter:
                rendered[direction] = limiter
        interfaces.append(rendered)

    machine: dict[str, Any] = {"vcpu_count": vcpus, "mem_size_mib": memory, "smt": bool(params.get("smt"))}
    if template is not None:
        machine["cpu_template"] = template
    boot: dict[str, Any] = {"kernel_image_path": kernel, "boot_args": boot_args}
    if initrd:
        boot["initrd_path"] = initrd
    log_path = params.get("log_path") or os.path.join(state_dir, "vmm.log")
    config: dict[str, Any] = {
        "boot-source": boot,
        "drives": drives,
        "machine-config": machine,
        "network-interfaces": interfaces,
        "logger": {"log_path": log_path, "level": params.get("log_level") or "Warning",
                   "show_level": True, "show_log_origin": False},
    }
    if params.get("metrics_path"):
        config["metrics"] = {"metrics_path": params["metrics_path"]}
    mmds = params.get("mmds")
    if mmds:
        mmds_ifaces = mmds.get("network_interfaces") or [i["iface_id"] for i in interfaces[:1]]
        known = {i["iface_id"] for i in interfaces}
        unknown = [i for i in mmds_ifaces if i not in known]
        if unknown:
            problems.append(f"mmds.network_interfaces: {', '.join(unknown)} not among network_interfaces")
        rendered_mmds: dict[str, Any] = {"version": mmds.get("version") or "V2", "network_interfaces": mmds_ifaces}
        if mmds.get("ipv4_address"):
            rendered_mmds["ipv4_address"] = mmds["ipv4_address"]
        config["mmds-config"] = rendered_mmds
    elif params.get("mmds_metadata") is not None:
        problems.append("mmds_metadata: set mmds (at least {}) to give the guest a metadata service")
    vsock = params.get("vsock")
    if vsock:
        cid = check(_whole_number, "vsock.guest_cid", vsock.get("guest_cid"), 3)
        uds = vsock.get("uds_path") or os.path.join(state_dir, "vsock.sock")
        config["vsock"] = {"guest_cid": cid, "uds_path": uds}
    balloon = params.get("balloon")
    if balloon:
        config["balloon"] = {
            "amount_mib": check(_whole_number, "balloon.amount_mib", balloon.get("amount_mib", 0), 0),
            "deflate_on_oom": bool(balloon.get("deflate_on_oom")),
            "stats_polling_interval_s": check(_whole_number, "balloon.stats_polling_interval_s",
                                              balloon.get("stats_polling_interval_s", 0), 0),
        }
    jail = None
    if params.get("jailer"):
        for option, where in (("log_path", JAIL_LOG), ("metrics_path", None)):
            if params.get(option):
                problems.append(f"{option}: not with jailer: the jailed VMM can only reach files inside its jail"
                                + (f" (its log is <jail root>{where})" if where else ""))
        if vsock and vsock.get("uds_path"):
            problems.append("vsock.uds_path: not with jailer: the vsock socket is <jail root>/vsock.sock")
        jail = build_jail(params["jailer"], name, params.get("firecracker_bin") or "", problems)
    if problems:
        raise SpecError(f"{label}: " + "; ".join(problems))
    if jail is not None:
        config = jail_config(config, jail)
        try:
            check_placements(jail, problems)
        except (OSError, JailError) as exc:
            problems.append(f"jailer: {exc}")
        if problems:
            raise SpecError(f"{label}: " + "; ".join(problems))
        log_path = jail.host_path(JAIL_LOG)
    return VMSpec(name=name, config=config, mmds_metadata=params.get("mmds_metadata"), state_dir=state_dir,
                  console_log=params.get("console_log") or os.path.join(state_dir, "console.log"),
                  log_path=log_path, jail=jail)


_LIST_KEYS = {"drives": "drive_id", "network-interfaces": "iface_id"}
# Sections a VMM may legitimately leave out of GET /vm/config.
_OPTIONAL_SECTIONS = ("logger", "metrics")


def differences(wanted: Any, actual: Any, path: str = "") -> list[str]:
    """Where ``actual`` differs from ``wanted``; keys ``wanted`` does not set are not compared."""
    if isinstance(wanted, dict):
        if not isinstance(actual, dict):
            return [f"{path or '/'}: {actual!r} -> {wanted!r}"]
        result = []
        for key, value in wanted.items():
            if not path and key in _OPTIONAL_SECTIONS and actual.get(key) is None:
                continue
            sub = f"{path}.{key}" if path else key
            if key in _LIST_KEYS and isinstance(value, list):
                result += _list_differences(value, actual.get(key) or [], sub, _LIST_KEYS[key])
            else:
                result += differences(value, actual.get(key), sub)
        return result
    if wanted != actual:
        return [f"{path}: {actual!r} -> {wanted!r}"]
    return []


def _list_differences(wanted: list[Any], actual: list[Any], path: str, key: str) -> list[str]:
    wanted_by_id = {item[key]: item for item in wanted}
    actual_by_id = {item.get(key): item for item in actual if isinstance(item, dict)}
    result = [f"{path}[{item_id}]: removed" for item_id in actual_by_id if item_id not in wanted_by_id]
    for item_id, item in wanted_by_id.items():
        if item_id not in actual_by_id:
            result.append(f"{path}[{item_id}]: added")
        else:
            result += differences(item, actual_by_id[item_id], f"{path}[{item_id}]")
    return result

# -*- coding: utf-8 -*-
# Copyright: (c) 2026, microvm.firecracker contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The microvm role's VM list, checked as a whole before anything on a host is touched.

Each VM is normalised (profile resolved, defaults filled in) and every problem is collected, named by VM
and field, so one run reports all of them. The per-field rules are the modules' own (fc_vm, rootfs_inject),
imported rather than restated, so the role cannot accept what a module would refuse later.
"""
from __future__ import annotations

import ipaddress
from typing import Any, Callable, Optional

from ansible_collections.microvm.firecracker.plugins.module_utils._fc_config import (
    _VM_NAME,
    MIN_MEM_MIB,
    MAX_VCPUS,
    SpecError,
    _whole_number,
    credential_in_boot_args,
)
from ansible_collections.microvm.firecracker.plugins.module_utils._rootfs_inject import (
    InjectError,
    check_environment,
    check_guest_path,
    check_unit_name,
    check_unit_to_enable,
)

STATES = ("running", "stopped", "paused", "absent")
ADDRESSING = ("dhcp", "static")
ON_CHANGE = ("restart", "fail", "ignore")
VM_KEYS = frozenset((
    "name", "state", "profile", "vcpu_count", "mem_size_mib", "image", "boot_args", "environment",
    "environment_secret", "systemd_units", "files", "wait_for", "autostart", "addressing", "on_change",
    "mmds_metadata",
))
WAIT_KEYS = frozenset(("port", "http_path", "http_status", "contains", "timeout"))
UNIT_KEYS = frozenset(("name", "content", "src", "enabled"))
FILE_KEYS = frozenset(("dest", "content", "src", "mode", "owner", "group", "secret"))


class PlanError(Exception):
    pass


def _sources(where: str, entry: dict[str, Any], problems: list[str]) -> None:
    if ("content" in entry) == ("src" in entry):
        problems.append(f"{where}: give exactly one of content (text) or src (a file on the controller)")


def _unknown(where: str, entry: dict[str, Any], allowed: frozenset[str], problems: list[str]) -> None:
    extra = sorted(set(entry) - allowed)
    if extra:
        problems.append(f"{where}: unknown key(s) {', '.join(map(str, extra))} (allowed: {', '.join(sorted(allowed))})")


def _injections(label: str, vm: dict[str, Any], key: str, allowed: frozenset[str],
                check: Callable[[dict[str, Any]], Any], problems: list[str]) -> list[Any]:
    """The list ``vm[key]`` of things to inject (units, files), each checked by ``check`` (rootfs_inject's rule,
    raising InjectError), for known keys and for exactly one source; returned as given (``[]`` when unset)."""
    entries = vm.get(key) or []
    if not isinstance(entries, list):
        problems.append(f"{label}: {key} must be a list")
        return []
    for position, entry in enumerate(entries):
        where = f"{label}: {key}[{position}]"
        if not isinstance(entry, dict):
            problems.append(f"{where}: expected a dict")
            continue
        _unknown(where, entry, allowed, problems)
        try:
            check(entry)
        except InjectError as exc:
            problems.append(f"{where}: {exc.cause}")
        _sources(where, entry, problems)
    return entries


def _check_unit(unit: dict[str, Any]) -> None:
    """rootfs_inject's rules for a unit the role injects (enabled unless ``enabled: false``)."""
    check_unit_name(unit.get("name"))
    if isinstance(unit.get("content"), str) and unit.get("enabled", True) is True:
        check_unit_to_enable(unit["name"], unit["content"])


def _one(vm: Any, index: int, profiles: dict[str, Any], defaults: dict[str, Any],
         problems: list[str]) -> Optional[dict[str, Any]]:
    if not isinstance(vm, dict):
        problems.append(f"microvm_vms[{index}]: expected a dict with at least a name, got {type(vm).__name__}")
        return None
    name = vm.get("name")
    label = f"VM {name}" if isinstance(name, str) and name else f"microvm_vms[{index}]"
    if not isinstance(name, str) or not _VM_NAME.match(name):
        problems.append(f"{label}: name {name!r} is not valid (letters, digits and -, at most 64, not starting with -)")
    _unknown(label, vm, VM_KEYS, problems)
    plan = dict(vm)
    plan["state"] = vm.get("state", "running")
    if plan["state"] not in STATES:
        problems.append(f"{label}: state {plan['state']!r} is not one of {', '.join(STATES)}")
    if plan["state"] == "absent":
        return plan

    profile_name = vm.get("profile", defaults.get("profile"))
    profile: dict[str, Any] = {}
    if profile_name is not None:
        if profile_name not in profiles:
            problems.append(f"{label}: profile {profile_name!r} is not defined (known: {', '.join(sorted(profiles)) or 'none'})")
        else:
            profile = profiles[profile_name] or {}
    for field, low, high in (("vcpu_count", 1, MAX_VCPUS), ("mem_size_mib", MIN_MEM_MIB, None)):
        value = vm.get(field, profile.get(field, defaults.get(field)))
        try:
            plan[field] = _whole_number(f"{label}: {field}", value, low, high)
        except SpecError as exc:
            problems.append(str(exc) + (" (the floor keeps Debian guests from dying of OOM at boot)"
                                        if field == "mem_size_mib" else ""))
    for field in ("image", "boot_args", "addressing", "on_change"):
        plan[field] = vm.get(field, defaults.get(field))
    if plan["addressing"] not in ADDRESSING:
        problems.append(f"{label}: addressing {plan['addressing']!r} is not one of {', '.join(ADDRESSING)}")
    if plan["on_change"] not in ON_CHANGE:
        problems.append(f"{label}: on_change {plan['on_change']!r} is not one of {', '.join(ON_CHANGE)}")
    if not isinstance(plan["boot_args"], str):
        problems.append(f"{label}: boot_args must be a string")
    else:
        what = credential_in_boot_args(plan["boot_args"])
        if what:
            problems.append(f"{label}: boot_args contains what looks like a credential ({what}); the kernel command "
                            "line is readable by every process in the guest and on the host; pass secrets in "
                            "environment (environment_secret: true) or MMDS metadata")
    plan["autostart"] = bool(vm.get("autostart", defaults.get("autostart", False)))
    plan["environment_secret"] = bool(vm.get("environment_secret", False))
    environment = vm.get("environment") or {}
    try:
        check_environment(environment)
    except InjectError as exc:
        problems.append(f"{label}: environment: {exc.cause}")
    plan["environment"] = environment

    plan["systemd_units"] = _injections(label, vm, "systemd_units", UNIT_KEYS, _check_unit, problems)
    plan["files"] = _injections(label, vm, "files", FILE_KEYS,
                                lambda entry: check_guest_path(entry.get("dest"), "dest"), problems)

    wait_for = vm.get("wait_for")
    if wait_for is not None:
        if not isinstance(wait_for, dict) or "port" not in wait_for:
            problems.append(f"{label}: wait_for must be a dict with at least a port")
        else:
            _unknown(f"{label}: wait_for", wait_for, WAIT_KEYS, problems)
            plan["wait_for"] = {"timeout": defaults.get("wait_timeout", 120), **wait_for}
    return plan


def vm_plan(vms: Any, profiles: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """Return ``{"vms": [...normalised...], "errors": [...]}``; the role fails on any error."""
    problems: list[str] = []
    if not isinstance(vms, list):
        return {"vms": [], "errors": [f"microvm_vms must be a list, got {type(vms).__name__}"]}
    planned = []
    seen: dict[str, int] = {}
    for index, vm in enumerate(vms):
        plan = _one(vm, index, profiles, defaults, problems)
        if plan is None:
            continue
        name = plan.get("name")
        if isinstance(name, str):
            if name in seen:
                problems.append(f"VM {name}: the name is used twice (microvm_vms[{seen[name]}] and [{index}])")
            seen.setdefault(name, index)
        planned.append(plan)
    return {"vms": planned, "errors": problems}


def fleet_subnet(supernet: Any, prefix: Any, index: Any) -> str:
    """The ``index``-th /``prefix`` subnet of ``supernet`` (index 0 is the first)."""
    try:
        network = ipaddress.IPv4Network(str(supernet), strict=True)
    except ValueError as exc:
        raise PlanError(f"supernet {supernet!r} is not an IPv4 network ({exc})")
    try:
        new_prefix, position = int(prefix), int(index)
    except (TypeError, ValueError):
        raise PlanError(f"prefix {prefix!r} and index {index!r} must be whole numbers")
    if not network.prefixlen <= new_prefix <= 29:
        raise PlanError(f"prefix /{new_prefix} must be between /{network.prefixlen} and /29")
    count = 2 ** (new_prefix - network.prefixlen)
    if not 0 <= position < count:
        raise PlanError(f"index {position} is outside the {count} /{new_prefix} subnets of {network}")
    return str(ipaddress.IPv4Network((int(network.network_address) + position * 2 ** (32 - new_prefix), new_prefix)))


def _network_file(allocation: dict[str, Any], dns: list[str]) -> str:
    lines = ["[Match]", "Name=eth0", "", "[Network]",
             f"Address={allocation['ip']}/{allocation['prefix']}", f"Gateway={allocation['gateway']}"]
    lines += [f"DNS={server}" for server in dns]
    return "\n".join(lines) + "\n"


def vm_launch(vms: list[dict[str, Any]], allocations: dict[str, Any], network: dict[str, Any],
              settings: dict[str, Any]) -> list[dict[str, Any]]:
    """Per VM, the arguments of every step of a launch but the injection (see vm_injections)."""
    return [{key: value for key, value in launch.items() if key != "inject"}
            for launch in _launches(vms, allocations, network, settings)]


def vm_injections(vms: list[dict[str, Any]], allocations: dict[str, Any], network: dict[str, Any],
                  settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per VM name, the rootfs_inject arguments, kept apart because they may carry secrets."""
    return {launch["name"]: launch["inject"] for launch in _launches(vms, allocations, network, settings)}


def _launches(vms: list[dict[str, Any]], allocations: dict[str, Any], network: dict[str, Any],
              settings: dict[str, Any]) -> list[dict[str, Any]]:
    """Per VM, the arguments of every step of a launch, derived from one plan and one allocation.

    ``settings`` holds state_dir, golden_dir, firecracker_bin, supervisor, stop_timeout. Files and units
    given with ``src`` (on the controller) are staged in the VM's directory first; ``copies`` lists them.
    """
    launches = []
    for vm in vms:
        name = vm["name"]
        allocation = allocations.get(name)
        if not allocation:
            raise PlanError(f"VM {name}: no address allocation")
        vm_dir = f"{settings['state_dir'].rstrip('/')}/vms/{name}"
        disk = f"{vm_dir}/rootfs.ext4"
        copies = []
        units = []
        for unit in vm.get("systemd_units") or []:
            entry = {"name": unit["name"], "enabled": unit.get("enabled", True)}
            if "src" in unit:
                staged = f"{vm_dir}/inject/unit-{unit['name']}"
                copies.append({"src": unit["src"], "dest": staged, "secret": False})
                entry["src"] = staged
            else:
                entry["content"] = unit["content"]
            units.append(entry)
        files = []
        for position, spec in enumerate(vm.get("files") or []):
            entry = {"path": spec["dest"]}
            entry.update({key: spec[key] for key in ("mode", "owner", "group", "secret") if key in spec})
            if "src" in spec:
                staged = f"{vm_dir}/inject/file-{position}"
                copies.append({"src": spec["src"], "dest": staged, "secret": bool(spec.get("secret", False))})
                entry["src"] = staged
            else:
                entry["content"] = spec["content"]
            files.append(entry)
        if vm["addressing"] == "static":
            files.append({"path": "/etc/systemd/network/10-eth0.network", "mode": "0644",
                          "content": _network_file(allocation, list(network.get("dns_servers") or []))})
        inject = {
            "image": disk, "hostname": name, "reset_machine_id": True,
            "environment": vm.get("environment") or None, "environment_secret": vm["environment_secret"],
            "systemd_units": units, "files": files,
        }
        wait_for = None
        if vm.get("wait_for"):
            wait_for = {"host": allocation["ip"], **vm["wait_for"]}
        tap: dict[str, Any] = {"name": allocation["tap"]}
        jailer = None
        if settings.get("jailer"):
            # One uid/gid per VM, stable: the host part of its address (unique within the host's network).
            address = ipaddress.IPv4Interface(f"{allocation['ip']}/{allocation['prefix']}")
            offset = int(address.ip) - int(address.network.network_address)
            uid = int(settings["jailer"]["uid_base"]) + offset
            jailer = {key: settings["jailer"][key] for key in ("jailer_bin", "chroot_base_dir", "cgroups", "parent_cgroup")}
            jailer.update({"uid": uid, "gid": uid})
            tap.update({"owner": uid, "group": uid})
        fc_vm = {
            "jailer": jailer,
            "name": name, "state": vm["state"], "state_dir": vm_dir, "netns": network.get("netns") or None,
            "supervisor": settings["supervisor"], "firecracker_bin": settings["firecracker_bin"],
            "boot_args": vm["boot_args"], "vcpu_count": vm["vcpu_count"], "mem_size_mib": vm["mem_size_mib"],
            "drives": [{"drive_id": "rootfs", "path": disk, "root": True}],
            "network_interfaces": [{"iface_id": "eth0", "tap": allocation["tap"], "guest_mac": allocation["mac"]}],
            "autostart": vm["autostart"], "on_change": vm["on_change"], "stop_timeout": settings["stop_timeout"],
        }
        launches.append({
            "name": name, "state": vm["state"], "dir": vm_dir, "disk": disk, "ip": allocation["ip"],
            "golden": f"{settings['golden_dir'].rstrip('/')}/golden-{vm['image']}.ext4",
            "tap": tap, "copies": copies, "inject": inject, "fc_vm": fc_vm,
            "wait_for": wait_for, "secret": vm["environment_secret"] or any(c["secret"] for c in copies),
        })
    return launches


def vm_prepare_args(launches: list[dict[str, Any]], injections: dict[str, dict[str, Any]],
                    new_names: list[str]) -> list[dict[str, Any]]:
    """rootfs_prepare's ``vms``: every VM's directory, disk and injection (``new``: created by this run)."""
    return [{
        "name": launch["name"], "dir": launch["dir"], "golden": launch["golden"], "disk": launch["disk"],
        "inject": injections[launch["name"]], "staged": [copy["dest"] for copy in launch["copies"]],
        "new": launch["name"] in new_names, "on_change": launch["fc_vm"]["on_change"],
        "supervisor": launch["fc_vm"]["supervisor"], "stop_timeout": launch["fc_vm"]["stop_timeout"],
    } for launch in launches]


def _kernel_files(prepared: dict[str, Any]) -> tuple[str, str]:
    """The kernel and initrd of the golden version the VM's disk was cloned from (they lie beside it)."""
    source = prepared.get("source")
    if not source or not source.endswith(".ext4"):
        raise PlanError(f"VM {prepared.get('name')}: its disk records no golden image it was cloned from")
    return source[:-len(".ext4")] + ".vmlinux", source[:-len(".ext4")] + ".initrd"


def vm_start_args(launches: list[dict[str, Any]], prepared: list[dict[str, Any]],
                  skip: list[str]) -> list[dict[str, Any]]:
    """fc_vms' ``vms``: fc_vm's options per VM (those in ``skip`` left out), with the kernel and initrd of the
    golden version each disk came from, and the readiness check for VMs that should run."""
    by_name = {entry["name"]: entry for entry in prepared}
    vms = []
    for launch in launches:
        if launch["name"] in skip:
            continue
        if launch["name"] not in by_name:
            raise PlanError(f"VM {launch['name']}: its disk was not prepared")
        args = {key: value for key, value in launch["fc_vm"].items() if key != "netns" and value is not None}
        args["kernel"], args["initrd"] = _kernel_files(by_name[launch["name"]])
        if launch["wait_for"] is not None and launch["state"] == "running":
            args["wait_for"] = launch["wait_for"]
        vms.append(args)
    return vms


def vm_teardown_args(names: list[str], allocations: dict[str, dict[str, Any]],
                     settings: dict[str, Any]) -> dict[str, Any]:
    """What removing the VMs ``names`` takes, one task each: ``vms`` (fc_vms' elements, state absent), ``taps``
    (tap_vnet_hdr's, from the host's allocations; a VM with no allocation has none) and ``dirs``."""
    if not isinstance(names, list) or not all(isinstance(name, str) and name for name in names):
        raise PlanError(f"the VM names to remove must be a list of names, not {names!r}")
    state_dir = settings["state_dir"]
    return {
        "vms": [{"name": name, "state": "absent", "state_dir": f"{state_dir}/vms/{name}",
                 "supervisor": settings["supervisor"], "stop_timeout": int(settings["stop_timeout"])}
                for name in names],
        "taps": [{"name": allocations[name]["tap"]} for name in names if name in allocations],
        "dirs": [f"{state_dir}/vms/{name}" for name in names],
    }


def vm_report(launches: list[dict[str, Any]], prepared: list[dict[str, Any]],
              started: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The microvm_launched fact: per VM name, its address, TAP, files, golden version, pid and readiness."""
    versions = {entry["name"]: entry.get("version") for entry in prepared}
    runs = {entry["name"]: entry for entry in started}
    return {launch["name"]: {
        "ip": launch["ip"], "tap": launch["tap"]["name"], "mac": launch["fc_vm"]["network_interfaces"][0]["guest_mac"],
        "dir": launch["dir"], "disk": launch["disk"], "state": launch["state"],
        "golden_version": versions.get(launch["name"]),
        "pid": runs.get(launch["name"], {}).get("pid"),
        "ready_seconds": runs.get(launch["name"], {}).get("ready_seconds"),
    } for launch in launches}

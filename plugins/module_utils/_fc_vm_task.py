# -*- coding: utf-8 -*-
# Copyright: (c) 2026, microvm.firecracker contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""One fc_vm task: its options, its validation and its converge flow, shared by fc_vm and fc_vms.

The caller enters the network namespace (once, before anything here runs): everything below lists
links, starts VMMs and probes guests in the namespace the process is in.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

from ansible.module_utils.common.arg_spec import ArgumentSpecValidator
from ansible.module_utils.errors import UnsupportedError

from ansible_collections.microvm.firecracker.plugins.module_utils import _fc_vm
from ansible_collections.microvm.firecracker.plugins.module_utils._fc_api import FirecrackerAPIError
from ansible_collections.microvm.firecracker.plugins.module_utils._fc_config import (
    SpecError, VMSpec, build_spec, removal_spec,
)
from ansible_collections.microvm.firecracker.plugins.module_utils._jail import JailError
from ansible_collections.microvm.firecracker.plugins.module_utils._netlink import Netlink, NetlinkOperationError
from ansible_collections.microvm.firecracker.plugins.module_utils._netns import NetnsError, enter_netns, netns_path

_LIMITER = dict(type="dict")

ARGUMENT_SPEC: dict[str, Any] = dict(
    name=dict(type="str", required=True),
    state=dict(type="str", default="running", choices=["running", "paused", "stopped", "hibernated", "absent"]),
    kernel=dict(type="path"),
    initrd=dict(type="path"),
    boot_args=dict(type="str", default="console=ttyS0 reboot=k panic=1"),
    vcpu_count=dict(type="raw", default=1),
    mem_size_mib=dict(type="raw", default=1024),
    smt=dict(type="bool", default=False),
    cpu_template=dict(type="str", choices=["None", "C3", "T2", "T2S", "T2CL", "T2A", "V1N1"]),
    drives=dict(type="list", elements="dict", default=[], options=dict(
        drive_id=dict(type="str", required=True),
        path=dict(type="path", required=True),
        root=dict(type="bool", default=False),
        read_only=dict(type="bool", default=False),
        cache_type=dict(type="str", choices=["Unsafe", "Writeback"], default="Unsafe"),
        io_engine=dict(type="str", choices=["Sync", "Async"], default="Sync"),
        rate_limiter=_LIMITER,
    )),
    network_interfaces=dict(type="list", elements="dict", default=[], options=dict(
        iface_id=dict(type="str", required=True),
        tap=dict(type="str", required=True),
        guest_mac=dict(type="str"),
        rx_rate_limiter=_LIMITER,
        tx_rate_limiter=_LIMITER,
    )),
    mmds=dict(type="dict"),
    mmds_metadata=dict(type="raw", no_log=True),
    vsock=dict(type="dict"),
    balloon=dict(type="dict"),
    log_level=dict(type="str", default="Warning", choices=["Error", "Warning", "Info", "Debug", "Trace", "Off"]),
    log_path=dict(type="path"),
    metrics_path=dict(type="path"),
    console_log=dict(type="path"),
    firecracker_bin=dict(type="path", default="/usr/local/bin/firecracker"),
    supervisor=dict(type="str", default="auto", choices=["auto", "systemd", "process"]),
    autostart=dict(type="bool", default=False),
    recreate_taps=dict(type="bool", default=True),
    jailer=dict(type="dict", options=dict(
        uid=dict(type="int", required=True),
        gid=dict(type="int", required=True),
        jailer_bin=dict(type="path", default="/usr/local/bin/jailer"),
        chroot_base_dir=dict(type="path", default="/srv/jailer"),
        cgroups=dict(type="dict", default={}),
        parent_cgroup=dict(type="str"),
        resource_limits=dict(type="dict", default={}),
    )),
    state_dir=dict(type="path"),
    netns=dict(type="str"),
    wait_for=dict(type="dict"),
    on_change=dict(type="str", default="restart", choices=["restart", "fail", "ignore"]),
    stop_timeout=dict(type="int", default=30),
    archive_logs_to=dict(type="path"),
)

REQUIRED_IF: list[tuple[str, str, tuple[str, ...]]] = [
    ("state", "running", ("kernel",)), ("state", "paused", ("kernel",)),
    ("state", "hibernated", ("kernel",)), ("state", "stopped", ("kernel",)),
]

# One element of fc_vms' ``vms``: fc_vm's options but the namespace, which fc_vms enters once for all VMs.
ELEMENT_SPEC: dict[str, Any] = {option: spec for option, spec in ARGUMENT_SPEC.items() if option != "netns"}

# What starts a VMM: a deferred readiness check measures from just before it.
_LAUNCH_STEPS = ("start", "wake")
MAX_PARALLEL_STARTS = 8


class TaskError(Exception):
    """The task fails with this message (it names the VM, the operation and the cause). ``changed``: the
    failure came after the VM's converge had started changing it (a VMM started, then refused)."""

    def __init__(self, msg: str, changed: bool = False) -> None:
        super().__init__(msg)
        self.msg = msg
        self.changed = changed


@dataclass(frozen=True)
class CheckModeAssumptions:
    """What earlier tasks of the same run would have done, for check mode, where they changed nothing.

    ``stopped``: VMs those tasks create or stop (a new VM, a VM stopped to re-inject its disk); each is
    predicted from a stopped VM, and its TAPs and drive files need not exist yet. ``taps``: TAPs those tasks
    create, taken as ready.
    """
    stopped: frozenset[str] = frozenset()
    taps: frozenset[str] = frozenset()


NO_ASSUMPTIONS = CheckModeAssumptions()


@contextmanager
def _task_errors(name: object, touched: Optional[list[bool]] = None) -> Iterator[None]:
    """The exceptions fc_vm reports as a failed task, as TaskError with fc_vm's messages (changed when
    ``touched`` holds True by then)."""
    try:
        yield
    except (SpecError, _fc_vm.VMError, FirecrackerAPIError, NetnsError, JailError) as exc:
        raise TaskError(str(exc), changed=bool(touched and touched[0])) from None
    except OSError as exc:
        raise TaskError(f"VM {name}: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "),
                        changed=bool(touched and touched[0])) from None


def enter_task_netns(netns: Optional[str], name: object = None) -> None:
    """Enter ``netns`` (when given) for the rest of the process; errors as TaskError."""
    if netns:
        with _task_errors(name):
            enter_netns(netns)


def _list_links() -> tuple[dict[str, Any], Optional[str]]:
    try:
        with Netlink() as netlink:
            return netlink.links(), None
    except (OSError, NetlinkOperationError) as exc:
        return {}, str(exc)


def _tap_recipes(spec_interfaces: list[dict[str, Any]], links: dict[str, Any]) -> list[_fc_vm.TapRecipe]:
    """The VM's TAPs as they are now (build_spec has checked that each exists and is a TAP)."""
    names_by_index = {link.index: name for name, link in links.items()}
    recipes = []
    for iface in spec_interfaces:
        link = links[iface["tap"]]
        recipes.append(_fc_vm.TapRecipe(
            name=link.name, vnet_hdr=link.tun.vnet_hdr, multi_queue=link.tun.multi_queue, owner=link.tun.owner,
            group=link.tun.group, mtu=link.mtu, bridge=names_by_index.get(link.master), link_group=link.group))
    return recipes


def _tap_checker(links: dict[str, Any], error: Optional[str], jailed_uid: Optional[int]) -> object:
    def problem(name: object) -> object:
        if error:
            return f"cannot list network links: {error}"
        link = links.get(name) if isinstance(name, str) else None
        if link is None:
            return f"TAP {name} does not exist (create it with microvm.firecracker.tap_vnet_hdr)"
        if link.tun is None or link.tun.mode != "tap":
            return f"{name} is a {link.kind or 'plain'} link, not a TAP"
        if jailed_uid is not None and link.tun.owner != jailed_uid:
            owner = "no owner" if link.tun.owner is None else f"owner uid {link.tun.owner}"
            return (f"TAP {name} has {owner}, but the jailed VMM runs as uid {jailed_uid}: create the TAP with "
                    f"owner {jailed_uid} (microvm.firecracker.tap_vnet_hdr)")
        return None

    return problem


@dataclass
class _Prepared:
    spec: VMSpec
    tap_recipes: list[_fc_vm.TapRecipe]


def _prepare(params: dict[str, Any], check_mode: bool, assume: CheckModeAssumptions = NO_ASSUMPTIONS) -> _Prepared:
    """Every check fc_vm makes before it touches anything: the spec, the TAPs, the binaries (in check mode,
    as far as ``assume`` leaves them to check)."""
    target = params["state"]
    tap_recipes: list[_fc_vm.TapRecipe] = []
    if target == "absent":
        return _Prepared(removal_spec(params), tap_recipes)
    links, links_error = _list_links()
    jailed_uid = (params["jailer"] or {}).get("uid")
    host_checker = _tap_checker(links, links_error, jailed_uid)
    pending = check_mode and params["name"] in assume.stopped

    def tap_problem(name: object) -> object:
        if check_mode and (pending or name in assume.taps):
            return None
        return host_checker(name)

    spec = build_spec(params, tap_problem, drives_pending=pending)
    if params["recreate_taps"]:
        interfaces = params["network_interfaces"] or []
        if check_mode:  # a TAP check mode takes as created is not there to record (nothing is recreated)
            interfaces = [iface for iface in interfaces if iface.get("tap") in links]
        tap_recipes = _tap_recipes(interfaces, links)
    if target in ("running", "paused", "hibernated") and not check_mode:
        binaries = [("firecracker_bin", params["firecracker_bin"])]
        if spec.jail is not None:
            binaries.append(("jailer.jailer_bin", spec.jail.jailer_bin))
        for option, binary in binaries:
            if not os.path.isfile(binary) or not os.access(binary, os.X_OK):
                raise SpecError(f"VM {spec.name}: {option}: {binary} is not an executable file")
    return _Prepared(spec, tap_recipes)


def validate_vm(params: dict[str, Any], check_mode: bool, assume: CheckModeAssumptions = NO_ASSUMPTIONS) -> _Prepared:
    """Raise TaskError when run_vm would refuse ``params`` before touching anything; change nothing.
    What it checked is returned, for run_vm to use rather than check again."""
    with _task_errors(params.get("name")):
        return _prepare(params, check_mode, assume)


def _merge(first: _fc_vm.Outcome, second: _fc_vm.Outcome) -> _fc_vm.Outcome:
    first.changed = first.changed or second.changed
    first.actions += second.actions
    first.api_seconds = second.api_seconds if second.api_seconds is not None else first.api_seconds
    first.ready_seconds = second.ready_seconds if second.ready_seconds is not None else first.ready_seconds
    return first


def _converge_deferred(vm: _fc_vm.MicroVM, target: str, steps: list[str], wait_for: dict[str, Any],
                       params: dict[str, Any]) -> tuple[_fc_vm.Outcome, Callable[[], None]]:
    """``_fc_vm.converge`` without its readiness check, and that check to run later.

    The check watches the console from where fc_vm would: from just before the VMM is (re)started (the
    console output of a VM stopped for a restart is not its new boot), or, for a VM left running, from the
    end of its converge.
    """
    split = next((index for index, step in enumerate(steps) if step in _LAUNCH_STEPS), len(steps))
    outcome = _fc_vm.converge(vm, target, steps[:split], None, params["stop_timeout"], params["archive_logs_to"])
    offset = vm._console_size()  # pylint: disable=protected-access
    started: Optional[float] = None
    if split < len(steps):
        started = time.monotonic()
        outcome = _merge(outcome, _fc_vm.converge(vm, target, steps[split:], None, params["stop_timeout"],
                                                  params["archive_logs_to"]))
    pid = vm.supervisor.pid()

    def wait() -> None:
        # A VM left running is timed from this check, as fc_vm times it.
        vm.wait_ready(wait_for, pid, offset, time.monotonic() if started is None else started, outcome)

    return outcome, wait


def run_vm(params: dict[str, Any], check_mode: bool, want_diff: bool, warn: Callable[[str], None],
           defer_wait: bool = False, prepared: Optional[_Prepared] = None,
           assume: CheckModeAssumptions = NO_ASSUMPTIONS) -> tuple[dict[str, Any], Optional[Callable[[], None]]]:
    """Converge one VM as fc_vm does (in the namespace the process is in) and return fc_vm's result.

    With ``defer_wait`` (target running with wait_for, not check mode) the readiness check is left out and
    returned as a callable; it sets ``ready_seconds`` in the result, or raises TaskError. Otherwise the
    second value is None. ``assume`` is used in check mode only. A TaskError raised once the converge has
    started changing the VM says so (``changed``).
    """
    target = params["state"]
    wait: Optional[Callable[[], None]] = None
    touched = [False]
    with _task_errors(params.get("name"), touched):
        if prepared is None:
            prepared = _prepare(params, check_mode, assume)
        spec = prepared.spec
        vm = _fc_vm.MicroVM(spec, params["supervisor"], params["firecracker_bin"],
                            netns_path(params["netns"]) if params["netns"] else None, prepared.tap_recipes)
        if params["autostart"] and vm.supervisor.kind != "systemd":
            warn(f"VM {spec.name}: autostart needs the systemd supervisor; the process supervisor "
                 "cannot start VMs at boot")
        observed = vm.observe()
        if check_mode and spec.name in assume.stopped and observed.state in ("running", "paused", "not-started"):
            # An earlier task of the run stops it (rootfs_prepare, before re-injecting its disk).
            observed = _fc_vm.Observed(state="stopped", config=observed.config, version=observed.version)
        drift = vm.drift(observed, target) if target != "absent" else []
        if drift and observed.state in ("running", "paused") and target != "stopped":
            if params["on_change"] == "fail":
                raise _fc_vm.VMError(f"VM {spec.name}: the running VM's configuration differs from the asked one "
                                     f"(on_change=fail): " + "; ".join(drift))
            if params["on_change"] == "ignore":
                warn(f"VM {spec.name}: configuration differs but on_change=ignore: " + "; ".join(drift))
        metadata_differs = False
        if observed.state in ("running", "paused") and spec.mmds_metadata is not None:
            metadata_differs = vm.api.get("/mmds") != spec.mmds_metadata
        steps = _fc_vm.plan_steps(observed, target, drift, params["on_change"], metadata_differs)
        autostart_changed = False
        touched[0] = bool(steps) and not check_mode
        if check_mode:
            outcome = _fc_vm.Outcome(changed=bool(steps), actions=[f"would {step}" for step in steps])
        elif defer_wait and target == "running" and params["wait_for"]:
            outcome, wait = _converge_deferred(vm, target, steps, params["wait_for"], params)
        else:
            outcome = _fc_vm.converge(vm, target, steps, params["wait_for"], params["stop_timeout"],
                                      params["archive_logs_to"])
        if not check_mode and target != "absent" and isinstance(vm.supervisor, _fc_vm.SystemdSupervisor):
            autostart_changed = vm.supervisor.set_autostart(params["autostart"])
        outcome.differences = drift
        after = observed if check_mode else vm.observe()

    final_state = after.state if not check_mode else (target if steps else observed.state)
    result: dict[str, Any] = dict(
        changed=outcome.changed or autostart_changed,
        state=final_state,
        pid=after.pid if final_state in ("running", "paused") else None,
        api_socket=vm.paths.socket,
        firecracker_version=after.version,
        console_log=spec.console_log,
        state_dir=spec.state_dir,
        jail_root=spec.jail.root if spec.jail is not None else None,
        supervisor=vm.supervisor.kind,
        actions=outcome.actions,
        differences=outcome.differences,
        api_seconds=outcome.api_seconds,
        ready_seconds=outcome.ready_seconds,
    )
    if target != "absent":
        result["config"] = spec.config
    if want_diff:
        result["diff"] = dict(
            before={"state": observed.state, "config": observed.config},
            after={"state": final_state, "config": spec.config if target != "absent" else None},
        )
    if wait is None:
        return result, None
    deferred_wait = wait

    def check() -> None:
        with _task_errors(spec.name):
            deferred_wait()
        result["ready_seconds"] = outcome.ready_seconds

    return result, check


@dataclass
class Elements:
    """fc_vms' ``vms`` validated against fc_vm's options: ``params`` (in input order, None for an element
    that is not a dictionary), what is wrong (each naming its element), the values to hide in output."""
    params: list[Optional[dict[str, Any]]]
    errors: list[str]
    no_log_values: set[str]


def element_label(index: int, element: object) -> str:
    name = element.get("name") if isinstance(element, dict) else None
    return f"vms[{index}] (VM {name})" if isinstance(name, str) and name else f"vms[{index}]"


def check_elements(elements: list[Any]) -> Elements:
    """Validate every element of fc_vms' ``vms`` as fc_vm validates its options, and refuse duplicate names."""
    validator = ArgumentSpecValidator(ELEMENT_SPEC, required_if=REQUIRED_IF)
    checked = Elements([], [], set())
    first_index: dict[str, int] = {}
    for index, element in enumerate(elements):
        label = element_label(index, element)
        if not isinstance(element, dict):
            checked.errors.append(f"{label}: {element!r} is not a dictionary of fc_vm options")
            checked.params.append(None)
            continue
        if "netns" in element:
            checked.errors.append(f"{label}: netns cannot be set per VM; set the task's netns option (one "
                                  "namespace for all the VMs)")
            element = {option: value for option, value in element.items() if option != "netns"}
        validated = validator.validate(element)
        checked.no_log_values.update(validated._no_log_values)  # pylint: disable=protected-access
        for error in validated.errors.errors:
            # As AnsibleModule words it, which names the options but not what they are.
            prefix = "Unsupported parameters: " if isinstance(error, UnsupportedError) else ""
            checked.errors.append(f"{label}: {prefix}{error.msg}")
        checked.params.append(validated.validated_parameters)
        name = element.get("name")
        if isinstance(name, str):
            if name in first_index:
                checked.errors.append(f"{label}: the name {name} is also given to vms[{first_index[name]}]; "
                                      "each VM must appear once")
            else:
                first_index[name] = index
    return checked


def run_vms(vms: list[dict[str, Any]], netns: Optional[str], check_mode: bool, want_diff: bool,
            warn: Callable[[str], None], assume: CheckModeAssumptions = NO_ASSUMPTIONS) -> dict[str, Any]:
    """fc_vms: converge every VM of ``vms`` (parameters from check_elements) as fc_vm would, in ``netns``
    (already entered by the caller), then await all their readiness checks at once.

    Raises TaskError, before anything is touched, when fc_vm would refuse any VM's input. Otherwise returns
    ``changed``, ``vms`` (one record per VM in input order: ``name``, ``failed``, ``msg`` on failure and fc_vm's
    result when its converge got that far), ``failed_names``, ``msg`` when a VM failed and, with
    ``want_diff``, ``diff`` (fc_vm's before/after per VM, with a header naming it). ``assume`` is used in
    check mode only. A VM that failed after its converge started changing it counts as changed.
    """
    vms = [dict(params, netns=netns) for params in vms]
    problems = []
    checked: list[Optional[_Prepared]] = []
    for params in vms:
        try:
            checked.append(validate_vm(params, check_mode, assume))
        except TaskError as exc:
            problems.append(exc.msg)
    if problems:
        raise TaskError(f"fc_vms: {len(problems)} of {len(vms)} VMs have invalid input, nothing was started: "
                        + " | ".join(problems))
    records: list[dict[str, Any]] = []
    checks: list[tuple[dict[str, Any], Callable[[], None]]] = []

    def converge_one(params: dict[str, Any], prepared: Optional[_Prepared]) -> tuple[dict[str, Any], Optional[Callable[[], None]]]:
        try:
            record, check = run_vm(params, check_mode, want_diff, warn, defer_wait=True, prepared=prepared,
                                   assume=assume)
        except TaskError as exc:
            return dict(name=params["name"], failed=True, msg=exc.msg, changed=exc.changed), None
        record.update(name=params["name"], failed=False)
        return record, check

    # VMs are independent (own state dir, TAP, socket, unit): their VMMs start at the same time, which on a
    # busy host also keeps the first guests' boot from slowing the later VMMs' start.
    with ThreadPoolExecutor(max_workers=min(len(vms), MAX_PARALLEL_STARTS) or 1, thread_name_prefix="fc_vms") as pool:
        converged = list(pool.map(converge_one, vms, checked))
    for record, check in converged:
        records.append(record)
        if check is not None:
            checks.append((record, check))
    if checks:
        with ThreadPoolExecutor(max_workers=len(checks), thread_name_prefix="fc_vms-ready") as pool:
            futures = [(record, pool.submit(check)) for record, check in checks]
        for record, future in futures:
            try:
                future.result()
            except TaskError as exc:
                record.update(failed=True, msg=exc.msg)
    failed = [record for record in records if record["failed"]]
    result: dict[str, Any] = dict(changed=any(record.get("changed") for record in records), vms=records,
                                  failed_names=[record["name"] for record in failed])
    if failed:
        result["msg"] = (f"fc_vms: {len(failed)} of {len(records)} VMs failed: "
                         + " | ".join(record["msg"] for record in failed))
    if want_diff:
        result["diff"] = [dict(before_header=f"VM {record['name']}", after_header=f"VM {record['name']}",
                               **record.pop("diff")) for record in records if "diff" in record]
    return result

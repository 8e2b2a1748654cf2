# -*- coding: utf-8 -*-
# Copyright: (c) 2026, microvm.firecracker contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Many VMs' directories and root disks in one call: sparse clone when missing, injection when what the
disk should carry changed (a fingerprint beside the disk says what it carries), stopping a VM first
when its on_change allows."""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from ansible.module_utils.common.arg_spec import ArgumentSpecValidator

from ansible_collections.microvm.firecracker.plugins.module_utils import _clone, _fc_vm, _rootfs_inject
from ansible_collections.microvm.firecracker.plugins.module_utils._fc_api import FirecrackerAPIError
from ansible_collections.microvm.firecracker.plugins.module_utils._fc_config import SpecError, removal_spec
from ansible_collections.microvm.firecracker.plugins.module_utils._jail import JailError

FINGERPRINT_FILE = "inject.sha256"
ON_CHANGE = ("restart", "fail", "ignore")


class PrepareError(Exception):
    """A failure, worded for the user (names the VM)."""


@dataclass
class Item:
    """One VM as asked, validated."""

    name: str
    dir: str
    golden: str
    disk: str
    inject: dict[str, Any]  # as given: the fingerprint is computed over this
    inject_params: dict[str, Any]  # with rootfs_inject's defaults filled in
    staged: list[str]
    on_change: str
    new: bool
    supervisor: str
    stop_timeout: int


@dataclass
class Outcome:
    name: str
    failed: bool = False
    msg: Optional[str] = None
    changed: bool = False
    actions: list[str] = field(default_factory=list)
    clone_action: str = "none"
    source: Optional[str] = None
    version: Optional[str] = None
    outdated: bool = False
    injected: bool = False
    stopped: bool = False
    changes: list[dict[str, Any]] = field(default_factory=list)

    def result(self) -> dict[str, Any]:
        result: dict[str, Any] = {
            "name": self.name, "failed": self.failed, "changed": self.changed, "actions": self.actions,
            "action": self.clone_action, "source": self.source, "version": self.version, "outdated": self.outdated,
            "injected": self.injected, "stopped": self.stopped, "changes": self.changes,
        }
        if self.msg is not None:
            result["msg"] = self.msg
        return result


def fingerprint(inject: dict[str, Any], staged: list[str]) -> str:
    """What a disk should carry: the injection request and the staged files' content.

    The same value the microvm role computed with Jinja before this module existed
    (``(inject | to_json(sort_keys=true)) ~ (sha1 of each staged file | join(',')) | hash('sha256')``), so
    VMs injected by it are not injected again.
    """
    digests = []
    for path in staged:
        sha1 = hashlib.sha1()  # nosec B324 - a content fingerprint (ansible.builtin.copy's checksum), not security
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                sha1.update(chunk)
        digests.append(sha1.hexdigest())
    text = json.dumps(inject, sort_keys=True) + ",".join(digests)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _read_fingerprint(directory: str) -> Optional[str]:
    try:
        with open(os.path.join(directory, FINGERPRINT_FILE), encoding="utf-8") as handle:
            return handle.read().strip()
    except FileNotFoundError:
        return None


def _write_fingerprint(directory: str, value: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".inject-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(value + "\n")
        os.replace(tmp, os.path.join(directory, FINGERPRINT_FILE))
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _bad(index: int, name: Any, cause: str) -> str:
    return f"vms[{index}]" + (f" (VM {name})" if isinstance(name, str) and name else "") + f": {cause}"


def validate(vms: list[dict[str, Any]]) -> tuple[list[Item], list[str]]:
    """Every VM's request checked before anything is touched; (items, problems)."""
    items: list[Item] = []
    problems: list[str] = []
    seen: dict[str, int] = {}
    inject_validator = ArgumentSpecValidator(_rootfs_inject.ARGUMENT_SPEC)
    for index, vm in enumerate(vms):
        name = vm.get("name")
        if name in seen:
            problems.append(_bad(index, name, f"the name is used by vms[{seen[name]}] too"))
            continue
        seen[name] = index
        inject = vm.get("inject") or {}
        checked = inject_validator.validate(inject)
        if checked.error_messages:
            problems.append(_bad(index, name, "inject: " + "; ".join(checked.error_messages)))
            continue
        if checked.validated_parameters["image"] != vm["disk"]:
            problems.append(_bad(index, name, f"inject.image {inject.get('image')} is not the VM's disk {vm['disk']}"))
            continue
        for option in ("dir", "disk", "golden"):
            if not os.path.isabs(vm[option]):
                problems.append(_bad(index, name, f"{option} {vm[option]} is not an absolute path"))
        for path in vm["staged"]:
            if not os.path.isabs(path) or os.path.dirname(path) in ("", "/"):
                problems.append(_bad(index, name, f"staged file {path} is not an absolute path in a directory"))
        try:
            _clone.resolve_source(vm["golden"])
        except _clone.CloneError as exc:
            problems.append(_bad(index, name, f"golden image: {exc}"))
        items.append(Item(name=name, dir=vm["dir"], golden=vm["golden"], disk=vm["disk"], inject=inject,
                          inject_params=checked.validated_parameters, staged=list(vm["staged"]),
                          on_change=vm["on_change"], new=bool(vm["new"]), supervisor=vm["supervisor"],
                          stop_timeout=int(vm["stop_timeout"])))
    return items, problems


def secret_values(vms: list[dict[str, Any]]) -> set[str]:
    """Values of every VM's injection that must never be shown (see rootfs_inject)."""
    values: set[str] = set()
    for vm in vms:
        if isinstance(vm, dict) and isinstance(vm.get("inject"), dict):
            values |= _rootfs_inject.secret_values(vm["inject"])
    return values


@dataclass
class Decision:
    """What one VM's disk needs, decided before anything is written."""

    item: Item
    disk_exists: bool
    wanted: Optional[str]  # None: not computable yet (a staged file is missing in check mode)
    carried: Optional[str]

    @property
    def differs(self) -> bool:
        return not self.disk_exists or self.wanted is None or self.wanted != self.carried

    @property
    def new(self) -> bool:
        return self.item.new or not self.disk_exists


def decide(items: list[Item], check_mode: bool) -> tuple[list[Decision], list[str]]:
    """Fingerprints against what each disk carries; on_change=fail refusals, before anything changes."""
    decisions: list[Decision] = []
    problems: list[str] = []
    for item in items:
        exists = os.path.lexists(item.disk)
        if exists and not os.path.isfile(item.disk):
            problems.append(f"VM {item.name}: {item.disk} exists and is not a regular file")
            continue
        missing = [path for path in item.staged if not os.path.isfile(path)]
        if missing and not check_mode:
            problems.append(f"VM {item.name}: staged file {missing[0]} does not exist (copy it first)")
            continue
        wanted = None if missing else fingerprint(item.inject, item.staged)
        decision = Decision(item, exists, wanted, _read_fingerprint(item.dir) if exists else None)
        if decision.differs and not decision.new and item.on_change == "fail":
            problems.append(f"VM {item.name}: the files, units or environment to inject differ from what its "
                            "disk carries, and on_change is fail")
            continue
        decisions.append(decision)
    return decisions, problems


def _stop(item: Item, outcome: Outcome, check_mode: bool) -> None:
    """Stop the VM (its disk is never written while in use); the start that follows brings it back."""
    try:
        vm = _fc_vm.MicroVM(removal_spec({"name": item.name, "state_dir": item.dir}), item.supervisor, "")
        if vm.supervisor.pid() is None:
            return
        if check_mode:
            outcome.actions.append("would stop the VM")
        else:
            vm.stop(_fc_vm.Outcome(), item.stop_timeout)
            outcome.actions.append("stopped the VM")
        outcome.stopped = True
    except (SpecError, _fc_vm.VMError, FirecrackerAPIError, JailError) as exc:
        raise PrepareError(f"VM {item.name}: cannot stop it before injecting: {exc}") from None


def prepare_one(decision: Decision, check_mode: bool, tools: _rootfs_inject.Tools, tmpdir: str,
                warn: Callable[[str], None]) -> Outcome:
    item = decision.item
    outcome = Outcome(item.name)
    try:
        if not os.path.isdir(item.dir):
            outcome.actions.append(f"{'would create' if check_mode else 'created'} {item.dir}")
            if not check_mode:
                os.makedirs(item.dir, mode=0o700, exist_ok=True)
                os.chmod(item.dir, 0o700)
        steps = _clone.apply(item.golden, item.disk, "present", False, check_mode)
        record = steps.get("record") or {}
        source = steps.get("source")
        outcome.clone_action = steps["action"]
        outcome.source = record.get("source") or (source.path if source else None)
        outcome.version = record.get("version") if record else (source.version if source else None)
        outcome.outdated = bool(steps.get("outdated", False))
        if steps["action"] == "clone":
            outcome.actions.append("would clone the golden image" if check_mode else "cloned the golden image")
        if decision.differs and item.on_change == "ignore" and not decision.new:
            warn(f"VM {item.name}: the files, units or environment to inject differ from what its disk carries, "
                 "but on_change is ignore: not injected")
        elif decision.differs:
            if not decision.new and item.on_change == "restart":
                _stop(item, outcome, check_mode)
            if check_mode:
                outcome.actions.append("would inject")
            else:
                workdir = tempfile.mkdtemp(prefix=f"rootfs-prepare-{item.name}-", dir=tmpdir)
                try:
                    injected = _rootfs_inject.run(item.inject_params, check_mode=False, want_diff=False,
                                                  workdir=workdir, tools=tools, warn=warn)
                finally:
                    shutil.rmtree(workdir, ignore_errors=True)
                outcome.changes = injected["changes"]
                # decide() computed it: outside check mode every staged file exists.
                _write_fingerprint(item.dir, decision.wanted or fingerprint(item.inject, item.staged))
                outcome.actions.append("injected")
            outcome.injected = True
    except (_clone.CloneError, _rootfs_inject.RunError, PrepareError) as exc:
        outcome.failed, outcome.msg = True, f"VM {item.name}: {exc}"
    except OSError as exc:
        outcome.failed = True
        outcome.msg = f"VM {item.name}: {exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
    outcome.changed = bool(outcome.actions)
    return outcome


def prepare(decisions: list[Decision], check_mode: bool, tools: _rootfs_inject.Tools, tmpdir: str,
            warn: Callable[[str], None], workers: int) -> list[Outcome]:
    """Each VM's disk prepared (clone and injection are mostly waiting on cp, debugfs and e2fsck: threads)."""
    if workers <= 1 or len(decisions) <= 1:
        return [prepare_one(decision, check_mode, tools, tmpdir, warn) for decision in decisions]
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(prepare_one, decision, check_mode, tools, tmpdir, warn) for decision in decisions]
        return [future.result() for future in futures]

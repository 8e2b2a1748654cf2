# -*- coding: utf-8 -*-
# Copyright: (c) 2026, microvm.firecracker contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Filters of the microvm and host_network roles: the VM list checked as a whole, each step's arguments, the
report of launched VMs, and fleet subnets."""
from __future__ import annotations

from typing import Any

from ansible.errors import AnsibleFilterError

from ansible_collections.microvm.firecracker.plugins.module_utils._vm_plan import (
    PlanError,
    fleet_subnet,
    vm_injections,
    vm_launch,
    vm_plan,
    vm_prepare_args,
    vm_report,
    vm_start_args,
    vm_teardown_args,
)


def _vm_plan(vms: Any, profiles: Any = None, defaults: Any = None) -> dict[str, Any]:
    return vm_plan(vms, profiles or {}, defaults or {})


def _vm_launch(vms: Any, allocations: Any, network: Any, settings: Any) -> list[dict[str, Any]]:
    try:
        return vm_launch(vms, allocations, network, settings)
    except PlanError as exc:
        raise AnsibleFilterError("vm_launch: %s" % exc) from exc


def _vm_injections(vms: Any, allocations: Any, network: Any, settings: Any) -> dict[str, Any]:
    try:
        return vm_injections(vms, allocations, network, settings)
    except PlanError as exc:
        raise AnsibleFilterError("vm_injections: %s" % exc) from exc


def _vm_start_args(launches: Any, prepared: Any, skip: Any = None) -> list[dict[str, Any]]:
    try:
        return vm_start_args(launches, prepared, list(skip or []))
    except PlanError as exc:
        raise AnsibleFilterError("vm_start_args: %s" % exc) from exc


def _vm_teardown_args(names: Any, allocations: Any, settings: Any) -> dict[str, Any]:
    try:
        return vm_teardown_args(names, allocations, settings)
    except PlanError as exc:
        raise AnsibleFilterError("vm_teardown_args: %s" % exc) from exc


def _fleet_subnet(supernet: Any, prefix: Any, index: Any) -> str:
    try:
        return fleet_subnet(supernet, prefix, index)
    except PlanError as exc:
        raise AnsibleFilterError("fleet_subnet: %s" % exc) from exc


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {
            "vm_plan": _vm_plan, "vm_launch": _vm_launch, "vm_injections": _vm_injections, "fleet_subnet": _fleet_subnet,
            "vm_prepare_args": vm_prepare_args, "vm_start_args": _vm_start_args, "vm_report": vm_report,
            "vm_teardown_args": _vm_teardown_args,
        }

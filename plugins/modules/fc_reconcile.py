#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: (c) 2026, microvm.firecracker contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations

DOCUMENTATION = r"""
module: fc_reconcile
short_description: Find, and optionally remove, leaked microVM leftovers (TAPs, VM dirs, leases, allocations, VMMs)
version_added: 0.1.0
description:
  - Compares what exists on the host with the host's allocator state (C(allocations.json) in O(state_dir), see
    M(microvm.firecracker.fc_allocation)) and the VM directories (C(<state_dir>/vms/<name>), see
    M(microvm.firecracker.fc_vm)), and reports the leftovers of VMs that no longer exist. With O(remove=true)
    it removes them.
  - "A VM is I(live) when it has a VM directory and an allocation (or, with O(vms), a directory and a place in
    O(vms)). Nothing of a live VM is ever an orphan: not its directory, its allocation, its VMM process, the TAP
    and MAC of its allocation or of its C(config.json), nor any TAP its VMM holds open."
  - "The kinds of orphans (O(kinds)):"
  - "V(processes): VMM processes whose API socket (C(--api-sock)) or launch script lies in C(<state_dir>/vms/<name>)
    (as fc_vm starts them, directly or through C(nsenter), in any network namespace) when VM C(<name>) is not
    live. A VMM fc_vm runs under the jailer (its C(--api-sock) is a path inside its jail) is VM C(<name>)'s when
    its jail root (C(/proc/<pid>/root), or C(/proc/<pid>/cwd) under the jailer stand-in) is the C(<jail_dir>/root)
    that C(<name>)'s marker records, or, when no marker records its jail (the VM directory was deleted), when its
    jail is C(.../<exec name>/<name>), its C(--id) is C(<name>) and its console output goes to a file in
    C(<state_dir>/vms/<name>); the jailer itself, before it execs the VMM, likewise. Removed with C(SIGTERM),
    then C(SIGKILL), each by PID with a deadline; the PID's start time is checked
    first, so a recycled PID is never signalled."
  - "V(taps): TAP devices named O(tap_prefix)... (only the ports of O(bridge) when given) in O(netns) that are
    neither the TAP of a kept allocation nor of a live VM's C(config.json), and that no live VM's VMM holds open.
    A TAP held open by any other process is reported but never deleted (a TAP held by an orphan VMM is deleted
    once that VMM is stopped, when V(processes) is in O(kinds)). A TAP held by a child of a VMM (the Firecracker
    stand-in's QEMU) counts as held by that VMM."
  - "V(leases): lines of the dnsmasq lease file O(dhcp_leasefile) whose MAC is not that of a kept allocation or a
    live VM. Removed with C(dhcp_release O(dhcp_interface) IP MAC) run in O(netns), which asks the running dnsmasq
    to drop the lease; the module then waits for dnsmasq to rewrite its lease file and fails if it does not."
  - "V(vm_dirs): real directories (never symlinks) under C(<state_dir>/vms) whose VM has no allocation and is not
    in O(vms). A directory a VMM still runs from is only removed after that VMM is stopped. A jailed VM's
    directory goes with the jail directory and cgroups its marker records (only a jail fc_vm made, which carries
    its C(.fc_vm_jail) marker); its TAPs and MACs are read from the jail's C(config.json)."
  - "V(allocations): allocations whose VM has no directory and, when O(vms) is given, is not in O(vms). Removed
    last, under the allocator's lock, which is held for the whole run when removing."
  - Removal goes in the order processes, TAPs, leases, directories, allocations, so that a re-run finds nothing.
    An orphan that must be left in place (a TAP in use by another process, a directory whose VMM is not being
    stopped) is listed in RV(left_in_place) with the reason, and a warning is shown.
author:
  - microvm.firecracker contributors (@microvm)
requirements:
  - Python >= 3.9 on the managed host; no third-party Python library
  - C(dhcp_release) (Debian/Ubuntu package C(dnsmasq-utils)) to remove leases
attributes:
  check_mode:
    support: full
    description: Check mode finds the orphans and reports in RV(removed) what a real run would remove, touching nothing.
  diff_mode:
    support: none
    description: What changes is listed in RV(removed); there is no before/after document to compare.
  platform:
    platforms: [linux]
    support: full
    description: Linux only (C(/proc), rtnetlink, network namespaces).
options:
  state_dir:
    description: The host's firecracker state directory; C(allocations.json) lives there and the VM directories in
      its C(vms) subdirectory. Must exist when O(remove=true).
    type: path
    default: /var/lib/firecracker
  netns:
    description: Named network namespace (C(/run/netns/NAME)) where the TAPs, the bridge and O(dhcp_interface)
      are. The module enters it; C(dhcp_release) runs there too.
    type: str
  tap_prefix:
    description: Only TAPs whose names start with this prefix are considered (the allocator's O(microvm.firecracker.fc_allocation#module:tap_prefix)).
      Must not be empty.
    type: str
    default: fc-
  bridge:
    description: Only consider TAPs that are ports of this bridge. Default all TAPs with O(tap_prefix).
    type: str
  dhcp_leasefile:
    description: dnsmasq's lease file (C(--dhcp-leasefile)). Without it leases are not checked.
    type: path
  dhcp_interface:
    description: The interface dnsmasq serves the VMs on (usually the bridge); C(dhcp_release) sends the release
      there. Required to remove leases.
    type: str
  vms:
    description:
      - The names of the VMs that should exist. When given, allocations of other names that have no VM directory
        are orphans, and the allocations and directories of the listed names are kept even when the other half is
        missing (a VM whose launch is in progress).
      - Without it, every allocation without a VM directory is an orphan; run it when no launch is in progress.
      - Live VMs that are not listed are returned in RV(unlisted_vms) and never removed (use
        M(microvm.firecracker.fc_vm) with C(state=absent) for them).
    type: list
    elements: str
  remove:
    description: Remove the orphans found. V(false) only reports them.
    type: bool
    default: false
  kinds:
    description: The kinds of orphans to look for (and remove).
    type: list
    elements: str
    choices: [processes, taps, leases, vm_dirs, allocations]
    default: [processes, taps, leases, vm_dirs, allocations]
  stop_timeout:
    description: Seconds an orphan VMM gets to exit after C(SIGTERM) before C(SIGKILL).
    type: int
    default: 10
notes:
  - Only VMs under C(<state_dir>/vms) are seen; a VM that fc_vm runs with its own O(microvm.firecracker.fc_vm#module:state_dir)
    elsewhere is invisible here, so its allocation counts as stale unless it is listed in O(vms).
  - Orphan VMMs are signalled by PID even when they run in a C(firecracker@<name>.service) unit (the unit is named
    in RV(orphans)); the unit's instance drop-in, if any, is not removed.
seealso:
  - module: microvm.firecracker.fc_allocation
  - module: microvm.firecracker.fc_vm
  - module: microvm.firecracker.tap_vnet_hdr
"""

EXAMPLES = r"""
- name: Report what is leaked (changes nothing)
  microvm.firecracker.fc_reconcile:
    bridge: fcbr0
    dhcp_leasefile: /var/lib/misc/dnsmasq.leases
  register: fc_leftovers

- name: Remove the leftovers of every VM not in the inventory
  microvm.firecracker.fc_reconcile:
    bridge: fcbr0
    dhcp_leasefile: /var/lib/misc/dnsmasq.leases
    dhcp_interface: fcbr0
    vms: "{{ microvm_vms | map(attribute='name') | list }}"
    remove: true

- name: Only stray TAPs and VMM processes, in a lab namespace
  microvm.firecracker.fc_reconcile:
    netns: lab
    kinds: [processes, taps]
    remove: true
"""

RETURN = r"""
orphans:
  description:
    - The orphans found, keyed by kind (only the kinds in O(kinds)); each has C(name) (TAP name, directory path,
      lease IP, PID, or VM name for allocations), a human C(detail), and kind-specific keys (C(pid), C(vm), C(cmdline),
      C(unit) for processes; C(bridge), C(holders) for TAPs; C(ip), C(mac), C(hostname), C(expiry) for leases;
      C(vm), C(disk_bytes) and, for a jailed VM, C(jail_dir) for directories; C(ip), C(mac), C(tap) for allocations).
  returned: always
  type: dict
  sample:
    taps: [{name: fc-c0a86463, detail: "TAP fc-c0a86463: not the TAP of any allocated VM; port of bridge fcbr0",
            bridge: fcbr0, holders: []}]
    allocations: [{name: web7, detail: "allocation of VM web7 (192.168.100.9, ...): its VM directory ... does not exist",
                   ip: 192.168.100.9, mac: "06:00:c0:a8:64:09", tap: fc-c0a86409}]
    processes: []
    leases: []
    vm_dirs: []
removed:
  description: The orphans removed (in check mode, those a real run would remove), same shape as RV(orphans); an entry
    may carry a C(note) such as C(stopped (SIGTERM)) or C(already gone).
  returned: always
  type: dict
left_in_place:
  description: Orphans left in place although O(remove=true), same shape as RV(orphans) plus C(reason).
  returned: always
  type: dict
  sample:
    taps: [{name: fc-x1, detail: "...", reason: "held open by pid 4242 (qemu-system-x86_64 ...), which is not a VMM
            of a removed VM; refusing to delete a TAP in use"}]
unlisted_vms:
  description: Live VMs (directory and allocation) that O(vms) does not list; never removed. Empty without O(vms).
  returned: always
  type: list
  elements: str
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.microvm.firecracker.plugins.module_utils import _dnsmasq, _reconcile
from ansible_collections.microvm.firecracker.plugins.module_utils._netns import NetnsError, enter_netns


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(
            state_dir=dict(type="path", default="/var/lib/firecracker"),
            netns=dict(type="str"),
            tap_prefix=dict(type="str", default="fc-"),
            bridge=dict(type="str"),
            dhcp_leasefile=dict(type="path"),
            dhcp_interface=dict(type="str"),
            vms=dict(type="list", elements="str"),
            remove=dict(type="bool", default=False),
            kinds=dict(type="list", elements="str", choices=list(_reconcile.KINDS), default=list(_reconcile.KINDS)),
            stop_timeout=dict(type="int", default=10),
        ),
        supports_check_mode=True,
    )
    params = module.params
    try:
        settings = _reconcile.settings_from(params, _dnsmasq.find_dhcp_release())
        if settings.netns:
            enter_netns(settings.netns)
        outcome = _reconcile.run(settings, module.check_mode)
    except (_reconcile.ReconcileError, NetnsError) as exc:
        module.fail_json(msg=f"fc_reconcile: {exc}")
    except OSError as exc:
        module.fail_json(msg=f"fc_reconcile: {exc.filename or params['state_dir']}: {exc.strerror or exc}")

    for warning in outcome.warnings:
        module.warn(warning)
    for kind, items in outcome.left_in_place.items():
        for item in items:
            module.warn(f"fc_reconcile: {kind}: left in place: {item['reason']}")
    result = outcome.report()
    if outcome.failures:
        module.fail_json(msg="fc_reconcile: " + "; ".join(outcome.failures), **result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()

#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: (c) 2026, microvm.firecracker contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations

DOCUMENTATION = r"""
module: tap_vnet_hdr
short_description: Persistent TAP devices for microVMs, with IFF_VNET_HDR, owner and bridge, many at once
version_added: 0.1.0
description:
  - Ensures persistent TAP devices exist (or not) as asked, in one netlink session per call.
  - Creates TAPs with C(IFF_TAP|IFF_NO_PI) and, by default, C(IFF_VNET_HDR), sets their owner and group,
    attaches them to a bridge, sets the MTU, link group and administrative state.
  - C(IFF_VNET_HDR) on a persistent TAP is only a default; when a VMM attaches with C(TUNSETIFF) the kernel
    replaces the TAP's feature flags with the opener's (Firecracker always asks for C(IFF_VNET_HDR)).
    So a TAP that a process holds open (RV(taps[].attached) is true) is never re-opened;
    a C(vnet_hdr), O(owner) or O(group) difference on it is reported as a warning and in
    RV(attached_differences), not changed. MTU, bridge, link group and up/down are still converged in place.
  - A type (TUN vs TAP) or O(multi_queue) mismatch on an existing device is an error naming both values,
    unless O(recreate=true).
  - All input is validated, and every O(bridge) and existing device is checked, before anything changes.
author:
  - microvm.firecracker contributors (@microvm)
requirements:
  - Python >= 3.9 on the managed host; no third-party Python library (rtnetlink is spoken with the standard library)
  - Linux with C(/dev/net/tun); root or C(CAP_NET_ADMIN)
attributes:
  check_mode:
    support: full
    description: Check mode computes the same plan as a real run and reports the predicted state.
  diff_mode:
    support: full
    description: Shows each TAP's flags, owner, group, bridge, MTU, up and link group before and after.
  platform:
    platforms: [linux]
    support: full
    description: Linux only.
options:
  name:
    description:
      - Name of a single TAP device (at most 15 bytes; letters, digits, C(_), C(.), C(+), C(-)).
      - Mutually exclusive with O(taps).
    type: str
  taps:
    description:
      - A batch of TAP devices. Options not set on an entry take the value of the top-level option of the same name.
      - Mutually exclusive with O(name).
    type: list
    elements: dict
    suboptions:
      name:
        description: TAP device name.
        type: str
        required: true
      vnet_hdr:
        description: Overrides O(vnet_hdr) for this TAP.
        type: bool
      multi_queue:
        description: Overrides O(multi_queue) for this TAP.
        type: bool
      owner:
        description: Overrides O(owner) for this TAP.
        type: raw
      group:
        description: Overrides O(group) for this TAP.
        type: raw
      mtu:
        description: Overrides O(mtu) for this TAP.
        type: int
      bridge:
        description: Overrides O(bridge) for this TAP.
        type: str
      up:
        description: Overrides O(up) for this TAP.
        type: bool
  state:
    description:
      - V(present) creates or converges the TAPs; V(absent) deletes them.
      - With V(absent), O(link_group) and neither O(name) nor O(taps), every TAP in that link group is
        deleted with a single netlink request (fast bulk removal). The group must hold only TUN/TAP devices.
      - V(absent) refuses to delete a non-TAP link, and a TAP a process holds open unless O(force=true).
    type: str
    choices: [present, absent]
    default: present
  vnet_hdr:
    description: Set C(IFF_VNET_HDR) on the persistent TAP (sysfs C(tun_flags) 0x5802 instead of 0x1802).
    type: bool
    default: true
  multi_queue:
    description: Create a multi-queue TAP (C(IFF_MULTI_QUEUE)). Must match what the VMM opens it with.
    type: bool
    default: false
  owner:
    description:
      - User (name or numeric uid) allowed to attach the TAP without C(CAP_NET_ADMIN); use the VMM's (jailer's) uid.
      - Unset leaves the current owner. The kernel cannot remove an owner once set; recreate the TAP for that.
    type: raw
  group:
    description:
      - Group (name or numeric gid) allowed to attach the TAP. Unset leaves the current group.
    type: raw
  mtu:
    description: MTU of the TAP (68..65535). Unset leaves the current MTU (1500 for a new TAP).
    type: int
  bridge:
    description:
      - Bridge the TAP is attached to as a port. It must already exist (see M(microvm.firecracker.fc_bridge)).
      - Unset leaves the current master; an empty string detaches the TAP from any bridge.
    type: str
  up:
    description:
      - Administrative state. A TAP that is down makes the VMM's writes fail with EIO.
    type: bool
    default: true
  netns:
    description:
      - Operate inside this named network namespace (C(/run/netns/NAME), as made by C(ip netns add)).
      - The module process enters it once for the whole batch.
    type: str
  link_group:
    description:
      - Link group number (1..4294967295) set on every TAP of the call, for fast bulk removal with O(state=absent).
    type: int
  recreate:
    description:
      - Delete and recreate an existing TUN/TAP device whose type or multi_queue setting differs,
        instead of failing. Never done to a device a process holds open.
    type: bool
    default: false
  force:
    description:
      - With O(state=absent), also delete TAPs that a process holds open (the VM using it loses its network).
    type: bool
    default: false
notes:
  - Returned C(tun_flags) is derived from netlink (C(IFLA_TUN_*)) and equals what C(/sys/class/net/<tap>/tun_flags)
    shows; sysfs itself is not read because it belongs to the namespace that mounted it.
seealso:
  - module: microvm.firecracker.fc_bridge
"""

EXAMPLES = r"""
- name: One TAP for a VM, owned by the VMM user, on the VMs' bridge
  microvm.firecracker.tap_vnet_hdr:
    name: fc-web1
    owner: firecracker
    bridge: fcbr0

- name: A batch of TAPs in a lab namespace, tagged for bulk removal
  microvm.firecracker.tap_vnet_hdr:
    netns: fclab
    bridge: fcbr0
    link_group: 4242
    taps:
      - name: fc-vm1
      - name: fc-vm2
        mtu: 1400
      - name: fc-vm3
        owner: 1003
        group: kvm

- name: Remove every TAP of the batch with one netlink request
  microvm.firecracker.tap_vnet_hdr:
    netns: fclab
    link_group: 4242
    state: absent
"""

RETURN = r"""
taps:
  description: State of each TAP after the call (predicted in check mode), in the order asked.
  returned: always
  type: list
  elements: dict
  contains:
    name:
      description: Device name.
      type: str
      sample: fc-vm1
    state:
      description: V(present) or V(absent).
      type: str
      sample: present
    ifindex:
      description: Interface index (null for a TAP check mode would create).
      type: int
      sample: 12
    tun_flags:
      description: Flags as C(/sys/class/net/<tap>/tun_flags) shows them (hex).
      type: str
      sample: "0x5802"
    vnet_hdr:
      description: Whether C(IFF_VNET_HDR) is set.
      type: bool
    multi_queue:
      description: Whether C(IFF_MULTI_QUEUE) is set.
      type: bool
    owner:
      description: Owner uid, null when none.
      type: int
    group:
      description: Group gid, null when none.
      type: int
    bridge:
      description: Name of the bridge the TAP is a port of, null when none.
      type: str
    mtu:
      description: MTU.
      type: int
    up:
      description: Administrative state.
      type: bool
    operstate:
      description: Kernel operational state (C(down) until a VMM attaches, even when administratively up).
      type: str
    attached:
      description: Whether a process (a VMM) currently holds the TAP open.
      type: bool
    link_group:
      description: Link group number (0 is the default group).
      type: int
attached_differences:
  description: Differences found on TAPs held open by a process, reported instead of changed.
  returned: always
  type: list
  elements: dict
  sample: [{"name": "fc-vm1", "field": "owner", "current": 1000, "requested": 1003}]
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.microvm.firecracker.plugins.module_utils import _taps
from ansible_collections.microvm.firecracker.plugins.module_utils._netlink import Netlink, NetlinkOperationError
from ansible_collections.microvm.firecracker.plugins.module_utils._netns import NetnsError, enter_netns
from ansible_collections.microvm.firecracker.plugins.module_utils._tuntap import TunTapError

_TAP_ENTRY = dict(
    name=dict(type="str", required=True),
    vnet_hdr=dict(type="bool"),
    multi_queue=dict(type="bool"),
    owner=dict(type="raw"),
    group=dict(type="raw"),
    mtu=dict(type="int"),
    bridge=dict(type="str"),
    up=dict(type="bool"),
)


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(
            name=dict(type="str"),
            taps=dict(type="list", elements="dict", options=_TAP_ENTRY),
            state=dict(type="str", default="present", choices=["present", "absent"]),
            vnet_hdr=dict(type="bool", default=True),
            multi_queue=dict(type="bool", default=False),
            owner=dict(type="raw"),
            group=dict(type="raw"),
            mtu=dict(type="int"),
            bridge=dict(type="str"),
            up=dict(type="bool", default=True),
            netns=dict(type="str"),
            link_group=dict(type="int"),
            recreate=dict(type="bool", default=False),
            force=dict(type="bool", default=False),
        ),
        mutually_exclusive=[("name", "taps")],
        supports_check_mode=True,
    )
    params = module.params
    by_group_only = params["state"] == "absent" and not (params["name"] or params["taps"])
    if not (params["name"] or params["taps"]) and not (by_group_only and params["link_group"]):
        module.fail_json(msg="tap_vnet_hdr: give name or taps (or, with state=absent, link_group)")
    try:
        requests = _taps.build_requests(params)
        if params["netns"]:
            enter_netns(params["netns"])
        with Netlink() as netlink:
            links = netlink.links()
            if params["state"] == "present":
                plans = _taps.plan_present(requests, links, params["recreate"])
            elif by_group_only:
                plans = _taps.plan_absent_group(params["link_group"], links, params["force"])
            else:
                plans = _taps.plan_absent([req.name for req in requests], links, params["force"])
            changed = any(plan.changed for plan in plans)
            if changed and not module.check_mode:
                _taps.apply(netlink, plans, {req.name: req for req in requests}, links,
                            link_group_delete=params["link_group"] if by_group_only else None)
                links = netlink.links()
                by_index = {link.index: link for link in links.values()}
                for plan in plans:
                    link = links.get(plan.name)
                    if plan.after and plan.after.get("state") == "present" and link is not None:
                        plan.after = _taps.view(link, by_index)
    except (_taps.TapError, NetnsError, NetlinkOperationError, TunTapError) as exc:
        module.fail_json(msg=f"tap_vnet_hdr: {exc}")

    differences = [item for plan in plans for item in plan.attached_differences]
    for item in differences:
        module.warn(f"TAP {item['name']} is held open by a process: its {item['field']} is {item['current']}, "
                    f"asked {item['requested']}; left as is (the VMM's own attach sets the flags)")
    result = dict(
        changed=changed,
        taps=[plan.after for plan in plans],
        attached_differences=differences,
    )
    if module._diff:
        result["diff"] = _taps.diff_of(plans)
    module.exit_json(**result)


if __name__ == "__main__":
    main()

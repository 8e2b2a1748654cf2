#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: (c) 2026, microvm.firecracker contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations

DOCUMENTATION = r"""
module: fc_bridge
short_description: The Linux bridge that microVM TAP devices attach to
version_added: 0.1.0
description:
  - Ensures a Linux bridge exists (or not) with the given addresses, STP setting, forward delay, MTU and
    administrative state, optionally inside a named network namespace.
  - Addresses listed in O(addresses) are added when missing. Addresses on the bridge that are not listed
    (set by someone else, or by an earlier run with a different list) are kept and reported in
    RV(bridge.addresses), unless O(purge_addresses=true), which removes them. IPv6 link-local addresses
    (C(fe80::/10)) are the kernel's and are never added, removed or reported.
  - Removing a bridge that still has ports is refused with the list of ports, unless O(force=true).
  - All input is validated, and an existing link of that name is checked to be a bridge, before anything changes.
author:
  - microvm.firecracker contributors (@microvm)
requirements:
  - Python >= 3.9 on the managed host; no third-party Python library (rtnetlink is spoken with the standard library)
  - Linux; root or C(CAP_NET_ADMIN)
attributes:
  check_mode:
    support: full
    description: Check mode computes the same plan as a real run and reports the predicted state.
  diff_mode:
    support: full
    description: Shows addresses, STP, forward delay, MTU and up before and after.
  platform:
    platforms: [linux]
    support: full
    description: Linux only.
options:
  name:
    description: Bridge name (at most 15 bytes; letters, digits, C(_), C(.), C(+), C(-)).
    type: str
    required: true
  state:
    description: V(present) creates or converges the bridge; V(absent) deletes it.
    type: str
    choices: [present, absent]
    default: present
  addresses:
    description:
      - Addresses with prefix length (CIDR, IPv4 or IPv6) the bridge must have, for example V(198.18.0.1/24).
      - Unset leaves addresses alone entirely.
    type: list
    elements: str
  purge_addresses:
    description:
      - Remove addresses that are on the bridge but not in O(addresses) (IPv6 link-local excepted).
      - Ignored when O(addresses) is unset.
    type: bool
    default: false
  stp:
    description: Spanning tree protocol. Off for a VM bridge, so ports forward at once.
    type: bool
    default: false
  forward_delay:
    description:
      - Forward delay in seconds. 0 lets a VM's port forward immediately.
      - With O(stp=true) the kernel only accepts 2..30.
    type: int
    default: 0
  mtu:
    description: MTU (68..65535). Unset leaves the current MTU (a new bridge starts at 1500).
    type: int
  up:
    description: Administrative state.
    type: bool
    default: true
  netns:
    description: Operate inside this named network namespace (C(/run/netns/NAME), as made by C(ip netns add)).
    type: str
  force:
    description: With O(state=absent), delete the bridge even if it still has ports (they are released, not deleted).
    type: bool
    default: false
notes:
  - A bridge without any port that is up reports RV(bridge.operstate=down) even when administratively up.
seealso:
  - module: microvm.firecracker.tap_vnet_hdr
"""

EXAMPLES = r"""
- name: The VMs' bridge with the guests' gateway address
  microvm.firecracker.fc_bridge:
    name: fcbr0
    addresses:
      - 192.168.100.1/24

- name: Exactly these addresses, nothing else
  microvm.firecracker.fc_bridge:
    name: fcbr0
    addresses: [192.168.100.1/24]
    purge_addresses: true

- name: Remove the bridge even though TAPs are still attached
  microvm.firecracker.fc_bridge:
    name: fcbr0
    state: absent
    force: true
"""

RETURN = r"""
bridge:
  description: State of the bridge after the call (predicted in check mode).
  returned: always
  type: dict
  contains:
    name:
      description: Bridge name.
      type: str
      sample: fcbr0
    state:
      description: V(present) or V(absent).
      type: str
    ifindex:
      description: Interface index (null for a bridge check mode would create).
      type: int
    addresses:
      description: Addresses on the bridge in CIDR form, IPv6 link-local excepted.
      type: list
      elements: str
      sample: ["192.168.100.1/24"]
    ports:
      description: Names of the links attached to the bridge.
      type: list
      elements: str
      sample: ["fc-vm1", "fc-vm2"]
    stp:
      description: Whether STP is on.
      type: bool
    forward_delay:
      description: Forward delay in seconds.
      type: int
    mtu:
      description: MTU.
      type: int
    up:
      description: Administrative state.
      type: bool
    operstate:
      description: Kernel operational state.
      type: str
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.microvm.firecracker.plugins.module_utils import _bridges
from ansible_collections.microvm.firecracker.plugins.module_utils._netlink import Netlink, NetlinkOperationError
from ansible_collections.microvm.firecracker.plugins.module_utils._netns import NetnsError, enter_netns


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(
            name=dict(type="str", required=True),
            state=dict(type="str", default="present", choices=["present", "absent"]),
            addresses=dict(type="list", elements="str"),
            purge_addresses=dict(type="bool", default=False),
            stp=dict(type="bool", default=False),
            forward_delay=dict(type="int", default=0),
            mtu=dict(type="int"),
            up=dict(type="bool", default=True),
            netns=dict(type="str"),
            force=dict(type="bool", default=False),
        ),
        supports_check_mode=True,
    )
    try:
        request = _bridges.build_request(module.params)
        if module.params["netns"]:
            enter_netns(module.params["netns"])
        with Netlink() as netlink:
            links = netlink.links()
            link = links.get(request.name)
            addresses = netlink.addresses(link.index) if link is not None else []
            plan = _bridges.plan(request, links, addresses)
            if plan.changed and not module.check_mode:
                _bridges.apply(netlink, request, plan, links)
                if request.state == "present":
                    links = netlink.links()
                    link = links[request.name]
                    plan.after = _bridges.view(link, netlink.addresses(link.index), links)
    except (_bridges.BridgeError, NetnsError, NetlinkOperationError) as exc:
        module.fail_json(msg=f"fc_bridge: {exc}")
    result = dict(changed=plan.changed, bridge=plan.after)
    if module._diff:
        result["diff"] = _bridges.diff_of(plan)
    module.exit_json(**result)


if __name__ == "__main__":
    main()

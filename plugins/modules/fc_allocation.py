#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: (c) 2026, microvm.firecracker contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations

DOCUMENTATION = r"""
module: fc_allocation
short_description: The host's address allocator for microVMs (IP, MAC, TAP name per VM)
version_added: 0.1.0
description:
  - Allocates, for each VM name, an IPv4 address from a pool derived from one CIDR, and the MAC address and
    TAP name derived from that address. The allocations are persisted in O(state_dir) (C(allocations.json),
    mode 0600) and read and written only under an exclusive lock, so concurrent runs on one host never hand
    out the same address or TAP name, and a restart changes nothing.
  - A VM keeps its allocation until it is released with O(state=absent).
  - The same allocations feed the DHCP reservations or the guest's static network file, and the TAP, so
    they cannot disagree.
  - The MAC is locally administered and unicast (C(06:00:) followed by the four IPv4 octets); the TAP name
    is O(tap_prefix) followed by the whole address in hex (never truncated, so never shared).
author:
  - microvm.firecracker contributors (@microvm)
attributes:
  check_mode:
    support: full
    description: Check mode reads the allocations and reports what a real run would allocate or release.
  diff_mode:
    support: full
    description: The allocations of the named VMs before and after.
  platform:
    platforms: [linux]
    support: full
    description: Linux (uses C(flock)).
options:
  names:
    description: VM names (letters, digits and C(-), at most 64 characters) to allocate for or release.
    type: list
    elements: str
    required: true
  state:
    description: V(present) allocates (or keeps) an address for each name; V(absent) releases them.
    type: str
    choices: [present, absent]
    default: present
  cidr:
    description: The VMs' IPv4 network, for example V(192.168.100.0/24) (at most /29).
    type: str
    required: true
  gateway:
    description: The guests' gateway (the bridge's address). Default the first host address of O(cidr).
    type: str
  pool_start:
    description: First address handed out. Default the first host address after the gateway.
    type: str
  pool_end:
    description: Last address handed out. Default the last host address of O(cidr).
    type: str
  tap_prefix:
    description: Prefix of the TAP names (with 8 hex digits the name must fit in 15 bytes).
    type: str
    default: fc-
  state_dir:
    description: Directory of the allocations file and its lock.
    type: path
    default: /var/lib/firecracker
"""

EXAMPLES = r"""
- name: Addresses for two VMs
  microvm.firecracker.fc_allocation:
    cidr: 192.168.100.0/24
    names: [web1, web2]
  register: fc_alloc

- name: Release one
  microvm.firecracker.fc_allocation:
    cidr: 192.168.100.0/24
    names: [web2]
    state: absent
"""

RETURN = r"""
allocations:
  description: The allocation of each named VM (empty for released ones), keyed by name.
  returned: always
  type: dict
  sample:
    web1: {name: web1, ip: 192.168.100.2, prefix: 24, netmask: 255.255.255.0, gateway: 192.168.100.1,
           mac: "06:00:c0:a8:64:02", tap: fc-c0a86402, allocated_at: "2026-11-29T01:00:00Z"}
all_allocations:
  description: Every allocation on the host, keyed by VM name (for DHCP reservations and reconciling).
  returned: always
  type: dict
changed_names:
  description: The names whose allocation was created, updated or released.
  returned: always
  type: list
  elements: str
pool:
  description: The pool in use.
  returned: always
  type: dict
  sample: {network: 192.168.100.0/24, gateway: 192.168.100.1, first: 192.168.100.2, last: 192.168.100.254, size: 253}
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.microvm.firecracker.plugins.module_utils._allocator import (
    AllocationError,
    Allocator,
    make_pool,
)


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(
            names=dict(type="list", elements="str", required=True),
            state=dict(type="str", default="present", choices=["present", "absent"]),
            cidr=dict(type="str", required=True),
            gateway=dict(type="str"),
            pool_start=dict(type="str"),
            pool_end=dict(type="str"),
            tap_prefix=dict(type="str", default="fc-"),
            state_dir=dict(type="path", default="/var/lib/firecracker"),
        ),
        supports_check_mode=True,
    )
    params = module.params
    try:
        pool = make_pool(params["cidr"], params["gateway"], params["pool_start"], params["pool_end"])
        allocator = Allocator(params["state_dir"], pool, params["tap_prefix"])
        before, after, changed = allocator.apply(params["names"], params["state"], module.check_mode)
    except AllocationError as exc:
        module.fail_json(msg=f"fc_allocation: {exc}")
    except OSError as exc:
        module.fail_json(msg=f"fc_allocation: {params['state_dir']}: {exc.strerror}")
    result = dict(
        changed=bool(changed),
        changed_names=changed,
        allocations={name: after.get(name, {}) for name in params["names"]},
        all_allocations=after,
        pool={"network": str(pool.network), "gateway": str(pool.gateway), "first": str(pool.first),
              "last": str(pool.last), "size": pool.size},
    )
    if module._diff:
        result["diff"] = {"before": {n: before.get(n) for n in params["names"]},
                          "after": {n: after.get(n) for n in params["names"]}}
    module.exit_json(**result)


if __name__ == "__main__":
    main()

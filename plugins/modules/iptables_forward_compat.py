#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: (c) 2026, microvm.firecracker contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations

DOCUMENTATION = r"""
module: iptables_forward_compat
short_description: Let a VM bridge's traffic through an iptables FORWARD drop (Docker, libvirt)
version_added: 0.1.0
description:
  - Docker sets the policy of the iptables C(filter FORWARD) chain to DROP, and libvirt setups often do too. With
    C(br_netfilter) even bridged frames pass that chain. An accept in another nftables table does not override that
    drop, so the VMs' forwarded traffic is dropped although the VM bridge's own firewall accepts it.
  - This module detects that situation and inserts two ACCEPT rules at the top of C(DOCKER-USER) when that chain
    exists (Docker's documented place for user rules; Docker never flushes it) or else at the top of C(FORWARD)
    (in from the bridge; established/related out to the bridge). Each rule carries the comment
    C(microvm.firecracker host_network <bridge>), by which it is found again and removed.
  - Rules with that comment in another chain (for example in C(FORWARD) after Docker was installed) are removed.
  - Nothing is changed on a host without a FORWARD drop in O(mode=auto); rules an earlier run inserted are kept
    there (Docker may be started again).
author:
  - microvm.firecracker contributors (@microvm)
requirements:
  - C(iptables) (either backend) on the managed host, except with O(mode=auto) or O(state=absent), where a host
    without iptables has nothing to fix
  - Linux; root
attributes:
  check_mode:
    support: full
    description: Reads the rules and reports what would be inserted or removed.
  diff_mode:
    support: full
    description: Our rules (C(iptables -S) lines) before and after.
  platform:
    platforms: [linux]
    support: full
    description: Linux only.
options:
  bridge:
    description: The VM bridge.
    type: str
    required: true
  mode:
    description:
      - V(auto) inserts the rules when iptables would drop the traffic (FORWARD policy DROP, or a C(DOCKER-USER)
        chain), V(always) inserts them in any case, V(never) removes them.
    type: str
    choices: [auto, always, never]
    default: auto
  state:
    description: V(absent) removes the rules from every chain of the filter table.
    type: str
    choices: [present, absent]
    default: present
  netns:
    description: Operate inside this named network namespace (C(/run/netns/NAME)).
    type: str
notes:
  - Only IPv4 (C(iptables)); the VMs' network is IPv4.
  - C(iptables) here is whatever the host's C(iptables) command is (nft or legacy backend). Docker uses the same
    command, so both see the same rules.
"""

EXAMPLES = r"""
- name: Let fcbr0's traffic through Docker's FORWARD drop
  microvm.firecracker.iptables_forward_compat:
    bridge: fcbr0

- name: Remove the rules again
  microvm.firecracker.iptables_forward_compat:
    bridge: fcbr0
    state: absent
"""

RETURN = r"""
needed:
  description: Whether iptables would drop the bridge's forwarded traffic without the rules (or O(mode=always)).
  returned: always
  type: bool
reason:
  description: Why the rules are (or are not) needed.
  returned: always
  type: str
  sample: a DOCKER-USER chain exists (Docker)
chain:
  description: The chain that holds the rules (null when they are not needed).
  returned: always
  type: str
  sample: DOCKER-USER
rules:
  description: Our rules after the call, as C(iptables -S) lines (predicted in check mode).
  returned: always
  type: list
  elements: str
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.microvm.firecracker.plugins.module_utils import _forward_compat
from ansible_collections.microvm.firecracker.plugins.module_utils._ifnames import ifname_problem
from ansible_collections.microvm.firecracker.plugins.module_utils._netns import NetnsError, enter_netns


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(
            bridge=dict(type="str", required=True),
            mode=dict(type="str", default="auto", choices=list(_forward_compat.MODES)),
            state=dict(type="str", default="present", choices=["present", "absent"]),
            netns=dict(type="str"),
        ),
        supports_check_mode=True,
    )
    params = module.params
    bridge = params["bridge"]
    problem = ifname_problem(bridge)
    if problem:
        module.fail_json(msg=f"iptables_forward_compat: bridge {bridge!r}: {problem}")
    comment = _forward_compat.comment_for(bridge)
    before: list[str] = []
    after: list[str] = []
    plan = None
    try:
        if params["netns"]:
            enter_netns(params["netns"])
        state = _forward_compat.read_state(comment)
        before = _forward_compat.rule_lines(state)
        plan = _forward_compat.plan(state, bridge, comment, params["mode"], params["state"] == "present")
        if plan.changed and not module.check_mode:
            _forward_compat.apply(plan)
            after = _forward_compat.rule_lines(_forward_compat.read_state(comment))
        else:
            kept = [(c, s) for c, s in state.ours if (c, s) not in plan.remove]
            predicted = _forward_compat.FilterState(True, ours=[(plan.chain or "", s) for s in plan.insert] + kept)
            after = _forward_compat.rule_lines(predicted)
    except (_forward_compat.CompatError, NetnsError) as exc:
        module.fail_json(msg=f"iptables_forward_compat: bridge {bridge}: {exc}")
    result = dict(changed=plan.changed, needed=plan.needed, reason=plan.reason, chain=plan.chain, rules=after)
    if module._diff:
        result["diff"] = {"before": "".join(line + "\n" for line in before),
                          "after": "".join(line + "\n" for line in after)}
    module.exit_json(**result)


if __name__ == "__main__":
    main()

#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: (c) 2026, microvm.firecracker contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations

DOCUMENTATION = r"""
module: host_network_verify
short_description: Check a VM bridge's host network, naming what is broken when a VM boots but has no network
version_added: 0.1.0
description:
  - Checks the live host (or named network namespace) for the usual causes of "the VM boots but has no network",
    one check each, and returns them all. Read-only; never changed.
  - C(bridge) the bridge exists, is a bridge, is up and has the gateway address. C(ip_forward) C(net.ipv4.ip_forward)
    is 1. C(rp_filter) reverse-path filtering is not strict (1) on the bridge (the kernel applies the larger of
    C(all) and the bridge's value). C(nft_table) the firewall tables are loaded and equal to what their rule file
    loads (compared in a scratch network namespace, see M(microvm.firecracker.nft_tables)). C(masquerade) (with
    O(nat)) the inet table masquerades out of the uplink. C(forward_compat) (unless O(forward_compat=never)) when
    iptables drops forwarded traffic (FORWARD policy DROP, or a C(DOCKER-USER) chain) our ACCEPT rules are there
    (see M(microvm.firecracker.iptables_forward_compat)). C(dhcp_server) and C(dhcp_hosts) (with O(dhcp)) the
    bridge's dnsmasq runs (the pid in its pid file is alive and reads its configuration) and its reservations file
    exists. C(uplink) (with O(nat) or an O(uplink)) the uplink exists and is up.
  - Fails naming every failed check, unless O(fail_on_error=false).
author:
  - microvm.firecracker contributors (@microvm)
requirements:
  - C(nft) and C(unshare) for the C(nft_table) check; C(iptables) where it is installed
  - Linux; root
attributes:
  check_mode:
    support: full
    description: Runs the same read-only checks.
  diff_mode:
    support: none
    description: Read-only; it never changes anything.
  platform:
    platforms: [linux]
    support: full
    description: Linux only.
options:
  bridge:
    description: The VM bridge.
    type: str
    required: true
  gateway:
    description: The bridge's address with prefix length, for example V(192.168.100.1/24).
    type: str
    required: true
  uplink:
    description: The interface the guests' traffic leaves through (empty when there is none).
    type: str
    default: ""
  nat:
    description: Whether the guests' traffic is masqueraded out of O(uplink).
    type: bool
    default: true
  nft_file:
    description: The rule file that owns O(nft_tables).
    type: path
    required: true
  nft_tables:
    description: The tables the rule file owns, each C(<family> <name>). The first C(inet) one holds the masquerade.
    type: list
    elements: str
    required: true
  forward_compat:
    description: The role's C(host_network_forward_compat); V(never) skips the C(forward_compat) check.
    type: str
    choices: [auto, always, never]
    default: auto
  dhcp:
    description: Whether a dnsmasq instance serves DHCP on the bridge.
    type: bool
    default: true
  dnsmasq_config:
    description: The dnsmasq instance's configuration file (required with O(dhcp)).
    type: path
  dnsmasq_pidfile:
    description: Its pid file (required with O(dhcp)).
    type: path
  dhcp_hostsfile:
    description: Its reservations file (required with O(dhcp)).
    type: path
  netns:
    description: Check inside this named network namespace (C(/run/netns/NAME)).
    type: str
  fail_on_error:
    description: Fail when a check fails. V(false) only reports the checks.
    type: bool
    default: true
"""

EXAMPLES = r"""
- name: Why has my VM no network?
  microvm.firecracker.host_network_verify:
    bridge: fcbr0
    gateway: 192.168.100.1/24
    uplink: eth0
    nft_file: /etc/microvm/network/fcbr0/nftables.nft
    nft_tables: [inet microvm_fcbr0, bridge microvm_fcbr0]
    dnsmasq_config: /etc/microvm/network/fcbr0/dnsmasq.conf
    dnsmasq_pidfile: /run/microvm/network/fcbr0/dnsmasq.pid
    dhcp_hostsfile: /var/lib/microvm/network/fcbr0/dhcp-hosts
"""

RETURN = r"""
checks:
  description: Every check that ran, in order.
  returned: always
  type: list
  elements: dict
  contains:
    name:
      description: C(bridge), C(ip_forward), C(rp_filter), C(nft_table), C(masquerade), C(forward_compat),
        C(dhcp_server), C(dhcp_hosts) or C(uplink).
      type: str
    ok:
      description: Whether it passed.
      type: bool
    detail:
      description: What was found.
      type: str
  sample: [{name: ip_forward, ok: false, detail: "net.ipv4.ip_forward is 0: the host does not route the guests' packets"}]
ok:
  description: Whether every check passed.
  returned: always
  type: bool
failed_checks:
  description: The names of the checks that failed.
  returned: always
  type: list
  elements: str
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.microvm.firecracker.plugins.module_utils import _host_network_verify as verify
from ansible_collections.microvm.firecracker.plugins.module_utils._nft import NftError, parse_table
from ansible_collections.microvm.firecracker.plugins.module_utils._netns import NetnsError, enter_netns


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(
            bridge=dict(type="str", required=True),
            gateway=dict(type="str", required=True),
            uplink=dict(type="str", default=""),
            nat=dict(type="bool", default=True),
            nft_file=dict(type="path", required=True),
            nft_tables=dict(type="list", elements="str", required=True),
            forward_compat=dict(type="str", default="auto", choices=["auto", "always", "never"]),
            dhcp=dict(type="bool", default=True),
            dnsmasq_config=dict(type="path"),
            dnsmasq_pidfile=dict(type="path"),
            dhcp_hostsfile=dict(type="path"),
            netns=dict(type="str"),
            fail_on_error=dict(type="bool", default=True),
        ),
        required_if=[("dhcp", True, ["dnsmasq_config", "dnsmasq_pidfile", "dhcp_hostsfile"])],
        supports_check_mode=True,
    )
    p = module.params
    try:
        tables = [parse_table(text) for text in p["nft_tables"]]
        if not any(table.family == "inet" for table in tables):
            raise NftError("nft_tables: list the inet table that holds the masquerade")
        target = verify.Target(
            bridge=p["bridge"], gateway=verify.gateway_interface(p["gateway"]), uplink=p["uplink"] or "",
            nat=p["nat"], nft_file=p["nft_file"], nft_tables=tables, forward_compat=p["forward_compat"],
            dhcp=p["dhcp"], dnsmasq_config=p["dnsmasq_config"] or "", dnsmasq_pidfile=p["dnsmasq_pidfile"] or "",
            dhcp_hostsfile=p["dhcp_hostsfile"] or "")
        if p["netns"]:
            enter_netns(p["netns"])
    except (ValueError, NftError, NetnsError) as exc:
        module.fail_json(msg=f"host_network_verify: {exc}", checks=[], ok=False, failed_checks=[])
    checks = verify.run_checks(target)
    result = dict(changed=False, checks=[c.as_dict() for c in checks], ok=all(c.ok for c in checks),
                  failed_checks=[c.name for c in checks if not c.ok])
    message = verify.summary(p["bridge"], checks)
    if message and p["fail_on_error"]:
        module.fail_json(msg=message, **result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()

#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: (c) 2026, microvm.firecracker contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations

DOCUMENTATION = r"""
module: dnsmasq_reservations
short_description: DHCP reservations of a dnsmasq instance, reloaded without a restart, stale leases released
version_added: 0.1.0
description:
  - Writes a dnsmasq C(dhcp-hostsfile) holding exactly the given reservations (C(MAC,IP,hostname), one per line,
    sorted by address), atomically and only when its content differs.
  - When the file changed and the instance runs, sends it SIGHUP, which makes dnsmasq re-read the file without a
    restart; its leases are kept.
  - Every lease in O(leasefile) whose MAC/IP pair is no longer reserved is released, so a VM that is gone leaves no
    lease behind. While the instance runs, with C(dhcp_release) inside its network namespace, waiting until the lease
    file no longer lists the lease; while it does not run, by removing the line from the lease file.
  - All reservations are validated (host names, unicast MACs, addresses inside O(network) and not its gateway, no
    name, MAC or address twice) before anything is written.
author:
  - microvm.firecracker contributors (@microvm)
requirements:
  - C(dhcp_release) (Debian/Ubuntu package dnsmasq-utils) to release leases of a running instance
  - Linux; root
attributes:
  check_mode:
    support: full
    description: Reports the file change, the reload and the leases that would be released.
  diff_mode:
    support: full
    description: The reservations file before and after.
  platform:
    platforms: [linux]
    support: full
    description: Linux only.
options:
  hostsfile:
    description: The reservations file (the instance's C(dhcp-hostsfile=)). Its directory must exist.
    type: path
    required: true
  reservations:
    description:
      - The reservations, all of them (one per VM); V([]) leaves none.
      - Each is a dict with C(name) (the guest's host name; letters, digits, C(-), at most 63), C(mac) (its unicast
        MAC address) and C(ip) (the address reserved for it, a host address of O(network)). Other keys are ignored,
        so the entries of M(microvm.firecracker.fc_allocation)'s C(all_allocations) fit as they are.
    type: list
    elements: dict
    required: true
  network:
    description: The bridge's IPv4 network (CIDR); every reserved address must be a host address in it.
    type: str
    required: true
  gateway:
    description: The gateway address, which may not be reserved.
    type: str
  leasefile:
    description: The instance's lease file (C(dhcp-leasefile=)). Unset releases nothing.
    type: path
  pidfile:
    description: The instance's pid file (C(pid-file=)), to find the running daemon. Unset treats it as not running.
    type: path
  config:
    description: The instance's configuration file; the pid is only trusted when that process reads it.
    type: path
  interface:
    description: The bridge dnsmasq serves, where C(dhcp_release) sends its release. Required to release leases of a
      running instance.
    type: str
  netns:
    description: The named network namespace dnsmasq serves in (for C(dhcp_release)).
    type: str
  timeout:
    description: Seconds to wait for dnsmasq to drop a released lease from its lease file.
    type: float
    default: 10
"""

EXAMPLES = r"""
- name: The VMs' reservations on fcbr0
  microvm.firecracker.dnsmasq_reservations:
    hostsfile: /var/lib/microvm/network/fcbr0/dhcp-hosts
    leasefile: /var/lib/microvm/network/fcbr0/dnsmasq.leases
    pidfile: /run/microvm/network/fcbr0/dnsmasq.pid
    config: /etc/microvm/network/fcbr0/dnsmasq.conf
    interface: fcbr0
    network: 192.168.100.0/24
    gateway: 192.168.100.1
    reservations:
      - {name: web1, mac: "06:00:c0:a8:64:02", ip: 192.168.100.2}
"""

RETURN = r"""
reservations:
  description: The reservations as written (normalized, sorted by address).
  returned: always
  type: list
  elements: dict
  sample: [{name: web1, mac: "06:00:c0:a8:64:02", ip: 192.168.100.2}]
reloaded:
  description: Whether the running dnsmasq was sent SIGHUP.
  returned: always
  type: bool
pid:
  description: The running dnsmasq's pid (null when it does not run).
  returned: always
  type: int
released:
  description: The leases released (or that check mode would release).
  returned: always
  type: list
  elements: dict
  sample: [{ip: 192.168.100.3, mac: "06:00:c0:a8:64:03", hostname: web2}]
"""

import ipaddress
import os
import signal

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.microvm.firecracker.plugins.module_utils import _dnsmasq
from ansible_collections.microvm.firecracker.plugins.module_utils._netns import NetnsError, enter_netns


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(
            hostsfile=dict(type="path", required=True),
            reservations=dict(type="list", elements="dict", required=True),
            network=dict(type="str", required=True),
            gateway=dict(type="str"),
            leasefile=dict(type="path"),
            pidfile=dict(type="path"),
            config=dict(type="path"),
            interface=dict(type="str"),
            netns=dict(type="str"),
            timeout=dict(type="float", default=10.0),
        ),
        supports_check_mode=True,
    )
    params = module.params
    hostsfile = params["hostsfile"]
    before = after = ""
    reservations: list = []
    stale: list = []
    pid = None
    reloaded = False
    file_changed = False
    try:
        try:
            network = ipaddress.IPv4Network(params["network"], strict=True)
            gateway = ipaddress.IPv4Address(params["gateway"]) if params["gateway"] else None
        except ValueError as exc:
            raise _dnsmasq.DnsmasqError(f"network {params['network']} / gateway {params['gateway']}: {exc}") from None
        reservations = _dnsmasq.parse_reservations(params["reservations"], network, gateway)
        after = _dnsmasq.hostsfile_content(reservations)
        before = _dnsmasq.read_text(hostsfile) or ""
        file_changed = before != after or not os.path.exists(hostsfile)
        if params["pidfile"]:
            pid = _dnsmasq.running_pid(params["pidfile"], params["config"])
        if params["leasefile"]:
            stale = _dnsmasq.stale_leases(_dnsmasq.parse_leases(_dnsmasq.read_text(params["leasefile"])), reservations)
        if stale and pid is not None and not params["interface"]:
            raise _dnsmasq.DnsmasqError("interface: required to release leases of the running dnsmasq")
        reloaded = file_changed and pid is not None
        if not module.check_mode:
            if file_changed:
                if not os.path.isdir(os.path.dirname(hostsfile) or "."):
                    raise _dnsmasq.DnsmasqError(f"{hostsfile}: the directory does not exist (is the DHCP server set up?)")
                _dnsmasq.write_atomic(hostsfile, after)
            if reloaded:
                os.kill(pid, signal.SIGHUP)
            if stale and pid is not None:
                if params["netns"]:
                    enter_netns(params["netns"])
                _dnsmasq.release(params["interface"], stale, params["leasefile"], params["timeout"])
            elif stale:
                _dnsmasq.drop_from_leasefile(params["leasefile"], stale)
    except (_dnsmasq.DnsmasqError, NetnsError) as exc:
        module.fail_json(msg=f"dnsmasq_reservations: {exc}")
    except OSError as exc:
        module.fail_json(msg=f"dnsmasq_reservations: {hostsfile}: {exc}")
    result = dict(
        changed=file_changed or bool(stale),
        reservations=[{"name": r.name, "mac": r.mac, "ip": r.ip} for r in reservations],
        reloaded=reloaded,
        pid=pid,
        released=[{"ip": lease.ip, "mac": lease.mac, "hostname": lease.hostname} for lease in stale],
    )
    if module._diff:
        result["diff"] = {"before": before, "after": after, "before_header": hostsfile, "after_header": hostsfile}
    module.exit_json(**result)


if __name__ == "__main__":
    main()

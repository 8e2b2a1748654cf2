# -*- coding: utf-8 -*-
# Copyright: (c) 2026, microvm.firecracker contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Read-only checks of a VM bridge's host network: the diagnosis for "the VM boots but has no network".

Each check looks at the live kernel (or process) state for one of the usual causes:
no bridge or no gateway address on it, forwarding off, strict reverse-path filtering,
the firewall table missing or different from its file, no masquerade, an iptables
FORWARD drop (Docker, libvirt) without our accept rules, no DHCP server, no
reservations file, no uplink. Nothing is changed. Importable without Ansible.
"""
from __future__ import annotations

import ipaddress
import os
import stat
from dataclasses import dataclass
from typing import Any, Callable, Optional

from ansible_collections.microvm.firecracker.plugins.module_utils import _dnsmasq, _forward_compat, _nft, _sysctl
from ansible_collections.microvm.firecracker.plugins.module_utils._netlink import Netlink


@dataclass
class Target:
    bridge: str
    gateway: Any  # ipaddress.IPv4Interface
    uplink: str
    nat: bool
    nft_file: str
    nft_tables: list[_nft.Table]
    forward_compat: str
    dhcp: bool
    dnsmasq_config: str
    dnsmasq_pidfile: str
    dhcp_hostsfile: str


class Check:
    def __init__(self, name: str, ok: bool, detail: str) -> None:
        self.name, self.ok, self.detail = name, ok, detail

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "detail": self.detail}


def _guard(name: str, probe: Callable[[], tuple[bool, str]]) -> Check:
    """A check that cannot even look (a tool missing, a file unreadable) fails with the reason."""
    try:
        ok, detail = probe()
    except (OSError, _nft.NftError, _sysctl.SysctlError, _forward_compat.CompatError, _dnsmasq.DnsmasqError) as exc:
        ok, detail = False, f"cannot check: {exc}"
    return Check(name, ok, detail)


def check_bridge(t: Target) -> tuple[bool, str]:
    with Netlink() as netlink:
        links = netlink.links()
        link = links.get(t.bridge)
        if link is None:
            return False, f"bridge {t.bridge} does not exist"
        if link.kind != "bridge":
            return False, f"{t.bridge} exists but is a {link.kind or 'plain'} link, not a bridge"
        addresses = [a.interface for a in netlink.addresses(link.index)]
    problems = []
    if not link.admin_up:
        problems.append("is administratively down")
    if t.gateway not in addresses:
        have = ", ".join(str(a) for a in addresses if a.version == 4) or "no IPv4 address"
        problems.append(f"lacks the gateway address {t.gateway} (has {have})")
    if problems:
        return False, f"bridge {t.bridge} " + " and ".join(problems)
    return True, f"bridge {t.bridge} is up with {t.gateway}"


def check_ip_forward(_t: Target) -> tuple[bool, str]:
    value = _sysctl.read("net.ipv4.ip_forward")
    if value != "1":
        return False, f"net.ipv4.ip_forward is {value}: the host does not route the guests' packets"
    return True, "net.ipv4.ip_forward is 1"


def check_rp_filter(t: Target) -> tuple[bool, str]:
    every = _sysctl.read("net.ipv4.conf.all.rp_filter")
    own = _sysctl.read(f"net.ipv4.conf.{t.bridge.replace('.', '/')}.rp_filter")
    if own is None:
        return False, f"net.ipv4.conf.{t.bridge}.rp_filter does not exist (no bridge {t.bridge})"
    # The kernel applies the larger of conf/all and conf/<interface>.
    effective = max(int(every or 0), int(own))
    if effective == 1:
        return False, (f"reverse-path filtering is strict on {t.bridge} (all={every}, {t.bridge}={own}): "
                       "packets with asymmetric routes are dropped; use 2 (loose) or 0")
    return True, f"reverse-path filtering on {t.bridge} is {effective} (all={every}, {t.bridge}={own})"


def check_nft_table(t: Target) -> tuple[bool, str]:
    names = ", ".join(str(table) for table in t.nft_tables)
    if not os.path.isfile(t.nft_file):
        return False, f"{t.nft_file} does not exist"
    wanted, live, differ = _nft.differences(t.nft_file, t.nft_tables)
    if differ:
        missing = [str(table) for table in t.nft_tables if live[table] is None and wanted[table] is not None]
        if missing:
            return False, f"table(s) {', '.join(missing)} not loaded (nft -f {t.nft_file} loads them)"
        return False, f"table(s) {', '.join(differ)} differ from {t.nft_file} (flushed or edited; nft -f reloads)"
    return True, f"{names} loaded as in {t.nft_file}"


def check_masquerade(t: Target) -> tuple[bool, str]:
    table = next(table for table in t.nft_tables if table.family == "inet")
    listing = _nft.live([table])[table] or ""
    wanted = f'oifname "{t.uplink}" masquerade'
    for line in listing.splitlines():
        if line.strip().endswith(wanted):
            return True, f"{table} masquerades out of {t.uplink}"
    return False, f"no masquerade rule out of {t.uplink!r} in table {table}: guests cannot reach beyond the host"


def check_forward_compat(t: Target) -> tuple[bool, str]:
    comment = _forward_compat.comment_for(t.bridge)
    state = _forward_compat.read_state(comment)
    if not _forward_compat.blocked(state):
        if not state.available:
            return True, "iptables is not installed: nothing can drop the forwarded traffic there"
        return True, "the iptables FORWARD policy is ACCEPT and there is no DOCKER-USER chain"
    chain = _forward_compat.DOCKER_USER if state.docker_user else _forward_compat.FORWARD
    wanted = _forward_compat.wanted_rules(t.bridge, comment)
    have = [spec for c, spec in state.ours if c == chain]
    missing = [spec for spec in wanted if spec not in have]
    cause = "a DOCKER-USER chain exists" if state.docker_user else f"the FORWARD policy is {state.forward_policy}"
    if missing:
        return False, (f"iptables drops forwarded traffic ({cause}) and {chain} lacks the ACCEPT rules for "
                       f"{t.bridge} (forward_compat is {t.forward_compat})")
    return True, f"iptables drops forwarded traffic ({cause}), and {chain} accepts {t.bridge}'s"


def check_dhcp_server(t: Target) -> tuple[bool, str]:
    pid = _dnsmasq.running_pid(t.dnsmasq_pidfile, t.dnsmasq_config)
    if pid is None:
        recorded = _dnsmasq.read_pid(t.dnsmasq_pidfile)
        why = f"pid {recorded} from {t.dnsmasq_pidfile} is not running" if recorded else f"no pid in {t.dnsmasq_pidfile}"
        return False, f"dnsmasq for {t.bridge} ({t.dnsmasq_config}) is not running: {why}"
    return True, f"dnsmasq for {t.bridge} runs as pid {pid}"


def unreadable_by_others(path: str) -> Optional[str]:
    """Why an unprivileged process (dnsmasq drops to nobody) cannot read ``path``, or None."""
    mode = os.stat(path).st_mode
    if not mode & stat.S_IROTH:
        return f"{path} is mode {stat.S_IMODE(mode):04o}"
    directory = os.path.dirname(os.path.abspath(path))
    while True:
        mode = os.stat(directory).st_mode
        if not mode & stat.S_IXOTH:
            return f"{directory} is mode {stat.S_IMODE(mode):04o}"
        if directory == "/":
            return None
        directory = os.path.dirname(directory)


def check_dhcp_hosts(t: Target) -> tuple[bool, str]:
    if not os.path.isfile(t.dhcp_hostsfile):
        return False, f"the reservations file {t.dhcp_hostsfile} does not exist: no guest gets an address"
    # dnsmasq reads the file after dropping its privileges: it must be readable by others.
    why = unreadable_by_others(t.dhcp_hostsfile)
    if why:
        return False, (f"dnsmasq (an unprivileged user once started) cannot read {t.dhcp_hostsfile}: {why}; "
                       "no guest gets an address")
    with open(t.dhcp_hostsfile, encoding="utf-8") as handle:
        count = sum(1 for line in handle if line.strip() and not line.startswith("#"))
    return True, f"{t.dhcp_hostsfile} holds {count} reservation(s)"


def check_uplink(t: Target) -> tuple[bool, str]:
    if not t.uplink:
        return False, "no uplink: no default route, and none configured"
    with Netlink() as netlink:
        link = netlink.links().get(t.uplink)
    if link is None:
        return False, f"uplink {t.uplink} does not exist"
    if not link.admin_up:
        return False, f"uplink {t.uplink} is administratively down"
    return True, f"uplink {t.uplink} exists and is up"


def run_checks(t: Target) -> list[Check]:
    checks = [
        _guard("bridge", lambda: check_bridge(t)),
        _guard("ip_forward", lambda: check_ip_forward(t)),
        _guard("rp_filter", lambda: check_rp_filter(t)),
        _guard("nft_table", lambda: check_nft_table(t)),
    ]
    if t.nat:
        checks.append(_guard("masquerade", lambda: check_masquerade(t)))
    if t.forward_compat != "never":
        checks.append(_guard("forward_compat", lambda: check_forward_compat(t)))
    if t.dhcp:
        checks.append(_guard("dhcp_server", lambda: check_dhcp_server(t)))
        checks.append(_guard("dhcp_hosts", lambda: check_dhcp_hosts(t)))
    if t.nat or t.uplink:
        checks.append(_guard("uplink", lambda: check_uplink(t)))
    return checks


def gateway_interface(text: str) -> Any:
    try:
        value = ipaddress.IPv4Interface(text)
    except ValueError:
        raise ValueError(f"gateway {text!r}: expected an IPv4 address with prefix length, e.g. 192.168.100.1/24") from None
    if "/" not in text:
        raise ValueError(f"gateway {text!r}: the prefix length is missing, e.g. {text}/24")
    return value


def summary(bridge: str, checks: list[Check]) -> Optional[str]:
    failed = [c for c in checks if not c.ok]
    if not failed:
        return None
    return (f"host network of bridge {bridge}: {len(failed)} check(s) failed: "
            + "; ".join(f"{c.name}: {c.detail}" for c in failed))

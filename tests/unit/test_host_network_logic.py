"""The host_network role's Python logic without a kernel: the vm_network filter, DHCP reservations and
leases, the iptables FORWARD compatibility plan, sysctl keys and nft listings (integration:
tests/integration/test_host_network.py)."""
from __future__ import annotations

import ipaddress

import pytest

from ansible_collections.microvm.firecracker.plugins.filter.host_network import FilterModule
from ansible_collections.microvm.firecracker.plugins.module_utils import _dnsmasq, _forward_compat, _nft, _sysctl

NETWORK = ipaddress.IPv4Network("198.18.90.0/24")
GATEWAY = ipaddress.IPv4Address("198.18.90.1")
vm_network = FilterModule().filters()["vm_network"]


def test_vm_network_derives_what_the_allocator_derives():
    assert vm_network("198.18.90.0/24") == {
        "cidr": "198.18.90.0/24", "network": "198.18.90.0", "prefix": 24, "netmask": "255.255.255.0",
        "broadcast": "198.18.90.255", "gateway": "198.18.90.1", "pool_start": "198.18.90.2",
        "pool_end": "198.18.90.254", "pool_size": 253, "error": ""}
    custom = vm_network("198.18.90.0/24", "", "198.18.90.10", "198.18.90.20")
    assert (custom["gateway"], custom["pool_start"], custom["pool_end"], custom["pool_size"]) == (
        "198.18.90.1", "198.18.90.10", "198.18.90.20", 11)


def test_vm_network_fails_or_returns_every_problem():
    assert vm_network("198.18.90.0/24", "198.18.90.50", "198.18.90.10", "198.18.90.100", errors="return") == {
        "error": "cidr 198.18.90.0/24: pool 198.18.90.10-198.18.90.100 contains the gateway 198.18.90.50"}
    with pytest.raises(Exception, match="vm_network: cidr 10.0.0.0/33: not an IPv4 network"):
        vm_network("10.0.0.0/33")
    with pytest.raises(Exception, match="errors must be"):
        vm_network("10.0.0.0/24", errors="ignore")


def test_reservations_are_normalized_sorted_and_extra_keys_ignored():
    entries = [{"name": "web2", "mac": "06-00-C6-12-5A-0B", "ip": "198.18.90.11", "tap": "fc-c6125a0b"},
               {"name": "web1", "mac": "06:00:c6:12:5a:0a", "ip": "198.18.90.10", "allocated_at": "x"}]
    reservations = _dnsmasq.parse_reservations(entries, NETWORK, GATEWAY)
    assert [r.line() for r in reservations] == ["06:00:c6:12:5a:0a,198.18.90.10,web1",
                                                "06:00:c6:12:5a:0b,198.18.90.11,web2"]
    content = _dnsmasq.hostsfile_content(reservations)
    assert content.startswith("# ") and content.endswith("06:00:c6:12:5a:0b,198.18.90.11,web2\n")


def test_bad_reservations_are_all_named():
    entries = [{"name": "ok", "mac": "06:00:c6:12:5a:0a", "ip": "198.18.90.10"},
               {"name": "bad_name", "mac": "01:00:5e:00:00:01", "ip": "198.18.91.10"},
               {"name": "gw", "mac": "06:00:c6:12:5a:0c", "ip": "198.18.90.1"},
               {"name": "dup", "mac": "06:00:c6:12:5a:0a", "ip": "nope"}]
    with pytest.raises(_dnsmasq.DnsmasqError) as raised:
        _dnsmasq.parse_reservations(entries, NETWORK, GATEWAY)
    message = str(raised.value)
    for fragment in ("name 'bad_name' is not a host name", "mac 01:00:5e:00:00:01 is a multicast address",
                     "ip 198.18.91.10 is not a host address of 198.18.90.0/24", "ip 198.18.90.1 is the gateway",
                     "ip 'nope' is not an IPv4 address", "mac reserved more than once: 06:00:c6:12:5a:0a"):
        assert fragment in message, (fragment, message)


def test_stale_leases_are_those_no_longer_reserved():
    text = ("1795963472 06:00:c6:12:5a:0a 198.18.90.10 web1 01:06:00:c6:12:5a:0a\n"
            "1795963473 06:00:c6:12:5a:0b 198.18.90.11 * *\n"
            "1795963474 06:00:c6:12:5a:0a 198.18.90.99 web1 *\n"
            "duid 00:01:00:01:2c:5f:2b:0c:06:00:c6:12:5a:01\n")
    leases = _dnsmasq.parse_leases(text)
    assert [(lease.mac, lease.ip, lease.client_id) for lease in leases] == [
        ("06:00:c6:12:5a:0a", "198.18.90.10", "01:06:00:c6:12:5a:0a"), ("06:00:c6:12:5a:0b", "198.18.90.11", "*"),
        ("06:00:c6:12:5a:0a", "198.18.90.99", "*")]
    reserved = _dnsmasq.parse_reservations([{"name": "web1", "mac": "06:00:c6:12:5a:0a", "ip": "198.18.90.10"}],
                                           NETWORK, GATEWAY)
    assert [lease.ip for lease in _dnsmasq.stale_leases(leases, reserved)] == ["198.18.90.11", "198.18.90.99"]


@pytest.mark.parametrize("argv, found", [
    (["/usr/sbin/dnsmasq", "-C", "/etc/x/dnsmasq.conf"], True),
    (["dnsmasq", "--conf-file=/etc/x/dnsmasq.conf"], True),
    (["dnsmasq", "-C/etc/x/dnsmasq.conf"], True),
    (["dnsmasq", "-C", "/etc/y/dnsmasq.conf"], False),
    (["sleep", "-C", "/etc/x/dnsmasq.conf"], False),
    ([], False),
])
def test_a_pid_is_ours_only_when_it_is_dnsmasq_reading_our_config(argv, found):
    assert _dnsmasq.names_config(argv, "/etc/x/dnsmasq.conf") is found


COMMENT = _forward_compat.comment_for("fcbr0")
WANTED = _forward_compat.wanted_rules("fcbr0", COMMENT)


def state(policy="ACCEPT", docker=False, ours=()):
    chains = {"INPUT", "FORWARD", "OUTPUT"} | ({"DOCKER-USER"} if docker else set())
    return _forward_compat.FilterState(True, policy, chains, list(ours))


def test_compat_rules_go_to_docker_user_or_forward_only_when_iptables_drops():
    assert not _forward_compat.plan(state(), "fcbr0", COMMENT, "auto", True).needed
    docker = _forward_compat.plan(state("DROP", docker=True), "fcbr0", COMMENT, "auto", True)
    assert (docker.needed, docker.chain, docker.insert, docker.remove) == (True, "DOCKER-USER", WANTED, [])
    libvirt = _forward_compat.plan(state("DROP"), "fcbr0", COMMENT, "auto", True)
    assert (libvirt.chain, libvirt.reason) == ("FORWARD", "the iptables FORWARD policy is DROP")
    assert _forward_compat.plan(state(), "fcbr0", COMMENT, "always", True).chain == "FORWARD"


def test_compat_rules_are_idempotent_moved_and_removed():
    in_place = state("DROP", docker=True, ours=[("DOCKER-USER", spec) for spec in WANTED])
    assert not _forward_compat.plan(in_place, "fcbr0", COMMENT, "auto", True).changed
    # Docker appeared after the rules were put in FORWARD: they move to DOCKER-USER.
    moved = _forward_compat.plan(state("DROP", docker=True, ours=[("FORWARD", spec) for spec in WANTED]),
                                 "fcbr0", COMMENT, "auto", True)
    assert moved.insert == WANTED and moved.remove == [("FORWARD", spec) for spec in WANTED]
    # Not needed any more: kept (Docker may come back); never / absent: removed.
    kept = state(ours=[("FORWARD", spec) for spec in WANTED])
    assert not _forward_compat.plan(kept, "fcbr0", COMMENT, "auto", True).changed
    assert len(_forward_compat.plan(kept, "fcbr0", COMMENT, "never", True).remove) == 2
    assert len(_forward_compat.plan(kept, "fcbr0", COMMENT, "auto", False).remove) == 2


def test_compat_without_iptables():
    missing = _forward_compat.FilterState(False)
    assert not _forward_compat.plan(missing, "fcbr0", COMMENT, "auto", True).needed
    with pytest.raises(_forward_compat.CompatError, match="iptables is not installed"):
        _forward_compat.plan(missing, "fcbr0", COMMENT, "always", True)


def test_sysctl_keys_and_values():
    assert _sysctl.key_path("net.ipv4.conf.eth0/100.rp_filter") == "/proc/sys/net/ipv4/conf/eth0.100/rp_filter"
    assert _sysctl.normalize(True) == "1" and _sysctl.normalize(" 4096  8192 ") == "4096\t8192"
    for key in ("kernel.panic", "net..x", "net.ipv4.conf.../rp_filter", "net"):
        with pytest.raises(_sysctl.SysctlError):
            _sysctl.key_path(key)


def test_nft_table_names_and_listing_split():
    inet, bridge = _nft.parse_table("inet microvm_fcbr0"), _nft.parse_table("bridge microvm_fcbr0")
    for bad in ("inet", "inet microvm-fcbr0", "foo x", "inet 0x"):
        with pytest.raises(_nft.NftError):
            _nft.parse_table(bad)
    output = ("### microvm.firecracker table inet microvm_fcbr0\ntable inet microvm_fcbr0 {\n}\n"
              "### microvm.firecracker table bridge microvm_fcbr0\n### absent\n")
    assert _nft._split(output, [inet, bridge]) == {inet: "table inet microvm_fcbr0 {\n}\n", bridge: None}

"""Planning for fc_bridge, on synthetic link and address tables (no kernel needed)."""
from __future__ import annotations

import ipaddress

import pytest

from ansible_collections.microvm.firecracker.plugins.module_utils import _bridges
from ansible_collections.microvm.firecracker.plugins.module_utils._netlink import Address, BridgeInfo, Link

DEFAULTS = dict(name="br0", state="present", addresses=None, purge_addresses=False, stp=False,
                forward_delay=0, mtu=None, up=True, force=False)


def request(**overrides):
    return _bridges.build_request({**DEFAULTS, **overrides})


def bridge_link(index=2, stp=False, delay_cs=0, mtu=1500, up=True):
    return Link(name="br0", index=index, kind="bridge", mtu=mtu, admin_up=up, carrier=False, operstate="down",
                master=None, group=0, bridge=BridgeInfo(stp=stp, forward_delay_cs=delay_cs))


def addr(text, scope=0):
    return Address(interface=ipaddress.ip_interface(text), scope=scope)


def test_new_bridge_plan():
    plan = _bridges.plan(request(addresses=["198.18.0.1/24"]), {}, [])
    assert plan.action == "create" and plan.changed
    assert plan.after["addresses"] == ["198.18.0.1/24"] and plan.after["stp"] is False


def test_converged_bridge_ignores_link_local_ipv6():
    links = {"br0": bridge_link()}
    plan = _bridges.plan(request(addresses=["198.18.0.1/24"], purge_addresses=True), links,
                         [addr("198.18.0.1/24"), addr("fe80::1/64", scope=253)])
    assert plan.action == "none" and not plan.changed
    assert plan.after["addresses"] == ["198.18.0.1/24"]


def test_unlisted_addresses_kept_unless_purged():
    links = {"br0": bridge_link()}
    current = [addr("198.18.0.9/24")]
    kept = _bridges.plan(request(addresses=["198.18.1.1/24", "2001:db8::1/64"]), links, current)
    assert kept.after["addresses"] == ["198.18.0.9/24", "198.18.1.1/24", "2001:db8::1/64"]
    assert not kept.del_addresses
    purged = _bridges.plan(request(addresses=["198.18.1.1/24"], purge_addresses=True), links, current)
    assert [str(a) for a in purged.del_addresses] == ["198.18.0.9/24"]
    assert purged.after["addresses"] == ["198.18.1.1/24"]


def test_stp_and_forward_delay_changes():
    plan = _bridges.plan(request(stp=True, forward_delay=15), {"br0": bridge_link()}, [])
    assert plan.bridge_options == {"stp": True, "forward_delay_cs": 1500}


@pytest.mark.parametrize("overrides, fragment", [
    ({"addresses": ["10.0.0.300/24"]}, "not an address with prefix length"),
    ({"addresses": ["198.18.0.1"]}, "has no prefix length"),
    ({"addresses": ["198.18.0.1/24", "198.18.0.1/24"]}, "listed twice"),
    ({"stp": True, "forward_delay": 0}, "with stp=true the kernel accepts 2..30 s"),
    ({"forward_delay": 31}, "outside 0..30"),
    ({"mtu": 10}, "mtu 10 is outside"),
    ({"name": "x" * 16}, "16 bytes long"),
])
def test_bad_input(overrides, fragment):
    with pytest.raises(_bridges.BridgeError, match=fragment):
        request(**overrides)


def test_remove_refused_with_ports_unless_forced():
    links = {"br0": bridge_link(), "tap0": Link(name="tap0", index=3, kind="tun", mtu=1500, admin_up=True,
                                                carrier=False, operstate="down", master=2, group=0)}
    with pytest.raises(_bridges.BridgeError, match="still has ports tap0"):
        _bridges.plan(request(state="absent"), links, [])
    assert _bridges.plan(request(state="absent", force=True), links, []).action == "delete"
    assert _bridges.plan(request(state="absent"), {}, []).action == "none"


def test_existing_non_bridge_is_refused():
    links = {"br0": Link(name="br0", index=2, kind="veth", mtu=1500, admin_up=True, carrier=True,
                         operstate="up", master=None, group=0)}
    with pytest.raises(_bridges.BridgeError, match="a veth link of that name already exists"):
        _bridges.plan(request(), links, [])

"""The rtnetlink attribute codec, on hand-built messages (no socket needed)."""
from __future__ import annotations

import struct

from ansible_collections.microvm.firecracker.plugins.module_utils import _netlink as nl


def u8(kind: int, value: int) -> bytes:
    return nl._attr(kind, struct.pack("=B", value))


def test_attributes_are_padded_to_four_bytes_and_round_trip():
    encoded = nl._attr(nl.IFLA_IFNAME, b"tap0\0") + nl._u32(nl.IFLA_MTU, 1400)
    assert len(encoded) % 4 == 0
    assert nl._attrs(encoded) == {nl.IFLA_IFNAME: b"tap0\0", nl.IFLA_MTU: struct.pack("=I", 1400)}


def test_nested_flag_is_ignored_when_parsing():
    nested = struct.pack("=HH", 8, nl.IFLA_LINKINFO | 0x8000) + b"abcd"
    assert nl._attrs(nested) == {nl.IFLA_LINKINFO: b"abcd"}


def test_truncated_attribute_stops_parsing():
    assert nl._attrs(struct.pack("=HH", 2, 1)) == {}


def test_parse_tap_link():
    data = (nl._attr(nl.IFLA_TUN_TYPE, b"\x02") + u8(nl.IFLA_TUN_PI, 0) + u8(nl.IFLA_TUN_VNET_HDR, 1)
            + u8(nl.IFLA_TUN_PERSIST, 1) + u8(nl.IFLA_TUN_MULTI_QUEUE, 0) + nl._u32(nl.IFLA_TUN_OWNER, 4242))
    linkinfo = nl._attr(nl.IFLA_INFO_KIND, b"tun\0") + nl._attr(nl.IFLA_INFO_DATA, data)
    attrs = nl._attrs(nl._attr(nl.IFLA_IFNAME, b"fc-vm1\0") + nl._u32(nl.IFLA_MTU, 1500)
                      + u8(nl.IFLA_OPERSTATE, 2) + u8(nl.IFLA_CARRIER, 0) + nl._u32(nl.IFLA_MASTER, 3)
                      + nl._u32(nl.IFLA_GROUP, 7) + nl._attr(nl.IFLA_LINKINFO, linkinfo))
    link = nl.parse_link(12, nl.IFF_UP, attrs)
    assert (link.name, link.index, link.kind, link.mtu, link.admin_up, link.operstate, link.master, link.group) == (
        "fc-vm1", 12, "tun", 1500, True, "down", 3, 7)
    assert link.tun is not None and link.tun.flags == 0x5802 and link.tun.owner == 4242 and link.tun.group is None
    assert link.attached is False


def test_parse_bridge_link():
    data = nl._u32(nl.IFLA_BR_FORWARD_DELAY, 1500) + nl._u32(nl.IFLA_BR_STP_STATE, 1)
    linkinfo = nl._attr(nl.IFLA_INFO_KIND, b"bridge\0") + nl._attr(nl.IFLA_INFO_DATA, data)
    link = nl.parse_link(2, 0, nl._attrs(nl._attr(nl.IFLA_IFNAME, b"fcbr0\0") + nl._attr(nl.IFLA_LINKINFO, linkinfo)))
    assert link.kind == "bridge" and link.bridge == nl.BridgeInfo(stp=True, forward_delay_cs=1500)
    assert link.admin_up is False and link.tun is None


def test_bridge_attributes_carry_only_what_changes():
    only_stp = nl._attrs(nl._attrs(nl._bridge_attrs(False, None))[nl.IFLA_LINKINFO])
    assert only_stp[nl.IFLA_INFO_KIND] == b"bridge\0"
    assert nl._attrs(only_stp[nl.IFLA_INFO_DATA]) == {nl.IFLA_BR_STP_STATE: struct.pack("=I", 0)}

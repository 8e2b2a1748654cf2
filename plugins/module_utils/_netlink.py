# -*- coding: utf-8 -*-
# Copyright: (c) 2026, microvm.firecracker contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Link and address state over rtnetlink, with the Python standard library only.

A deliberately small rtnetlink client: one NETLINK_ROUTE socket per module
call, dumps parsed for the few attributes the modules use, and changes sent
as one batch of messages whose acknowledgements are collected afterwards.
This is what keeps a 200-TAP converge within 2x of ``ip -batch`` (pyroute2
0.9 spends ~0.5 ms per message in Python), and it needs nothing installed
on the managed host. Importable without Ansible.
"""
from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
import sys
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from ansible_collections.microvm.firecracker.plugins.module_utils._tuntap import (
    IFF_MULTI_QUEUE,
    IFF_NO_PI,
    IFF_PERSIST,
    IFF_TAP,
    IFF_TUN,
    IFF_VNET_HDR,
)

# linux/netlink.h, linux/rtnetlink.h, linux/if_link.h, linux/if_addr.h
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLM_F_DUMP = 0x300
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
IFLA_IFNAME, IFLA_MTU, IFLA_MASTER, IFLA_OPERSTATE = 3, 4, 10, 16
IFLA_LINKINFO, IFLA_GROUP, IFLA_EXT_MASK, IFLA_CARRIER = 18, 27, 29, 33
IFLA_INFO_KIND, IFLA_INFO_DATA = 1, 2
IFLA_TUN_OWNER, IFLA_TUN_GROUP, IFLA_TUN_TYPE, IFLA_TUN_PI = 1, 2, 3, 4
IFLA_TUN_VNET_HDR, IFLA_TUN_PERSIST, IFLA_TUN_MULTI_QUEUE, IFLA_TUN_NUM_QUEUES = 5, 6, 7, 8
IFLA_TUN_NUM_DISABLED_QUEUES = 9
IFLA_BR_FORWARD_DELAY, IFLA_BR_STP_STATE = 1, 5
IFA_ADDRESS, IFA_LOCAL = 1, 2
RTEXT_FILTER_SKIP_STATS = 1 << 3
NLA_TYPE_MASK = 0x3FFF
IFF_UP = 0x1
OPERSTATES = ("unknown", "notpresent", "down", "lowerlayerdown", "testing", "dormant", "up")
# Kernel bridge timers are in clock_t (USER_HZ = 100) units.
CENTISECONDS_PER_SECOND = 100

_NLMSGHDR = struct.Struct("=IHHII")
_IFINFOMSG = struct.Struct("=BxHiII")
_IFADDRMSG = struct.Struct("=BBBBI")
_RTATTR = struct.Struct("=HH")
_ERRNO = struct.Struct("=i")
_U32 = struct.Struct("=I")
_BATCH_BYTES = 32768


@dataclass
class TunInfo:
    mode: str  # "tap" or "tun"
    pi: bool
    vnet_hdr: bool
    persist: bool
    multi_queue: bool
    owner: Optional[int]
    group: Optional[int]
    num_queues: Optional[int]

    @property
    def flags(self) -> int:
        """The flags word the kernel shows in /sys/class/net/<dev>/tun_flags."""
        value = IFF_TAP if self.mode == "tap" else IFF_TUN
        if not self.pi:
            value |= IFF_NO_PI
        if self.vnet_hdr:
            value |= IFF_VNET_HDR
        if self.multi_queue:
            value |= IFF_MULTI_QUEUE
        if self.persist:
            value |= IFF_PERSIST
        return value


@dataclass
class BridgeInfo:
    stp: bool
    forward_delay_cs: int


@dataclass
class Link:
    name: str
    index: int
    kind: Optional[str]
    mtu: int
    admin_up: bool
    carrier: bool
    operstate: str
    master: Optional[int]
    group: int
    tun: Optional[TunInfo] = None
    bridge: Optional[BridgeInfo] = None

    @property
    def attached(self) -> bool:
        """Whether a process holds the TUN/TAP device open (a VMM, usually)."""
        if self.tun is None:
            return False
        if self.tun.multi_queue and self.tun.num_queues is not None:
            return self.tun.num_queues > 0
        # The kernel reports queue counts only for multi-queue devices; for the others it
        # turns the carrier on at attach and off when the last file is closed.
        return self.carrier


@dataclass
class Address:
    interface: Any  # ipaddress.IPv4Interface | ipaddress.IPv6Interface
    scope: int

    @property
    def link_local(self) -> bool:
        return self.interface.version == 6 and self.interface.ip.is_link_local


class NetlinkOperationError(Exception):
    """A netlink request failed; the message names the object and operation."""


def _attr(kind: int, payload: bytes) -> bytes:
    length = _RTATTR.size + len(payload)
    return _RTATTR.pack(length, kind) + payload + b"\0" * (-length % 4)


def _u32(kind: int, value: int) -> bytes:
    return _attr(kind, _U32.pack(value))


def _attrs(data: bytes, offset: int = 0) -> dict[int, bytes]:
    result = {}
    while offset + _RTATTR.size <= len(data):
        length, kind = _RTATTR.unpack_from(data, offset)
        if length < _RTATTR.size:
            break
        result[kind & NLA_TYPE_MASK] = data[offset + _RTATTR.size:offset + length]
        offset += (length + 3) & ~3
    return result


def _int(raw: Optional[bytes]) -> Optional[int]:
    if raw is None:
        return None
    return int.from_bytes(raw, sys.byteorder)


def _text(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def _bridge_attrs(stp: Optional[bool], forward_delay_cs: Optional[int]) -> bytes:
    data = b""
    if forward_delay_cs is not None:
        data += _u32(IFLA_BR_FORWARD_DELAY, forward_delay_cs)
    if stp is not None:
        data += _u32(IFLA_BR_STP_STATE, int(stp))
    return _attr(IFLA_LINKINFO, _attr(IFLA_INFO_KIND, b"bridge\0") + _attr(IFLA_INFO_DATA, data))


def parse_link(index: int, flags: int, attrs: dict[int, bytes]) -> Link:
    operstate = _int(attrs.get(IFLA_OPERSTATE)) or 0
    link = Link(
        name=_text(attrs.get(IFLA_IFNAME, b"")),
        index=index,
        kind=None,
        mtu=_int(attrs.get(IFLA_MTU)) or 0,
        admin_up=bool(flags & IFF_UP),
        carrier=bool(_int(attrs.get(IFLA_CARRIER))),
        operstate=OPERSTATES[operstate] if operstate < len(OPERSTATES) else "unknown",
        master=_int(attrs.get(IFLA_MASTER)),
        group=_int(attrs.get(IFLA_GROUP)) or 0,
    )
    if IFLA_LINKINFO not in attrs:
        return link
    info = _attrs(attrs[IFLA_LINKINFO])
    link.kind = _text(info[IFLA_INFO_KIND]) if IFLA_INFO_KIND in info else None
    data = _attrs(info.get(IFLA_INFO_DATA, b""))
    if link.kind == "tun":
        link.tun = TunInfo(
            mode="tap" if _int(data.get(IFLA_TUN_TYPE)) == IFF_TAP else "tun",
            pi=bool(_int(data.get(IFLA_TUN_PI))),
            vnet_hdr=bool(_int(data.get(IFLA_TUN_VNET_HDR))),
            persist=bool(_int(data.get(IFLA_TUN_PERSIST))),
            multi_queue=bool(_int(data.get(IFLA_TUN_MULTI_QUEUE))),
            owner=_int(data.get(IFLA_TUN_OWNER)),
            group=_int(data.get(IFLA_TUN_GROUP)),
            num_queues=_int(data.get(IFLA_TUN_NUM_QUEUES)),
        )
    elif link.kind == "bridge":
        link.bridge = BridgeInfo(
            stp=bool(_int(data.get(IFLA_BR_STP_STATE))),
            forward_delay_cs=_int(data.get(IFLA_BR_FORWARD_DELAY)) or 0,
        )
    return link


class Netlink:
    """One NETLINK_ROUTE socket in the caller's current network namespace."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.sock.bind((0, 0))
        self.seq = 0
        self.pending: list[tuple[int, bytes, str]] = []

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "Netlink":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _message(self, kind: int, flags: int, body: bytes) -> tuple[int, bytes]:
        self.seq += 1
        return self.seq, _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, flags, self.seq, 0) + body

    def _receive(self) -> Iterator[tuple[int, int, bytes]]:
        """(type, seq, payload) of every message in the next datagram."""
        data = self.sock.recv(1 << 20)
        offset = 0
        while offset + _NLMSGHDR.size <= len(data):
            length, kind, _flags, seq, _pid = _NLMSGHDR.unpack_from(data, offset)
            if length < _NLMSGHDR.size:
                break
            yield kind, seq, data[offset + _NLMSGHDR.size:offset + length]
            offset += (length + 3) & ~3

    def _dump(self, kind: int, body: bytes) -> Iterator[tuple[int, bytes]]:
        seq, message = self._message(kind, NLM_F_REQUEST | NLM_F_DUMP, body)
        self.sock.send(message)
        while True:
            for msg_type, msg_seq, payload in self._receive():
                if msg_seq != seq:
                    continue
                if msg_type == NLMSG_DONE:
                    return
                if msg_type == NLMSG_ERROR:
                    code = -_ERRNO.unpack_from(payload)[0]
                    raise NetlinkOperationError(f"netlink dump failed: {os.strerror(code)}")
                yield msg_type, payload

    def links(self) -> dict[str, Link]:
        body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + _u32(IFLA_EXT_MASK, RTEXT_FILTER_SKIP_STATS)
        result = {}
        for msg_type, payload in self._dump(RTM_GETLINK, body):
            if msg_type != RTM_NEWLINK:
                continue
            _family, _type, index, flags, _change = _IFINFOMSG.unpack_from(payload)
            link = parse_link(index, flags, _attrs(payload, _IFINFOMSG.size))
            result[link.name] = link
        return result

    def addresses(self, index: int) -> list[Address]:
        result = []
        for msg_type, payload in self._dump(RTM_GETADDR, _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)):
            if msg_type != RTM_NEWADDR:
                continue
            family, prefixlen, _flags, scope, addr_index = _IFADDRMSG.unpack_from(payload)
            if addr_index != index:
                continue
            attrs = _attrs(payload, _IFADDRMSG.size)
            raw = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)
            if raw is None:
                continue
            ip = socket.inet_ntop(family, raw)
            result.append(Address(interface=ipaddress.ip_interface(f"{ip}/{prefixlen}"), scope=scope))
        return result

    # Changes are queued, then sent together by commit(), which reports every failure.

    def queue(self, what: str, kind: int, flags: int, body: bytes) -> None:
        seq, message = self._message(kind, NLM_F_REQUEST | NLM_F_ACK | flags, body)
        self.pending.append((seq, message, what))

    def commit(self) -> None:
        pending, self.pending = self.pending, []
        failures = []
        for start in range(0, len(pending), 256):
            chunk = pending[start:start + 256]
            waiting = {seq: what for seq, _message, what in chunk}
            buffer = b"".join(message for _seq, message, _what in chunk)
            self.sock.send(buffer)
            while waiting:
                for msg_type, seq, payload in self._receive():
                    if msg_type != NLMSG_ERROR or seq not in waiting:
                        continue
                    what = waiting.pop(seq)
                    code = -_ERRNO.unpack_from(payload)[0]
                    if code:
                        failures.append(f"{what}: {os.strerror(code)} ({errno.errorcode.get(code, code)})")
        if failures:
            raise NetlinkOperationError("; ".join(failures))

    def set_link(self, what: str, index: int, *, mtu: Optional[int] = None, master: Optional[int] = None,
                 up: Optional[bool] = None, group: Optional[int] = None) -> None:
        flags = change = 0
        if up is not None:
            flags, change = (IFF_UP if up else 0), IFF_UP
        body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, flags, change)
        if mtu is not None:
            body += _u32(IFLA_MTU, mtu)
        if group is not None:
            body += _u32(IFLA_GROUP, group)
        if master is not None:
            body += _u32(IFLA_MASTER, master)
        self.queue(what, RTM_NEWLINK, 0, body)

    def delete_link(self, what: str, index: int) -> None:
        self.queue(what, RTM_DELLINK, 0, _IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, 0, 0))

    def delete_group(self, what: str, group: int) -> None:
        """Delete every link in a link group with one request (fast bulk removal)."""
        body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + _u32(IFLA_GROUP, group)
        self.queue(what, RTM_DELLINK, 0, body)

    def add_bridge(self, what: str, name: str, *, stp: bool, forward_delay_cs: int, mtu: Optional[int]) -> None:
        body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + _attr(IFLA_IFNAME, name.encode() + b"\0")
        if mtu is not None:
            body += _u32(IFLA_MTU, mtu)
        body += _bridge_attrs(stp, forward_delay_cs)
        self.queue(what, RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, body)

    def set_bridge(self, what: str, index: int, *, stp: Optional[bool] = None,
                   forward_delay_cs: Optional[int] = None) -> None:
        body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, 0, 0) + _bridge_attrs(stp, forward_delay_cs)
        self.queue(what, RTM_NEWLINK, 0, body)

    def _address(self, what: str, kind: int, flags: int, index: int, iface: Any) -> None:
        family = socket.AF_INET if iface.version == 4 else socket.AF_INET6
        raw = iface.ip.packed
        body = _IFADDRMSG.pack(family, iface.network.prefixlen, 0, 0, index)
        body += _attr(IFA_LOCAL, raw) + _attr(IFA_ADDRESS, raw)
        self.queue(what, kind, flags, body)

    def add_address(self, what: str, index: int, iface: Any) -> None:
        self._address(what, RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, index, iface)

    def delete_address(self, what: str, index: int, iface: Any) -> None:
        self._address(what, RTM_DELADDR, 0, index, iface)

# -*- coding: utf-8 -*-
# Copyright: (c) 2026, microvm.firecracker contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Desired-state logic for the VMs' Linux bridge: validate, plan, apply, report."""
from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from typing import Any, Optional

from ansible_collections.microvm.firecracker.plugins.module_utils._ifnames import ifname_problem
from ansible_collections.microvm.firecracker.plugins.module_utils._netlink import (
    CENTISECONDS_PER_SECOND,
    Address,
    BridgeInfo,
    Link,
    Netlink,
)

MIN_MTU = 68
MAX_MTU = 65535
# With STP on, the kernel only accepts a forward delay of 2..30 s (BR_MIN/MAX_FORWARD_DELAY).
STP_FORWARD_DELAY_RANGE = (2, 30)
DIFF_FIELDS = ("addresses", "stp", "forward_delay", "mtu", "up")


class BridgeError(Exception):
    """Invalid input or a refused operation; nothing has been changed when raised by planning."""


@dataclass(frozen=True)
class BridgeRequest:
    name: str
    state: str
    addresses: Optional[tuple[Any, ...]]  # None: addresses not managed
    purge_addresses: bool
    stp: bool
    forward_delay: int
    mtu: Optional[int]
    up: bool
    force: bool


@dataclass
class BridgePlan:
    action: str  # create | update | delete | none
    bridge_options: dict[str, Any] = field(default_factory=dict)
    link_changes: dict[str, Any] = field(default_factory=dict)
    add_addresses: list[Any] = field(default_factory=list)
    del_addresses: list[Any] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)
    before: Optional[dict[str, Any]] = None
    after: Optional[dict[str, Any]] = None

    @property
    def changed(self) -> bool:
        return bool(self.changes)


def build_request(params: dict[str, Any]) -> BridgeRequest:
    name = params["name"]
    problems = []
    problem = ifname_problem(name)
    if problem:
        problems.append(f"invalid name: {problem}")
    addresses = None
    if params.get("addresses") is not None:
        parsed = []
        for text in params["addresses"]:
            try:
                iface = ipaddress.ip_interface(str(text).strip())
            except ValueError:
                problems.append(f"address {text!r} is not an address with prefix length (CIDR), e.g. 198.18.0.1/24")
                continue
            if "/" not in str(text):
                problems.append(f"address {text!r} has no prefix length; write it as CIDR, e.g. {text}/24")
                continue
            if iface in parsed:
                problems.append(f"address {text} is listed twice")
                continue
            parsed.append(iface)
        addresses = tuple(parsed)
    mtu = params.get("mtu")
    if mtu is not None and not MIN_MTU <= mtu <= MAX_MTU:
        problems.append(f"mtu {mtu} is outside {MIN_MTU}..{MAX_MTU}")
    forward_delay = params.get("forward_delay", 0)
    low, high = STP_FORWARD_DELAY_RANGE
    if params.get("stp") and not low <= forward_delay <= high:
        problems.append(f"forward_delay {forward_delay} s: with stp=true the kernel accepts {low}..{high} s")
    elif forward_delay < 0 or forward_delay > high:
        problems.append(f"forward_delay {forward_delay} s is outside 0..{high}")
    if problems:
        raise BridgeError(f"bridge {name}: " + "; ".join(problems))
    return BridgeRequest(
        name=name, state=params["state"], addresses=addresses,
        purge_addresses=bool(params.get("purge_addresses")), stp=bool(params.get("stp")),
        forward_delay=forward_delay, mtu=mtu, up=bool(params.get("up")), force=bool(params.get("force")),
    )


def _sorted_addresses(addresses: list[Any]) -> list[str]:
    return sorted((str(iface) for iface in addresses), key=lambda text: (":" in text, text))


def view(link: Link, addresses: list[Address], links: dict[str, Link]) -> dict[str, Any]:
    bridge = link.bridge or BridgeInfo(stp=False, forward_delay_cs=0)
    return {
        "name": link.name,
        "state": "present",
        "ifindex": link.index,
        "addresses": _sorted_addresses([a.interface for a in addresses if not a.link_local]),
        "ports": sorted(port.name for port in links.values() if port.master == link.index),
        "stp": bridge.stp,
        "forward_delay": bridge.forward_delay_cs // CENTISECONDS_PER_SECOND,
        "mtu": link.mtu,
        "up": link.admin_up,
        "operstate": link.operstate,
    }


def _diff_view(state: Optional[dict[str, Any]]) -> dict[str, Any]:
    if state is None or state.get("state") == "absent":
        return {"state": "absent"}
    return {"state": "present", **{key: state[key] for key in DIFF_FIELDS}}


def diff_of(plan: BridgePlan) -> dict[str, Any]:
    return {"before": _diff_view(plan.before), "after": _diff_view(plan.after)}


def plan(req: BridgeRequest, links: dict[str, Link], addresses: list[Address]) -> BridgePlan:
    link = links.get(req.name)
    if link is not None and link.kind != "bridge":
        raise BridgeError(f"bridge {req.name}: a {link.kind or 'plain'} link of that name already exists; "
                          "refusing to touch a device that is not a bridge")
    if req.state == "absent":
        if link is None:
            return BridgePlan(action="none", after={"name": req.name, "state": "absent"})
        before = view(link, addresses, links)
        if before["ports"] and not req.force:
            raise BridgeError(f"bridge {req.name}: cannot remove: it still has ports "
                              f"{', '.join(before['ports'])} (force=true removes it anyway)")
        return BridgePlan(action="delete", changes=["delete"], before=before,
                          after={"name": req.name, "state": "absent"})

    forward_delay_cs = req.forward_delay * CENTISECONDS_PER_SECOND
    if link is None:
        result = BridgePlan(action="create", changes=["create"])
        result.add_addresses = list(req.addresses or ())
        if req.up:
            result.link_changes["up"] = True
        result.after = {
            "name": req.name, "state": "present", "ifindex": None,
            "addresses": _sorted_addresses(result.add_addresses), "ports": [],
            "stp": req.stp, "forward_delay": req.forward_delay, "mtu": req.mtu or 1500,
            "up": req.up, "operstate": None,
        }
        return result

    before = view(link, addresses, links)
    current = link.bridge or BridgeInfo(stp=False, forward_delay_cs=0)
    result = BridgePlan(action="update", before=before)
    after = dict(before)
    if current.stp != req.stp:
        result.bridge_options["stp"] = req.stp
        result.changes.append(f"stp {current.stp} -> {req.stp}")
        after["stp"] = req.stp
    if current.forward_delay_cs != forward_delay_cs:
        result.bridge_options["forward_delay_cs"] = forward_delay_cs
        result.changes.append(f"forward_delay {before['forward_delay']} -> {req.forward_delay}")
        after["forward_delay"] = req.forward_delay
    if req.mtu is not None and link.mtu != req.mtu:
        result.link_changes["mtu"] = req.mtu
        result.changes.append(f"mtu {link.mtu} -> {req.mtu}")
        after["mtu"] = req.mtu
    if link.admin_up != req.up:
        result.link_changes["up"] = req.up
        result.changes.append(f"up {link.admin_up} -> {req.up}")
        after["up"] = req.up
    if req.addresses is not None:
        current = [a.interface for a in addresses if not a.link_local]
        result.add_addresses = [iface for iface in req.addresses if iface not in current]
        if req.purge_addresses:
            result.del_addresses = [iface for iface in current if iface not in req.addresses]
        for iface in result.add_addresses:
            result.changes.append(f"add address {iface}")
        for iface in result.del_addresses:
            result.changes.append(f"remove address {iface}")
        kept = [iface for iface in current if iface not in result.del_addresses]
        after["addresses"] = _sorted_addresses(kept + result.add_addresses)
    if not result.changes:
        result.action = "none"
    result.after = after
    return result


def apply(netlink: Netlink, req: BridgeRequest, plan_: BridgePlan, links: dict[str, Link]) -> None:
    """Carry out a plan computed against ``links`` (the current state)."""
    label = f"bridge {req.name}"
    if plan_.action == "delete":
        netlink.delete_link(f"{label}: cannot delete", links[req.name].index)
        netlink.commit()
        return
    if plan_.action == "create":
        netlink.add_bridge(f"{label}: cannot create", req.name, stp=req.stp,
                           forward_delay_cs=req.forward_delay * CENTISECONDS_PER_SECOND, mtu=req.mtu)
        netlink.commit()
    index = socket.if_nametoindex(req.name)
    # The kernel rejects a forward delay under 2 s while STP is on: STP goes off before the
    # delay drops, and comes on after it rises. Messages are processed in the order sent.
    options = plan_.bridge_options
    if options.get("stp") is False:
        netlink.set_bridge(f"{label}: cannot turn STP off", index, stp=False)
    if "forward_delay_cs" in options:
        netlink.set_bridge(f"{label}: cannot set forward_delay", index,
                           forward_delay_cs=options["forward_delay_cs"])
    if options.get("stp") is True:
        netlink.set_bridge(f"{label}: cannot turn STP on", index, stp=True)
    for iface in plan_.del_addresses:
        netlink.delete_address(f"{label}: cannot remove address {iface}", index, iface)
    for iface in plan_.add_addresses:
        netlink.add_address(f"{label}: cannot add address {iface}", index, iface)
    if plan_.link_changes:
        netlink.set_link(f"{label}: cannot set {', '.join(sorted(plan_.link_changes))}", index,
                         **plan_.link_changes)
    netlink.commit()

# -*- coding: utf-8 -*-
# Copyright: (c) 2026, microvm.firecracker contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Desired-state logic for persistent TAP devices: validate, plan, apply, report.

Planning is pure (links in, plan out) so check mode and the real run share
it; applying touches the kernel only through ``_tuntap`` and ``_netlink``.
"""
from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import Any, Optional

from ansible_collections.microvm.firecracker.plugins.module_utils._ifnames import (
    ifname_problem,
    resolve_gid,
    resolve_uid,
)
from ansible_collections.microvm.firecracker.plugins.module_utils._netlink import Link, Netlink
from ansible_collections.microvm.firecracker.plugins.module_utils._tuntap import (
    IFF_PERSIST,
    ensure_persistent_tap,
    tap_flags,
)

DEFAULT_TAP_MTU = 1500
MIN_MTU = 68
MAX_MTU = 65535
MAX_LINK_GROUP = 2**32 - 1
# Fields compared in diffs and predicted by check mode.
DIFF_FIELDS = ("tun_flags", "vnet_hdr", "multi_queue", "owner", "group", "bridge", "mtu", "up", "link_group")


class TapError(Exception):
    """Invalid input or an impossible request; nothing has been changed when raised by planning."""


@dataclass(frozen=True)
class TapRequest:
    name: str
    vnet_hdr: bool
    multi_queue: bool
    owner: Optional[int]
    group: Optional[int]
    mtu: Optional[int]
    bridge: Optional[str]  # None: leave as is; "": not on any bridge
    up: bool
    link_group: Optional[int]


@dataclass
class TapPlan:
    name: str
    action: str  # create | recreate | update | delete | none
    reopen: bool = False
    link_changes: dict[str, Any] = field(default_factory=dict)
    changes: list[str] = field(default_factory=list)
    attached_differences: list[dict[str, Any]] = field(default_factory=list)
    before: Optional[dict[str, Any]] = None
    after: Optional[dict[str, Any]] = None

    @property
    def changed(self) -> bool:
        return self.action in ("create", "recreate", "delete") or bool(self.changes)


_PER_TAP_KEYS = ("vnet_hdr", "multi_queue", "owner", "group", "mtu", "bridge", "up")


def build_requests(params: dict[str, Any]) -> list[TapRequest]:
    """Turn module parameters into validated requests; every problem is reported at once."""
    entries: list[dict[str, Any]]
    if params.get("taps"):
        entries = [dict(entry) for entry in params["taps"]]
    elif params.get("name"):
        entries = [{"name": params["name"]}]
    else:
        entries = []
    problems: list[str] = []
    link_group = params.get("link_group")
    if link_group is not None and not 1 <= link_group <= MAX_LINK_GROUP:
        problems.append(f"link_group {link_group}: must be between 1 and {MAX_LINK_GROUP} (0 is every link's default group)")
    seen: set[str] = set()
    requests = []
    for entry in entries:
        name = entry.get("name")
        label = f"TAP {name!r}" if isinstance(name, str) else "TAP entry"
        problem = ifname_problem(name)
        if problem:
            problems.append(f"{label}: invalid name: {problem}")
            continue
        if name in seen:
            problems.append(f"TAP {name}: listed more than once in this batch")
            continue
        seen.add(name)
        merged = {key: entry.get(key) if entry.get(key) is not None else params.get(key) for key in _PER_TAP_KEYS}
        owner = group = None
        try:
            owner = None if merged["owner"] in (None, "") else resolve_uid(merged["owner"])
        except KeyError as exc:
            problems.append(f"TAP {name}: owner: {exc.args[0]}")
        try:
            group = None if merged["group"] in (None, "") else resolve_gid(merged["group"])
        except KeyError as exc:
            problems.append(f"TAP {name}: group: {exc.args[0]}")
        mtu = merged["mtu"]
        if mtu is not None and not MIN_MTU <= mtu <= MAX_MTU:
            problems.append(f"TAP {name}: mtu {mtu} is outside {MIN_MTU}..{MAX_MTU}")
        bridge = merged["bridge"]
        if bridge:
            bridge_problem = ifname_problem(bridge)
            if bridge_problem:
                problems.append(f"TAP {name}: bridge {bridge!r}: invalid name: {bridge_problem}")
        requests.append(TapRequest(
            name=name,
            vnet_hdr=bool(merged["vnet_hdr"]),
            multi_queue=bool(merged["multi_queue"]),
            owner=owner,
            group=group,
            mtu=mtu,
            bridge=bridge,
            up=bool(merged["up"]),
            link_group=link_group,
        ))
    if problems:
        raise TapError("; ".join(problems))
    return requests


def view(link: Link, links_by_index: dict[int, Link]) -> dict[str, Any]:
    """What the module reports for one existing TAP."""
    tun = link.tun
    if tun is None:
        raise TapError(f"TAP {link.name}: is a {link.kind or 'plain'} link, not a TUN/TAP device")
    master = links_by_index.get(link.master) if link.master else None
    return {
        "name": link.name,
        "state": "present",
        "ifindex": link.index,
        "tun_flags": f"0x{tun.flags:x}",
        "vnet_hdr": tun.vnet_hdr,
        "multi_queue": tun.multi_queue,
        "owner": tun.owner,
        "group": tun.group,
        "bridge": master.name if master else None,
        "mtu": link.mtu,
        "up": link.admin_up,
        "operstate": link.operstate,
        "attached": link.attached,
        "link_group": link.group,
    }


def _diff_view(state: Optional[dict[str, Any]]) -> dict[str, Any]:
    if state is None or state.get("state") == "absent":
        return {"state": "absent"}
    return {"state": "present", **{key: state[key] for key in DIFF_FIELDS}}


def _problem_for_existing(req: TapRequest, link: Link, recreate: bool) -> Optional[str]:
    if link.kind != "tun" or link.tun is None:
        return (f"TAP {req.name}: a {link.kind or 'non-TUN/TAP'} link of that name already exists; "
                "refusing to replace a device this module does not manage")
    mismatches = []
    if link.tun.mode != "tap":
        mismatches.append(f"type is {link.tun.mode}, asked tap")
    if link.tun.multi_queue != req.multi_queue:
        mismatches.append(f"multi_queue is {link.tun.multi_queue}, asked {req.multi_queue}")
    if not mismatches:
        return None
    if not recreate:
        return f"TAP {req.name}: existing device differs: {', '.join(mismatches)}; set recreate=true to delete and recreate it"
    if link.attached:
        return (f"TAP {req.name}: existing device differs ({', '.join(mismatches)}) but a process holds it open; "
                "refusing to recreate a TAP in use")
    return None


def plan_present(requests: list[TapRequest], links: dict[str, Link], recreate: bool) -> list[TapPlan]:
    by_index = {link.index: link for link in links.values()}
    problems = []
    for req in requests:
        if req.bridge:
            bridge = links.get(req.bridge)
            if bridge is None:
                problems.append(f"TAP {req.name}: bridge {req.bridge}: no such device")
            elif bridge.kind != "bridge":
                problems.append(f"TAP {req.name}: bridge {req.bridge}: is a {bridge.kind or 'plain'} link, not a bridge")
        link = links.get(req.name)
        if link is not None:
            problem = _problem_for_existing(req, link, recreate)
            if problem:
                problems.append(problem)
    if problems:
        raise TapError("; ".join(problems))
    return [_plan_one(req, links.get(req.name), links, by_index) for req in requests]


def _plan_one(req: TapRequest, link: Optional[Link], links: dict[str, Link],
              by_index: dict[int, Link]) -> TapPlan:
    before = view(link, by_index) if link is not None else None
    needs_recreate = link is not None and link.tun is not None and (
        link.tun.mode != "tap" or link.tun.multi_queue != req.multi_queue)
    if link is None or needs_recreate:
        plan = TapPlan(name=req.name, action="recreate" if needs_recreate else "create", reopen=True)
        plan.before = before
        after = {
            "name": req.name, "state": "present", "ifindex": None,
            "tun_flags": f"0x{tap_flags(req.vnet_hdr, req.multi_queue) | IFF_PERSIST:x}",
            "vnet_hdr": req.vnet_hdr, "multi_queue": req.multi_queue,
            "owner": req.owner, "group": req.group,
            "bridge": req.bridge or None, "mtu": req.mtu or DEFAULT_TAP_MTU, "up": req.up,
            "operstate": None, "attached": False, "link_group": req.link_group or 0,
        }
        if req.mtu:
            plan.link_changes["mtu"] = req.mtu
        if req.bridge:
            plan.link_changes["master"] = req.bridge
        if req.up:
            plan.link_changes["up"] = True
        if req.link_group:
            plan.link_changes["group"] = req.link_group
        plan.changes.append(plan.action)
        plan.after = after
        return plan

    plan = TapPlan(name=req.name, action="update", before=before)
    after = dict(before)
    identity = {"vnet_hdr": (link.tun.vnet_hdr, req.vnet_hdr)}
    if req.owner is not None:
        identity["owner"] = (link.tun.owner, req.owner)
    if req.group is not None:
        identity["group"] = (link.tun.group, req.group)
    for key, (current, wanted) in identity.items():
        if current == wanted:
            continue
        if link.attached:
            # The VMM's own TUNSETIFF replaced these flags; this is not drift, and never ours to fix.
            plan.attached_differences.append({"name": req.name, "field": key, "current": current, "requested": wanted})
        else:
            plan.reopen = True
            plan.changes.append(f"{key} {current} -> {wanted}")
            after[key] = wanted
    if plan.reopen:
        after["tun_flags"] = f"0x{tap_flags(after['vnet_hdr'], req.multi_queue) | IFF_PERSIST:x}"
    if req.mtu is not None and link.mtu != req.mtu:
        plan.link_changes["mtu"] = req.mtu
        plan.changes.append(f"mtu {link.mtu} -> {req.mtu}")
        after["mtu"] = req.mtu
    if req.bridge is not None:
        current_bridge = before["bridge"]
        wanted_bridge = req.bridge or None
        if current_bridge != wanted_bridge:
            plan.link_changes["master"] = req.bridge
            plan.changes.append(f"bridge {current_bridge} -> {wanted_bridge}")
            after["bridge"] = wanted_bridge
    if link.admin_up != req.up:
        plan.link_changes["up"] = req.up
        plan.changes.append(f"up {link.admin_up} -> {req.up}")
        after["up"] = req.up
    if req.link_group is not None and link.group != req.link_group:
        plan.link_changes["group"] = req.link_group
        plan.changes.append(f"link_group {link.group} -> {req.link_group}")
        after["link_group"] = req.link_group
    if not plan.changes:
        plan.action = "none"
    plan.after = after
    return plan


def plan_absent(names: list[str], links: dict[str, Link], force: bool) -> list[TapPlan]:
    by_index = {link.index: link for link in links.values()}
    problems = []
    plans = []
    for name in names:
        link = links.get(name)
        if link is None:
            plans.append(TapPlan(name=name, action="none", after={"name": name, "state": "absent"}))
            continue
        if link.kind != "tun":
            problems.append(f"TAP {name}: the existing link is a {link.kind or 'non-TUN/TAP'} device, not a TAP; refusing to delete it")
            continue
        if link.attached and not force:
            problems.append(f"TAP {name}: a process holds it open (a running VM?); refusing to delete it (force=true overrides)")
            continue
        plans.append(TapPlan(name=name, action="delete", changes=["delete"], before=view(link, by_index),
                             after={"name": name, "state": "absent"}))
    if problems:
        raise TapError("; ".join(problems))
    return plans


def plan_absent_group(link_group: int, links: dict[str, Link], force: bool) -> list[TapPlan]:
    members = sorted((link for link in links.values() if link.group == link_group), key=lambda link: link.index)
    strangers = [f"{link.name} ({link.kind or 'plain'})" for link in members if link.kind != "tun"]
    if strangers:
        raise TapError(f"link_group {link_group}: also holds links that are not TUN/TAP devices: "
                       f"{', '.join(strangers)}; refusing a bulk delete")
    return plan_absent([link.name for link in members], links, force)


def apply(netlink: Netlink, plans: list[TapPlan], requests: dict[str, TapRequest],
          links: dict[str, Link], link_group_delete: Optional[int] = None) -> None:
    """Carry out plans computed against ``links`` (the current state), in one netlink session."""
    if link_group_delete is not None and any(p.action == "delete" for p in plans):
        netlink.delete_group(f"link_group {link_group_delete}: cannot delete its TAPs", link_group_delete)
    else:
        for plan in plans:
            if plan.action in ("delete", "recreate"):
                netlink.delete_link(f"TAP {plan.name}: cannot delete", links[plan.name].index)
    netlink.commit()
    for plan in plans:
        if plan.reopen:
            req = requests[plan.name]
            ensure_persistent_tap(plan.name, vnet_hdr=req.vnet_hdr, multi_queue=req.multi_queue,
                                  owner=req.owner, group=req.group)
    for plan in plans:
        if not plan.link_changes:
            continue
        changes = dict(plan.link_changes)
        if "master" in changes:
            changes["master"] = socket.if_nametoindex(changes["master"]) if changes["master"] else 0
        netlink.set_link(f"TAP {plan.name}: cannot set {', '.join(sorted(plan.link_changes))}",
                         socket.if_nametoindex(plan.name), **changes)
    netlink.commit()


def diff_of(plans: list[TapPlan]) -> dict[str, Any]:
    return {
        "before": {plan.name: _diff_view(plan.before) for plan in plans},
        "after": {plan.name: _diff_view(plan.after) for plan in plans},
    }

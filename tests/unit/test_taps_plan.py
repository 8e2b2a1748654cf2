"""Planning for tap_vnet_hdr, on synthetic link tables (no kernel needed)."""
from __future__ import annotations

import pytest

from ansible_collections.microvm.firecracker.plugins.module_utils import _taps
from ansible_collections.microvm.firecracker.plugins.module_utils._netlink import BridgeInfo, Link, TunInfo

DEFAULTS = dict(name=None, taps=None, vnet_hdr=True, multi_queue=False, owner=None, group=None,
                mtu=None, bridge=None, up=True, link_group=None)


def params(**overrides):
    return {**DEFAULTS, **overrides}


def tap(name, index, *, vnet_hdr=True, mode="tap", multi_queue=False, owner=None, group=None, carrier=False,
        master=None, mtu=1500, up=True, link_group=0, num_queues=None):
    return Link(name=name, index=index, kind="tun", mtu=mtu, admin_up=up, carrier=carrier,
                operstate="down", master=master, group=link_group,
                tun=TunInfo(mode=mode, pi=False, vnet_hdr=vnet_hdr, persist=True, multi_queue=multi_queue,
                            owner=owner, group=group, num_queues=num_queues))


def bridge(name, index):
    return Link(name=name, index=index, kind="bridge", mtu=1500, admin_up=True, carrier=False,
                operstate="down", master=None, group=0, bridge=BridgeInfo(stp=False, forward_delay_cs=0))


def table(*links):
    return {link.name: link for link in links}


def test_batch_entries_inherit_top_level_options():
    requests = _taps.build_requests(params(taps=[{"name": "a"}, {"name": "b", "mtu": 1400, "vnet_hdr": False}],
                                           mtu=9000, owner="4242", bridge="br0", link_group=5))
    assert [(r.name, r.mtu, r.vnet_hdr, r.owner, r.bridge, r.link_group) for r in requests] == [
        ("a", 9000, True, 4242, "br0", 5), ("b", 1400, False, 4242, "br0", 5)]


def test_all_input_problems_are_reported_together():
    with pytest.raises(_taps.TapError) as err:
        _taps.build_requests(params(taps=[{"name": "ok"}, {"name": "ok"}, {"name": "x" * 16},
                                          {"name": "u", "owner": "no-such-user-x"}], link_group=0))
    message = str(err.value)
    for fragment in ("link_group 0", "TAP ok: listed more than once", "16 bytes long", "TAP u: owner: unknown user"):
        assert fragment in message


def test_new_tap_plan_predicts_flags_and_settings():
    requests = _taps.build_requests(params(name="t0", bridge="br0", owner=7, mtu=1400, link_group=3))
    [plan] = _taps.plan_present(requests, table(bridge("br0", 2)), recreate=False)
    assert plan.action == "create" and plan.reopen
    assert plan.link_changes == {"mtu": 1400, "master": "br0", "up": True, "group": 3}
    assert plan.after["tun_flags"] == "0x5802" and plan.after["owner"] == 7 and plan.after["bridge"] == "br0"


def test_vnet_hdr_off_predicts_0x1802():
    [plan] = _taps.plan_present(_taps.build_requests(params(name="t0", vnet_hdr=False)), {}, recreate=False)
    assert plan.after["tun_flags"] == "0x1802"


def test_converged_tap_has_no_changes():
    requests = _taps.build_requests(params(name="t0", bridge="br0", owner=7))
    links = table(bridge("br0", 2), tap("t0", 3, owner=7, master=2))
    [plan] = _taps.plan_present(requests, links, recreate=False)
    assert plan.action == "none" and not plan.changed and plan.before == plan.after


def test_unattached_flag_and_owner_differences_are_fixed_by_reopening():
    requests = _taps.build_requests(params(name="t0", vnet_hdr=True, owner=8))
    [plan] = _taps.plan_present(requests, table(tap("t0", 3, vnet_hdr=False, owner=7)), recreate=False)
    assert plan.reopen and plan.changed
    assert plan.after["tun_flags"] == "0x5802" and plan.after["owner"] == 8


def test_attached_differences_are_reported_not_fixed():
    requests = _taps.build_requests(params(name="t0", vnet_hdr=False, owner=8, mtu=1400))
    [plan] = _taps.plan_present(requests, table(tap("t0", 3, owner=7, carrier=True)), recreate=False)
    assert not plan.reopen
    assert {d["field"] for d in plan.attached_differences} == {"vnet_hdr", "owner"}
    assert plan.link_changes == {"mtu": 1400}, "MTU is still converged in place"
    assert plan.after["owner"] == 7


def test_multi_queue_attachment_is_read_from_queue_count():
    assert tap("t0", 3, multi_queue=True, num_queues=2).attached
    assert not tap("t0", 3, multi_queue=True, num_queues=0, carrier=True).attached


def test_type_mismatch_needs_recreate_and_names_both_values():
    requests = _taps.build_requests(params(name="t0"))
    links = table(tap("t0", 3, mode="tun"))
    with pytest.raises(_taps.TapError, match="type is tun, asked tap"):
        _taps.plan_present(requests, links, recreate=False)
    [plan] = _taps.plan_present(requests, links, recreate=True)
    assert plan.action == "recreate"


def test_recreate_of_an_attached_tap_is_refused():
    requests = _taps.build_requests(params(name="t0", multi_queue=True))
    with pytest.raises(_taps.TapError, match="holds it open"):
        _taps.plan_present(requests, table(tap("t0", 3, carrier=True)), recreate=True)


def test_non_tap_link_and_bad_bridge_are_refused():
    requests = _taps.build_requests(params(taps=[{"name": "br0"}, {"name": "t1", "bridge": "t2"}]))
    with pytest.raises(_taps.TapError) as err:
        _taps.plan_present(requests, table(bridge("br0", 2), tap("t2", 4)), recreate=False)
    assert "TAP br0: a bridge link of that name already exists" in str(err.value)
    assert "TAP t1: bridge t2: is a tun link, not a bridge" in str(err.value)


def test_detach_from_bridge_with_empty_string():
    requests = _taps.build_requests(params(name="t0", bridge=""))
    [plan] = _taps.plan_present(requests, table(bridge("br0", 2), tap("t0", 3, master=2)), recreate=False)
    assert plan.link_changes == {"master": ""} and plan.after["bridge"] is None


def test_absent_plans():
    links = table(tap("t0", 3), tap("t1", 4, carrier=True), bridge("br0", 2))
    plans = _taps.plan_absent(["t0", "gone"], links, force=False)
    assert [(p.name, p.action) for p in plans] == [("t0", "delete"), ("gone", "none")]
    with pytest.raises(_taps.TapError, match="t1: a process holds it open"):
        _taps.plan_absent(["t1"], links, force=False)
    assert _taps.plan_absent(["t1"], links, force=True)[0].action == "delete"
    with pytest.raises(_taps.TapError, match="not a TAP"):
        _taps.plan_absent(["br0"], links, force=False)


def test_group_removal_only_for_groups_of_taps():
    links = table(tap("t0", 3, link_group=9), tap("t1", 4, link_group=9), tap("t2", 5))
    assert [p.name for p in _taps.plan_absent_group(9, links, force=False)] == ["t0", "t1"]
    links["br9"] = Link(name="br9", index=6, kind="bridge", mtu=1500, admin_up=True, carrier=False,
                        operstate="down", master=None, group=9)
    with pytest.raises(_taps.TapError, match=r"br9 \(bridge\)"):
        _taps.plan_absent_group(9, links, force=False)


def test_diff_shows_only_stable_fields():
    [plan] = _taps.plan_present(_taps.build_requests(params(name="t0")), {}, recreate=False)
    diff = _taps.diff_of([plan])
    assert diff["before"] == {"t0": {"state": "absent"}}
    assert set(diff["after"]["t0"]) == {"state", *_taps.DIFF_FIELDS}

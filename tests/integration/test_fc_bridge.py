"""fc_bridge against real Linux bridges, each test in its own network namespace."""
from __future__ import annotations

import netcheck
from conftest import assert_each_fails, in_netns


def bridge_task(netns: str, **args) -> dict:
    return {"name": "bridge", "microvm.firecracker.fc_bridge": {"netns": netns, **args}}


def bridge_details(netns: str, name: str) -> dict:
    return netcheck.links(netns)[name]["linkinfo"]["info_data"]


def test_create_check_mode_rerun_and_diff(netns, ansible):
    task = bridge_task(netns, name="fcbr0", addresses=["198.18.10.1/24"])

    check = ansible.run([task], check=True, diff=True)
    assert check.rc == 0, check.output
    assert check.task("bridge")["changed"] is True
    assert "fcbr0" not in netcheck.link_names(netns)

    real = ansible.run([task], diff=True)
    assert real.rc == 0, real.output
    result = real.task("bridge")
    assert result["changed"] is True
    assert result["diff"] == check.task("bridge")["diff"]
    assert netcheck.addresses(netns, "fcbr0") == ["198.18.10.1/24"]
    details = bridge_details(netns, "fcbr0")
    assert details["stp_state"] == 0 and details["forward_delay"] == 0
    assert "UP" in netcheck.links(netns)["fcbr0"]["flags"]
    bridge = result["bridge"]
    assert bridge["ifindex"] == netcheck.links(netns)["fcbr0"]["ifindex"]
    assert (bridge["addresses"], bridge["stp"], bridge["forward_delay"], bridge["up"], bridge["ports"]) == (
        ["198.18.10.1/24"], False, 0, True, [])

    for check_mode in (False, True):
        again = ansible.run([task], check=check_mode)
        assert again.rc == 0 and again.task("bridge")["changed"] is False, again.output


def test_stp_forward_delay_and_mtu(netns, ansible):
    assert ansible.run([bridge_task(netns, name="fcbr1")]).rc == 0
    on = ansible.run([bridge_task(netns, name="fcbr1", stp=True, forward_delay=4, mtu=1400)], diff=True)
    assert on.rc == 0 and on.task("bridge")["changed"] is True, on.output
    details = bridge_details(netns, "fcbr1")
    assert details["stp_state"] == 1 and details["forward_delay"] == 400
    assert netcheck.links(netns)["fcbr1"]["mtu"] == 1400
    assert on.task("bridge")["diff"]["after"]["stp"] is True

    off = ansible.run([bridge_task(netns, name="fcbr1", mtu=1400)])
    assert off.rc == 0 and off.task("bridge")["changed"] is True, off.output
    details = bridge_details(netns, "fcbr1")
    assert details["stp_state"] == 0 and details["forward_delay"] == 0


def test_unmanaged_addresses_are_kept_unless_purged(netns, ansible):
    in_netns(netns, "ip", "link", "add", "fcbr2", "type", "bridge")
    in_netns(netns, "ip", "addr", "add", "198.18.20.9/24", "dev", "fcbr2")
    keep = ansible.run([bridge_task(netns, name="fcbr2", addresses=["198.18.21.1/24"])])
    assert keep.rc == 0 and keep.task("bridge")["changed"] is True, keep.output
    assert netcheck.addresses(netns, "fcbr2") == ["198.18.20.9/24", "198.18.21.1/24"]
    assert keep.task("bridge")["bridge"]["addresses"] == ["198.18.20.9/24", "198.18.21.1/24"]

    purge_task = bridge_task(netns, name="fcbr2", addresses=["198.18.21.1/24"], purge_addresses=True)
    check = ansible.run([purge_task], check=True, diff=True)
    assert check.task("bridge")["changed"] is True
    assert check.task("bridge")["diff"]["after"]["addresses"] == ["198.18.21.1/24"]
    assert netcheck.addresses(netns, "fcbr2") == ["198.18.20.9/24", "198.18.21.1/24"]
    purge = ansible.run([purge_task])
    assert purge.rc == 0 and purge.task("bridge")["changed"] is True, purge.output
    assert netcheck.addresses(netns, "fcbr2") == ["198.18.21.1/24"]
    again = ansible.run([purge_task])
    assert again.task("bridge")["changed"] is False


def test_absent_with_ports_is_refused_unless_forced(netns, ansible):
    assert ansible.run([bridge_task(netns, name="fcbr3")]).rc == 0
    in_netns(netns, "ip", "tuntap", "add", "fc-p1", "mode", "tap")
    in_netns(netns, "ip", "tuntap", "add", "fc-p2", "mode", "tap")
    in_netns(netns, "ip", "link", "set", "fc-p1", "master", "fcbr3")
    in_netns(netns, "ip", "link", "set", "fc-p2", "master", "fcbr3")
    before = netcheck.snapshot(netns)

    refused = ansible.run([bridge_task(netns, name="fcbr3", state="absent")])
    assert refused.rc != 0
    assert "bridge fcbr3: cannot remove: it still has ports fc-p1, fc-p2" in refused.task("bridge")["msg"]
    assert netcheck.snapshot(netns) == before

    forced = ansible.run([bridge_task(netns, name="fcbr3", state="absent", force=True)])
    assert forced.rc == 0 and forced.task("bridge")["changed"] is True, forced.output
    names = netcheck.link_names(netns)
    assert "fcbr3" not in names and {"fc-p1", "fc-p2"} <= names, "ports are released, not deleted"
    again = ansible.run([bridge_task(netns, name="fcbr3", state="absent")])
    assert again.rc == 0 and again.task("bridge")["changed"] is False


BAD_INPUTS = [
    ("invalid name", {"name": "fc-bridge-name-too-long"}, "bridge fc-bridge-name-too-long: invalid name: the name is 23 bytes long"),
    ("not CIDR", {"name": "fcbr9", "addresses": ["198.18.0.300/24"]}, "bridge fcbr9: address '198.18.0.300/24' is not an address with prefix length"),
    ("no prefix", {"name": "fcbr9", "addresses": ["198.18.0.1"]}, "bridge fcbr9: address '198.18.0.1' has no prefix length"),
    ("stp delay", {"name": "fcbr9", "stp": True}, "bridge fcbr9: forward_delay 0 s: with stp=true the kernel accepts 2..30 s"),
    ("mtu", {"name": "fcbr9", "mtu": 70000}, "bridge fcbr9: mtu 70000 is outside 68..65535"),
    ("existing non-bridge", {"name": "fc-veth"}, "bridge fc-veth: a veth link of that name already exists"),
]


def test_bad_input_fails_before_any_change(netns, ansible):
    in_netns(netns, "ip", "link", "add", "fc-veth", "type", "veth", "peer", "name", "fc-veth-p")
    before = netcheck.snapshot(netns)
    cases = [(label, {"netns": netns, **args}, message) for label, args, message in BAD_INPUTS]
    cases.append(("unknown netns", {"netns": "fct-does-not-exist", "name": "fcbr9"},
                  "netns fct-does-not-exist: no such network namespace"))
    assert_each_fails(ansible, "microvm.firecracker.fc_bridge", cases)
    assert netcheck.snapshot(netns) == before

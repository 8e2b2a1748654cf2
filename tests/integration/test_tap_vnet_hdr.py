"""tap_vnet_hdr against real TAP devices, each test in its own network namespace."""
from __future__ import annotations

import subprocess
import sys

import netcheck
import pytest
from conftest import assert_each_fails, in_netns, wait_for

# Attaches to a TAP like a VMM does (TUNSETIFF with TAP|NO_PI|VNET_HDR), reports, and holds it
# until stdin closes. With a uid argument it opens /dev/net/tun as root (the device node may be
# root-only) and then drops to that uid before TUNSETIFF, which is where the kernel checks the owner.
ATTACH = r"""
import fcntl, os, struct, sys
fd = os.open("/dev/net/tun", os.O_RDWR)
if len(sys.argv) > 2:
    uid = int(sys.argv[2])
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
try:
    fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH22x", sys.argv[1].encode(), 0x0002 | 0x1000 | 0x4000))
except OSError as exc:
    print("refused", exc.errno, flush=True)
    sys.exit(3)
print("attached", flush=True)
sys.stdin.read()
"""


def tap_task(netns: str, **args) -> dict:
    return {"name": "tap", "microvm.firecracker.tap_vnet_hdr": {"netns": netns, **args}, "register": "r"}


def hold_tap(netns: str, name: str, reaper: list, uid: int | None = None) -> subprocess.Popen:
    argv = ["ip", "netns", "exec", netns, sys.executable, "-c", ATTACH, name]
    if uid is not None:
        argv.append(str(uid))
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    reaper.append(proc)
    return proc


def test_create_check_mode_rerun_and_diff(netns, ansible):
    task = tap_task(netns, name="fc-t1", owner=4242, group=4343)

    check = ansible.run([task], check=True, diff=True)
    assert check.rc == 0, check.output
    predicted = check.task("tap")
    assert predicted["changed"] is True
    assert "fc-t1" not in netcheck.link_names(netns), "check mode must not create the TAP"
    assert predicted["diff"]["before"] == {"fc-t1": {"state": "absent"}}

    real = ansible.run([task], diff=True)
    assert real.rc == 0, real.output
    result = real.task("tap")
    assert result["changed"] is True
    assert result["diff"] == predicted["diff"], "check mode must predict the real run's diff exactly"
    assert netcheck.tun_flags(netns, "fc-t1") == "0x5802"
    info = netcheck.tun_info(netns, "fc-t1")
    assert (info["type"], info["pi"], info["vnet_hdr"], info["persist"]) == ("tap", False, True, True)
    assert (info["user"], info["group"]) == (4242, 4343)
    tap = result["taps"][0]
    assert tap["tun_flags"] == netcheck.tun_flags(netns, "fc-t1")
    assert tap["ifindex"] == netcheck.links(netns)["fc-t1"]["ifindex"]
    assert (tap["owner"], tap["group"], tap["up"], tap["attached"], tap["mtu"]) == (4242, 4343, True, False, 1500)
    assert "UP" in netcheck.links(netns)["fc-t1"]["flags"]
    stable = {k: v for k, v in tap.items() if k not in ("ifindex", "operstate")}
    assert stable == {k: v for k, v in predicted["taps"][0].items() if k not in ("ifindex", "operstate")}

    for check_mode in (False, True):
        again = ansible.run([task], check=check_mode, diff=True)
        assert again.rc == 0, again.output
        assert again.task("tap")["changed"] is False, again.output
        assert again.task("tap")["diff"]["before"] == again.task("tap")["diff"]["after"]


def test_vnet_hdr_off_then_on(netns, ansible):
    off = ansible.run([tap_task(netns, name="fc-t2", vnet_hdr=False)])
    assert off.rc == 0, off.output
    assert netcheck.tun_flags(netns, "fc-t2") == "0x1802"
    assert off.task("tap")["taps"][0]["tun_flags"] == "0x1802"
    index = netcheck.links(netns)["fc-t2"]["ifindex"]

    on = ansible.run([tap_task(netns, name="fc-t2", vnet_hdr=True)], diff=True)
    assert on.rc == 0, on.output
    result = on.task("tap")
    assert result["changed"] is True
    assert result["diff"]["before"]["fc-t2"]["vnet_hdr"] is False
    assert result["diff"]["after"]["fc-t2"]["vnet_hdr"] is True
    assert netcheck.tun_flags(netns, "fc-t2") == "0x5802"
    assert netcheck.links(netns)["fc-t2"]["ifindex"] == index, "flags are fixed in place, not by recreation"


def test_owner_is_enforced_by_the_kernel(netns, ansible, process_reaper):
    result = ansible.run([tap_task(netns, name="fc-own", owner=4242, group=4242)])
    assert result.rc == 0, result.output

    stranger = hold_tap(netns, "fc-own", process_reaper, uid=4343)
    line = stranger.stdout.readline().strip()
    stranger.stdin.close()
    stranger.wait(timeout=10)
    assert line == "refused 1", f"uid 4343 must get EPERM on a TAP owned by 4242, got {line!r}"

    owner = hold_tap(netns, "fc-own", process_reaper, uid=4242)
    assert owner.stdout.readline().strip() == "attached"
    wait_for(lambda: "NO-CARRIER" not in netcheck.links(netns)["fc-own"]["flags"], 5, "carrier after attach")


def test_bridge_attach_mtu_detach(netns, ansible):
    in_netns(netns, "ip", "link", "add", "fcbr-t", "type", "bridge")
    created = ansible.run([tap_task(netns, name="fc-t3", bridge="fcbr-t")])
    assert created.rc == 0, created.output
    assert netcheck.master(netns, "fc-t3") == "fcbr-t"
    assert created.task("tap")["taps"][0]["bridge"] == "fcbr-t"

    mtu = ansible.run([tap_task(netns, name="fc-t3", bridge="fcbr-t", mtu=1400)], diff=True)
    assert mtu.rc == 0 and mtu.task("tap")["changed"] is True, mtu.output
    assert netcheck.links(netns)["fc-t3"]["mtu"] == 1400
    assert mtu.task("tap")["diff"]["before"]["fc-t3"]["mtu"] == 1500

    down = ansible.run([tap_task(netns, name="fc-t3", up=False)])
    assert down.rc == 0 and down.task("tap")["changed"] is True, down.output
    assert "UP" not in netcheck.links(netns)["fc-t3"]["flags"]
    assert netcheck.master(netns, "fc-t3") == "fcbr-t", "an unset bridge option leaves the master alone"

    detach = ansible.run([tap_task(netns, name="fc-t3", bridge="", up=False)])
    assert detach.rc == 0 and detach.task("tap")["changed"] is True, detach.output
    assert netcheck.master(netns, "fc-t3") is None


def test_absent_check_mode_and_rerun(netns, ansible):
    assert ansible.run([tap_task(netns, name="fc-t4")]).rc == 0
    absent = tap_task(netns, name="fc-t4", state="absent")
    check = ansible.run([absent], check=True)
    assert check.task("tap")["changed"] is True
    assert "fc-t4" in netcheck.link_names(netns)
    real = ansible.run([absent])
    assert real.rc == 0 and real.task("tap")["changed"] is True, real.output
    assert "fc-t4" not in netcheck.link_names(netns)
    again = ansible.run([absent])
    assert again.rc == 0 and again.task("tap")["changed"] is False


def test_batch_of_200_and_bulk_removal_by_link_group(netns, ansible):
    in_netns(netns, "ip", "link", "add", "fcbr-b", "type", "bridge")
    taps = [{"name": f"fcb{i:03d}"} for i in range(200)]
    task = tap_task(netns, taps=taps, bridge="fcbr-b", owner=4242, link_group=77)

    first = ansible.run([task])
    assert first.rc == 0, first.output
    assert first.task("tap")["changed"] is True
    state = netcheck.links(netns)
    for entry in taps:
        link = state[entry["name"]]
        assert link["master"] == "fcbr-b" and "UP" in link["flags"] and link["group"] == "77", link
        assert link["linkinfo"]["info_data"]["vnet_hdr"] is True
    assert netcheck.tun_flags(netns, "fcb000") == netcheck.tun_flags(netns, "fcb199") == "0x5802"
    assert [t["name"] for t in first.task("tap")["taps"]] == [t["name"] for t in taps]

    second = ansible.run([task])
    assert second.rc == 0 and second.task("tap")["changed"] is False, second.output

    bulk = ansible.run([{"name": "tap", "microvm.firecracker.tap_vnet_hdr":
                         {"netns": netns, "link_group": 77, "state": "absent"}}])
    assert bulk.rc == 0 and bulk.task("tap")["changed"] is True, bulk.output
    remaining = netcheck.link_names(netns)
    assert not [name for name in remaining if name.startswith("fcb0") or name.startswith("fcb1")]
    assert "fcbr-b" in remaining


def test_bulk_removal_refuses_a_group_with_other_links(netns, ansible):
    in_netns(netns, "ip", "link", "add", "fcother", "group", "78", "type", "bridge")
    assert ansible.run([tap_task(netns, name="fc-g1", link_group=78)]).rc == 0
    before = netcheck.snapshot(netns)
    bulk = ansible.run([{"name": "tap", "microvm.firecracker.tap_vnet_hdr":
                         {"netns": netns, "link_group": 78, "state": "absent"}}])
    assert bulk.rc != 0
    assert "fcother (bridge)" in bulk.task("tap")["msg"]
    assert netcheck.snapshot(netns) == before


def test_attached_tap_is_left_untouched(netns, ansible, process_reaper):
    in_netns(netns, "ip", "link", "add", "fcbr-a", "type", "bridge")
    assert ansible.run([tap_task(netns, name="fc-att", owner=4242, bridge="fcbr-a")]).rc == 0
    holder = hold_tap(netns, "fc-att", process_reaper)
    assert holder.stdout.readline().strip() == "attached"
    flags_before = netcheck.tun_flags(netns, "fc-att")
    before = netcheck.snapshot(netns)

    result = ansible.run([tap_task(netns, name="fc-att", owner=4343, vnet_hdr=False, bridge="fcbr-a")])
    assert result.rc == 0, result.output
    tap = result.task("tap")
    assert tap["changed"] is False
    assert tap["taps"][0]["attached"] is True
    fields = {(d["field"], d["current"], d["requested"]) for d in tap["attached_differences"]}
    assert fields == {("owner", 4242, 4343), ("vnet_hdr", True, False)}
    assert any("fc-att is held open" in w for w in tap.get("warnings", []))
    assert netcheck.tun_flags(netns, "fc-att") == flags_before
    assert netcheck.snapshot(netns) == before
    assert holder.poll() is None, "the process holding the TAP must not be disturbed"

    delete = ansible.run([tap_task(netns, name="fc-att", state="absent")])
    assert delete.rc != 0
    assert "fc-att: a process holds it open" in delete.task("tap")["msg"]
    assert "fc-att" in netcheck.link_names(netns)


def test_type_and_multi_queue_mismatch(netns, ansible):
    in_netns(netns, "ip", "tuntap", "add", "fc-tun", "mode", "tun")
    in_netns(netns, "ip", "tuntap", "add", "fc-mq", "mode", "tap", "multi_queue")
    before = netcheck.snapshot(netns)

    tun = ansible.run([tap_task(netns, name="fc-tun")])
    assert tun.rc != 0
    assert "fc-tun: existing device differs: type is tun, asked tap" in tun.task("tap")["msg"]
    mq = ansible.run([tap_task(netns, name="fc-mq")])
    assert mq.rc != 0
    assert "fc-mq: existing device differs: multi_queue is True, asked False" in mq.task("tap")["msg"]
    assert netcheck.snapshot(netns) == before

    recreated = ansible.run([tap_task(netns, taps=[{"name": "fc-tun"}, {"name": "fc-mq"}], recreate=True)])
    assert recreated.rc == 0 and recreated.task("tap")["changed"] is True, recreated.output
    assert netcheck.tun_flags(netns, "fc-tun") == "0x5802"
    assert netcheck.tun_flags(netns, "fc-mq") == "0x5802"

    mq_ok = ansible.run([tap_task(netns, name="fc-mq2", multi_queue=True)])
    assert mq_ok.rc == 0, mq_ok.output
    assert netcheck.tun_flags(netns, "fc-mq2") == "0x5902"


BAD_INPUTS = [
    ("too long", {"taps": [{"name": "fc-ok"}, {"name": "fc-0123456789abc"}]}, "TAP 'fc-0123456789abc': invalid name: the name is 16 bytes long"),
    ("bad characters", {"taps": [{"name": "fc-ok"}, {"name": "fc/vm 1"}]}, "TAP 'fc/vm 1': invalid name"),
    ("unknown bridge", {"taps": [{"name": "fc-ok"}, {"name": "fc-b"}], "bridge": "nosuchbr"}, "TAP fc-ok: bridge nosuchbr: no such device"),
    ("bridge is not a bridge", {"name": "fc-ok", "bridge": "fc-plain"}, "TAP fc-ok: bridge fc-plain: is a veth link, not a bridge"),
    ("unknown user", {"taps": [{"name": "fc-ok"}, {"name": "fc-u", "owner": "no-such-user-x"}]}, "TAP fc-u: owner: unknown user 'no-such-user-x'"),
    ("unknown group", {"taps": [{"name": "fc-ok"}, {"name": "fc-g", "group": "no-such-group-x"}]}, "TAP fc-g: group: unknown group 'no-such-group-x'"),
    ("non-TAP link of that name", {"taps": [{"name": "fc-ok"}, {"name": "fc-plain"}]}, "TAP fc-plain: a veth link of that name already exists"),
    ("duplicate in batch", {"taps": [{"name": "fc-ok"}, {"name": "fc-ok"}]}, "TAP fc-ok: listed more than once in this batch"),
    ("mtu out of range", {"name": "fc-ok", "mtu": 20}, "TAP fc-ok: mtu 20 is outside 68..65535"),
]


def test_bad_input_fails_before_any_change(netns, ansible):
    in_netns(netns, "ip", "link", "add", "fc-plain", "type", "veth", "peer", "name", "fc-peer")
    before = netcheck.snapshot(netns)
    cases = [(label, {"netns": netns, **args}, message) for label, args, message in BAD_INPUTS]
    cases.append(("unknown netns", {"netns": "fct-does-not-exist", "name": "fc-ok"},
                  "netns fct-does-not-exist: no such network namespace"))
    assert_each_fails(ansible, "microvm.firecracker.tap_vnet_hdr", cases)
    assert netcheck.snapshot(netns) == before, "a failed validation must leave the namespace unchanged"


@pytest.mark.parametrize("check_mode", [False, True])
def test_name_or_taps_required(netns, ansible, check_mode):
    result = ansible.run([{"name": "tap", "ignore_errors": True,
                           "microvm.firecracker.tap_vnet_hdr": {"netns": netns}}], check=check_mode)
    assert result.status("tap") == "failed"
    assert "give name or taps" in result.task("tap")["msg"]

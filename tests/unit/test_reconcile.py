"""fc_reconcile's classification (pure, over snapshots), its parsers and /proc scanners (on a fake /proc tree),
and dir/allocation removal on a temporary state dir (no kernel objects; see the integration test for those)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ansible_collections.microvm.firecracker.plugins.module_utils import _procs
from ansible_collections.microvm.firecracker.plugins.module_utils import _reconcile as rc
from ansible_collections.microvm.firecracker.plugins.module_utils._dnsmasq import Lease
from ansible_collections.microvm.firecracker.plugins.module_utils._allocator import Allocator, make_pool
from ansible_collections.microvm.firecracker.plugins.module_utils._netlink import Link, TunInfo

VMS = "/var/lib/firecracker/vms"


def alloc(name: str, last: int) -> dict:
    return {"name": name, "ip": f"198.18.80.{last}", "mac": f"06:00:c6:12:50:{last:02x}",
            "tap": f"fc-c61250{last:02x}", "prefix": 24}


def vmm(pid: int, vm: str, start: int = 100) -> rc.VMMProcess:
    return rc.VMMProcess(pid=pid, vm=vm, start_time=start, vm_id=vm,
                         argv=("/usr/local/bin/firecracker", "--api-sock", f"{VMS}/{vm}/api.sock", "--id", vm))


def vmdir(name: str, taps=(), macs=()) -> rc.VMDir:
    return rc.VMDir(name=name, path=f"{VMS}/{name}", taps=tuple(taps), macs=tuple(macs))


def tap(name: str, holders=(), attached=None, index=10) -> rc.TapDevice:
    return rc.TapDevice(name=name, index=index, bridge="fcbr0", holders=tuple(holders),
                        attached=bool(holders) if attached is None else attached)


def lease(ip: str, mac: str) -> Lease:
    return Lease(expiry="1795923186", mac=mac, ip=ip, hostname="*", client_id="*")


def names(orphans: dict, kind: str) -> list:
    return [o.name for o in orphans[kind]]


def blocked(orphans: dict, kind: str) -> dict:
    return {o.name: o.blocked for o in orphans[kind] if o.blocked}


def base_snapshot(**overrides) -> rc.Snapshot:
    """web1: live (dir + allocation + VMM + TAP + lease); stale: allocation only; old: dir only."""
    snap = rc.Snapshot(
        vms_dir=VMS,
        allocations={"web1": alloc("web1", 2), "stale": alloc("stale", 3)},
        vm_dirs={"web1": vmdir("web1", ["fc-c6125002"], ["06:00:c6:12:50:02"]), "old": vmdir("old")},
        processes=[vmm(501, "web1")],
        taps=[tap("fc-c6125002", [501]), tap("fc-c6125003"), tap("fc-c6125063")],
        leases=[lease("198.18.80.2", "06:00:C6:12:50:02"), lease("198.18.80.3", "06:00:c6:12:50:03"),
                lease("198.18.80.99", "06:00:c6:12:50:63")],
    )
    for key, value in overrides.items():
        setattr(snap, key, value)
    return snap


def test_live_vm_is_never_an_orphan_and_each_kind_is_found():
    orphans = rc.classify(base_snapshot(), rc.KINDS)
    assert names(orphans, "processes") == []
    assert names(orphans, "taps") == ["fc-c6125003", "fc-c6125063"]
    assert names(orphans, "leases") == ["198.18.80.3", "198.18.80.99"], "MACs compare case-insensitively"
    assert names(orphans, "vm_dirs") == [f"{VMS}/old"]
    assert orphans["vm_dirs"][0].detail == f"VM directory {VMS}/old: VM old has no allocation"
    assert names(orphans, "allocations") == ["stale"]
    assert not any(o.blocked for items in orphans.values() for o in items)
    details = {o.name: o.detail for items in orphans.values() for o in items}
    assert "the TAP of VM stale, whose allocation is stale" in details["fc-c6125003"]
    assert "not the TAP of any allocated VM" in details["fc-c6125063"]
    assert "the MAC of VM stale" in details["198.18.80.3"]
    assert details["stale"].endswith(f"its VM directory {VMS}/stale does not exist")


def test_only_asked_kinds_are_reported():
    orphans = rc.classify(base_snapshot(), ["taps", "allocations"])
    assert set(orphans) == {"taps", "allocations"}


def test_vms_keeps_listed_allocations_and_dirs_and_reports_unlisted_live_vms():
    snap = base_snapshot(vms=frozenset({"stale", "old"}))
    orphans = rc.classify(snap, rc.KINDS)
    assert names(orphans, "allocations") == [], "a listed VM's allocation is kept (launch in progress)"
    assert names(orphans, "vm_dirs") == [], "a listed VM's directory is kept"
    assert names(orphans, "taps") == ["fc-c6125063"], "the kept allocation's TAP is kept"
    assert names(orphans, "leases") == ["198.18.80.99"]
    assert rc.unlisted_vms(snap) == ["web1"]
    assert rc.unlisted_vms(base_snapshot()) == []


def test_vms_makes_unlisted_dirless_allocations_orphans_but_never_a_live_vms():
    snap = base_snapshot(vms=frozenset())
    orphans = rc.classify(snap, rc.KINDS)
    assert names(orphans, "allocations") == ["stale"]
    assert "and it is not in vms" in orphans["allocations"][0].detail
    assert names(orphans, "processes") == [] and "fc-c6125002" not in names(orphans, "taps")


def test_vmm_processes_of_dead_vms_are_orphans():
    snap = base_snapshot(processes=[vmm(501, "web1"), vmm(502, "gone"), vmm(503, "old"), vmm(504, "stale")])
    orphans = rc.classify(snap, rc.KINDS)
    assert names(orphans, "processes") == ["502", "503", "504"]
    details = {o.name: o.detail for o in orphans["processes"]}
    assert f"its VM directory {VMS}/gone does not exist" in details["502"]
    assert "VM old has no allocation" in details["503"]
    assert f"its VM directory {VMS}/stale does not exist" in details["504"]
    assert orphans["processes"][0].data["cmdline"].startswith("/usr/local/bin/firecracker --api-sock")


def test_vmm_of_a_listed_vm_with_a_dir_but_no_allocation_is_kept():
    snap = base_snapshot(processes=[vmm(503, "old")], vms=frozenset({"old"}))
    assert names(rc.classify(snap, rc.KINDS), "processes") == []


def test_tap_held_by_a_live_vmm_is_never_an_orphan_whatever_its_name():
    snap = base_snapshot(taps=[tap("fc-custom", [501])])
    assert names(rc.classify(snap, rc.KINDS), "taps") == []


def test_taps_and_macs_in_a_live_vms_config_are_kept():
    dirs = {"web1": vmdir("web1", ["fc-web1"], ["06:00:aa:bb:cc:dd"]), "old": vmdir("old", ["fc-old"])}
    snap = base_snapshot(vm_dirs=dirs, taps=[tap("fc-web1"), tap("fc-old")],
                         leases=[lease("198.18.80.50", "06:00:AA:BB:CC:DD")])
    orphans = rc.classify(snap, rc.KINDS)
    assert names(orphans, "taps") == ["fc-old"], "only a live VM's config protects"
    assert names(orphans, "leases") == []


def test_tap_held_by_an_orphan_vmm_is_removable_only_with_processes():
    snap = base_snapshot(processes=[vmm(501, "web1"), vmm(502, "gone")], taps=[tap("fc-c6125063", [502])])
    assert blocked(rc.classify(snap, rc.KINDS), "taps") == {}
    only_taps = rc.classify(snap, ["taps"])
    assert "add 'processes' to kinds" in only_taps["taps"][0].blocked
    assert "VMM (pid 502) of VM gone" in only_taps["taps"][0].blocked


def test_tap_held_by_another_process_or_an_unknown_one_is_never_removable():
    snap = base_snapshot(taps=[tap("fc-q", [777]), tap("fc-ns", attached=True)], holder_cmdlines={777: "qemu -netdev"})
    found = blocked(rc.classify(snap, rc.KINDS), "taps")
    assert "pid 777 (qemu -netdev), which is not a VMM of a removed VM" in found["fc-q"]
    assert "not found in /proc" in found["fc-ns"]


def test_dir_and_allocation_of_a_running_orphan_vmm_wait_for_processes():
    snap = base_snapshot(processes=[vmm(503, "old"), vmm(504, "stale")])
    with_processes = rc.classify(snap, rc.KINDS)
    assert blocked(with_processes, "vm_dirs") == {} and blocked(with_processes, "allocations") == {}
    without = rc.classify(snap, ["vm_dirs", "allocations"])
    assert "the VMM (pid 503) of VM old still runs" in blocked(without, "vm_dirs")[f"{VMS}/old"]
    assert "the VMM (pid 504) of VM stale still runs" in blocked(without, "allocations")["stale"]


def test_nothing_at_all_is_clean():
    snap = rc.Snapshot(vms_dir=VMS, allocations={}, vm_dirs={})
    assert rc.classify(snap, rc.KINDS) == {kind: [] for kind in rc.KINDS}


# --- parsers -----------------------------------------------------------------------


def test_read_leases_keeps_ipv4_ethernet_leases_only(tmp_path: Path):
    text = ("1795923186 06:00:c6:12:5f:02 198.18.95.2 keep *\n"
            "1795923186 06:00:C6:12:5F:64 198.18.95.100 old 01:06:00:c6:12:5f:64\n"
            "duid 00:01:00:01:2c:aa:bb:cc:dd:ee:ff:00:11:22\n"
            "1795923186 1234567 fd00::5 v6host 00:01:00:01\n"
            "1795923186 20-00:11:22:33:44:55:66:77:88:99:aa:bb:cc:dd:ee:ff:00:11:22:33 198.18.95.7 ib *\n"
            "1795923186 06:00:c6:12:5f:08 not-an-ip x *\n"
            "garbage\n\n")
    path = tmp_path / "dnsmasq.leases"
    path.write_text(text)
    leases = rc.read_leases(str(path))
    assert [(l.ip, l.mac, l.hostname, l.client_id) for l in leases] == [
        ("198.18.95.2", "06:00:c6:12:5f:02", "keep", "*"),
        ("198.18.95.100", "06:00:c6:12:5f:64", "old", "01:06:00:c6:12:5f:64")], "MACs in lower case"
    assert leases[1].release_argv("/usr/bin/dhcp_release", "fcbr0") == [
        "/usr/bin/dhcp_release", "fcbr0", "198.18.95.100", "06:00:c6:12:5f:64", "01:06:00:c6:12:5f:64"]
    assert leases[0].release_argv("dhcp_release", "fcbr0") == ["dhcp_release", "fcbr0", "198.18.95.2",
                                                               "06:00:c6:12:5f:02"], "no client id to match"
    assert rc.read_leases(str(tmp_path / "missing")) is None


@pytest.mark.parametrize("argv, expected", [
    (("/usr/local/bin/firecracker", "--api-sock", f"{VMS}/web1/api.sock", "--id", "web1", "--config-file", "x"),
     ("web1", "web1")),
    (("python3", "/opt/fc-standin", "--id=w2", f"--api-sock={VMS}/web2/api.sock"), ("web2", "w2")),
    (("nsenter", "--net=/run/netns/lab", "--", "fc", "--api-sock", f"{VMS}/web3/api.sock", "--id", "web3"),
     ("web3", "web3")),
    (("/bin/sh", f"{VMS}/web4/launch"), ("web4", None)),
    (("/usr/local/bin/firecracker", "--api-sock", "/run/firecracker.socket"), None),
    (("/usr/local/bin/firecracker", "--api-sock", f"{VMS}/web1/sub/api.sock"), None),
    (("/usr/local/bin/firecracker", "--api-sock", f"{VMS}/api.sock"), None),
    (("/usr/local/bin/firecracker", "--api-sock", "relative/vms/x/api.sock"), None),
    (("grep", "-r", f"{VMS}/web1/api.sock"), None),
    (("/usr/local/bin/firecracker", "--api-sock"), None),
])
def test_vmm_of(argv, expected):
    assert rc.vmm_of(argv, [VMS]) == expected


def test_parse_stat_handles_spaces_and_parens_in_the_command_name():
    fields = ["S"] + ["0"] * 18 + ["123456"] + ["0"] * 5
    assert _procs.parse_stat("42 (a ) b) " + " ".join(fields)) == ("S", 123456)
    assert _procs.parse_stat("42 (x) Z 1") is None


def test_unit_of():
    assert rc.unit_of("0::/system.slice/system-firecracker.slice/firecracker@web1.service\n") == "firecracker@web1.service"
    assert rc.unit_of("0::/user.slice/user-0.slice/session-3.scope\n") is None


def tun_link(name: str, index: int, master=None, mode="tap", carrier=False) -> Link:
    return Link(name=name, index=index, kind="tun", mtu=1500, admin_up=True, carrier=carrier, operstate="down",
                master=master, group=0, tun=TunInfo(mode=mode, pi=False, vnet_hdr=True, persist=True,
                                                    multi_queue=False, owner=None, group=None, num_queues=None))


def test_tap_candidates_filters_prefix_kind_and_bridge():
    bridge = Link(name="fcbr0", index=2, kind="bridge", mtu=1500, admin_up=True, carrier=True, operstate="up",
                  master=None, group=0)
    dummy = Link(name="fc-dummy", index=7, kind="dummy", mtu=1500, admin_up=True, carrier=True, operstate="up",
                 master=2, group=0)
    links = {link.name: link for link in (
        bridge, dummy, tun_link("fc-a", 3, master=2, carrier=True), tun_link("fc-b", 4),
        tun_link("fc-tun", 5, mode="tun"), tun_link("vx-c", 6, master=2))}
    every = rc.tap_candidates(links, "fc-", None, {"fc-a": [9]})
    assert [(t.name, t.bridge, t.attached, t.holders) for t in sorted(every, key=lambda t: t.name)] == [
        ("fc-a", "fcbr0", True, (9,)), ("fc-b", None, False, ())]
    assert [t.name for t in rc.tap_candidates(links, "fc-", "fcbr0", {})] == ["fc-a"]
    with pytest.raises(rc.ReconcileError, match="bridge nosuch: no such device in netns lab"):
        rc.tap_candidates(links, "fc-", "nosuch", {}, " in netns lab")
    with pytest.raises(rc.ReconcileError, match="bridge fc-b: is a tun link, not a bridge"):
        rc.tap_candidates(links, "fc-", "fc-b", {})


# --- scanners on a fake /proc -----------------------------------------------------------


def fake_process(root: Path, pid: int, argv: list, state: str = "S", start: int = 1000, tun_fds=None,
                 netns: str = "netA", cgroup: str = "0::/\n") -> None:
    base = root / str(pid)
    (base / "fd").mkdir(parents=True)
    (base / "fdinfo").mkdir()
    (base / "ns").mkdir()
    (base / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    fields = [state] + ["0"] * 18 + [str(start)] + ["0"] * 5
    (base / "stat").write_text(f"{pid} ({os.path.basename(argv[0])}) " + " ".join(fields) + "\n")
    (base / "cgroup").write_text(cgroup)
    (base / "ns" / "net").symlink_to(root.parent / netns)
    (base / "fd" / "0").symlink_to("/dev/null")
    for fd, name in (tun_fds or {}).items():
        (base / "fd" / str(fd)).symlink_to("/dev/net/tun")
        (base / "fdinfo" / str(fd)).write_text(f"pos:\t0\nflags:\t02\nmnt_id:\t1\nino:\t5\niff:\t{name}\n")


@pytest.fixture
def proc(tmp_path: Path) -> Path:
    for netns in ("netA", "netB"):
        (tmp_path / netns).write_text(netns)
    root = tmp_path / "proc"
    (root / "self" / "ns").mkdir(parents=True)
    (root / "self" / "ns" / "net").symlink_to(tmp_path / "netA")
    fake_process(root, 100, [
        "python3", "/opt/fc-standin", "--api-sock", f"{VMS}/web1/api.sock", "--id", "web1"],
        tun_fds={5: "fc-c6125002"}, cgroup="0::/system.slice/system-firecracker.slice/firecracker@web1.service\n")
    fake_process(root, 101, ["/bin/sh", f"{VMS}/gone/launch"], start=2000)
    fake_process(root, 102, ["/usr/local/bin/firecracker", "--api-sock", f"{VMS}/dead/api.sock"], state="Z")
    fake_process(root, 103, ["qemu-system-x86_64", "-netdev", "tap,ifname=fc-q"], tun_fds={3: "fc-q", 4: "fc-q2"})
    fake_process(root, 104, ["/usr/local/bin/firecracker", "--api-sock", f"{VMS}/other/api.sock"],
                 tun_fds={3: "fc-c6125002"}, netns="netB")
    fake_process(root, 105, ["sleep", "100"])
    return root


def test_find_vmm_processes(proc: Path):
    found = rc.find_vmm_processes(VMS, str(proc))
    assert [(p.pid, p.vm, p.vm_id, p.start_time, p.unit) for p in found] == [
        (100, "web1", "web1", 1000, "firecracker@web1.service"),
        (101, "gone", None, 2000, None),
        (104, "other", None, 1000, None)], "zombies are not processes to stop"


def test_find_tap_holders_in_this_network_namespace_only(proc: Path):
    holders, cmdlines = rc.find_tap_holders(str(proc))
    assert holders == {"fc-c6125002": [100], "fc-q": [103], "fc-q2": [103]}
    assert cmdlines[103] == "qemu-system-x86_64 -netdev tap,ifname=fc-q"


def test_start_time_is_none_for_gone_and_zombie(proc: Path):
    assert rc.start_time(100, str(proc)) == 1000
    assert rc.start_time(102, str(proc)) is None
    assert rc.start_time(999, str(proc)) is None
    assert [pid for pid in (100, 102, 999, 0, None) if _procs.pid_alive(pid, str(proc))] == [100]


def test_read_vm_dirs_takes_real_directories_and_their_config(tmp_path: Path):
    vms = tmp_path / "vms"
    (vms / "web1").mkdir(parents=True)
    (vms / "web1" / "config.json").write_text(json.dumps({"network-interfaces": [
        {"iface_id": "eth0", "host_dev_name": "fc-web1", "guest_mac": "06:00:00:00:00:01"}]}))
    (vms / "broken").mkdir()
    (vms / "broken" / "config.json").write_text("{not json")
    for skipped in (".tmp", "lost+found"):
        (vms / skipped).mkdir()
    (vms / "web1.ext4").write_text("")
    (vms / "link").symlink_to(vms / "web1")
    dirs = rc.read_vm_dirs(str(vms))
    assert sorted(dirs) == ["broken", "web1"]
    assert dirs["web1"].taps == ("fc-web1",) and dirs["web1"].macs == ("06:00:00:00:00:01",)
    assert dirs["broken"].taps == ()
    assert dirs["web1"].disk_bytes == rc.disk_usage(str(vms / "web1")) and dirs["web1"].disk_bytes > 0
    assert rc.read_vm_dirs(str(tmp_path / "missing")) == {}


# --- settings ----------------------------------------------------------------------------


def params(**overrides) -> dict:
    base = {"state_dir": "/var/lib/firecracker", "netns": None, "tap_prefix": "fc-", "bridge": None,
            "dhcp_leasefile": None, "dhcp_interface": None, "vms": None, "remove": False,
            "kinds": list(rc.KINDS), "stop_timeout": 10}
    base.update(overrides)
    return base


def test_settings_validation_names_every_problem():
    with pytest.raises(rc.ReconcileError) as info:
        rc.settings_from(params(tap_prefix="", state_dir="rel", stop_timeout=-1, remove=True,
                                dhcp_leasefile="/x.leases"), None)
    message = str(info.value)
    for fragment in ("tap_prefix: must not be empty", "state_dir: 'rel' is not an absolute path",
                     "stop_timeout: -1 is negative", "dhcp_interface: required to release leases",
                     "dhcp_release: not found", "dnsmasq-utils"):
        assert fragment in message


def test_settings_leases_need_dhcp_release_only_when_removing_them():
    assert not rc.settings_from(params(dhcp_leasefile="/x.leases"), None).releasing
    assert not rc.settings_from(params(dhcp_leasefile="/x.leases", remove=True, kinds=["taps"]), None).releasing
    settings = rc.settings_from(params(dhcp_leasefile="/x", dhcp_interface="br", remove=True, kinds=["leases", "taps"],
                                       vms=["a"]), "/usr/bin/dhcp_release")
    assert settings.releasing and settings.kinds == ("taps", "leases") and settings.vms == frozenset({"a"})


# --- dirs and allocations end to end on a temporary state dir ------------------------------------


def state_with(tmp_path: Path, names: list, dirs: list) -> Path:
    state = tmp_path / "state"
    allocator = Allocator(str(state), make_pool("198.18.80.0/24"))
    allocator.apply(names, "present", check_mode=False)
    for name in dirs:
        (state / "vms" / name).mkdir(parents=True)
        (state / "vms" / name / "disk.img").write_bytes(b"x" * 10)
    return state


def run(state: Path, proc_root: Path, check_mode: bool = False, **overrides):
    settings = rc.Settings(state_dir=str(state), kinds=("vm_dirs", "allocations"), proc_root=str(proc_root),
                           **overrides)
    return rc.run(settings, check_mode)


def stored(state: Path) -> dict:
    return json.loads((state / "allocations.json").read_text())


def test_dirs_and_allocations_check_mode_remove_rerun(tmp_path: Path, proc: Path):
    state = state_with(tmp_path, ["keep", "stale"], ["keep", "old"])
    before = stored(state)

    report = run(state, proc)
    assert not report.changed and report.removed == {"vm_dirs": [], "allocations": []}
    assert [o.name for o in report.orphans["vm_dirs"]] == [str(state / "vms" / "old")]
    assert [o.name for o in report.orphans["allocations"]] == ["stale"]

    predicted = run(state, proc, check_mode=True, remove=True)
    assert predicted.changed and [i["name"] for i in predicted.removed["allocations"]] == ["stale"]
    assert (state / "vms" / "old").is_dir() and stored(state) == before

    removed = run(state, proc, remove=True)
    assert removed.changed and not removed.failures
    assert removed.report()["removed"] == predicted.report()["removed"]
    assert not (state / "vms" / "old").exists() and (state / "vms" / "keep" / "disk.img").exists()
    after = stored(state)
    assert list(after["allocations"]) == ["keep"] and after["network"] == before["network"]
    assert after["allocations"]["keep"] == before["allocations"]["keep"]
    assert oct((state / "allocations.json").stat().st_mode & 0o777) == "0o600"

    again = run(state, proc, remove=True)
    assert not again.changed and again.orphans == {"vm_dirs": [], "allocations": []}


def test_removal_refuses_a_missing_state_dir(tmp_path: Path, proc: Path):
    with pytest.raises(rc.ReconcileError, match="does not exist; refusing to remove anything"):
        run(tmp_path / "nothing", proc, remove=True)
    assert not run(tmp_path / "nothing", proc).changed


def test_a_damaged_allocations_file_stops_everything(tmp_path: Path, proc: Path):
    state = state_with(tmp_path, [], ["old"])
    (state / "allocations.json").write_text("{broken")
    with pytest.raises(rc.ReconcileError, match="cannot read the allocations"):
        run(state, proc, remove=True)
    assert (state / "vms" / "old").is_dir()


def test_orphan_dir_detail_says_what_it_holds():
    dirs = {"old": rc.VMDir(name="old", path=f"{VMS}/old", disk_bytes=3 << 30)}
    orphans = rc.classify(rc.Snapshot(vms_dir=VMS, allocations={}, vm_dirs=dirs), ["vm_dirs"])
    assert orphans["vm_dirs"][0].detail.endswith("VM old has no allocation; 3.0 GiB on disk")
    assert orphans["vm_dirs"][0].report() == {"name": f"{VMS}/old", "detail": orphans["vm_dirs"][0].detail,
                                              "vm": "old", "disk_bytes": 3 << 30}


# --- jailed VMs -----------------------------------------------------------------------------------

JAILS = "/srv/jailer/firecracker-v1.10.1-x86_64"
JAILED = ("/firecracker-v1.10.1-x86_64", "--id", "vm1", "--start-time-us", "1", "--parent-cpu-time-us", "2",
          "--api-sock", "/run/firecracker.socket", "--config-file", "/config.json")
STANDIN_JAILED = ("python3", "/proc/self/cwd/firecracker-v1.10.1-x86_64", "--id", "vm1", "--start-time-us", "1",
                  "--api-sock", "/run/firecracker.socket", "--config-file", "/config.json")
JAILER = ("/usr/local/bin/jailer", "--id", "vm1", "--exec-file", "/usr/local/bin/firecracker-v1.10.1-x86_64",
          "--uid", "4242", "--gid", "4242", "--chroot-base-dir", "/srv/jailer", "--cgroup-version", "2", "--",
          "--api-sock", "/run/firecracker.socket", "--config-file", "/config.json")
RECORDED = {f"{JAILS}/vm1": "vm1"}
CONSOLE = f"{VMS}/vm1/console.log"


@pytest.mark.parametrize("argv, jails, places, outputs, expected", [
    # A recorded jail: the chrooted VMM (its root) or the stand-in's (its cwd); the jailer before its exec.
    (JAILED, RECORDED, [f"{JAILS}/vm1/root"], [], ("vm1", "vm1")),
    (STANDIN_JAILED, RECORDED, [f"{JAILS}/vm1/root"], ["/dev/null"], ("vm1", "vm1")),
    (JAILED, {f"{JAILS}/vm1": "dirname"}, [f"{JAILS}/vm1/root"], [], ("dirname", "vm1")),
    (JAILER, RECORDED, [], [], ("vm1", "vm1")),
    # No marker records the jail (the VM directory was deleted): its console log, even deleted, says whose it is.
    (JAILED, {}, [f"{JAILS}/vm1/root"], [f"{CONSOLE} (deleted)"], ("vm1", "vm1")),
    (STANDIN_JAILED, {}, [f"{JAILS}/vm1/root"], ["/dev/null", CONSOLE], ("vm1", "vm1")),
    (JAILER, {}, [], [f"{CONSOLE} (deleted)"], ("vm1", "vm1")),
    # Not ours: another state dir's jailed VMM, a jail of another id or exec name, no jail at all.
    (JAILED, {}, [f"{JAILS}/vm1/root"], ["/srv/other/vms/vm1/console.log"], None),
    (JAILED, {}, [f"{JAILS}/vm1/root"], [f"{VMS}/vm1/sub/console.log"], None),
    (JAILED, {}, [f"{JAILS}/vm1/root"], [], None),
    (JAILED, {}, ["/srv/jailer/other-binary/vm1/root"], [CONSOLE], None),
    (JAILED, RECORDED, [f"{JAILS}/vm2/root"], [CONSOLE], None),
    (JAILED, {f"{JAILS}/vm2": "vm2"}, [f"{JAILS}/vm2/root"], [], None),
    (JAILED, RECORDED, [f"{JAILS}/vm1"], [], None),
    (JAILED, RECORDED, [], [CONSOLE], None),
    (JAILER, {"/srv/other/firecracker/vm1": "vm1"}, [], [], None),
    # A process merely sitting in the jail, or in the VM directory, is not a VMM.
    (("sleep", "100"), RECORDED, [f"{JAILS}/vm1/root"], [CONSOLE], None),
    (("bash", "--id", "vm1"), RECORDED, [f"{JAILS}/vm1/root"], [CONSOLE], None),
    (("tail", "-f", CONSOLE, "--id", "vm1"), {}, [f"{JAILS}/vm1/root"], [CONSOLE], None),
    (JAILED[:7] + JAILED[9:], RECORDED, [f"{JAILS}/vm1/root"], [], None),
    (("/firecracker", "--id", "../x", "--api-sock", "/run/firecracker.socket"), {f"{JAILS}/../x": "x"},
     [f"{JAILS}/../x/root"], [], None),
    # A VMM whose socket is in a VM directory is vmm_of's; an unjailed VMM elsewhere is nobody's.
    (("/usr/local/bin/firecracker", "--api-sock", f"{VMS}/vm1/api.sock", "--id", "vm1"), {}, ["/home"], [CONSOLE],
     None),
])
def test_jailed_vmm_of(argv, jails, places, outputs, expected):
    assert rc.jailed_vmm_of(argv, [VMS], jails, places, outputs) == expected


def jail_tree(tmp_path: Path, name: str = "vm1", marker: bool = True) -> tuple[Path, Path]:
    """fc_vm's jailed layout: the VM directory (marker recording the jail, launch script, console log, its
    disk) and the jail (fc_vm's jail marker, config.json with jail paths, the disk hard-linked in)."""
    vm_dir = tmp_path / "state" / "vms" / name
    jail_dir = tmp_path / "jails" / "firecracker-v1.10.1-x86_64" / name
    (jail_dir / "root" / "drives").mkdir(parents=True)
    vm_dir.mkdir(parents=True)
    (vm_dir / ".fc_vm").write_text(json.dumps({"name": name, "jail_dir": str(jail_dir),
                                               "cgroup_dirs": [str(tmp_path / "cgroup" / name)]}) + "\n")
    (vm_dir / "launch").write_text("#!/bin/sh\n")
    (vm_dir / "console.log").write_bytes(b"c" * 5000)
    (vm_dir / "rootfs.ext4").write_bytes(b"d" * 100000)
    os.link(vm_dir / "rootfs.ext4", jail_dir / "root" / "drives" / "rootfs")
    (jail_dir / "root" / "config.json").write_text(json.dumps({
        "drives": [{"drive_id": "rootfs", "path_on_host": "/drives/rootfs"}],
        "network-interfaces": [{"iface_id": "eth0", "host_dev_name": f"fc-{name}", "guest_mac": "06:00:00:00:00:07"}]}))
    if marker:
        (jail_dir / ".fc_vm_jail").write_text(name + "\n")
    (tmp_path / "cgroup" / name).mkdir(parents=True)
    return vm_dir, jail_dir


def test_read_vm_dirs_reads_a_jailed_vms_config_from_its_jail(tmp_path: Path):
    vm_dir, jail_dir = jail_tree(tmp_path)
    (vm_dir / "config.json").write_text(json.dumps({"network-interfaces": [
        {"host_dev_name": "fc-stale", "guest_mac": "06:00:00:00:00:99"}]}))  # an unjailed past: not what runs
    (jail_dir / "root" / "vmm.log").write_bytes(b"l" * 20000)
    dirs = rc.read_vm_dirs(str(vm_dir.parent))
    assert dirs["vm1"].taps == ("fc-vm1",) and dirs["vm1"].macs == ("06:00:00:00:00:07",)
    assert dirs["vm1"].jail_dir == str(jail_dir) and dirs["vm1"].cgroup_dirs == (str(tmp_path / "cgroup" / "vm1"),)
    unjailed = rc.disk_usage(str(vm_dir))
    jail_only = rc.disk_usage(str(jail_dir))
    disk = dirs["vm1"].disk_bytes
    assert disk == rc.disk_usage(str(vm_dir), str(jail_dir)) and unjailed < disk < unjailed + jail_only, \
        "the jail's own files count, the hard-linked drive once"
    assert disk - unjailed == jail_only - os.lstat(jail_dir / "root" / "drives" / "rootfs").st_blocks * 512


def test_read_vm_dirs_markers_without_a_jail(tmp_path: Path):
    vms = tmp_path / "vms"
    for name, marker in (("plain", {"name": "plain"}), ("relative", {"name": "r", "jail_dir": "jails/x"}),
                         ("text", None), ("list", [1])):
        (vms / name).mkdir(parents=True)
        (vms / name / ".fc_vm").write_text(json.dumps(marker) if marker is not None else "old marker\n")
        (vms / name / "config.json").write_text(json.dumps({"network-interfaces": [{"host_dev_name": f"fc-{name}"}]}))
    dirs = rc.read_vm_dirs(str(vms))
    assert {name: (d.taps, d.jail_dir) for name, d in dirs.items()} == {
        name: ((f"fc-{name}",), None) for name in ("list", "plain", "relative", "text")}
    assert rc.recorded_jails(str(vms)) == {}


def test_find_vmm_processes_maps_jailed_vmms_through_their_jail(tmp_path: Path, proc: Path):
    vm_dir, jail_dir = jail_tree(tmp_path)
    vms = str(vm_dir.parent)
    other_jail = tmp_path / "jails" / "firecracker-v1.10.1-x86_64"
    stand_in = ["python3", "/proc/self/cwd/firecracker-v1.10.1-x86_64", "--id", "vm1", "--api-sock",
                "/run/firecracker.socket"]

    def jailed(pid: int, argv: list, cwd: Path, root: str = "/", console=None) -> None:
        fake_process(proc, pid, argv)
        (proc / str(pid) / "cwd").symlink_to(cwd)
        (proc / str(pid) / "root").symlink_to(root)
        if console:
            (proc / str(pid) / "fd" / "1").symlink_to(console)

    jailed(200, stand_in, jail_dir / "root")  # the recorded jail, stand-in: no chroot, its cwd
    jailed(201, ["/firecracker-v1.10.1-x86_64", "--id", "vm1", "--api-sock", "/run/firecracker.socket"],
           jail_dir / "root", root=str(jail_dir / "root"))  # chrooted
    # Its VM directory was deleted: its console log (deleted) is still its stdout.
    jailed(202, [*stand_in[:3], "gone", *stand_in[4:]], other_jail / "gone" / "root",
           console=f"{vms}/gone/console.log (deleted)")
    # Another state dir's jailed VMM, and a shell sitting in the jail: not ours.
    jailed(203, [*stand_in[:3], "x", *stand_in[4:]], other_jail / "x" / "root", console="/srv/other/vms/x/console.log")
    jailed(204, ["/bin/bash"], jail_dir / "root", console=str(vm_dir / "console.log"))
    jailed(205, ["/usr/local/bin/jailer", "--id", "vm1", "--exec-file", "/usr/bin/firecracker-v1.10.1-x86_64",
                 "--chroot-base-dir", str(tmp_path / "jails"), "--", "--api-sock", "/run/firecracker.socket"], tmp_path)
    found = {p.pid: (p.vm, p.vm_id) for p in rc.find_vmm_processes(vms, str(proc))}
    assert found == {200: ("vm1", "vm1"), 201: ("vm1", "vm1"), 202: ("gone", "gone"), 205: ("vm1", "vm1")}


def test_classify_a_jailed_vms_leftovers():
    dirs = {"vm1": rc.VMDir(name="vm1", path=f"{VMS}/vm1", taps=("fc-vm1",), macs=("06:00:00:00:00:07",),
                            jail_dir=f"{JAILS}/vm1", disk_bytes=2048)}
    jailed = rc.VMMProcess(pid=600, vm="vm1", start_time=1, argv=JAILED, vm_id="vm1")
    live = rc.Snapshot(vms_dir=VMS, allocations={"vm1": alloc("vm1", 7)}, vm_dirs=dirs, processes=[jailed],
                       taps=[tap("fc-vm1")], leases=[lease("198.18.80.7", "06:00:00:00:00:07")])
    assert all(items == [] for items in rc.classify(live, rc.KINDS).values()), "the jail's config protects"
    orphan = rc.classify(rc.Snapshot(vms_dir=VMS, allocations={}, vm_dirs=dirs, processes=[jailed]), rc.KINDS)
    assert names(orphan, "processes") == ["600"] and names(orphan, "vm_dirs") == [f"{VMS}/vm1"]
    assert orphan["vm_dirs"][0].data["jail_dir"] == f"{JAILS}/vm1"
    assert f"its jail {JAILS}/vm1 goes with it" in orphan["vm_dirs"][0].detail


def test_removing_a_jailed_vms_directory_removes_its_jail(tmp_path: Path, proc: Path):
    vm_dir, jail_dir = jail_tree(tmp_path, "vm1")
    foreign_dir, foreign_jail = jail_tree(tmp_path, "vm2", marker=False)
    state = tmp_path / "state"
    Allocator(str(state), make_pool("198.18.80.0/24")).apply([], "present", check_mode=False)
    predicted = run(state, proc, check_mode=True, remove=True)
    assert sorted(i["name"] for i in predicted.removed["vm_dirs"]) == [str(vm_dir), str(foreign_dir)]
    assert jail_dir.exists()
    removed = run(state, proc, remove=True)
    assert [i["name"] for i in removed.removed["vm_dirs"]] == [str(vm_dir)]
    assert not vm_dir.exists() and not jail_dir.exists() and not (tmp_path / "cgroup" / "vm1").exists()
    assert jail_dir.parent.is_dir(), "the exec name's directory is shared with other jails"
    [failure] = removed.failures
    assert f"cannot remove its jail {foreign_jail}" in failure and "no .fc_vm_jail marker" in failure
    assert foreign_dir.is_dir() and foreign_jail.is_dir(), "a jail fc_vm did not make is left, and its record"


def test_a_jailed_vmm_holds_its_tap_through_its_jails_tun_node(tmp_path: Path, proc: Path):
    fake_process(proc, 300, list(JAILED))
    fake_process(proc, 301, ["cat"])
    links = ((300, f"{JAILS}/vm1/root/dev/net/tun", 7), (300, f"{JAILS}/vm2/root/dev/net/tun (deleted)", 8),
             (301, f"{tmp_path}/dev/net/tun.txt", 3))
    for pid, target, fd in links:
        (proc / str(pid) / "fd" / str(fd)).symlink_to(target)
        (proc / str(pid) / "fdinfo" / str(fd)).write_text(f"pos:\t0\niff:\tfc-j{fd}\n")
    holders, cmdlines = rc.find_tap_holders(str(proc))
    assert holders["fc-j7"] == [300] and holders["fc-j8"] == [300] and "fc-j3" not in holders
    assert cmdlines[300].startswith("/firecracker-v1.10.1-x86_64 --id vm1")


def test_a_jail_two_vm_directories_record_is_never_removed(tmp_path: Path, proc: Path):
    vm_dir, jail_dir = jail_tree(tmp_path, "vm1")
    copy = vm_dir.parent / "vm1-copy"
    copy.mkdir()
    (copy / ".fc_vm").write_text((vm_dir / ".fc_vm").read_text())
    state = tmp_path / "state"
    Allocator(str(state), make_pool("198.18.80.0/24")).apply(["vm1"], "present", check_mode=False)
    for check_mode in (True, False):
        outcome = run(state, proc, check_mode=check_mode, remove=True)
        assert outcome.removed["vm_dirs"] == [] and not outcome.failures
        [left] = outcome.left_in_place["vm_dirs"]
        assert left["name"] == str(copy) and f"its jail {jail_dir} is also recorded by VM directory vm1" in left["reason"]
    assert copy.is_dir() and jail_dir.is_dir()


def test_a_tap_held_by_a_vmms_child_is_the_vmms(proc: Path):
    """The stand-in's QEMU (a child of the VMM) holds the TAP the VMM opened: it counts as the VMM's."""
    fake_process(proc, 400, ["qemu-system-x86_64", "-netdev", "tap,fd=9"], start=4000, tun_fds={9: "fc-q4"})
    fields = (proc / "400" / "stat").read_text().split()
    fields[3] = "100"  # ppid: the live VMM of web1 in the fake /proc
    (proc / "400" / "stat").write_text(" ".join(fields) + "\n")
    fake_process(proc, 401, ["qemu-system-x86_64"], start=4001, tun_fds={9: "fc-q5"})  # ppid 0: nobody's
    assert rc.vmm_helpers([100, 400, 401, 999], {100, 101}, str(proc)) == {400: (100, 4000)}

    live = base_snapshot(taps=[tap("fc-q4", [400])], helpers={400: (501, 4000)})
    assert names(rc.classify(live, rc.KINDS), "taps") == [], "a live VMM's child protects its TAP"
    orphaned = base_snapshot(processes=[vmm(501, "web1"), vmm(502, "gone")], taps=[tap("fc-q4", [400])],
                             helpers={400: (502, 4000)})
    [found] = rc.classify(orphaned, rc.KINDS)["taps"]
    assert found.blocked is None and "held open by pid 400 (a child of the VMM, pid 502, of VM gone)" in found.detail
    [waiting] = rc.classify(orphaned, ["taps"])["taps"]
    assert "held open by the VMM (pid 502) of VM gone; add 'processes'" in waiting.blocked
    stranger = base_snapshot(taps=[tap("fc-q4", [400])], holder_cmdlines={400: "qemu"})
    assert "pid 400 (qemu), which is not a VMM" in rc.classify(stranger, rc.KINDS)["taps"][0].blocked

"""The microvm role's VM list checks and per-step arguments (filters vm_plan, vm_launch, vm_injections,
fleet_subnet), and the sparse clone of a golden image (rootfs_clone's module_utils)."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from ansible_collections.microvm.firecracker.plugins.module_utils import _clone
from ansible_collections.microvm.firecracker.plugins.module_utils._vm_plan import (
    PlanError,
    fleet_subnet,
    vm_injections,
    vm_launch,
    vm_plan,
    vm_prepare_args,
    vm_report,
    vm_start_args,
    vm_teardown_args,
)

PROFILES = {"small": {"vcpu_count": 1, "mem_size_mib": 512}, "big": {"vcpu_count": 4, "mem_size_mib": 4096}}
DEFAULTS = {"profile": "small", "image": "base", "boot_args": "console=ttyS0 reboot=k panic=1",
            "addressing": "dhcp", "on_change": "restart", "autostart": False, "wait_timeout": 90}
SETTINGS = {"state_dir": "/var/lib/firecracker", "golden_dir": "/g", "firecracker_bin": "/usr/local/bin/firecracker",
            "supervisor": "auto", "stop_timeout": 30}
NETWORK = {"netns": "lab", "dns_servers": ["198.18.80.1"]}


def alloc(name: str, last: int) -> dict:
    return {"name": name, "ip": f"198.18.80.{last}", "prefix": 24, "gateway": "198.18.80.1",
            "mac": f"06:00:c6:12:50:{last:02x}", "tap": f"fc-c61250{last:02x}"}


def test_profiles_defaults_and_overrides_resolve():
    plan = vm_plan([{"name": "a"}, {"name": "b", "profile": "big", "mem_size_mib": 8192},
                    {"name": "c", "vcpu_count": 2.0, "wait_for": {"port": 8080}}], PROFILES, DEFAULTS)
    assert plan["errors"] == []
    a, b, c = plan["vms"]
    assert (a["vcpu_count"], a["mem_size_mib"], a["state"], a["image"]) == (1, 512, "running", "base")
    assert (b["vcpu_count"], b["mem_size_mib"]) == (4, 8192)
    assert c["vcpu_count"] == 2 and c["wait_for"] == {"timeout": 90, "port": 8080}


@pytest.mark.parametrize("vms, fragment", [
    ([{"name": "a"}, {"name": "a"}], "VM a: the name is used twice (microvm_vms[0] and [1])"),
    ([{"name": "-bad"}], "name '-bad' is not valid"),
    ([{"name": "a", "vcpu_count": 1.5}], "VM a: vcpu_count: 1.5 is not a whole number"),
    ([{"name": "a", "vcpu_count": 33}], "VM a: vcpu_count: 33 is out of range (1..32)"),
    ([{"name": "a", "mem_size_mib": 256}], "VM a: mem_size_mib: 256 is out of range (at least 512)"),
    ([{"name": "a", "profile": "huge"}], "VM a: profile 'huge' is not defined"),
    ([{"name": "a", "environment": {"BAD-KEY": "x"}}], "VM a: environment: environment key 'BAD-KEY' is not a valid name"),
    ([{"name": "a", "boot_args": "console=ttyS0 http_proxy=http://bob:hunter2@proxy:3128"}],
     "VM a: boot_args contains what looks like a credential (user:password@)"),
    ([{"name": "a", "boot_args": "console=ttyS0 token=abc"}], "looks like a credential (a secret-named key)"),
    ([{"name": "a", "addressing": "slaac"}], "VM a: addressing 'slaac' is not one of dhcp, static"),
    ([{"name": "a", "vcpus": 2}], "VM a: unknown key(s) vcpus"),
    ([{"name": "a", "systemd_units": [{"name": "x.service"}]}], "give exactly one of content"),
    ([{"name": "a", "systemd_units": [{"name": "nosuffix", "content": ""}]}], "systemd unit name 'nosuffix' is not valid"),
    ([{"name": "a", "systemd_units": [{"name": "x.service", "content": "[Service]\nExecStart=/bin/true\n"}]}],
     "VM a: systemd_units[0]: unit x.service has no WantedBy=, RequiredBy=, UpheldBy= or Alias= in its [Install] section"),
    ([{"name": "a", "systemd_units": [{"name": "x@.service", "content": "[Install]\nWantedBy=multi-user.target\n"}]}],
     "template unit x@.service has no DefaultInstance="),
    ([{"name": "a", "files": [{"dest": "relative/path", "content": ""}]}], "VM a: files[0]"),
    ([{"name": "a", "wait_for": {"path": "/"}}], "wait_for must be a dict with at least a port"),
    ([{"name": "a", "state": "on"}], "state 'on' is not one of"),
    ("not a list", "microvm_vms must be a list"),
])
def test_each_problem_is_named(vms, fragment):
    errors = vm_plan(vms, PROFILES, DEFAULTS)["errors"]
    assert any(fragment in error for error in errors), errors


def test_all_problems_are_reported_at_once_and_secrets_never_echoed():
    errors = vm_plan([{"name": "a", "vcpu_count": 0, "environment": {"TOKEN": "s3cr3t\nx"}},
                      {"name": "b", "mem_size_mib": 1}], PROFILES, DEFAULTS)["errors"]
    assert len(errors) == 3, errors
    assert "s3cr3t" not in json.dumps(errors)


def test_absent_vms_need_only_a_name():
    plan = vm_plan([{"name": "gone", "state": "absent", "vcpu_count": 0}], PROFILES, DEFAULTS)
    assert plan["errors"] == [] and plan["vms"][0]["state"] == "absent"


def test_launch_arguments_come_from_one_allocation():
    plan = vm_plan([
        {"name": "web", "addressing": "static", "environment": {"SESSION_ID": "abc"}, "environment_secret": True,
         "systemd_units": [{"name": "web.service", "content": "[Service]\n"}, {"name": "agent.service", "src": "agent.service"}],
         "files": [{"dest": "/opt/agent", "src": "files/agent", "mode": "0755"}, {"dest": "/etc/motd", "content": "hi\n"}],
         "wait_for": {"port": 8080, "http_path": "/"}},
    ], PROFILES, DEFAULTS)["vms"]
    allocations = {"web": alloc("web", 2)}
    (launch,) = vm_launch(plan, allocations, NETWORK, SETTINGS)
    assert "inject" not in launch and "SESSION_ID" not in json.dumps(launch), "secrets stay out of loop items"
    assert launch["dir"] == "/var/lib/firecracker/vms/web" and launch["disk"].endswith("/web/rootfs.ext4")
    assert launch["golden"] == "/g/golden-base.ext4" and launch["tap"] == {"name": "fc-c6125002"}
    assert launch["fc_vm"]["network_interfaces"] == [{"iface_id": "eth0", "tap": "fc-c6125002", "guest_mac": "06:00:c6:12:50:02"}]
    assert launch["fc_vm"]["netns"] == "lab" and launch["secret"] is True
    assert launch["wait_for"] == {"host": "198.18.80.2", "timeout": 90, "port": 8080, "http_path": "/"}
    assert launch["copies"] == [
        {"src": "agent.service", "dest": "/var/lib/firecracker/vms/web/inject/unit-agent.service", "secret": False},
        {"src": "files/agent", "dest": "/var/lib/firecracker/vms/web/inject/file-0", "secret": False}]
    inject = vm_injections(plan, allocations, NETWORK, SETTINGS)["web"]
    assert inject["environment"] == {"SESSION_ID": "abc"} and inject["environment_secret"] is True
    assert inject["systemd_units"][1] == {"name": "agent.service", "enabled": True,
                                          "src": "/var/lib/firecracker/vms/web/inject/unit-agent.service"}
    network = [f for f in inject["files"] if f["path"] == "/etc/systemd/network/10-eth0.network"]
    assert network and "Address=198.18.80.2/24\nGateway=198.18.80.1\nDNS=198.18.80.1\n" in network[0]["content"]


def test_jailed_vms_get_their_own_uid_which_owns_their_tap():
    plan = vm_plan([{"name": "a"}, {"name": "b"}], PROFILES, DEFAULTS)["vms"]
    jailer = {"jailer_bin": "/usr/local/bin/jailer", "chroot_base_dir": "/srv/jailer", "uid_base": 100000,
              "cgroups": {"cpu.max": "100000 100000"}, "parent_cgroup": None}
    launches = vm_launch(plan, {"a": alloc("a", 2), "b": alloc("b", 77)}, NETWORK, {**SETTINGS, "jailer": jailer})
    for launch, uid in zip(launches, (100002, 100077)):
        assert launch["tap"] == {"name": launch["fc_vm"]["network_interfaces"][0]["tap"], "owner": uid, "group": uid}
        assert launch["fc_vm"]["jailer"] == {"jailer_bin": "/usr/local/bin/jailer", "chroot_base_dir": "/srv/jailer",
                                             "cgroups": {"cpu.max": "100000 100000"}, "parent_cgroup": None,
                                             "uid": uid, "gid": uid}
    (unjailed,) = vm_launch(plan[:1], {"a": alloc("a", 2)}, NETWORK, {**SETTINGS, "jailer": None})
    assert unjailed["fc_vm"]["jailer"] is None and unjailed["tap"] == {"name": "fc-c6125002"}


def test_dhcp_vms_get_no_static_network_file():
    plan = vm_plan([{"name": "a"}], PROFILES, DEFAULTS)["vms"]
    inject = vm_injections(plan, {"a": alloc("a", 3)}, NETWORK, SETTINGS)["a"]
    assert not [f for f in inject["files"] if "network" in f["path"]]
    with pytest.raises(PlanError, match="VM a: no address allocation"):
        vm_launch(plan, {}, NETWORK, SETTINGS)


def test_batch_arguments_and_report():
    plan = vm_plan([{"name": "a", "on_change": "fail", "wait_for": {"port": 80}},
                    {"name": "b", "state": "stopped", "wait_for": {"port": 80}, "systemd_units": [{"name": "u.service", "src": "u"}]}],
                   PROFILES, DEFAULTS)["vms"]
    allocations = {"a": alloc("a", 2), "b": alloc("b", 3)}
    launches = vm_launch(plan, allocations, NETWORK, SETTINGS)
    injections = vm_injections(plan, allocations, NETWORK, SETTINGS)
    a, b = vm_prepare_args(launches, injections, ["b"])
    assert a == {"name": "a", "dir": "/var/lib/firecracker/vms/a", "golden": "/g/golden-base.ext4",
                 "disk": "/var/lib/firecracker/vms/a/rootfs.ext4", "inject": injections["a"], "staged": [], "new": False,
                 "on_change": "fail", "supervisor": "auto", "stop_timeout": 30}
    assert b["new"] is True and b["staged"] == ["/var/lib/firecracker/vms/b/inject/unit-u.service"]

    prepared = [{"name": "a", "source": "/g/golden-base-00112233445566aa.ext4", "version": "00112233445566aa"},
                {"name": "b", "source": "/g/golden-base-ffeeddccbbaa9988.ext4", "version": "ffeeddccbbaa9988"}]
    start_a, start_b = vm_start_args(launches, prepared, [])
    assert "netns" not in start_a and "jailer" not in start_a, "fc_vms takes the namespace once; None means unset"
    assert start_a["kernel"] == "/g/golden-base-00112233445566aa.vmlinux"
    assert start_a["initrd"] == "/g/golden-base-00112233445566aa.initrd"
    assert start_a["wait_for"] == {"host": "198.18.80.2", "timeout": 90, "port": 80}
    assert start_b["state"] == "stopped" and "wait_for" not in start_b, "only a VM that should run is awaited"
    assert [vm["name"] for vm in vm_start_args(launches, prepared, ["a"])] == ["b"]
    with pytest.raises(PlanError, match="VM b: its disk was not prepared"):
        vm_start_args(launches, prepared[:1], [])
    with pytest.raises(PlanError, match="VM a: its disk records no golden image"):
        vm_start_args(launches, [{"name": "a", "source": None}, prepared[1]], [])

    report = vm_report(launches, prepared, [{"name": "a", "pid": 42, "ready_seconds": 3.5}])
    assert report["a"] == {"ip": "198.18.80.2", "tap": "fc-c6125002", "mac": "06:00:c6:12:50:02",
                           "dir": "/var/lib/firecracker/vms/a", "disk": "/var/lib/firecracker/vms/a/rootfs.ext4",
                           "state": "running", "golden_version": "00112233445566aa", "pid": 42, "ready_seconds": 3.5}
    assert report["b"]["pid"] is None and report["b"]["ready_seconds"] is None


@pytest.mark.parametrize("supernet, prefix, index, expected", [
    ("10.128.0.0/16", 24, 0, "10.128.0.0/24"),
    ("10.128.0.0/16", 24, 255, "10.128.255.0/24"),
    ("198.18.0.0/15", 20, 3, "198.18.48.0/20"),
])
def test_fleet_subnets(supernet, prefix, index, expected):
    assert fleet_subnet(supernet, prefix, index) == expected


@pytest.mark.parametrize("args, fragment", [
    (("10.128.0.0/16", 24, 256), "index 256 is outside the 256 /24 subnets"),
    (("10.128.0.1/16", 24, 0), "not an IPv4 network"),
    (("10.128.0.0/16", 8, 0), "between /16 and /29"),
])
def test_fleet_subnet_errors(args, fragment):
    with pytest.raises(PlanError, match=fragment.replace("/", ".")):
        fleet_subnet(*args)


def test_clone_is_sparse_records_the_version_and_keeps_the_disk(tmp_path: Path):
    versioned = tmp_path / "golden-base-0123456789abcdef.ext4"
    with open(versioned, "wb") as handle:
        handle.truncate(64 << 20)
        handle.seek(1 << 20)
        handle.write(b"data" * 1024)
    link = tmp_path / "golden-base.ext4"
    link.symlink_to(versioned.name)
    disk = tmp_path / "vm" / "rootfs.ext4"
    disk.parent.mkdir()
    assert _clone.apply(str(link), str(disk), "present", False, check_mode=True)["action"] == "clone"
    assert not disk.exists()
    steps = _clone.apply(str(link), str(disk), "present", False, check_mode=False)
    assert steps["action"] == "clone" and steps["record"]["version"] == "0123456789abcdef"
    assert disk.stat().st_size == 64 << 20 and disk.stat().st_blocks * 512 < 4 << 20
    assert oct(disk.stat().st_mode & 0o777) == "0o600"
    disk.write_bytes(b"the VM's own data")
    newer = tmp_path / "golden-base-fedcba9876543210.ext4"
    newer.write_bytes(b"new")
    link.unlink()
    link.symlink_to(newer.name)
    kept = _clone.apply(str(link), str(disk), "present", False, check_mode=False)
    assert kept["action"] == "none" and kept["outdated"] and disk.read_bytes() == b"the VM's own data"
    assert _clone.apply(str(link), str(disk), "present", True, check_mode=False)["action"] == "reclone"
    assert disk.read_bytes() == b"new" and _clone.read_record(str(disk))["version"] == "fedcba9876543210"
    assert _clone.apply(None, str(disk), "absent", False, check_mode=False)["action"] == "remove"
    assert not disk.exists() and not Path(str(disk) + _clone.RECORD_SUFFIX).exists()
    assert _clone.apply(None, str(disk), "absent", False, check_mode=False)["action"] == "none"


def test_clone_refuses_a_disk_in_use(tmp_path: Path):
    src = tmp_path / "golden-x-0123456789abcdef.ext4"
    src.write_bytes(b"a")
    disk = tmp_path / "d.ext4"
    _clone.apply(str(src), str(disk), "present", False, check_mode=False)
    with open(disk, "rb") as held:  # another process (as a VMM would) holds the disk open
        holder = subprocess.Popen(["sleep", "60"], stdin=held)
    try:
        with pytest.raises(_clone.CloneError, match=f"open by pid {holder.pid}"):
            _clone.apply(str(src), str(disk), "absent", False, check_mode=False)
        assert disk.exists()
    finally:
        holder.kill()
        holder.wait()
    with pytest.raises(_clone.CloneError, match="cannot resolve"):
        _clone.apply(str(tmp_path / "missing"), str(tmp_path / "e.ext4"), "present", False, check_mode=False)
    assert sorted(os.listdir(tmp_path)) == sorted([src.name, disk.name, disk.name + _clone.RECORD_SUFFIX])


def test_a_unit_that_is_not_enabled_needs_no_install_section():
    unit = {"name": "x.service", "content": "[Service]\nExecStart=/bin/true\n", "enabled": False}
    vms = [{"name": "a", "systemd_units": [unit]}]
    assert vm_plan(vms, PROFILES, DEFAULTS)["errors"] == []


def test_teardown_args_one_task_each_for_vms_taps_and_dirs():
    allocations = {"a": {"ip": "198.18.84.2", "tap": "fc-aaaa"}, "b": {"ip": "198.18.84.3", "tap": "fc-bbbb"}}
    settings = {"state_dir": "/var/lib/microvm", "supervisor": "process", "stop_timeout": "7"}
    removal = vm_teardown_args(["b", "orphan"], allocations, settings)
    assert removal["vms"] == [
        {"name": "b", "state": "absent", "state_dir": "/var/lib/microvm/vms/b", "supervisor": "process", "stop_timeout": 7},
        {"name": "orphan", "state": "absent", "state_dir": "/var/lib/microvm/vms/orphan", "supervisor": "process",
         "stop_timeout": 7}]
    assert removal["taps"] == [{"name": "fc-bbbb"}], "a VM with no allocation has no TAP to remove"
    assert removal["dirs"] == ["/var/lib/microvm/vms/b", "/var/lib/microvm/vms/orphan"]
    assert vm_teardown_args([], allocations, settings) == {"vms": [], "taps": [], "dirs": []}
    with pytest.raises(PlanError, match="must be a list of names"):
        vm_teardown_args("b", allocations, settings)

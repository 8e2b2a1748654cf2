"""VM spec validation and config rendering for fc_vm (no VMM needed)."""
from __future__ import annotations

import pytest

from ansible_collections.microvm.firecracker.plugins.module_utils import _fc_config as fc


@pytest.fixture
def files(tmp_path):
    paths = {}
    for name in ("vmlinux", "initrd", "root.ext4", "data.ext4"):
        path = tmp_path / name
        path.write_bytes(b"x")
        paths[name] = str(path)
    return paths


def params(files, **overrides):
    base = dict(name="vm1", state_dir="/var/lib/firecracker/vms/vm1", kernel=files["vmlinux"],
                initrd=files["initrd"], boot_args=None, vcpu_count=2, mem_size_mib=1024, smt=False,
                cpu_template=None, log_level="Warning", log_path=None, metrics_path=None, console_log=None,
                drives=[{"drive_id": "rootfs", "path": files["root.ext4"], "root": True}],
                network_interfaces=[{"iface_id": "eth0", "tap": "fc-vm1", "guest_mac": "06:00:C6:12:00:02"}],
                mmds=None, mmds_metadata=None, vsock=None, balloon=None)
    base.update(overrides)
    return base


def no_tap_problem(name):
    return None


def build(files, **overrides):
    return fc.build_spec(params(files, **overrides), no_tap_problem)


def test_renders_config_file_format(files):
    spec = build(files)
    config = spec.config
    assert config["boot-source"] == {"kernel_image_path": files["vmlinux"], "initrd_path": files["initrd"],
                                     "boot_args": fc.DEFAULT_BOOT_ARGS}
    assert config["machine-config"] == {"vcpu_count": 2, "mem_size_mib": 1024, "smt": False}
    assert config["drives"] == [{"drive_id": "rootfs", "path_on_host": files["root.ext4"], "is_root_device": True,
                                 "is_read_only": False, "cache_type": "Unsafe", "io_engine": "Sync"}]
    assert config["network-interfaces"] == [{"iface_id": "eth0", "host_dev_name": "fc-vm1",
                                             "guest_mac": "06:00:c6:12:00:02"}]
    assert config["logger"]["log_path"] == "/var/lib/firecracker/vms/vm1/vmm.log"
    assert spec.state_dir == "/var/lib/firecracker/vms/vm1"


@pytest.mark.parametrize("field, value, fragment", [
    ("vcpu_count", 1.5, "vcpu_count: 1.5 is not a whole number"),
    ("vcpu_count", "2.5", "vcpu_count: '2.5' is not a whole number"),
    ("vcpu_count", 0, "vcpu_count: 0 is out of range (1..32)"),
    ("vcpu_count", 33, "vcpu_count: 33 is out of range (1..32)"),
    ("vcpu_count", True, "vcpu_count: True is not a whole number"),
    ("mem_size_mib", 256, "mem_size_mib: 256 is out of range (at least 512)"),
    ("mem_size_mib", 1024.5, "mem_size_mib: 1024.5 is not a whole number"),
    ("name", "bad name", "name: 'bad name' is not a valid VM id"),
    ("name", "-x", "name: '-x' is not a valid VM id"),
    ("boot_args", "console=ttyS0 http_proxy=http://bob:hunter2@proxy:3128", "boot_args: contains what looks like a credential (user:password@)"),
    ("boot_args", "console=ttyS0 agent.token=abc", "boot_args: contains what looks like a credential (a secret-named key)"),
    ("cpu_template", "X9", "cpu_template: 'X9' is not one of"),
    ("kernel", "/nonexistent/vmlinux", "kernel: /nonexistent/vmlinux does not exist"),
    ("state_dir", "/" + "d" * 120, "exceeds 107 bytes"),
])
def test_bad_fields_are_named(files, field, value, fragment):
    with pytest.raises(fc.SpecError, match=None) as err:
        build(files, **{field: value})
    assert fragment in str(err.value)


def test_whole_floats_and_numeric_strings_are_accepted(files):
    spec = build(files, vcpu_count=2.0, mem_size_mib="2048")
    assert spec.config["machine-config"]["vcpu_count"] == 2
    assert spec.config["machine-config"]["mem_size_mib"] == 2048


def test_drive_problems(files):
    two_roots = [{"drive_id": "a", "path": files["root.ext4"], "root": True},
                 {"drive_id": "b", "path": files["data.ext4"], "root": True}]
    with pytest.raises(fc.SpecError, match="more than one root drive \\(a, b\\)"):
        build(files, drives=two_roots)
    with pytest.raises(fc.SpecError, match="no root drive"):
        build(files, drives=[{"drive_id": "a", "path": files["data.ext4"]}])
    dup = [{"drive_id": "a", "path": files["root.ext4"], "root": True}, {"drive_id": "a", "path": files["data.ext4"]}]
    with pytest.raises(fc.SpecError, match="drive_id a is used twice"):
        build(files, drives=dup)
    with pytest.raises(fc.SpecError, match=r"drives\[rootfs\].path: /nope.ext4 does not exist"):
        build(files, drives=[{"drive_id": "rootfs", "path": "/nope.ext4", "root": True}])


@pytest.mark.parametrize("mac, fragment", [
    ("06:00:00:00:00", "is not a MAC address"),
    ("07:00:00:00:00:01", "is a multicast address"),
    ("00:00:00:00:00:00", "all-zero MAC"),
])
def test_mac_validation(files, mac, fragment):
    with pytest.raises(fc.SpecError, match=fragment):
        build(files, network_interfaces=[{"iface_id": "eth0", "tap": "t", "guest_mac": mac}])


def test_all_problems_reported_together_and_tap_checked(files):
    def tap_problem(name):
        return f"TAP {name} does not exist"
    with pytest.raises(fc.SpecError) as err:
        fc.build_spec(params(files, vcpu_count=0.5, network_interfaces=[
            {"iface_id": "eth0", "tap": "fc-x"}, {"iface_id": "eth0", "tap": "fc-y"}]), tap_problem)
    message = str(err.value)
    assert message.startswith("VM vm1: ")
    assert "vcpu_count: 0.5" in message and "TAP fc-x does not exist" in message and "iface_id eth0 is used twice" in message


def test_rate_limiters_and_optional_devices(files):
    spec = build(files, network_interfaces=[{"iface_id": "eth0", "tap": "t",
                                             "rx_rate_limiter": {"bandwidth": {"size": 1000, "refill_time": 100}}}],
                 mmds={"version": "V2"}, mmds_metadata={"token": "s3cret"}, vsock={"guest_cid": 3},
                 balloon={"amount_mib": 64, "deflate_on_oom": True})
    assert spec.config["network-interfaces"][0]["rx_rate_limiter"] == {"bandwidth": {"size": 1000, "refill_time": 100}}
    assert spec.config["mmds-config"] == {"version": "V2", "network_interfaces": ["eth0"]}
    assert "s3cret" not in repr(spec.config), "MMDS contents never go into the config file"
    assert spec.config["vsock"] == {"guest_cid": 3, "uds_path": "/var/lib/firecracker/vms/vm1/vsock.sock"}
    with pytest.raises(fc.SpecError, match="vsock.guest_cid: 2 is out of range"):
        build(files, vsock={"guest_cid": 2})
    with pytest.raises(fc.SpecError, match="unknown keys burst"):
        build(files, drives=[{"drive_id": "r", "path": files["root.ext4"], "root": True, "rate_limiter": {"burst": 1}}])


def test_differences_compare_only_what_was_asked():
    wanted = {"machine-config": {"vcpu_count": 2, "mem_size_mib": 1024},
              "drives": [{"drive_id": "rootfs", "path_on_host": "/a"}],
              "logger": {"level": "Warning"}}
    actual = {"machine-config": {"vcpu_count": 2, "mem_size_mib": 1024, "huge_pages": "None"},
              "drives": [{"drive_id": "rootfs", "path_on_host": "/a", "partuuid": None}], "logger": None}
    assert fc.differences(wanted, actual) == []
    actual["machine-config"]["vcpu_count"] = 1
    actual["drives"].append({"drive_id": "extra", "path_on_host": "/b"})
    assert fc.differences(wanted, actual) == ["machine-config.vcpu_count: 1 -> 2", "drives[extra]: removed"]


def test_removal_spec_needs_only_name():
    spec = fc.removal_spec({"name": "vm1", "state_dir": None, "console_log": None, "log_path": None})
    assert spec.state_dir == "/var/lib/firecracker/vms/vm1" and spec.config == {}

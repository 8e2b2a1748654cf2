"""fc_vm's jail: validation of the jailer option, the config as the jailed VMM sees it, the jailer's argv."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from ansible_collections.microvm.firecracker.plugins.module_utils._jail import (
    JAIL_LOG,
    JAIL_SOCKET,
    JailError,
    build_jail,
    jail_config,
    recorded_jail,
    remove_recorded,
)

CONFIG = {
    "boot-source": {"kernel_image_path": "/g/golden-base.vmlinux", "initrd_path": "/g/golden-base.initrd",
                    "boot_args": "console=ttyS0"},
    "drives": [{"drive_id": "rootfs", "path_on_host": "/v/vm1/rootfs.ext4", "is_root_device": True, "is_read_only": False},
               {"drive_id": "data", "path_on_host": "/d/shared.img", "is_root_device": False, "is_read_only": True}],
    "machine-config": {"vcpu_count": 1, "mem_size_mib": 512, "smt": False},
    "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "fc-c6125002"}],
    "logger": {"log_path": "/v/vm1/vmm.log", "level": "Warning"},
    "vsock": {"guest_cid": 3, "uds_path": "/v/vm1/vsock.sock"},
}


def jail_for(tmp_path: Path, **options) -> tuple[object, list[str]]:
    binary = tmp_path / "firecracker-v1.10.1-x86_64"
    binary.write_text("")
    link = tmp_path / "firecracker"
    link.symlink_to(binary.name)
    problems: list[str] = []
    jail = build_jail({"uid": 4242, "gid": 4243, "chroot_base_dir": "/srv/jailer", **options}, "vm1", str(link), problems)
    return jail, problems


def test_the_jail_is_named_after_the_resolved_binary_and_the_config_sees_only_jail_paths(tmp_path):
    jail, problems = jail_for(tmp_path, cgroups={"cpu.max": "100000 100000"}, resource_limits={"no_file": 4096})
    assert problems == []
    assert jail.root == "/srv/jailer/firecracker-v1.10.1-x86_64/vm1/root"
    jailed = jail_config(CONFIG, jail)
    assert jailed["boot-source"] == {"kernel_image_path": "/boot/kernel", "initrd_path": "/boot/initrd",
                                     "boot_args": "console=ttyS0"}
    assert [d["path_on_host"] for d in jailed["drives"]] == ["/drives/rootfs", "/drives/data"]
    assert jailed["logger"]["log_path"] == JAIL_LOG and jailed["vsock"]["uds_path"] == "/vsock.sock"
    assert jailed["network-interfaces"] == CONFIG["network-interfaces"]
    assert CONFIG["drives"][0]["path_on_host"] == "/v/vm1/rootfs.ext4", "the host config is not modified"
    assert [(p.source, p.jail_path, p.writable) for p in jail.placements] == [
        ("/g/golden-base.vmlinux", "/boot/kernel", False), ("/g/golden-base.initrd", "/boot/initrd", False),
        ("/v/vm1/rootfs.ext4", "/drives/rootfs", True), ("/d/shared.img", "/drives/data", False)]
    assert jail.host_path(JAIL_SOCKET) == jail.root + "/run/firecracker.socket"
    assert jail.jail_path(jail.root + "/snapshot/vm.mem") == "/snapshot/vm.mem"
    with pytest.raises(JailError, match="outside the jail"):
        jail.jail_path("/etc/passwd")


def test_the_jailer_command_line(tmp_path):
    jail, _problems = jail_for(tmp_path, cgroups={"memory.max": "1073741824", "cpu.max": "100000 100000"},
                               parent_cgroup="fc.slice", resource_limits={"no_file": 4096, "fsize": 1048576})
    argv = jail.argv("/run/netns/lab", ["--api-sock", JAIL_SOCKET, "--config-file", "/config.json"])
    assert argv == [
        "/usr/local/bin/jailer", "--id", "vm1", "--exec-file", str(tmp_path / "firecracker"),
        "--uid", "4242", "--gid", "4243", "--chroot-base-dir", "/srv/jailer", "--cgroup-version", "2",
        "--parent-cgroup", "fc.slice", "--cgroup", "cpu.max=100000 100000", "--cgroup", "memory.max=1073741824",
        "--resource-limit", "fsize=1048576", "--resource-limit", "no-file=4096", "--netns", "/run/netns/lab",
        "--", "--api-sock", JAIL_SOCKET, "--config-file", "/config.json"]
    assert jail.made_by_jailer() == ["dev", "firecracker-v1.10.1-x86_64", "firecracker-v1.10.1-x86_64.pid"]


@pytest.mark.parametrize("options, fragment", [
    ({"uid": 0}, "jailer.uid: 0 is not allowed"),
    ({"gid": "x"}, "jailer.gid: 'x' is not a whole number"),
    ({"chroot_base_dir": "srv/jailer"}, "jailer.chroot_base_dir: srv/jailer is not an absolute path"),
    ({"parent_cgroup": "../escape"}, "jailer.parent_cgroup: '../escape' is not a relative cgroup path"),
    ({"cgroups": {"memory max": "1"}}, "is not a cgroup v2 file name"),
    ({"cgroups": {"memory.max": "1\n2"}}, "jailer.cgroups.memory.max"),
    ({"resource_limits": {"cpu": 1}}, "jailer.resource_limits: 'cpu' is not one of fsize, no_file"),
    ({"resource_limits": {"fsize": "big"}}, "jailer.resource_limits.fsize: 'big' is not a whole number"),
    ({"chroot_base_dir": "/" + "b" * 80}, "exceeds 107 bytes"),
])
def test_each_jailer_problem_is_named(tmp_path, options, fragment):
    _jail, problems = jail_for(tmp_path, **options)
    assert any(fragment in problem for problem in problems), problems


def test_a_binary_the_jailer_would_refuse(tmp_path):
    problems: list[str] = []
    build_jail({"uid": 1, "gid": 1}, "vm1", str(tmp_path / "fc-standin"), problems)
    assert problems and "whose file name contains 'firecracker'" in problems[0]


def test_removal_needs_the_marker_and_the_recorded_directories(tmp_path):
    jail_dir = tmp_path / "firecracker-v1" / "vm1"
    (jail_dir / "root" / "run").mkdir(parents=True)
    recorded = recorded_jail(str(jail_dir))
    assert recorded.root == str(jail_dir / "root") and recorded.vm_id == "vm1"
    with pytest.raises(JailError, match="refusing to delete a jail fc_vm did not make"):
        remove_recorded(str(jail_dir), [])
    assert jail_dir.exists()
    (jail_dir / ".fc_vm_jail").write_text("vm1\n")
    cgroup = tmp_path / "cg" / "firecracker-v1" / "vm1"
    cgroup.mkdir(parents=True)
    busy_parent_sibling = cgroup.parent / "vm2"
    busy_parent_sibling.mkdir()
    remove_recorded(str(jail_dir), [str(cgroup), str(cgroup.parent)])
    assert not jail_dir.exists() and not cgroup.exists()
    assert cgroup.parent.exists(), "a parent still holding another VM's cgroup stays"
    assert os.listdir(cgroup.parent) == ["vm2"]

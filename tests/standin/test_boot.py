"""fc-standin boots real guests with QEMU TCG (Debian cloud kernel + busybox initramfs).

These tests need qemu-system-x86_64 (Debian package qemu-system-x86) and
Debian's package mirror (the kernel and busybox are fetched with apt-get
download once per session)."""
from __future__ import annotations

import json
import re
import signal
import subprocess
from pathlib import Path

from standin_support import pid_alive, wait_for

POST_BOOT = "The requested operation is not supported after starting the microVM."
BOOT_TIMEOUT = 60


def make_image(path: Path, head: bytes, size: int = 1 << 20) -> Path:
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(size)
    return path


def disk_tick(path: Path) -> int:
    m = re.match(rb"FCSI-DISK-TICK (\d{8})", path.read_bytes()[:32])
    return int(m.group(1)) if m else 0


def ticks(p) -> list[int]:
    return [int(x) for x in re.findall(r"FCSI-TICK (\d+)", p.output())]


def assert_no_qemu_left(pids: list[int]) -> None:
    wait_for(lambda: not any(pid_alive(q) for q in pids), 15, f"QEMU pids {pids} to exit")


def test_boot_console_and_poweroff(spawn, guest, tmp_path):
    metrics = tmp_path / "metrics.json"
    metrics.write_text("")
    p = spawn("--id", "boot-test")
    p.ok("PUT", "/boot-source", guest.boot_source("poweroff"))
    p.ok("PUT", "/machine-config", {"vcpu_count": 2, "mem_size_mib": 192})
    p.ok("PUT", "/balloon", {"amount_mib": 16, "deflate_on_oom": True})
    p.ok("PUT", "/entropy", {})
    p.ok("PUT", "/metrics", {"metrics_path": str(metrics)})
    p.ok("PUT", "/actions", {"action_type": "InstanceStart"})
    qemu = p.qemu_pids()
    assert qemu, "fc-standin should have started QEMU"
    # pre-boot-only calls are now rejected, and InstanceStart only works once
    r = p.put("/actions", {"action_type": "InstanceStart"})
    assert (r.status, r.fault) == (400, POST_BOOT)
    for path, body in [("/boot-source", guest.boot_source("poweroff")),
                       ("/machine-config", {"vcpu_count": 1, "mem_size_mib": 128}),
                       ("/drives/x", {"drive_id": "x", "is_root_device": False, "path_on_host": "/x"}),
                       ("/logger", {}), ("/vsock", {"guest_cid": 3, "uds_path": "/tmp/x"})]:
        r = p.put(path, body)
        assert (r.status, r.fault) == (400, POST_BOOT), path
    info = p.get("/").json
    assert info["state"] == "Running" and info["id"] == "boot-test"
    cfg = p.get("/vm/config").json
    assert cfg["boot-source"]["kernel_image_path"] == str(guest.bzimage)
    assert cfg["machine-config"]["vcpu_count"] == 2
    assert p.get("/balloon").json["amount_mib"] == 16
    assert p.put("/actions", {"action_type": "FlushMetrics"}).status == 204
    line = json.loads(metrics.read_text().splitlines()[0])
    assert line["put_api_requests"]["actions_count"] >= 1
    # the guest's serial console is fc-standin's stdout; the guest powers off
    assert p.wait(BOOT_TIMEOUT) == 0
    out = p.output()
    assert "FCSI-BOOTED mode=poweroff" in out
    assert "fc-standin exiting successfully. exit_code=0" in out
    assert_no_qemu_left(qemu)
    # like Firecracker, the API socket is left behind
    assert Path(p.api_sock).exists()


def test_config_file_no_api_elf_kernel_and_drives(spawn, guest, tmp_path):
    root = make_image(tmp_path / "root.img", b"ROOT-DISK-AA")
    data = make_image(tmp_path / "data.img", b"DATA-DISK-BB")
    cfg = {
        "boot-source": guest.boot_source("disks", elf=True),
        "drives": [
            {"drive_id": "data", "path_on_host": str(data), "is_root_device": False,
             "is_read_only": False},
            {"drive_id": "rootfs", "path_on_host": str(root), "is_root_device": True,
             "is_read_only": True},
        ],
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 128},
    }
    cfg_path = tmp_path / "vm.json"
    cfg_path.write_text(json.dumps(cfg))
    p = spawn("--config-file", str(cfg_path), "--no-api", api=False)
    assert p.wait(BOOT_TIMEOUT) == 0, p.output()[-3000:]
    out = p.output()
    # the root drive is always the first device (/dev/vda), like Firecracker
    assert re.search(r"FCSI-DISK vda size=2048 ro=1 head=ROOT-DISK-AA", out), out[-3000:]
    assert re.search(r"FCSI-DISK vdb size=2048 ro=0 head=DATA-DISK-BB", out)
    cmdline = re.search(r"FCSI-CMDLINE (.*)", out).group(1)
    assert "fcsi.mode=disks" in cmdline and "root=/dev/vda ro" in cmdline
    assert "Successfully started microvm that was configured from one single json" in out


def test_pause_resume_snapshot_and_restore(spawn, guest, tmp_path):
    root = make_image(tmp_path / "root.img", b"ROOT")
    data = make_image(tmp_path / "data.img", b"")
    snap = tmp_path / "vm.snap"
    mem = tmp_path / "vm.mem"

    p = spawn("--id", "snap-src")
    p.ok("PUT", "/boot-source", guest.boot_source("tick"))
    p.ok("PUT", "/drives/rootfs", {"drive_id": "rootfs", "path_on_host": str(root),
                                   "is_root_device": True, "is_read_only": True})
    p.ok("PUT", "/drives/data", {"drive_id": "data", "path_on_host": str(data),
                                 "is_root_device": False, "is_read_only": False})
    p.ok("PUT", "/actions", {"action_type": "InstanceStart"})
    p.wait_output("FCSI-TICK 2", BOOT_TIMEOUT)
    wait_for(lambda: disk_tick(data) >= 2, 20, "the guest writing its data disk")

    # snapshots need a paused VM
    r = p.put("/snapshot/create", {"snapshot_path": str(snap), "mem_file_path": str(mem)})
    assert (r.status, r.fault) == (400, "Create snapshot error: Cannot save the microVM state: "
                                        "Operation not allowed: save/restore unavailable while running")
    p.ok("PATCH", "/vm", {"state": "Paused"})
    assert p.get("/").json["state"] == "Paused"
    paused_at = max(ticks(p))
    r = p.put("/snapshot/create", {"snapshot_path": str(snap), "mem_file_path": str(mem),
                                   "snapshot_type": "Diff"})
    assert r.fault == ("The requested operation is not supported: Diff snapshots are not "
                       "allowed on uVMs with dirty page tracking disabled.")
    p.ok("PUT", "/snapshot/create", {"snapshot_path": str(snap), "mem_file_path": str(mem)})
    assert snap.stat().st_size > 0 and mem.stat().st_size > 0
    state = json.loads(snap.read_text())
    assert "NOT a Firecracker snapshot" in state["description"]
    assert max(ticks(p)) <= paused_at + 1, "the guest kept running while paused"
    assert p.get("/").json["state"] == "Paused"

    # resume: the guest runs again and can still write its disk
    p.ok("PATCH", "/vm", {"state": "Resumed"})
    assert p.get("/").json["state"] == "Running"
    resumed = max(ticks(p))
    p.wait_output(f"FCSI-TICK {resumed + 2}", 20)
    wait_for(lambda: disk_tick(data) >= resumed + 1, 20, "a disk write after resume")

    # SendCtrlAltDel reaches the guest's init (as SIGINT, like systemd gets it)
    qemu = p.qemu_pids()
    p.ok("PUT", "/actions", {"action_type": "SendCtrlAltDel"})
    assert p.wait(30) == 0
    assert "FCSI-CTRL-ALT-DEL" in p.output()
    assert_no_qemu_left(qemu)

    # restore in a fresh process
    q = spawn("--id", "snap-dst")
    q.ok("PUT", "/logger", {"level": "Info"})   # logger/metrics are allowed before a load
    r = q.put("/snapshot/load", {"snapshot_path": str(snap),
                                 "mem_backend": {"backend_path": str(mem), "backend_type": "File"}})
    assert r.status == 204, r
    assert q.get("/").json["state"] == "Paused"
    cfg = q.get("/vm/config").json
    assert cfg["boot-source"] == {"kernel_image_path": "", "initrd_path": None, "boot_args": None}
    assert [d["drive_id"] for d in cfg["drives"]] == ["rootfs", "data"]
    r = q.put("/snapshot/load", {"snapshot_path": str(snap), "mem_file_path": str(mem)})
    assert (r.status, r.fault) == (400, POST_BOOT)
    assert "FCSI-TICK" not in q.output()
    q.ok("PATCH", "/vm", {"state": "Resumed"})
    q.wait_output("FCSI-TICK", 20, count=2)
    restored = ticks(q)
    # the guest continues from the snapshot, it did not boot again
    assert restored[0] == paused_at + 1 or restored[0] == paused_at + 2, (paused_at, restored)
    assert "FCSI-BOOTED" not in q.output()
    q.ok("PUT", "/actions", {"action_type": "SendCtrlAltDel"})
    assert q.wait(30) == 0
    assert "FCSI-CTRL-ALT-DEL" in q.output()


def test_patch_drive_and_sigterm(spawn, guest, tmp_path):
    first = make_image(tmp_path / "first.img", b"")
    second = make_image(tmp_path / "second.img", b"")
    root = make_image(tmp_path / "root.img", b"ROOT")
    p = spawn()
    p.ok("PUT", "/boot-source", guest.boot_source("tick"))
    p.ok("PUT", "/drives/rootfs", {"drive_id": "rootfs", "path_on_host": str(root),
                                   "is_root_device": True, "is_read_only": True})
    p.ok("PUT", "/drives/scratch", {"drive_id": "scratch", "path_on_host": str(first),
                                    "is_root_device": False, "is_read_only": False})
    p.ok("PUT", "/actions", {"action_type": "InstanceStart"})
    wait_for(lambda: disk_tick(first) >= 1, BOOT_TIMEOUT, "a tick on the first image")
    r = p.patch("/drives/nope", {"drive_id": "nope", "path_on_host": str(second)})
    assert r.fault == ("Drive config error: Unable to patch the block device: Device manager "
                       "error: Failed to find the device on the bus. Please verify the request "
                       "arguments.")
    p.ok("PATCH", "/drives/scratch", {"drive_id": "scratch", "path_on_host": str(second)})
    wait_for(lambda: disk_tick(second) >= 1, 20, "ticks landing on the patched image")
    cfg = p.get("/vm/config").json
    assert cfg["drives"][1]["path_on_host"] == str(second)

    qemu = p.qemu_pids()
    assert qemu
    p.proc.send_signal(signal.SIGTERM)
    assert p.wait(20) == -signal.SIGTERM
    assert_no_qemu_left(qemu)


def test_qemu_dies_with_a_killed_stand_in(spawn, guest):
    p = spawn()
    p.ok("PUT", "/boot-source", guest.boot_source("tick"))
    p.ok("PUT", "/actions", {"action_type": "InstanceStart"})
    p.wait_output("FCSI-TICK 1", BOOT_TIMEOUT)
    qemu = p.qemu_pids()
    assert qemu
    p.proc.kill()
    p.wait(10)
    assert_no_qemu_left(qemu)


def _tap(netns: str, name: str, addr: str | None = None) -> None:
    subprocess.run(["ip", "netns", "exec", netns, "ip", "tuntap", "add", name, "mode", "tap"],
                   check=True)
    subprocess.run(["ip", "netns", "exec", netns, "ip", "link", "set", name, "up"], check=True)
    if addr:
        subprocess.run(["ip", "netns", "exec", netns, "ip", "addr", "add", addr, "dev", name],
                       check=True)


def test_network_interface_semantics_in_a_netns(netns, spawn):
    _tap(netns, "fcsitap0")
    p = spawn(netns=netns)
    p.ok("PUT", "/network-interfaces/eth0", {"iface_id": "eth0", "host_dev_name": "fcsitap0",
                                             "guest_mac": "06:00:C6:12:00:02"})
    r = p.put("/network-interfaces/eth1", {"iface_id": "eth1", "host_dev_name": "fcsitap1",
                                           "guest_mac": "06:00:c6:12:00:02"})
    assert r.fault == "Network config error: The MAC address is already in use: 06:00:c6:12:00:02"
    r = p.put("/network-interfaces/eth1", {"iface_id": "eth1",
                                           "host_dev_name": "a-very-long-tap-name"})
    assert r.fault == ("Network config error: Could not create the network device: Open tap "
                       "device failed: Invalid interface name")
    # a second VMM cannot attach the TAP that the first one holds
    q = spawn(netns=netns)
    r = q.put("/network-interfaces/eth0", {"iface_id": "eth0", "host_dev_name": "fcsitap0"})
    assert r.fault == ("Network config error: Could not create the network device: Open tap "
                       "device failed: Error while creating ifreq structure: Device or resource "
                       "busy (os error 16). Invalid TUN/TAP Backend provided by fcsitap0. Check "
                       "our documentation on setting up the network devices.")
    p.ok("PUT", "/mmds/config", {"network_interfaces": ["eth0"], "version": "V2"})
    cfg = p.get("/vm/config").json
    assert cfg["network-interfaces"] == [{"iface_id": "eth0", "host_dev_name": "fcsitap0",
                                          "guest_mac": "06:00:c6:12:00:02",
                                          "rx_rate_limiter": None, "tx_rate_limiter": None}]
    assert cfg["mmds-config"] == {"version": "V2", "network_interfaces": ["eth0"],
                                  "ipv4_address": "169.254.169.254"}


def test_guest_network_through_a_tap(netns, spawn, guest):
    _tap(netns, "fcsitap0", "198.18.0.1/24")
    p = spawn(netns=netns)
    p.ok("PUT", "/boot-source", guest.boot_source(
        "net", "fcsi.ip=198.18.0.2/24 fcsi.gw=198.18.0.1"))
    p.ok("PUT", "/network-interfaces/eth0", {"iface_id": "eth0", "host_dev_name": "fcsitap0",
                                             "guest_mac": "06:00:c6:12:00:02"})
    p.ok("PUT", "/actions", {"action_type": "InstanceStart"})
    assert p.wait(BOOT_TIMEOUT) == 0, p.output()[-3000:]
    out = p.output()
    assert "FCSI-MAC 06:00:c6:12:00:02" in out
    assert "FCSI-PING-OK" in out, out[-3000:]


def test_config_file_with_api_boots_and_serves_the_runtime_api(spawn, guest, tmp_path):
    cfg_path = tmp_path / "vm.json"
    cfg_path.write_text(json.dumps({
        "boot-source": guest.boot_source("tick"),
        "drives": [],
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 128, "track_dirty_pages": True},
        "unknown-top-level-keys": "are ignored, as by Firecracker",
    }))
    p = spawn("--config-file", str(cfg_path), "--id", "cfgapi")
    p.wait_output("FCSI-TICK 1", BOOT_TIMEOUT)
    assert p.get("/").json["state"] == "Running"
    assert p.get("/machine-config").json["track_dirty_pages"] is True
    r = p.put("/actions", {"action_type": "InstanceStart"})
    assert (r.status, r.fault) == (400, POST_BOOT)
    p.ok("PATCH", "/vm", {"state": "Paused"})
    p.ok("PATCH", "/vm", {"state": "Resumed"})
    p.ok("PUT", "/actions", {"action_type": "SendCtrlAltDel"})
    assert p.wait(30) == 0

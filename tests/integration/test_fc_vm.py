"""fc_vm with the Firecracker API stand-in booting the golden image under QEMU TCG.

The lab: a network namespace with a bridge and a TAP made by the networking modules; the VM's
disk is a sparse clone of the session's golden image with a service injected by rootfs_inject
(static address, busybox httpd on 8080 serving the guest's boot id). Every VMM a test starts is
stopped by its PID in teardown, and the namespace is removed.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

import pytest
from conftest import bridge_lab, delete_netns, in_netns, proc_status, stop_vmms, wait_for

REPO = Path(__file__).resolve().parents[2]
STANDIN = str(REPO / "standin" / "fc-standin")
BRIDGE_IP, GUEST_IP, PREFIX = "198.18.70.1", "198.18.70.2", 24
TAP = "fc-vmt0"
MAC = "06:00:c6:12:46:02"
SERVICE = """[Unit]
Description=fc_vm test service
After=network.target

[Service]
ExecStartPre=/bin/sh -c 'mkdir -p /run/www && cat /proc/sys/kernel/random/boot_id > /run/www/boot_id && echo fc-vm-test > /run/www/index.html'
ExecStart=/bin/busybox httpd -f -p 8080 -h /run/www

[Install]
WantedBy=multi-user.target
"""
FAILING = """[Unit]
Description=fc_vm test unit that fails

[Service]
Type=oneshot
ExecStart=/bin/false

[Install]
WantedBy=multi-user.target
"""
NETWORK = f"""[Match]
Name=eth0

[Network]
Address={GUEST_IP}/{PREFIX}
"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory, golden):
    """Namespace + bridge + TAP (via the modules), kernel/initrd/image from the golden build."""
    workdir = tmp_path_factory.mktemp("fcvm")
    netns = bridge_lab(workdir, "fcbr-vm", f"{BRIDGE_IP}/{PREFIX}", [TAP])[0]
    try:
        # The versioned files, not the symlinks: other tests may move the symlinks later.
        yield {"netns": netns, "dir": workdir, "kernel": str(golden.link("vmlinux").resolve()),
               "initrd": str(golden.link("initrd").resolve()), "image": golden.link("ext4").resolve()}
    finally:
        stop_vmms(workdir)
        delete_netns(netns)


def make_disk(lab, ansible, name: str, units: dict[str, str]) -> str:
    disk = lab["dir"] / f"{name}.ext4"
    subprocess.run(["cp", "--sparse=always", str(lab["image"]), str(disk)], check=True)
    result = ansible.run([{"name": "inject", "microvm.firecracker.rootfs_inject": {
        "image": str(disk), "hostname": name,
        "files": [{"path": "/etc/systemd/network/10-eth0.network", "content": NETWORK}],
        "systemd_units": [{"name": unit, "content": content, "enabled": True} for unit, content in units.items()],
    }}])
    assert result.rc == 0, result.output
    return str(disk)


def vm_args(lab, name: str, disk: str, **overrides) -> dict:
    args = {
        "name": name, "netns": lab["netns"], "state_dir": str(lab["dir"] / name), "supervisor": "process",
        "firecracker_bin": STANDIN, "kernel": lab["kernel"], "initrd": lab["initrd"],
        "vcpu_count": 1, "mem_size_mib": 512, "stop_timeout": 20,
        "drives": [{"drive_id": "rootfs", "path": disk, "root": True}],
        "network_interfaces": [{"iface_id": "eth0", "tap": TAP, "guest_mac": MAC}],
        "wait_for": {"host": GUEST_IP, "port": 8080, "http_path": "/index.html", "contains": "fc-vm-test",
                     "timeout": 120},
    }
    args.update(overrides)
    return args


def vm(args: dict, **overrides) -> dict:
    return {"name": "vm", "microvm.firecracker.fc_vm": {**args, **overrides}}


def http(lab, path: str, timeout: float = 3) -> str | None:
    """GET from inside the namespace; None when the guest does not answer."""
    code = ("import sys, urllib.request\n"
            f"print(urllib.request.urlopen('http://{GUEST_IP}:8080{path}', timeout={timeout}).read().decode())")
    proc = in_netns(lab["netns"], "python3", "-c", code, check=False)
    return proc.stdout.strip() if proc.returncode == 0 else None


def pid_running(pid) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def mmds(state_dir: Path) -> object:
    """GET /mmds straight from the VMM's API socket."""
    code = ("import http.client, json, socket, sys\n"
            "class C(http.client.HTTPConnection):\n"
            "    def connect(self):\n"
            "        self.sock = socket.socket(socket.AF_UNIX); self.sock.connect(sys.argv[1])\n"
            "c = C('localhost'); c.request('GET', '/mmds', headers={'Accept': 'application/json'})\n"
            "print(c.getresponse().read().decode())")
    out = subprocess.run(["python3", "-c", code, str(state_dir / "api.sock")], capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out)


SECRET = "tok-4f1b9c0e-not-for-logs"


def test_lifecycle(lab, ansible):
    disk = make_disk(lab, ansible, "vm-life", {"fc-http.service": SERVICE})
    args = vm_args(lab, "vm-life", disk, mmds={"version": "V2"}, mmds_metadata={"agent": {"token": SECRET}})
    state_dir = Path(args["state_dir"])

    check = ansible.run([vm(args)], check=True)
    assert check.rc == 0 and check.task("vm")["changed"] is True, check.output
    assert not state_dir.exists(), "check mode must not create the VM"

    first = ansible.run([vm(args)])
    assert first.rc == 0, first.output
    started = first.task("vm")
    assert started["changed"] and started["state"] == "running" and started["actions"] == ["started"]
    assert started["ready_seconds"] is not None and started["firecracker_version"] == "1.10.1"
    assert http(lab, "/index.html") == "fc-vm-test"
    boot_id = http(lab, "/boot_id")
    pid = started["pid"]
    assert pid_running(pid)
    assert oct(state_dir.stat().st_mode & 0o777) == "0o700"
    assert json.loads((state_dir / "config.json").read_text()) == started["config"]
    assert mmds(state_dir) == {"agent": {"token": SECRET}}
    assert SECRET not in first.output and SECRET not in json.dumps(first.records)
    assert oct((state_dir / "mmds.json").stat().st_mode & 0o777) == "0o600"

    for check_mode in (False, True):
        again = ansible.run([vm(args)], check=check_mode)
        assert again.rc == 0 and again.task("vm")["changed"] is False, again.output
    assert again.task("vm")["pid"] == pid

    rotated = ansible.run([vm(args, mmds_metadata={"agent": {"token": SECRET + "-2"}})])
    assert rotated.rc == 0 and rotated.task("vm")["actions"] == ["MMDS metadata updated"], rotated.output
    assert rotated.task("vm")["pid"] == pid, "metadata is updated live, without a restart"
    assert mmds(state_dir) == {"agent": {"token": SECRET + "-2"}}
    assert SECRET not in rotated.output
    args["mmds_metadata"] = {"agent": {"token": SECRET + "-2"}}

    refused = ansible.run([vm(args, vcpu_count=2, on_change="fail")])
    assert refused.rc != 0
    assert "machine-config.vcpu_count: 1 -> 2" in refused.task("vm")["msg"]
    assert pid_running(pid), "on_change=fail must leave the VM running"

    restarted = ansible.run([vm(args, vcpu_count=2)], diff=True)
    assert restarted.rc == 0, restarted.output
    result = restarted.task("vm")
    assert result["changed"] and result["actions"][-1] == "started" and result["pid"] != pid
    assert result["diff"]["before"]["config"]["machine-config"]["vcpu_count"] == 1
    assert result["diff"]["after"]["config"]["machine-config"]["vcpu_count"] == 2
    assert not pid_running(pid)
    args["vcpu_count"] = 2
    boot_id = http(lab, "/boot_id")
    assert boot_id, "the service answers after the restart"

    paused = ansible.run([vm(args, state="paused")])
    assert paused.rc == 0 and paused.task("vm")["state"] == "paused", paused.output
    assert http(lab, "/index.html", timeout=2) is None, "a paused guest does not answer"
    resumed = ansible.run([vm(args)])
    assert resumed.rc == 0 and resumed.task("vm")["actions"] == ["resumed"], resumed.output
    assert http(lab, "/boot_id") == boot_id

    hibernated = ansible.run([vm(args, state="hibernated")])
    assert hibernated.rc == 0 and hibernated.task("vm")["state"] == "hibernated", hibernated.output
    assert hibernated.task("vm")["pid"] is None
    assert (state_dir / "snapshot" / "vm.mem").exists() and (state_dir / "snapshot" / "vm.state").exists()
    assert http(lab, "/index.html", timeout=2) is None
    again = ansible.run([vm(args, state="hibernated")])
    assert again.rc == 0 and again.task("vm")["changed"] is False, again.output

    woken = ansible.run([vm(args)])
    assert woken.rc == 0, woken.output
    assert woken.task("vm")["actions"] == ["restored from snapshot"]
    assert http(lab, "/boot_id") == boot_id, "the same guest (same boot id) continues after the restore"
    assert not (state_dir / "snapshot").exists(), "snapshot files are removed once restored"
    assert mmds(state_dir) == args["mmds_metadata"], "the metadata is given back after a restore"
    steady = ansible.run([vm(args)])
    assert steady.rc == 0 and steady.task("vm")["changed"] is False, steady.output

    stopped = ansible.run([vm(args, state="stopped")])
    assert stopped.rc == 0 and stopped.task("vm")["state"] == "stopped", stopped.output
    stop_pid = woken.task("vm")["pid"]
    assert not pid_running(stop_pid)
    assert not (state_dir / "api.sock").exists() and (state_dir / "config.json").exists()

    archive = lab["dir"] / "archive"
    removed = ansible.run([vm(args, state="absent", archive_logs_to=str(archive))])
    assert removed.rc == 0 and removed.task("vm")["changed"] is True, removed.output
    assert not state_dir.exists()
    [tarball] = archive.glob("vm-life-*.tar.gz")
    with tarfile.open(tarball) as saved:
        assert {"console.log", "vmm.log", "config.json"} <= set(saved.getnames())
    again = ansible.run([vm(args, state="absent")])
    assert again.rc == 0 and again.task("vm")["changed"] is False


def fails_fast(lab, ansible, args: dict, expected: tuple[str, ...]) -> None:
    """The task fails well before wait_for's timeout, with one of ``expected`` in the console excerpt."""
    started = time.monotonic()
    result = ansible.run([vm(args)])
    elapsed = time.monotonic() - started
    try:
        assert result.rc != 0
        message = result.task("vm")["msg"]
        assert any(text in message for text in expected), message
        assert elapsed < args["wait_for"]["timeout"] / 2, f"failed after {elapsed:.0f}s: not fast"
    finally:
        ansible.run([vm(args, state="absent")])


def test_kernel_panic_fails_fast_with_console_lines(lab, ansible):
    disk = make_disk(lab, ansible, "vm-panic", {"fc-http.service": SERVICE})
    # Without the initrd the Debian kernel has no virtio_blk driver: it cannot mount root and panics.
    fails_fast(lab, ansible, vm_args(lab, "vm-panic", disk, initrd=None),
               ("Kernel panic", "Unable to mount root fs"))


def test_failed_unit_fails_fast_with_console_lines(lab, ansible):
    disk = make_disk(lab, ansible, "vm-unit", {"fc-fail.service": FAILING})
    fails_fast(lab, ansible, vm_args(lab, "vm-unit", disk), ("Failed to start fc-fail.service", "[FAILED]"))


def each_fails_with_its_message(ansible, base: dict, cases: list[tuple[str, dict, str]]):
    """One play, one fc_vm task per (label, overrides, expected message); each must fail with its message."""
    tasks = [{"name": label, "ignore_errors": True, "microvm.firecracker.fc_vm": {**base, **args}}
             for label, args, _message in cases]
    result = ansible.run(tasks)
    for label, _args, message in cases:
        assert result.status(label) == "failed", f"{label}: {result.task(label)}"
        assert message in result.task(label)["msg"], f"{label}: {result.task(label)['msg']}"
    return result


def test_bad_input_fails_before_anything_starts(lab, ansible):
    disk = str(lab["image"])
    base = vm_args(lab, "vm-bad", disk, wait_for=None)
    root = {"drive_id": "rootfs", "path": disk, "root": True}
    cases = [
        ("fractional vcpu", {"vcpu_count": 1.5}, "vcpu_count: 1.5 is not a whole number"),
        ("too many vcpus", {"vcpu_count": 64}, "vcpu_count: 64 is out of range (1..32)"),
        ("memory floor", {"mem_size_mib": 256}, "mem_size_mib: 256 is out of range (at least 512)"),
        ("missing kernel", {"kernel": "/nonexistent/vmlinux"}, "kernel: /nonexistent/vmlinux does not exist"),
        ("missing initrd", {"initrd": "/nonexistent/initrd"}, "initrd: /nonexistent/initrd does not exist"),
        ("missing drive", {"drives": [{"drive_id": "rootfs", "path": "/nonexistent.ext4", "root": True}]},
         "drives[rootfs].path: /nonexistent.ext4 does not exist"),
        ("two root drives", {"drives": [root, {**root, "drive_id": "data"}]}, "more than one root drive (rootfs, data)"),
        ("duplicate drive ids", {"drives": [root, {"drive_id": "rootfs", "path": disk}]}, "drive_id rootfs is used twice"),
        ("missing TAP", {"network_interfaces": [{"iface_id": "eth0", "tap": "fc-nosuch"}]},
         "TAP fc-nosuch does not exist"),
        ("invalid MAC", {"network_interfaces": [{"iface_id": "eth0", "tap": TAP, "guest_mac": "06:00:zz:00:00:01"}]},
         "guest_mac: '06:00:zz:00:00:01' is not a MAC address"),
        ("malformed name", {"name": "vm bad!"}, "name: 'vm bad!' is not a valid VM id"),
        ("credential in boot_args", {"boot_args": "console=ttyS0 http_proxy=http://u:pw@proxy:3128"},
         "boot_args: contains what looks like a credential"),
    ]
    result = each_fails_with_its_message(ansible, base, cases)
    assert "u:pw" not in result.output
    assert not Path(base["state_dir"]).exists(), "nothing may be created for invalid input"


def tap_details(netns: str, name: str) -> dict | None:
    """``ip -d -j link show`` of one link in the namespace, or None when it does not exist."""
    proc = in_netns(netns, "ip", "-d", "-j", "link", "show", "dev", name, check=False)
    return json.loads(proc.stdout)[0] if proc.returncode == 0 else None


def test_launch_script_brings_a_vm_back_after_its_tap_and_bridge_are_gone(lab, ansible, process_reaper):
    """What a host restart does to a VM: the VMM dies and the kernel loses its TAP and bridge, while the
    VM's unit stays enabled. Run as systemd would at boot, the launch script fc_vm wrote waits for the
    bridge (made again here, as the host_network role's boot unit does), recreates the TAP as it was
    (IFF_VNET_HDR, owner, group, MTU, link group, bridge) and starts the VMM: the guest serves again."""
    tap = "fc-vmt1"
    made = ansible.run([{"name": "tap", "microvm.firecracker.tap_vnet_hdr": {
        "netns": lab["netns"], "name": tap, "bridge": "fcbr-vm", "owner": 4242, "group": 4243, "mtu": 1400,
        "link_group": 77}}])
    assert made.rc == 0, made.output
    disk = make_disk(lab, ansible, "vm-boot", {"fc-http.service": SERVICE})
    args = vm_args(lab, "vm-boot", disk, network_interfaces=[{"iface_id": "eth0", "tap": tap, "guest_mac": MAC}])
    state_dir = Path(args["state_dir"])
    before = tap_details(lab["netns"], tap)
    try:
        first = ansible.run([vm(args)])
        assert first.rc == 0, first.output
        boot_id = http(lab, "/boot_id")
        assert boot_id

        # The restart, as far as this VM is concerned.
        os.kill(first.task("vm")["pid"], signal.SIGKILL)
        wait_for(lambda: not pid_running(first.task("vm")["pid"]), 10, "the VMM to die")
        in_netns(lab["netns"], "ip", "link", "del", "dev", tap)
        in_netns(lab["netns"], "ip", "link", "del", "dev", "fcbr-vm")

        launched = subprocess.Popen([str(state_dir / "launch")], stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        process_reaper.append(launched)
        bridge = ansible.run([{"name": "bridge", "microvm.firecracker.fc_bridge": {
            "netns": lab["netns"], "name": "fcbr-vm", "addresses": [f"{BRIDGE_IP}/{PREFIX}"]}}])
        assert bridge.rc == 0, bridge.output

        after = wait_for(lambda: tap_details(lab["netns"], tap), 60, f"the launch script to recreate {tap}")
        for key in ("mtu", "group", "master"):
            assert after.get(key) == before.get(key), (key, before, after)
        want = {k: before["linkinfo"]["info_data"][k] for k in ("type", "vnet_hdr", "multi_queue", "user", "group")}
        got = {k: after["linkinfo"]["info_data"].get(k) for k in want}
        assert got == want and want["vnet_hdr"] is True and want["user"] == 4242, (want, got)

        wait_for(lambda: launched.poll() is not None or (http(lab, "/boot_id") or boot_id) != boot_id, 180,
                 "the guest to boot again and serve")
        assert launched.poll() is None, f"the launch script exited with {launched.returncode}"
        console = Path(first.task("vm")["console_log"]).read_text(errors="replace")
        assert f"fc_vm launch: recreated TAP {tap}" in console
    finally:
        for proc in process_reaper:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=30)
        gone = ansible.run([vm(args, state="absent"),
                            {"name": "tap gone", "microvm.firecracker.tap_vnet_hdr": {
                                "netns": lab["netns"], "name": tap, "state": "absent"}}])
        assert gone.rc == 0, gone.output
    assert not state_dir.exists()


JAILER = str(REPO / "standin" / "jailer-standin")
JAILED_UID = 4242


def cgroup2_mount() -> Path:
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines() if line.split()[2] == "cgroup2"]
    assert mounts, "no cgroup2 hierarchy in /proc/mounts"
    return Path(mounts[0])


def hugetlb_max_file() -> str:
    """hugetlb.<size>.max of the smallest huge page size here (the one cgroup v2 controller this host has)."""
    sizes_kb = sorted(int(d.name.split("-")[1].rstrip("kB")) for d in Path("/sys/kernel/mm/hugepages").iterdir())
    kb = sizes_kb[0]
    return f"hugetlb.{kb // 1048576}GB.max" if kb >= 1048576 else f"hugetlb.{kb // 1024}MB.max"


def jail_base() -> Path:
    """A short chroot base: the API socket's path inside the jail must stay under 108 bytes."""
    base = Path(tempfile.mkdtemp(prefix="fcj", dir="/tmp"))
    base.chmod(0o755)
    return base


def test_jailed_lifecycle(lab, ansible):
    """The VMM under the jailer (its stand-in): unprivileged, in its jail and cgroup, with the TAP it owns;
    idempotent; hibernated and restored with snapshot paths inside the jail; removed with jail and cgroup."""
    tap = "fc-vmj0"
    made = ansible.run([{"name": "tap", "microvm.firecracker.tap_vnet_hdr": {
        "netns": lab["netns"], "name": tap, "bridge": "fcbr-vm", "owner": JAILED_UID, "group": JAILED_UID}}])
    assert made.rc == 0, made.output
    # The jailer only runs a binary whose file name says firecracker: the stand-in under such a name.
    firecracker = lab["dir"] / "firecracker-v1.10.1-standin"
    firecracker.write_bytes(Path(STANDIN).read_bytes())
    firecracker.chmod(0o755)
    disk = make_disk(lab, ansible, "vm-jail", {"fc-http.service": SERVICE})
    base = jail_base()
    limit = hugetlb_max_file()
    jailer = {"uid": JAILED_UID, "gid": JAILED_UID, "jailer_bin": JAILER, "chroot_base_dir": str(base),
              "resource_limits": {"no_file": 4096}, "cgroups": {limit: "0"}}
    subtree_control = cgroup2_mount() / "cgroup.subtree_control"
    controllers_before = set(subtree_control.read_text().split())
    cgroup = cgroup2_mount() / firecracker.name / "vm-jail"
    args = vm_args(lab, "vm-jail", disk, firecracker_bin=str(firecracker), jailer=jailer,
                   network_interfaces=[{"iface_id": "eth0", "tap": tap, "guest_mac": MAC}])
    state_dir = Path(args["state_dir"])
    jail_dir = base / firecracker.name / "vm-jail"
    root = jail_dir / "root"
    try:
        first = ansible.run([vm(args)])
        assert first.rc == 0, first.output
        result = first.task("vm")
        assert result["jail_root"] == str(root) and result["api_socket"] == str(root / "run" / "firecracker.socket")
        assert result["config"]["boot-source"]["kernel_image_path"] == "/boot/kernel"
        assert result["config"]["drives"][0]["path_on_host"] == "/drives/rootfs"
        assert http(lab, "/index.html") == "fc-vm-test"
        pid = result["pid"]
        status = proc_status(pid)
        assert status["Uid"].split()[:2] == [str(JAILED_UID)] * 2 and status["Gid"].split()[:2] == [str(JAILED_UID)] * 2
        assert os.readlink(f"/proc/{pid}/cwd") == str(root)
        assert "Max open files            4096                 4096" in Path(f"/proc/{pid}/limits").read_text()
        assert os.stat(root / "drives" / "rootfs").st_ino == os.stat(disk).st_ino, "the drive is hard-linked"
        assert os.stat(disk).st_uid == JAILED_UID
        assert oct((root / "config.json").stat().st_mode & 0o777) == "0o640"
        assert os.stat(root / "run" / "firecracker.socket").st_uid == JAILED_UID
        assert (cgroup / limit).read_text().strip() == "0" and str(pid) in (cgroup / "cgroup.procs").read_text().split()

        for check_mode in (False, True):
            again = ansible.run([vm(args)], check=check_mode)
            assert again.rc == 0 and again.task("vm")["changed"] is False, again.output
        assert again.task("vm")["pid"] == pid

        boot_id = http(lab, "/boot_id")
        hibernated = ansible.run([vm(args, state="hibernated")])
        assert hibernated.rc == 0 and hibernated.task("vm")["state"] == "hibernated", hibernated.output
        assert (root / "snapshot" / "vm.mem").exists() and (root / "snapshot" / "vm.state").exists()
        assert os.stat(root / "snapshot" / "vm.mem").st_uid == JAILED_UID
        woken = ansible.run([vm(args)])
        assert woken.rc == 0 and woken.task("vm")["actions"] == ["restored from snapshot"], woken.output
        assert http(lab, "/boot_id") == boot_id, "the same guest continues after the restore in the jail"
        assert proc_status(woken.task("vm")["pid"])["Uid"].split()[0] == str(JAILED_UID)
    finally:
        removed = ansible.run([vm({"name": "vm-jail", "state_dir": str(state_dir), "netns": lab["netns"],
                                   "supervisor": "process"}, state="absent")])
        shutil.rmtree(base, ignore_errors=True)
        for controller in set(subtree_control.read_text().split()) - controllers_before:
            subtree_control.write_text(f"-{controller}\n")  # the jailer enables it at the hierarchy's root
    assert removed.rc == 0 and removed.task("vm")["changed"] is True, removed.output
    assert not state_dir.exists() and not jail_dir.exists()
    assert not cgroup.exists() and not cgroup.parent.exists(), "the VM's cgroup and the jailer's default parent"
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                assert str(root) not in os.readlink(proc / "cwd"), f"a process is left in the jail: {proc.name}"
            except OSError:
                pass
    gone = ansible.run([{"name": "tap gone", "microvm.firecracker.tap_vnet_hdr": {
        "netns": lab["netns"], "name": tap, "state": "absent"}}])
    assert gone.rc == 0, gone.output


def test_jailed_bad_input_fails_before_anything_starts(lab, ansible):
    disk = str(lab["image"])
    base = Path("/tmp") / f"fcj-never-{os.getpid()}"
    jailer = {"uid": JAILED_UID, "gid": JAILED_UID, "jailer_bin": JAILER, "chroot_base_dir": str(base)}
    firecracker = lab["dir"] / "firecracker-bad"
    firecracker.write_bytes(Path(STANDIN).read_bytes())
    firecracker.chmod(0o755)
    common = vm_args(lab, "vm-jbad", disk, wait_for=None, firecracker_bin=str(firecracker), jailer=jailer)
    cases = [
        ("TAP without the VMM's owner", {}, f"TAP {TAP} has no owner, but the jailed VMM runs as uid {JAILED_UID}"),
        ("root VMM", {"jailer": {**jailer, "uid": 0}}, "jailer.uid: 0 is not allowed"),
        ("log outside the jail", {"log_path": "/tmp/vmm.log"}, "log_path: not with jailer"),
        ("binary the jailer refuses", {"firecracker_bin": STANDIN}, "whose file name contains 'firecracker'"),
        ("bad cgroup file", {"jailer": {**jailer, "cgroups": {"memory max": "1"}}}, "is not a cgroup v2 file name"),
    ]
    each_fails_with_its_message(ansible, common, cases)
    assert not Path(common["state_dir"]).exists() and not base.exists(), "nothing may be created"

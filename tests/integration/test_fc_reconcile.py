"""fc_reconcile against real leftovers: TAPs on a bridge in a network namespace, VM directories written by fc_vm,
VMM processes (the Firecracker stand-in, started like fc_vm's launch script starts the VMM, holding its TAP open
after a real PUT /network-interfaces), a real dnsmasq with a lease file, and the allocator's state.

The lab: VM "keep" is live (allocation, fc_vm directory, running VMM holding its TAP, DHCP lease) and must survive
every run untouched. The leftovers: a stale allocation ("stale", no directory) with its TAP and lease, a TAP nobody
allocated, a lease nobody allocated, a directory the replaced system left ("old"), a VM directory without an
allocation whose VMM still runs ("ghost"), and the VMM of a VM whose directory was deleted under it ("gone"),
still holding its TAP. Everything runs in the test's namespace and is stopped by PID in teardown.

A jailed VM (fc_vm with the jailer stand-in, booting the golden image) is checked on its own: intact it has no
orphans; with its allocation and directory deleted behind fc_vm's back, its VMM and TAP are orphans.
"""
from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest
from conftest import assert_each_fails, in_netns, wait_for

REPO = Path(__file__).resolve().parents[2]
STANDIN = str(REPO / "standin" / "fc-standin")
JAILER = str(REPO / "standin" / "jailer-standin")
JAILED_UID = 4242
NET = "198.18.96"
BRIDGE = "fcbr-rc"
CIDR = f"{NET}.0/24"
KEEP_TAP, STALE_TAP = "fc-c6126002", "fc-c6126003"  # the allocator's names for .2 and .3
LOOSE_TAP, GONE_TAP = "fc-c6126063", "fc-c6126064"
KEEP_MAC, STALE_MAC, LOOSE_MAC = "06:00:c6:12:60:02", "06:00:c6:12:60:03", "06:00:c6:12:60:63"


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=5)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(self.path)


def api_put(sock: Path, path: str, body: dict) -> None:
    conn = UnixHTTPConnection(str(sock))
    try:
        conn.request("PUT", path, json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        text = response.read().decode()
    finally:
        conn.close()
    assert response.status == 204, f"PUT {path}: {response.status} {text}"


def alive(proc: subprocess.Popen) -> bool:
    return proc.poll() is None


def links(netns: str) -> dict[str, dict]:
    return {link["ifname"]: link for link in json.loads(in_netns(netns, "ip", "-j", "-d", "link", "show").stdout)}


def carrier(netns: str, name: str) -> str:
    return in_netns(netns, "cat", f"/sys/class/net/{name}/carrier").stdout.strip()


def start_vmm(lab: dict, name: str, tap: str | None) -> subprocess.Popen:
    """The VMM as fc_vm's launch script runs it (nsenter into the namespace, exec the binary with --api-sock in
    the VM directory and --id), configured through the API: PUT /network-interfaces opens the TAP, as in
    Firecracker."""
    vm_dir = lab["state"] / "vms" / name
    sock = vm_dir / "api.sock"
    with open(vm_dir / "console.log", "ab") as console:
        proc = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{lab['netns']}", "--", STANDIN, "--api-sock", str(sock), "--id", name],
            stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT, start_new_session=True)
    lab["reaper"].append(proc)
    wait_for(lambda: sock.exists() or not alive(proc), 10, f"API socket of VMM {name}")
    assert alive(proc), (vm_dir / "console.log").read_text()
    if tap:
        api_put(sock, "/network-interfaces/eth0", {"iface_id": "eth0", "host_dev_name": tap})
        wait_for(lambda: carrier(lab["netns"], tap) == "1", 5, f"{tap} held open by VMM {name}")
    return proc


def fc_vm_files(lab: dict, name: str, tap: str | None, mac: str | None) -> dict:
    """fc_vm state=stopped: the VM directory exactly as fc_vm writes it (marker, config.json, launch script)."""
    interfaces = [{"iface_id": "eth0", "tap": tap, "guest_mac": mac}] if tap else []
    return {"name": f"files {name}", "microvm.firecracker.fc_vm": {
        "name": name, "state": "stopped", "netns": lab["netns"], "state_dir": str(lab["state"] / "vms" / name),
        "supervisor": "process", "firecracker_bin": STANDIN, "kernel": str(lab["kernel"]),
        "drives": [{"drive_id": "rootfs", "path": str(lab["disk"]), "root": True}],
        "network_interfaces": interfaces}}


def write_leases(path: Path, entries: list[tuple[str, str, str]]) -> None:
    path.write_text("".join(f"1895923186 {mac} {ip} {host} *\n" for mac, ip, host in entries))


def start_dnsmasq(lab: dict) -> subprocess.Popen:
    log = lab["dir"] / "dnsmasq.log"
    proc = subprocess.Popen(
        ["ip", "netns", "exec", lab["netns"], "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null",
         "--port=0", "--bind-interfaces", f"--interface={BRIDGE}", "--except-interface=lo", "--user=root",
         f"--dhcp-range={NET}.2,{NET}.200,255.255.255.0,12h", f"--dhcp-leasefile={lab['leases']}",
         "--pid-file=", "--no-hosts", "--no-resolv", f"--log-facility={log}", "--log-dhcp"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lab["reaper"].append(proc)
    wait_for(lambda: not alive(proc) or (log.exists() and "sockets bound exclusively" in log.read_text()), 10,
             "dnsmasq serving the bridge")
    assert alive(proc), proc.stderr.read() if proc.stderr else ""
    return proc


@pytest.fixture
def lab(tmp_path, netns, ansible, process_reaper):
    in_netns(netns, "ip", "link", "add", BRIDGE, "type", "bridge")
    in_netns(netns, "ip", "addr", "add", f"{NET}.1/24", "dev", BRIDGE)
    in_netns(netns, "ip", "link", "set", BRIDGE, "up")
    lab = {"netns": netns, "dir": tmp_path, "state": tmp_path / "state", "leases": tmp_path / "dnsmasq.leases",
           "kernel": tmp_path / "vmlinux", "disk": tmp_path / "rootfs.ext4", "reaper": process_reaper}
    lab["kernel"].write_bytes(b"not booted here")
    lab["disk"].write_bytes(b"")
    setup = ansible.run([
        {"name": "alloc", "microvm.firecracker.fc_allocation": {
            "cidr": CIDR, "state_dir": str(lab["state"]), "names": ["keep", "stale"]}},
        {"name": "taps", "microvm.firecracker.tap_vnet_hdr": {"netns": netns, "bridge": BRIDGE, "taps": [
            {"name": name} for name in (KEEP_TAP, STALE_TAP, LOOSE_TAP, GONE_TAP)]}},
        fc_vm_files(lab, "keep", KEEP_TAP, KEEP_MAC),
        fc_vm_files(lab, "gone", GONE_TAP, "06:00:c6:12:60:64"),
        fc_vm_files(lab, "ghost", None, None),
    ])
    assert setup.rc == 0, setup.output
    assert setup.task("alloc")["allocations"]["stale"]["tap"] == STALE_TAP
    # Not candidates: another prefix, and a link with the prefix that is not a TAP.
    in_netns(netns, "ip", "tuntap", "add", "dev", "vx-other", "mode", "tap")
    in_netns(netns, "ip", "link", "add", "fc-veth0", "type", "veth", "peer", "name", "vx-veth1")
    # What the replaced system left: a directory with an image in it, no allocation.
    (lab["state"] / "vms" / "old").mkdir()
    with open(lab["state"] / "vms" / "old" / "rootfs.ext4", "wb") as image:
        image.truncate(8 << 30)
    lab["procs"] = {"keep": start_vmm(lab, "keep", KEEP_TAP), "gone": start_vmm(lab, "gone", GONE_TAP),
                    "ghost": start_vmm(lab, "ghost", None)}
    # "gone" was torn down by deleting its directory under the running VMM.
    subprocess.run(["rm", "-rf", str(lab["state"] / "vms" / "gone")], check=True)
    write_leases(lab["leases"], [(KEEP_MAC, f"{NET}.2", "keep"), (STALE_MAC, f"{NET}.3", "stale"),
                                 (LOOSE_MAC, f"{NET}.99", "leaked")])
    lab["dnsmasq"] = start_dnsmasq(lab)
    return lab


def reconcile(lab: dict, **args) -> dict:
    return {"name": "reconcile", "microvm.firecracker.fc_reconcile": {
        "state_dir": str(lab["state"]), "netns": lab["netns"], "bridge": BRIDGE,
        "dhcp_leasefile": str(lab["leases"]), "dhcp_interface": BRIDGE, "stop_timeout": 5, **args}}


def world(lab: dict) -> dict:
    """Everything a run could change, for before/after comparisons."""
    state = lab["state"]
    return {
        "links": sorted(links(lab["netns"])),
        "alive": sorted(name for name, proc in lab["procs"].items() if alive(proc)),
        "dirs": sorted(p.name for p in (state / "vms").iterdir()),
        "allocations": sorted(json.loads((state / "allocations.json").read_text())["allocations"]),
        "leases": sorted(line.split()[2] for line in lab["leases"].read_text().splitlines()),
    }


def names_of(result: dict, key: str) -> dict[str, list[str]]:
    return {kind: sorted(item["name"] for item in items) for kind, items in result[key].items()}


def test_report_check_remove_rerun(lab, ansible):
    pids = {name: proc.pid for name, proc in lab["procs"].items()}
    vms = lab["state"] / "vms"
    expected = {
        "processes": sorted([str(pids["gone"]), str(pids["ghost"])]),
        "taps": [STALE_TAP, LOOSE_TAP, GONE_TAP],
        "leases": [f"{NET}.3", f"{NET}.99"],
        "vm_dirs": sorted([str(vms / "ghost"), str(vms / "old")]),
        "allocations": ["stale"],
    }
    before = world(lab)
    assert before["alive"] == ["ghost", "gone", "keep"] and "gone" not in before["dirs"]

    report = ansible.run([reconcile(lab)])
    assert report.rc == 0, report.output
    result = report.task("reconcile")
    assert result["changed"] is False and names_of(result, "orphans") == expected
    assert all(items == [] for items in result["removed"].values())
    assert world(lab) == before, "a report changes nothing"
    by_name = {item["name"]: item for items in result["orphans"].values() for item in items}
    gone = by_name[str(pids["gone"])]
    assert gone["vm"] == "gone" and f"its VM directory {vms / 'gone'} does not exist" in gone["detail"]
    assert f"--api-sock {vms / 'gone' / 'api.sock'} --id gone" in gone["cmdline"]
    assert "VM ghost has no allocation" in by_name[str(pids["ghost"])]["detail"]
    assert by_name[GONE_TAP]["holders"] == [pids["gone"]] and by_name[GONE_TAP]["bridge"] == BRIDGE
    assert "the TAP of VM stale, whose allocation is stale" in by_name[STALE_TAP]["detail"]
    assert by_name[f"{NET}.99"]["mac"] == LOOSE_MAC and by_name["stale"]["tap"] == STALE_TAP

    check = ansible.run([reconcile(lab, remove=True)], check=True)
    assert check.rc == 0, check.output
    predicted = check.task("reconcile")
    assert predicted["changed"] is True and names_of(predicted, "removed") == expected
    assert all(items == [] for items in predicted["left_in_place"].values())
    assert world(lab) == before, "check mode changes nothing"

    real = ansible.run([reconcile(lab, remove=True)])
    assert real.rc == 0, real.output
    removed = real.task("reconcile")
    assert removed["changed"] is True and names_of(removed, "removed") == expected
    notes = {item["name"]: item.get("note") for item in removed["removed"]["processes"]}
    assert notes == {str(pids["gone"]): "stopped (SIGTERM)", str(pids["ghost"]): "stopped (SIGTERM)"}
    after = world(lab)
    assert after == {
        "links": sorted(set(before["links"]) - {STALE_TAP, LOOSE_TAP, GONE_TAP}),
        "alive": ["keep"],
        "dirs": ["keep"],
        "allocations": ["keep"],
        "leases": [f"{NET}.2"],
    }
    assert carrier(lab["netns"], KEEP_TAP) == "1", "the live VM's VMM still holds its TAP"
    assert (vms / "keep" / "api.sock").exists() and (vms / "keep" / "config.json").exists()
    assert links(lab["netns"])[KEEP_TAP].get("master") == BRIDGE

    for check_mode in (False, True):
        again = ansible.run([reconcile(lab, remove=True)], check=check_mode)
        assert again.rc == 0, again.output
        rerun = again.task("reconcile")
        assert rerun["changed"] is False, rerun
        assert all(items == [] for items in rerun["orphans"].values()), rerun["orphans"]
    assert world(lab) == after


def test_in_use_tap_kinds_vms_and_bridge_filter(lab, ansible):
    """A TAP held by some other process is reported, never deleted; kinds limits the work; vms keeps listed
    allocations; the bridge filter ignores TAPs elsewhere."""
    netns = lab["netns"]
    in_netns(netns, "ip", "tuntap", "add", "dev", "fc-held", "mode", "tap")
    in_netns(netns, "ip", "link", "set", "fc-held", "master", BRIDGE)
    in_netns(netns, "ip", "tuntap", "add", "dev", "fc-nobridge", "mode", "tap")
    holder_code = ("import fcntl, os, struct, sys\n"
                   "fd = os.open('/dev/net/tun', os.O_RDWR)\n"
                   "fcntl.ioctl(fd, 0x400454CA, struct.pack('16sH22x', b'fc-held', 0x1002))\n"
                   "print('held', flush=True)\n"
                   "sys.stdin.read()\n")
    holder = subprocess.Popen(["ip", "netns", "exec", netns, "python3", "-c", holder_code], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    lab["reaper"].append(holder)
    assert holder.stdout.readline().strip() == "held"

    result = ansible.run([reconcile(lab, remove=True, kinds=["taps", "allocations"], vms=["stale"])])
    assert result.rc == 0, result.output
    out = result.task("reconcile")
    assert set(out["orphans"]) == {"taps", "allocations"}
    assert names_of(out, "removed") == {"taps": [LOOSE_TAP], "allocations": []}, "stale is listed in vms"
    skipped = {item["name"]: item["reason"] for item in out["left_in_place"]["taps"]}
    assert set(skipped) == {"fc-held", GONE_TAP}
    assert f"held open by pid {holder.pid} (" in skipped["fc-held"] and "python3 -c import fcntl" in skipped["fc-held"]
    assert "refusing to delete a TAP in use" in skipped["fc-held"] and "\n" not in skipped["fc-held"]
    assert "add 'processes' to kinds to stop it first" in skipped[GONE_TAP]
    assert "left in place: held open by pid" in result.output
    present = links(netns)
    assert {"fc-held", "fc-nobridge", GONE_TAP, STALE_TAP} <= set(present) and LOOSE_TAP not in present
    assert alive(lab["procs"]["gone"]), "processes were not asked for"
    assert world(lab)["dirs"] == ["ghost", "keep", "old"] and world(lab)["leases"] == [f"{NET}.2", f"{NET}.3", f"{NET}.99"]
    holder.stdin.close()
    holder.wait(timeout=10)


def test_lease_release_without_dnsmasq_fails_clearly(lab, ansible):
    lab["dnsmasq"].terminate()
    lab["dnsmasq"].wait(timeout=10)
    result = ansible.run([reconcile(lab, remove=True, kinds=["leases"])])
    assert result.rc != 0
    message = result.task("reconcile")["msg"]
    assert f"lease {NET}.99 ({LOOSE_MAC}): dnsmasq did not drop it from {lab['leases']}" in message
    assert f"is dnsmasq running, serving {BRIDGE}" in message
    assert world(lab)["leases"] == [f"{NET}.2", f"{NET}.3", f"{NET}.99"]


def test_bad_settings_fail_before_anything_is_touched(lab, ansible):
    bad = lab["dir"] / "bad"
    (bad / "vms" / "x").mkdir(parents=True)
    (bad / "allocations.json").write_text("{not json")
    before = world(lab)
    base = {"state_dir": str(lab["state"]), "netns": lab["netns"]}
    assert_each_fails(ansible, "microvm.firecracker.fc_reconcile", [
        ("missing netns", {**base, "netns": "fct-nosuch"}, "netns fct-nosuch: no such network namespace"),
        ("missing bridge", {**base, "bridge": "nosuch0"}, f"bridge nosuch0: no such device in netns {lab['netns']}"),
        ("leases without interface", {**base, "remove": True, "dhcp_leasefile": str(lab["leases"])},
         "dhcp_interface: required to release leases"),
        ("interface not there", {**base, "remove": True, "dhcp_leasefile": str(lab["leases"]),
                                 "dhcp_interface": "nosuch0"}, "dhcp_interface nosuch0: no such interface in netns"),
        ("empty prefix", {**base, "tap_prefix": ""}, "tap_prefix: must not be empty"),
        ("missing state_dir", {**base, "state_dir": str(lab["dir"] / "nosuch"), "remove": True},
         "does not exist; refusing to remove anything"),
        ("damaged allocations", {**base, "state_dir": str(bad), "remove": True}, "cannot read the allocations"),
    ])
    assert world(lab) == before
    assert (bad / "vms" / "x").is_dir()


def start_time_of(pid: int) -> int | None:
    """/proc/<pid>/stat's start time; None once the process is gone (or a zombie)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else int(fields[19])


def parent_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def test_jailed_vm_intact_then_orphaned(lab, ansible, golden):
    """fc_vm runs VM jvm under the jailer (stand-in): its config and API socket are in its jail, its VMM's
    --api-sock is a jail path. Intact, nothing of it is an orphan (its TAP is not the allocation's: only the
    jail's config.json and its recognised VMM protect it). Then its allocation and directory are deleted behind
    fc_vm's back: the jailed VMM (still running) and its TAP are orphans, and are removed."""
    netns, vms = lab["netns"], lab["state"] / "vms"
    tap = "fc-jail0"
    allocated = ansible.run([{"name": "alloc", "microvm.firecracker.fc_allocation": {
        "cidr": CIDR, "state_dir": str(lab["state"]), "names": ["keep", "stale", "jvm"]}}])
    assert allocated.rc == 0, allocated.output
    mac = allocated.task("alloc")["allocations"]["jvm"]["mac"]
    made = ansible.run([{"name": "tap", "microvm.firecracker.tap_vnet_hdr": {
        "netns": netns, "name": tap, "bridge": BRIDGE, "owner": JAILED_UID, "group": JAILED_UID}}])
    assert made.rc == 0, made.output
    # The jailer only runs a binary whose file name says firecracker: the stand-in under such a name.
    firecracker = lab["dir"] / "firecracker-v1.10.1-standin"
    firecracker.write_bytes(Path(STANDIN).read_bytes())
    firecracker.chmod(0o755)
    disk = lab["dir"] / "jvm.ext4"
    subprocess.run(["cp", "--sparse=always", str(golden.link("ext4").resolve()), str(disk)], check=True)
    # A short chroot base: the API socket's path inside the jail must stay under 108 bytes.
    base = Path(tempfile.mkdtemp(prefix="fcj", dir="/tmp"))
    base.chmod(0o755)
    jail_root = base / firecracker.name / "jvm" / "root"
    pid = None
    try:
        started = ansible.run([{"name": "vm", "microvm.firecracker.fc_vm": {
            "name": "jvm", "netns": netns, "state_dir": str(vms / "jvm"), "supervisor": "process",
            "firecracker_bin": str(firecracker), "kernel": str(golden.link("vmlinux").resolve()),
            "initrd": str(golden.link("initrd").resolve()), "vcpu_count": 1, "mem_size_mib": 512,
            "drives": [{"drive_id": "rootfs", "path": str(disk), "root": True}],
            "network_interfaces": [{"iface_id": "eth0", "tap": tap, "guest_mac": mac}],
            "jailer": {"uid": JAILED_UID, "gid": JAILED_UID, "jailer_bin": JAILER, "chroot_base_dir": str(base)}}}])
        assert started.rc == 0, started.output
        pid = started.task("vm")["pid"]
        born = start_time_of(pid)
        assert born is not None and os.readlink(f"/proc/{pid}/cwd") == str(jail_root)
        assert "--api-sock /run/firecracker.socket" in " ".join(Path(f"/proc/{pid}/cmdline").read_text().split("\0"))
        assert not (vms / "jvm" / "config.json").exists() and (jail_root / "config.json").exists()
        wait_for(lambda: carrier(netns, tap) == "1", 30, f"{tap} held open by the jailed VMM")

        intact = ansible.run([reconcile(lab)])
        assert intact.rc == 0, intact.output
        orphans = intact.task("reconcile")["orphans"]
        assert [p for p in orphans["processes"] if p["pid"] == pid or p["vm"] == "jvm"] == []
        assert tap not in [t["name"] for t in orphans["taps"]], orphans["taps"]
        assert str(vms / "jvm") not in [d["name"] for d in orphans["vm_dirs"]]
        assert "jvm" not in [a["name"] for a in orphans["allocations"]]
        assert mac not in [lease["mac"] for lease in orphans["leases"]]

        # A crash or a botched manual clean-up: the allocation and the VM directory go, the VMM stays.
        released = ansible.run([{"name": "release", "microvm.firecracker.fc_allocation": {
            "cidr": CIDR, "state_dir": str(lab["state"]), "names": ["jvm"], "state": "absent"}}])
        assert released.rc == 0, released.output
        shutil.rmtree(vms / "jvm")
        assert start_time_of(pid) == born

        report = ansible.run([reconcile(lab, kinds=["processes", "taps"])])
        assert report.rc == 0, report.output
        found = report.task("reconcile")["orphans"]
        [jailed] = [p for p in found["processes"] if p["pid"] == pid]
        assert jailed["vm"] == "jvm" and jailed["vm_id"] == "jvm", jailed
        assert f"its VM directory {vms / 'jvm'} does not exist" in jailed["detail"]
        assert "--api-sock /run/firecracker.socket" in jailed["cmdline"]
        [held] = [t for t in found["taps"] if t["name"] == tap]
        # Firecracker holds its TAP itself; the stand-in hands it to its QEMU, a child of the VMM.
        assert held["holders"] and all(h == pid or parent_of(h) == pid for h in held["holders"]), held
        assert "of VM jvm)" in held["detail"], held
        assert start_time_of(pid) == born, "a report stops nothing"

        removed = ansible.run([reconcile(lab, remove=True, kinds=["processes", "taps"])])
        assert removed.rc == 0, removed.output
        done = removed.task("reconcile")["removed"]
        assert {p["pid"]: p.get("note") for p in done["processes"]}[pid] == "stopped (SIGTERM)"
        assert tap in [t["name"] for t in done["taps"]]
        assert start_time_of(pid) is None, "the jailed VMM is stopped"
        assert tap not in links(netns)
        assert alive(lab["procs"]["keep"]) and carrier(netns, KEEP_TAP) == "1", "the live VM is untouched"
    finally:
        if pid is not None and start_time_of(pid) is not None:
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda: start_time_of(pid) is None, 10, f"the jailed VMM {pid} to die")
        if (vms / "jvm").exists():
            gone = ansible.run([{"name": "vm", "microvm.firecracker.fc_vm": {
                "name": "jvm", "state_dir": str(vms / "jvm"), "netns": netns, "supervisor": "process",
                "state": "absent"}}])
            assert gone.rc == 0, gone.output
        # Nothing records the jail once its VM directory is gone: it is this test's to remove.
        shutil.rmtree(base, ignore_errors=True)
        disk.unlink(missing_ok=True)

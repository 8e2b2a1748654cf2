"""fc_vms: many VMs in one task, each with fc_vm's semantics, their readiness awaited together.

The lab (as test_fc_vm.py's, on its own bridge, TAPs and addresses): a network namespace with a bridge and
one TAP per VM made by the networking modules; each VM's disk is a sparse clone of the session's golden
image with a static address and a service (or a failing unit) injected by rootfs_inject; the VMM is the
Firecracker API stand-in booting it under QEMU TCG. Every VMM a test starts is stopped by its PID in
teardown, and the namespace is removed.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from conftest import bridge_lab, delete_netns, in_netns, stop_vmms
from test_fc_vm import FAILING, SERVICE, STANDIN, pid_running

BRIDGE, BRIDGE_IP, PREFIX = "fcbr-vms", "198.18.71.1", 24
# name -> (TAP, guest address, MAC)
GUESTS = {
    "vms-a": ("fc-vms0", "198.18.71.2", "06:00:c6:12:47:02"),
    "vms-b": ("fc-vms1", "198.18.71.3", "06:00:c6:12:47:03"),
    "vms-c": ("fc-vms2", "198.18.71.4", "06:00:c6:12:47:04"),
}
SECRET = "tok-71b2e4aa-not-for-logs"


@pytest.fixture(scope="module")
def lab(tmp_path_factory, golden):
    """Namespace + bridge + one TAP per guest (via the modules), kernel/initrd/image from the golden build."""
    workdir = tmp_path_factory.mktemp("fcvms")
    netns, runner = bridge_lab(workdir, BRIDGE, f"{BRIDGE_IP}/{PREFIX}", [tap for tap, _ip, _mac in GUESTS.values()])
    try:
        yield {"netns": netns, "dir": workdir, "runner": runner, "kernel": str(golden.link("vmlinux").resolve()),
               "initrd": str(golden.link("initrd").resolve()), "image": golden.link("ext4").resolve(), "disks": {}}
    finally:
        stop_vmms(workdir)
        delete_netns(netns)


def disk(lab, name: str, unit: str = "fc-http.service", content: str = SERVICE) -> str:
    """The guest's disk: the golden image with its address and ``unit`` injected (made once per name)."""
    key = (name, unit)
    if key not in lab["disks"]:
        path = lab["dir"] / f"{name}-{unit}.ext4"
        subprocess.run(["cp", "--sparse=always", str(lab["image"]), str(path)], check=True)
        network = f"[Match]\nName=eth0\n\n[Network]\nAddress={GUESTS[name][1]}/{PREFIX}\n"
        result = lab["runner"].run([{"name": "inject", "microvm.firecracker.rootfs_inject": {
            "image": str(path), "hostname": name,
            "files": [{"path": "/etc/systemd/network/10-eth0.network", "content": network}],
            "systemd_units": [{"name": unit, "content": content, "enabled": True}],
        }}])
        assert result.rc == 0, result.output
        lab["disks"][key] = str(path)
    return lab["disks"][key]


def element(lab, name: str, disk_path: str | None = None, **overrides) -> dict:
    """One element of ``vms``: fc_vm's options (no netns) for guest ``name``."""
    tap, address, mac = GUESTS[name]
    args = {
        "name": name, "state_dir": str(lab["dir"] / name), "supervisor": "process",
        "firecracker_bin": STANDIN, "kernel": lab["kernel"], "initrd": lab["initrd"],
        "vcpu_count": 1, "mem_size_mib": 512, "stop_timeout": 20,
        "drives": [{"drive_id": "rootfs", "path": disk_path or disk(lab, name), "root": True}],
        "network_interfaces": [{"iface_id": "eth0", "tap": tap, "guest_mac": mac}],
        "wait_for": {"host": address, "port": 8080, "http_path": "/index.html", "contains": "fc-vm-test",
                     "timeout": 120},
    }
    args.update(overrides)
    return args


def vms(lab, elements: list[dict], **options) -> dict:
    return {"name": "vms", "microvm.firecracker.fc_vms": {"netns": lab["netns"], "vms": elements, **options}}


def http(lab, name: str, path: str = "/index.html", timeout: float = 3) -> str | None:
    """GET from guest ``name`` inside the namespace; None when it does not answer."""
    code = ("import urllib.request\n"
            f"print(urllib.request.urlopen('http://{GUESTS[name][1]}:8080{path}', timeout={timeout}).read().decode())")
    proc = in_netns(lab["netns"], "python3", "-c", code, check=False)
    return proc.stdout.strip() if proc.returncode == 0 else None


def lab_processes(lab) -> list[str]:
    """Command lines of the processes (VMMs, QEMU) that refer to this lab's directory."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(lab["dir"]) in argv and pid_running(int(entry.name)):
            found.append(f"{entry.name}: {argv}")
    return found


def started_at(pid: int) -> float:
    """When the process started, in seconds since boot."""
    ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    return ticks / os.sysconf("SC_CLK_TCK")


def remove(lab, ansible, names: list[str]) -> None:
    gone = ansible.run([vms(lab, [{"name": name, "state": "absent", "state_dir": str(lab["dir"] / name)}
                                  for name in names])])
    assert gone.rc == 0, gone.output


def test_many_vms_in_one_task(lab, ansible):
    """Check mode predicts, the real run starts both and awaits both, a re-run changes nothing, absent removes."""
    elements = [element(lab, "vms-a", mmds={"version": "V2"}, mmds_metadata={"agent": {"token": SECRET}}),
                element(lab, "vms-b")]
    state_dirs = [Path(e["state_dir"]) for e in elements]
    try:
        check = ansible.run([vms(lab, elements)], check=True)
        assert check.rc == 0, check.output
        predicted = check.task("vms")
        assert predicted["changed"] is True and predicted["failed_names"] == []
        assert [(v["name"], v["state"], v["actions"], v["failed"]) for v in predicted["vms"]] == [
            ("vms-a", "running", ["would start"], False), ("vms-b", "running", ["would start"], False)]
        assert not any(path.exists() for path in state_dirs), "check mode must not create the VMs"
        assert lab_processes(lab) == [], "check mode must not start a VMM"

        first = ansible.run([vms(lab, elements)])
        assert first.rc == 0, first.output
        result = first.task("vms")
        assert result["changed"] is True and result["failed_names"] == []
        assert [v["name"] for v in result["vms"]] == ["vms-a", "vms-b"]
        for record in result["vms"]:
            assert record["failed"] is False and "msg" not in record
            assert record["state"] == "running" and record["actions"] == ["started"] and record["changed"] is True
            assert record["ready_seconds"] is not None and record["api_seconds"] is not None
            assert record["firecracker_version"] == "1.10.1" and record["supervisor"] == "process"
            assert pid_running(record["pid"])
            assert record["config"]["machine-config"]["mem_size_mib"] == 512
        assert http(lab, "vms-a") == "fc-vm-test" and http(lab, "vms-b") == "fc-vm-test"
        first_vm, second_vm = result["vms"]
        first_ready = started_at(first_vm["pid"]) + first_vm["ready_seconds"]
        assert started_at(second_vm["pid"]) < first_ready, "the second VMM starts before the first guest is awaited"
        assert SECRET not in first.output and SECRET not in str(first.records)
        pids = [v["pid"] for v in result["vms"]]

        again = ansible.run([vms(lab, elements)], diff=True)
        assert again.rc == 0, again.output
        steady = again.task("vms")
        assert steady["changed"] is False, steady
        assert [v["pid"] for v in steady["vms"]] == pids
        assert all(v["actions"] == [] and v["ready_seconds"] is not None for v in steady["vms"])
        assert [d["before_header"] for d in steady["diff"]] == ["VM vms-a", "VM vms-b"]
        assert steady["diff"][0]["before"]["state"] == steady["diff"][0]["after"]["state"] == "running"
        check_again = ansible.run([vms(lab, elements)], check=True)
        assert check_again.rc == 0 and check_again.task("vms")["changed"] is False, check_again.output

        removed = ansible.run([vms(lab, [dict(e, state="absent") for e in elements])])
        assert removed.rc == 0, removed.output
        gone = removed.task("vms")
        assert gone["changed"] is True
        assert [(v["name"], v["state"], v["pid"]) for v in gone["vms"]] == [
            ("vms-a", "absent", None), ("vms-b", "absent", None)]
        assert not any(pid_running(pid) for pid in pids)
        assert not any(path.exists() for path in state_dirs)
        again = ansible.run([vms(lab, [dict(e, state="absent") for e in elements])])
        assert again.rc == 0 and again.task("vms")["changed"] is False, again.output
    finally:
        remove(lab, ansible, ["vms-a", "vms-b"])


def test_a_failing_vm_fails_alone(lab, ansible):
    """A guest whose unit fails is reported with its console lines; the other guest is up and reported."""
    elements = [element(lab, "vms-a"), element(lab, "vms-c", disk(lab, "vms-c", "fc-fail.service", FAILING))]
    try:
        result = ansible.run([vms(lab, elements)])
        assert result.rc != 0, result.output
        failed = result.task("vms")
        assert failed["failed_names"] == ["vms-c"], failed
        good, bad = failed["vms"]
        assert good["name"] == "vms-a" and good["failed"] is False and good["state"] == "running"
        assert good["ready_seconds"] is not None and pid_running(good["pid"])
        assert http(lab, "vms-a") == "fc-vm-test"
        assert bad["name"] == "vms-c" and bad["failed"] is True and bad["actions"] == ["started"]
        assert bad["msg"].startswith("VM vms-c: ")
        assert any(text in bad["msg"] for text in ("Failed to start fc-fail.service", "[FAILED]")), bad["msg"]
        assert failed["msg"].startswith("fc_vms: 1 of 2 VMs failed: VM vms-c: "), failed["msg"]
    finally:
        remove(lab, ansible, ["vms-a", "vms-c"])


def test_bad_input_for_one_vm_starts_nothing(lab, ansible):
    """Invalid input (fc_vm's own checks, or the list's) fails the task naming the VM; no VMM starts."""
    good = element(lab, "vms-a")
    cases = [
        ("missing kernel", [good, element(lab, "vms-b", kernel="/nonexistent/vmlinux")],
         "VM vms-b: kernel: /nonexistent/vmlinux does not exist"),
        ("missing TAP", [good, element(lab, "vms-b", network_interfaces=[{"iface_id": "eth0", "tap": "fc-nosuch"}])],
         "TAP fc-nosuch does not exist"),
        ("duplicate names", [good, dict(good, state_dir=str(lab["dir"] / "other"))],
         "vms[1] (VM vms-a): the name vms-a is also given to vms[0]"),
        ("option of a wrong type", [good, element(lab, "vms-b", stop_timeout="soon")], "vms[1] (VM vms-b): "),
        ("no kernel", [good, {"name": "vms-b"}], "vms[1] (VM vms-b): state is running but all of the following"),
        ("netns per VM", [good, element(lab, "vms-b", netns=lab["netns"])], "vms[1] (VM vms-b): netns cannot be set"),
    ]
    tasks = [dict(vms(lab, elements), name=label, ignore_errors=True) for label, elements, _message in cases]
    result = ansible.run(tasks)
    for label, _elements, message in cases:
        assert result.status(label) == "failed", f"{label}: {result.task(label)}"
        assert message in result.task(label)["msg"], f"{label}: {result.task(label)['msg']}"
        assert "nothing was started" in result.task(label)["msg"]
    assert lab_processes(lab) == [], "no VMM may start for invalid input"
    assert not any((lab["dir"] / name).exists() for name in ("vms-a", "vms-b", "other"))

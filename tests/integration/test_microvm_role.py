"""The microvm role's refusals: each bad VM list fails naming the problem, before anything is created.

A lab namespace gets the host network (bridge, firewall, DHCP) from the host_network role; then each
bad input runs the launch playbook, and the lab must be exactly as before: no allocation, no TAP, no
VM directory, no reservation.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import pytest

import netcheck
from conftest import AnsibleRunner, delete_netns, in_netns, new_netns, proc_status

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "playbooks" / "launch.yml"
CIDR = "198.18.84.0/24"


@pytest.fixture
def lab(tmp_path, golden):
    netns = new_netns()
    net_dir = Path(tempfile.mkdtemp(prefix="microvm-role-", dir="/tmp"))
    net_dir.chmod(0o755)  # dnsmasq re-reads its reservations as nobody
    variables = {
        "microvm_target": "localhost", "host_network_netns": netns, "host_network_cidr": CIDR,
        "host_network_bridge": "fcbr-bad", "host_network_nat": False, "host_network_install_packages": False,
        "host_network_config_dir": str(net_dir / "etc"), "host_network_state_dir": str(net_dir / "state"),
        "host_network_sysctl_dir": str(net_dir / "sysctl.d"),
        "microvm_state_dir": str(tmp_path / "state"), "microvm_supervisor": "process",
        "microvm_golden_dir": golden.vars["golden_image_output_dir"], "microvm_golden_image": "ci",
        "microvm_firecracker_bin": str(REPO / "standin" / "fc-standin"),
    }
    runner = AnsibleRunner(tmp_path)
    try:
        result = runner.run_role("microvm.firecracker.host_network", "host_network", extra_vars=variables)
        assert result.rc == 0, result.output
        yield {"netns": netns, "runner": runner, "vars": variables, "net_dir": net_dir, "state": tmp_path / "state"}
    finally:
        for pidfile in net_dir.rglob("*.pid"):
            in_netns(netns, "kill", pidfile.read_text().strip(), check=False)
        delete_netns(netns)
        shutil.rmtree(net_dir, ignore_errors=True)


def reservations(net_dir: Path) -> list[str]:
    return [line for path in net_dir.rglob("dhcp-hosts") for line in path.read_text().splitlines()
            if line.strip() and not line.startswith("#")]


def test_bad_vm_lists_fail_before_anything_is_created(lab):
    in_netns(lab["netns"], "ip", "link", "add", "fc-c6125402", "type", "veth", "peer", "name", "squatter")
    before = netcheck.snapshot(lab["netns"])
    unit = {"name": "x.service", "content": "[Service]\nExecStart=/bin/true\n[Install]\nWantedBy=multi-user.target\n"}
    cases = [
        ("duplicate names", {"microvm_vms": [{"name": "a1"}, {"name": "a1"}]}, "VM a1: the name is used twice"),
        ("invalid environment key", {"microvm_vms": [{"name": "a1", "environment": {"BAD-KEY": "x"}}]},
         "environment key 'BAD-KEY' is not a valid name"),
        ("credential in boot_args", {"microvm_vms": [{"name": "a1", "boot_args": "console=ttyS0 https_proxy=http://u:p4ss@px:3128"}]},
         "boot_args contains what looks like a credential (user:password@)"),
        ("fractional vCPUs and too little memory", {"microvm_vms": [{"name": "a1", "vcpu_count": 1.5, "mem_size_mib": 256}]},
         "vcpu_count: 1.5 is not a whole number"),
        ("unit without content", {"microvm_vms": [{"name": "a1", "systemd_units": [{"name": "x.service"}]}]},
         "give exactly one of content"),
        ("unit that cannot be enabled", {"microvm_vms": [{"name": "a1", "systemd_units": [
            {"name": "x.service", "content": "[Service]\nExecStart=/bin/true\n"}]}]},
         "systemd_units[0]: unit x.service has no WantedBy=, RequiredBy=, UpheldBy= or Alias= in its [Install] section"),
        ("missing golden image", {"microvm_vms": [{"name": "a1", "image": "nope", "systemd_units": [unit]}]},
         "golden image nope not found"),
        ("address exhaustion", {"host_network_pool_start": "198.18.84.10", "host_network_pool_end": "198.18.84.10",
                                "microvm_vms": [{"name": "a1"}, {"name": "a2"}]},
         "pool 198.18.84.10-198.18.84.10 of 198.18.84.0/24 is exhausted"),
        ("TAP name taken by another device", {"microvm_vms": [{"name": "a1"}]},
         "TAP fc-c6125402: a veth link of that name already exists"),
        ("pool outside the CIDR", {"host_network_pool_start": "198.18.85.2", "microvm_vms": [{"name": "a1"}]},
         "pool_start 198.18.85.2 is not a usable host address of 198.18.84.0/24"),
        ("gateway inside the pool", {"host_network_gateway": "198.18.84.20", "microvm_vms": [{"name": "a1"}]},
         "contains the gateway 198.18.84.20"),
    ]
    for label, overrides, expected in cases:
        result = lab["runner"].run_playbook(LAUNCH, extra_vars={**lab["vars"], **overrides})
        message = result.failure()
        assert expected in message, (label, message)
        assert not (lab["state"] / "allocations.json").exists(), label
        assert not (lab["state"] / "vms").exists() or not list((lab["state"] / "vms").iterdir()), label
        assert netcheck.snapshot(lab["netns"]) == before, label
        assert reservations(lab["net_dir"]) == [], label
        assert "p4ss" not in result.output, "a credential is never echoed"


def test_all_problems_are_named_at_once(lab):
    result = lab["runner"].run_playbook(LAUNCH, extra_vars={**lab["vars"], "microvm_vms": [
        {"name": "a1", "vcpu_count": 0}, {"name": "a1"}, {"name": "b_2"}]})
    message = result.failure()
    for fragment in ("VM a1: vcpu_count: 0 is out of range", "VM a1: the name is used twice", "name 'b_2' is not valid"):
        assert fragment in message, message
    assert json.dumps(message).count("VM ") >= 3


def test_check_mode_predicts_a_launch_and_creates_nothing(lab):
    before = netcheck.snapshot(lab["netns"])
    vm = {"name": "c1", "environment": {"TOKEN": "not-shown-1f2e"}, "environment_secret": True,
          "systemd_units": [{"name": "x.service", "content": "[Service]\nExecStart=/bin/true\n[Install]\nWantedBy=multi-user.target\n"}]}
    result = lab["runner"].run_playbook(LAUNCH, check=True, extra_vars={**lab["vars"], "microvm_vms": [vm]})
    assert result.rc == 0, result.output
    changed = {r["task"].split(" : ", 1)[-1] for r in result.records if r["result"].get("changed")}
    for task in ("Allocate addresses, MACs and TAP names", "Create the TAPs on the bridge",
                 "Prepare the VMs' directories and disks (clone, inject)"):
        assert task in changed, (task, sorted(changed))
    assert not (lab["state"] / "allocations.json").exists()
    assert not (lab["state"] / "vms").exists()
    assert netcheck.snapshot(lab["netns"]) == before
    assert reservations(lab["net_dir"]) == []
    assert "not-shown-1f2e" not in result.output and "not-shown-1f2e" not in json.dumps(result.records)


def exited(pid: int) -> bool:
    try:
        return proc_status(pid).get("State", "").startswith("Z")
    except FileNotFoundError:
        return True


START_TASK = "microvm.firecracker.microvm : Start the VMs and await their readiness (console watched for panics and failed units)"


def test_check_mode_predicts_each_task_of_the_real_run(lab):
    """Check mode names the same changed tasks as the real run that follows, fc_vms included: for a new VM
    (TAP and disk not there yet), for a running VM whose injected environment changes (stopped, re-injected,
    started again), and for a VM whose VMM and TAP are gone as after a reboot."""
    unit = {"name": "x.service", "content": "[Service]\nExecStart=/bin/sleep infinity\n[Install]\nWantedBy=multi-user.target\n"}
    before = netcheck.snapshot(lab["netns"])

    def launch(environment: dict[str, str]) -> None:
        variables = {**lab["vars"], "microvm_vms": [{"name": "p1", "environment": environment, "systemd_units": [unit]}]}
        predicted = lab["runner"].run_playbook(LAUNCH, check=True, extra_vars=variables)
        assert predicted.rc == 0, predicted.output
        real = lab["runner"].run_playbook(LAUNCH, extra_vars=variables)
        assert real.rc == 0, real.output
        assert predicted.changed_tasks() == real.changed_tasks(), (predicted.changed_tasks(), real.changed_tasks())
        assert START_TASK in real.changed_tasks(), real.changed_tasks()
        vm_predicted, vm_real = predicted.task(START_TASK)["vms"][0], real.task(START_TASK)["vms"][0]
        done = {"would start": "started", "would stop": "stopped"}
        assert [done.get(action, action) for action in vm_predicted["actions"]] == vm_real["actions"], (vm_predicted, vm_real)
        assert vm_predicted["state"] == vm_real["state"] == "running"

    try:
        launch({"ROUND": "1"})  # new VM
        launch({"ROUND": "2"})  # running VM, environment changed: stopped, re-injected, started again
        pid = int((lab["state"] / "vms" / "p1" / "firecracker.pid").read_text())
        tap = json.loads((lab["state"] / "allocations.json").read_text())["allocations"]["p1"]["tap"]
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while not exited(pid):
            assert time.monotonic() < deadline, f"VMM {pid} did not exit after SIGTERM"
            time.sleep(0.1)
        in_netns(lab["netns"], "ip", "link", "delete", tap)
        launch({"ROUND": "2"})  # as after a reboot: no VMM, no TAP, the disk and its record still there
    finally:
        gone = lab["runner"].run_playbook(REPO / "playbooks" / "teardown.yml",
                                          extra_vars={**lab["vars"], "microvm_vms": [{"name": "p1"}]})
    assert gone.rc == 0, gone.output
    assert netcheck.snapshot(lab["netns"]) == before and reservations(lab["net_dir"]) == []


def test_jailed_vm_launch_rerun_and_teardown(lab, tmp_path):
    """microvm_jailer: the VM runs under the jailer (its stand-in) as its own uid, base + the host part of
    its address, which also owns its TAP; a re-run changes nothing; teardown removes the jail."""
    firecracker = tmp_path / "firecracker-v1.10.1-standin"  # the jailer runs only a binary named firecracker
    firecracker.write_bytes((REPO / "standin" / "fc-standin").read_bytes())
    firecracker.chmod(0o755)
    base = Path(tempfile.mkdtemp(prefix="fcj", dir="/tmp"))  # short: the API socket path in the jail < 108 bytes
    base.chmod(0o755)
    service = ("[Unit]\nAfter=network.target\n[Service]\nExecStartPre=/bin/sh -c 'mkdir -p /run/www && echo jailed > "
               "/run/www/index.html'\nExecStart=/bin/busybox httpd -f -p 8080 -h /run/www\n[Install]\n"
               "WantedBy=multi-user.target\n")
    variables = {**lab["vars"], "microvm_jailer": True, "microvm_jailer_bin": str(REPO / "standin" / "jailer-standin"),
                 "microvm_jailer_chroot_base_dir": str(base), "microvm_jailer_uid_base": 200000,
                 "microvm_firecracker_bin": str(firecracker),
                 "microvm_vms": [{"name": "j1", "systemd_units": [{"name": "web.service", "content": service}],
                                  "wait_for": {"port": 8080, "http_path": "/index.html", "contains": "jailed",
                                               "timeout": 180}}]}
    before = netcheck.snapshot(lab["netns"])
    try:
        first = lab["runner"].run_playbook(LAUNCH, extra_vars=variables)
        assert first.rc == 0, first.output
        allocation = json.loads((lab["state"] / "allocations.json").read_text())["allocations"]["j1"]
        uid = 200000 + int(allocation["ip"].rsplit(".", 1)[1])
        link = json.loads(in_netns(lab["netns"], "ip", "-d", "-j", "link", "show", "dev", allocation["tap"]).stdout)[0]
        assert link["linkinfo"]["info_data"]["user"] == uid and link["linkinfo"]["info_data"]["group"] == uid
        pid = int((lab["state"] / "vms" / "j1" / "firecracker.pid").read_text())
        status = proc_status(pid)
        assert status["Uid"].split()[0] == str(uid), status["Uid"]
        assert Path(f"/proc/{pid}/cwd").resolve() == base / firecracker.name / "j1" / "root"

        again = lab["runner"].run_playbook(LAUNCH, extra_vars=variables)
        assert again.rc == 0 and again.changed_tasks() == [], again.changed_tasks()
    finally:
        gone = lab["runner"].run_playbook(REPO / "playbooks" / "teardown.yml", extra_vars=variables)
        shutil.rmtree(base, ignore_errors=True)
    assert gone.rc == 0, gone.output
    assert not (base / firecracker.name / "j1").exists()
    assert not (lab["state"] / "vms" / "j1").exists()
    assert netcheck.snapshot(lab["netns"]) == before and reservations(lab["net_dir"]) == []

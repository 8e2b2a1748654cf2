"""microvm role: host-side launch time of 4 VMs, and an unchanged re-run, against the first run.

The lab: a network namespace with the host network from the host_network role (bridge, firewall, DHCP),
a golden image built once by the golden_image role (Debian bookworm minbase + busybox, 2 GiB apparent,
cached in benchmarks/results/cache/golden), and the Firecracker API stand-in as the VMM (QEMU TCG).

1. ``first``: launch.yml with N VMs (BENCH_MICROVM_COUNT, default 4), each with an injected HTTP unit
   and environment, without a readiness check: the playbook returns once every VMM says Running, so its
   wall time is the host-side work (allocation, TAPs, reservations, sparse clones, injection, VMM start)
   and none of the guests' own boot. Per-task seconds come from the result_log callback.
2. ``settle`` (not a figure): the same list with ``wait_for`` on the service, so every guest has booted
   and is idle before the re-run is timed.
3. ``rerun``: the same list again, nothing to change (every VM checked: allocation, TAP, reservation,
   disk record, injection fingerprint, ``GET /vm/config``, readiness probe).
4. ``teardown``: teardown.yml for all of them.
The baseline in the same run is ``ansible_noop``: ansible-playbook running one ``ansible.builtin.ping``
against the same inventory (interpreter and controller start-up), which every run pays once. ``empty_launch``
is launch.yml with an empty VM list: the role loaded, the host network settings read and the list checked,
nothing else; every launch, a re-run included, pays at least that.
Targets (issue #5): host-side ≤ 1 s per VM; the unchanged re-run ≤ 25% of the first run.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _bench_common import REPO, collection_tree

VENV_BIN = Path(sys.executable).parent
CACHE = REPO / "benchmarks" / "results" / "cache" / "golden"
CALLBACKS = REPO / "tests" / "integration" / "callback_plugins"
SERVICE = """[Unit]
Description=benchmark service
After=network-online.target
Wants=network-online.target

[Service]
EnvironmentFile=/etc/environment
ExecStartPre=/bin/sh -c 'mkdir -p /run/www && echo "$$BENCH_ID" > /run/www/index.html'
ExecStart=/bin/busybox httpd -f -p 8080 -h /run/www

[Install]
WantedBy=multi-user.target
"""


class Runner:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        home = tmp / "ansible-home"
        home.mkdir()
        self.env = dict(os.environ, ANSIBLE_HOME=str(home), ANSIBLE_LOCAL_TEMP=str(home / "tmp"),
                        ANSIBLE_REMOTE_TMP=str(home / "remote-tmp"),
                        ANSIBLE_COLLECTIONS_PATH=str(collection_tree(tmp)),
                        ANSIBLE_CALLBACK_PLUGINS=str(CALLBACKS), ANSIBLE_CALLBACKS_ENABLED="result_log",
                        ANSIBLE_PYTHON_INTERPRETER=sys.executable, ANSIBLE_NOCOLOR="1")
        self.count = 0

    def playbook(self, playbook: Path, variables: dict[str, Any]) -> tuple[float, list[dict[str, Any]]]:
        self.count += 1
        log = self.tmp / f"results-{self.count}.jsonl"
        argv = [str(VENV_BIN / "ansible-playbook"), "-i", "localhost,", "-c", "local", str(playbook),
                "-e", json.dumps(variables)]
        started = time.monotonic()
        proc = subprocess.run(argv, capture_output=True, text=True, env=dict(self.env, MICROVM_TEST_RESULT_LOG=str(log)),
                              cwd=self.tmp, check=False)
        seconds = time.monotonic() - started
        if proc.returncode != 0:
            raise RuntimeError(f"{playbook.name} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}")
        records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        return seconds, records

    def play(self, tasks: list[dict[str, Any]], variables: dict[str, Any]) -> tuple[float, list[dict[str, Any]]]:
        path = self.tmp / f"play-{self.count + 1}.yml"
        path.write_text(json.dumps([{"hosts": "localhost", "gather_facts": False, "tasks": tasks}]))
        return self.playbook(path, variables)


def slowest(records: list[dict[str, Any]], top: int = 6) -> dict[str, float]:
    totals: dict[str, float] = {}
    for record in records:
        name = record["task"].split(" : ", 1)[-1]
        totals[name] = totals.get(name, 0.0) + record["seconds"]
    return {name: round(seconds, 2) for name, seconds in sorted(totals.items(), key=lambda kv: -kv[1])[:top]}


def run() -> dict[str, Any]:
    count = int(os.environ.get("BENCH_MICROVM_COUNT", "4"))
    tmp = Path(tempfile.mkdtemp(prefix="fcbench-microvm-", dir="/tmp"))
    tmp.chmod(0o755)  # dnsmasq re-reads its reservations as nobody
    netns = f"fcbench-{secrets.token_hex(3)}"
    runner = Runner(tmp)
    session = secrets.token_hex(6)
    golden = {"golden_image_name": "bench", "golden_image_output_dir": str(CACHE / "out"),
              "golden_image_cache_dir": str(CACHE / "cache"), "golden_image_profiles": ["base"],
              "golden_image_extra_packages": ["busybox"], "golden_image_size": "2G"}
    variables = {
        "microvm_target": "localhost", "host_network_netns": netns, "host_network_cidr": "198.18.120.0/24",
        "host_network_bridge": "fcbr-bench", "host_network_nat": False, "host_network_install_packages": False,
        "host_network_config_dir": str(tmp / "etc"), "host_network_state_dir": str(tmp / "net"),
        "host_network_sysctl_dir": str(tmp / "sysctl.d"),
        "microvm_state_dir": str(tmp / "state"), "microvm_supervisor": "process",
        "microvm_golden_dir": golden["golden_image_output_dir"], "microvm_golden_image": "bench",
        "microvm_firecracker_bin": str(REPO / "standin" / "fc-standin"),
    }
    vms = [{"name": f"bench-{i}", "environment": {"BENCH_ID": session},
            "systemd_units": [{"name": "bench.service", "content": SERVICE}]} for i in range(count)]
    waited = [dict(vm, wait_for={"port": 8080, "http_path": "/", "contains": session, "timeout": 300}) for vm in vms]
    subprocess.run(["ip", "netns", "add", netns], check=True)
    # As on any host, loopback is up (dhcp_release's packet to the bridge address is delivered through it).
    subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True)
    try:
        CACHE.mkdir(parents=True, exist_ok=True)
        runner.play([{"ansible.builtin.include_role": {"name": "microvm.firecracker.golden_image"}}], golden)
        runner.play([{"ansible.builtin.include_role": {"name": "microvm.firecracker.host_network"}}], variables)
        noop = runner.play([{"ansible.builtin.ping": {}}], variables)[0]
        launch = REPO / "playbooks" / "launch.yml"
        empty = runner.playbook(launch, {**variables, "microvm_vms": []})[0]
        first, first_records = runner.playbook(launch, {**variables, "microvm_vms": vms})
        runner.playbook(launch, {**variables, "microvm_vms": waited})
        rerun, rerun_records = runner.playbook(launch, {**variables, "microvm_vms": waited})
        changed = [r["task"] for r in rerun_records if r["result"].get("changed")]
        teardown, teardown_records = runner.playbook(REPO / "playbooks" / "teardown.yml",
                                                     {**variables, "microvm_vms": vms, "microvm_teardown_all": True})
    finally:
        for pidfile in [*tmp.rglob("firecracker.pid"), *tmp.rglob("dnsmasq.pid")]:
            try:
                os.kill(int(pidfile.read_text().strip()), signal.SIGKILL)
            except (ValueError, ProcessLookupError):
                pass
        subprocess.run(["ip", "netns", "delete", netns], check=False)
        shutil.rmtree(tmp, ignore_errors=True)
    host_side_per_vm = (first - noop) / count
    return {
        "figures": {
            "vms": count,
            "ansible_noop_s": round(noop, 2),
            "empty_launch_s": round(empty, 2),
            "first_run_s": round(first, 2),
            "host_side_per_vm_s": round(host_side_per_vm, 2),
            "unchanged_rerun_s": round(rerun, 2),
            "unchanged_rerun_changed_tasks": len(changed),
            "teardown_s": round(teardown, 2),
            "first_run_tasks": len(first_records),
            "rerun_tasks": len(rerun_records),
            "rerun_tasks_seconds_sum": round(sum(record["seconds"] for record in rerun_records), 2),
            "first_run_slowest_tasks_s": slowest(first_records),
            "rerun_slowest_tasks_s": slowest(rerun_records),
            "teardown_slowest_tasks_s": slowest(teardown_records),
        },
        "ratios": {
            "rerun_vs_first": round(rerun / first, 2),
            "rerun_minus_noop_vs_first_minus_noop": round((rerun - noop) / (first - noop), 2),
            "empty_launch_vs_first": round(empty / first, 2),
        },
        "targets": {
            "host_side_per_vm_s <= 1.0": host_side_per_vm <= 1.0,
            "rerun_vs_first <= 0.25": rerun / first <= 0.25,
        },
    }

"""Fleet bootstrap: wall time of playbooks/site.yml on 1 host and on 3 hosts, in the same run.

The hosts are the Molecule scenarios' test "VPS" machines: Debian bookworm trees booted with
systemd-nspawn (systemd as PID 1), each in a network namespace of its own, reached over real SSH
(tests/molecule_support/nspawn_hosts.py; no network change in the machine's root namespace). Two sets
are booted before anything is measured: one host (baseline) and three hosts (the fleet), each set on a
fabric of its own. Then ``ansible-playbook playbooks/site.yml`` runs on the single host and on the three
hosts (one run, default forks 5, default linear strategy), with the inventory variables of the Molecule
scenarios (extensions/molecule/shared/group_vars/microvm_hosts.yml: the stand-in from a release-shaped
archive on the controller, host_network with its defaults, each host its own /24 of
198.18.112.0/20 through host_network_fleet_supernet/host_network_fleet_index). The golden image is built once on
the controller before any measurement (the warm cache both runs share) and distributed, so site.yml
runs with ``microvm_site_golden_image: false`` on both sets; then an unchanged re-run of each. As in the
scenarios, the host network lives in the namespace ``microvm`` inside each host (host_network_netns; see
that group_vars file for why), created before the measurements.

Figures: ``site_1_host_s``, ``site_3_hosts_s`` (first runs), ``rerun_1_host_s``, ``rerun_3_hosts_s``
(unchanged re-runs), ``controller_cpu_*`` (CPU seconds of every process of the first runs on the
controller side: ansible-playbook, its forks, ssh, the ProxyCommands), ``hosts_cpu_*`` (CPU seconds
the hosts themselves used during the first runs, from their cgroups), ``boot_*`` (hosts up, not part of
the ratio). Ratio: 3 hosts / 1 host (target <= 1.5: Ansible runs each task on the hosts in parallel, so
a fleet should cost about one host plus the controller's per-host work). The test hosts share this
machine's cores with the controller, so their own work does not run in parallel beyond the core count;
on real hosts only the controller's share grows with the fleet. Requires root and what hack/molecule.sh requires.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from _bench_common import REPO, collection_tree

HELPER = REPO / "tests" / "molecule_support" / "nspawn_hosts.py"
SHARED = REPO / "extensions" / "molecule" / "shared"
SUPERNET = "198.18.112.0/20"


def _ansible_env(tmp: Path, cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("VIRTUAL_ENV", None)
    env.update({
        "ANSIBLE_COLLECTIONS_PATH": str(collection_tree(tmp)),
        "ANSIBLE_HOME": str(tmp / "home"),
        "ANSIBLE_LOCAL_TEMP": str(tmp / "home" / "tmp"),
        "ANSIBLE_REMOTE_TMP": "/tmp/.ansible-bench",
        "ANSIBLE_HOST_KEY_CHECKING": "True",
        "ANSIBLE_PIPELINING": "True",
        "ANSIBLE_PYTHON_INTERPRETER": "/usr/bin/python3",
        "ANSIBLE_SSH_CONTROL_PATH_DIR": str(tmp / "cp"),
        "ANSIBLE_NOCOLOR": "1",
        "MICROVM_MOLECULE_CACHE": str(cache),
        "MOLECULE_PROJECT_DIRECTORY": str(REPO),
        "PATH": f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
    })
    return env


def _playbook(env: dict[str, str], *args: str, cpu: Optional[dict[str, float]] = None) -> float:
    """Run ansible-playbook; its wall time in seconds (it must succeed: a failed run is no figure). With
    ``cpu``, adds the controller's CPU seconds (user + system of ansible-playbook, its forks, ssh and the
    ProxyCommands: every process of the run on the controller side) under ``cpu["s"]``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    proc = subprocess.run([str(Path(sys.executable).parent / "ansible-playbook"), *args], env=env,
                          capture_output=True, text=True, check=False)
    seconds = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if cpu is not None:
        cpu["s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        raise RuntimeError(f"ansible-playbook {' '.join(args)}: exit {proc.returncode}\n{proc.stdout[-6000:]}")
    return seconds


def _up(state: Path, cache: Path, names: list[str], first: int) -> tuple[dict, float]:
    """Boot hosts on a fabric of their own, addresses from 198.18.100.<first> (the two sets get different
    addresses so that SSH connections, whose ControlPersist sockets are keyed by address, never mix)."""
    started = time.monotonic()
    hosts = [{"name": n, "address": f"198.18.100.{first + i}"} for i, n in enumerate(names)]
    proc = subprocess.run([sys.executable, str(HELPER), "up", "--state", str(state), "--cache", str(cache),
                           "--hosts", json.dumps(hosts)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"nspawn_hosts up {names}: {proc.stderr[-4000:]}")
    return json.loads(proc.stdout), time.monotonic() - started


def _hosts_cpu(state: Path) -> float:
    """CPU seconds used so far by a set's hosts (their nspawn cgroups' cpu.stat, unified hierarchy); 0 where
    the hosts run in systemd scopes instead."""
    total = 0.0
    for record in json.loads((state / "state.json").read_text())["hosts"].values():
        for cgroup in record.get("cgroups", []):
            stat = Path(cgroup, "cpu.stat")
            if stat.exists():  # the unified hierarchy's (a hybrid machine also lists name=systemd's)
                for line in stat.read_text().splitlines():
                    if line.startswith("usage_usec "):
                        total += int(line.split()[1]) / 1e6
    return total


def _inventory(directory: Path, booted: dict, first_index: int) -> Path:
    """An inventory directory: the hosts of one set, the scenarios' group_vars, each host's fleet index."""
    directory.mkdir(parents=True)
    hosts = {}
    for offset, host in enumerate(booted["hosts"]):
        hosts[host["name"]] = {
            "ansible_host": host["address"], "ansible_user": "root",
            "ansible_ssh_common_args": f"-F {booted['ssh_config']}",
            "host_network_fleet_supernet": SUPERNET, "host_network_fleet_index": first_index + offset,
        }
    (directory / "hosts.yml").write_text(json.dumps({"microvm_hosts": {"hosts": hosts}}, indent=2) + "\n")
    (directory / "group_vars").symlink_to(SHARED / "group_vars")
    return directory / "hosts.yml"


def run() -> dict:
    if os.geteuid() != 0:
        raise SystemExit("bench_fleet_bootstrap: must run as root (network namespaces, systemd-nspawn)")
    cache = Path(os.environ.get("MICROVM_MOLECULE_CACHE", REPO / "tests" / "output" / "molecule-cache")).resolve()
    tmp = Path(tempfile.mkdtemp(prefix="fcbench-fleet-"))
    states = [tmp / "one", tmp / "three"]
    figures: dict[str, float] = {}
    try:
        env = _ansible_env(tmp, cache)
        # The controller's artifacts (stand-in archive, golden image): built or found in the cache.
        figures["prepare_s"] = round(_playbook(env, "-i", "localhost,", "-c", "local",
                                               str(SHARED / "prepare.yml")), 2)
        one, figures["boot_1_host_s"] = _up(states[0], cache, ["bench-one1"], 11)
        three, figures["boot_3_hosts_s"] = _up(states[1], cache, ["bench-fleet1", "bench-fleet2", "bench-fleet3"], 21)
        inv_one = _inventory(tmp / "inv-one", one, 0)
        inv_three = _inventory(tmp / "inv-three", three, 1)
        # What the container hosts force (extensions/molecule/shared/netns.yml), not timed.
        for inv in (inv_one, inv_three):
            _playbook(env, "-i", str(inv), str(SHARED / "netns.yml"))
        site = str(REPO / "playbooks" / "site.yml")
        cpu_one: dict[str, float] = {}
        cpu_three: dict[str, float] = {}
        hosts_before = _hosts_cpu(states[0])
        figures["site_1_host_s"] = round(_playbook(env, "-i", str(inv_one), site, cpu=cpu_one), 2)
        figures["hosts_cpu_1_host_s"] = round(_hosts_cpu(states[0]) - hosts_before, 2)
        hosts_before = _hosts_cpu(states[1])
        figures["site_3_hosts_s"] = round(_playbook(env, "-i", str(inv_three), site, cpu=cpu_three), 2)
        figures["hosts_cpu_3_hosts_s"] = round(_hosts_cpu(states[1]) - hosts_before, 2)
        figures["controller_cpu_1_host_s"] = round(cpu_one["s"], 2)
        figures["controller_cpu_3_hosts_s"] = round(cpu_three["s"], 2)
        figures["rerun_1_host_s"] = round(_playbook(env, "-i", str(inv_one), site), 2)
        figures["rerun_3_hosts_s"] = round(_playbook(env, "-i", str(inv_three), site), 2)
        for key in ("boot_1_host_s", "boot_3_hosts_s"):
            figures[key] = round(figures[key], 2)
    finally:
        for state in states:
            if (state / "state.json").exists():
                subprocess.run([sys.executable, str(HELPER), "down", "--state", str(state)],
                               capture_output=True, check=False)
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "figures": figures,
        "ratios": {
            "site_3_hosts_vs_1_host": round(figures["site_3_hosts_s"] / figures["site_1_host_s"], 2),
            "rerun_3_hosts_vs_1_host": round(figures["rerun_3_hosts_s"] / figures["rerun_1_host_s"], 2),
        },
        "targets": {"site_3_hosts_vs_1_host": "<= 1.5"},
    }

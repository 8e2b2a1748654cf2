"""Converge 200 TAPs (create + attach to bridge + up): one tap_vnet_hdr task vs ip -batch vs an Ansible loop.

Every measurement runs in its own fresh network namespace, removed afterwards. BENCH_TAP_COUNT
changes the count (default 200).
Figures: wall seconds; the module's own process (run directly, as Ansible runs it on the host)
with its peak RSS; the Ansible task time of one tap_vnet_hdr task, of its unchanged re-run,
and of a loop of one ansible.builtin.command task per TAP.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _bench_common import collection_tree

REPO = Path(__file__).resolve().parents[1]
COUNT = int(os.environ.get("BENCH_TAP_COUNT", "200"))
BRIDGE = "fcbr-bench"
NAMES = [f"fcbn{i:03d}" for i in range(COUNT)]

# The same work through pyroute2 (what the design notes first proposed), for comparison only.
PYROUTE2 = r"""
import json, sys, time
from ansible_collections.microvm.firecracker.plugins.module_utils._netns import enter_netns
enter_netns(sys.argv[1])
from pyroute2 import IPRoute
names = json.loads(sys.argv[2])
started = time.monotonic()
with IPRoute() as ipr:
    bridge = ipr.link_lookup(ifname=sys.argv[3])[0]
    for name in names:
        ipr.link("add", ifname=name, kind="tuntap", mode="tap", ifr={"no_pi": True, "vnet_hdr": True})
        ipr.link("set", index=ipr.link_lookup(ifname=name)[0], master=bridge, state="up")
print(json.dumps(time.monotonic() - started))
"""

# The module's own work, in process: the same calls tap_vnet_hdr.main() makes, timed after the
# imports and the namespace switch (which the module process also pays, see module_process_wall_s).
IN_PROCESS = r"""
import json, sys, time
from ansible_collections.microvm.firecracker.plugins.module_utils import _taps
from ansible_collections.microvm.firecracker.plugins.module_utils._netlink import Netlink
from ansible_collections.microvm.firecracker.plugins.module_utils._netns import enter_netns
params = json.loads(sys.argv[1])
enter_netns(params["netns"])
timings = []
for _ in range(2):
    started = time.monotonic()
    requests = _taps.build_requests(params)
    with Netlink() as netlink:
        links = netlink.links()
        plans = _taps.plan_present(requests, links, False)
        if any(plan.changed for plan in plans):
            _taps.apply(netlink, plans, {req.name: req for req in requests}, links)
        after = netlink.links()
    timings.append(time.monotonic() - started)
print(json.dumps(timings))
"""


def _netns() -> str:
    name = f"fcbench-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "-n", name, "link", "add", BRIDGE, "type", "bridge"], check=True)
    return name


def _drop(name: str) -> None:
    subprocess.run(["ip", "netns", "delete", name], check=False)


def _timed(argv: list[str], **kwargs) -> tuple[float, int]:
    """Wall seconds and peak RSS (KiB) of one child process."""
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, **kwargs)
    _pid, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    elapsed = time.monotonic() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[:3]} exited with {proc.returncode}")
    return elapsed, usage.ru_maxrss


def _verify(netns: str) -> None:
    out = subprocess.run(["ip", "-n", netns, "-j", "-d", "link", "show", "master", BRIDGE],
                         capture_output=True, text=True, check=True).stdout
    ports = [e for e in json.loads(out) if e["ifname"].startswith("fcbn")]
    ok = [e for e in ports if "UP" in e["flags"] and e["linkinfo"]["info_data"].get("vnet_hdr")]
    if len(ok) != COUNT:
        raise RuntimeError(f"expected {COUNT} vnet_hdr TAPs up on {BRIDGE}, found {len(ok)}")


def _ansible(tmp: Path, tree: Path, netns: str, tasks: list[dict], tag: str) -> tuple[float, list[dict]]:
    play = [{"hosts": "localhost", "gather_facts": False, "tasks": tasks}]
    path = tmp / f"{tag}.yml"
    path.write_text(json.dumps(play))
    log = tmp / f"{tag}.jsonl"
    env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=str(tree), ANSIBLE_HOME=str(tmp / "home"),
               ANSIBLE_LOCAL_TEMP=str(tmp / "home" / "tmp"), ANSIBLE_REMOTE_TMP=str(tmp / "home" / "rtmp"),
               ANSIBLE_CALLBACK_PLUGINS=str(REPO / "tests" / "integration" / "callback_plugins"),
               ANSIBLE_CALLBACKS_ENABLED="result_log", MICROVM_TEST_RESULT_LOG=str(log),
               ANSIBLE_PYTHON_INTERPRETER=sys.executable)
    bin_dir = Path(sys.executable).parent
    wall, _rss = _timed([str(bin_dir / "ansible-playbook"), "-i", "localhost,", "-c", "local", str(path)], env=env)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    return wall, records


def run() -> dict:
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="fcbench-") as tmpdir:
        tmp = Path(tmpdir)
        tree = collection_tree(tmp)

        netns = _netns()
        try:
            batch = tmp / "ip.batch"
            batch.write_text("".join(f"tuntap add dev {n} mode tap vnet_hdr\nlink set {n} master {BRIDGE} up\n"
                                     for n in NAMES))
            figures["ip_batch_wall_s"], figures["ip_batch_peak_rss_kib"] = _timed(
                ["ip", "-n", netns, "-batch", str(batch)])
            _verify(netns)
        finally:
            _drop(netns)

        netns = _netns()
        try:
            args = tmp / "args.json"
            args.write_text(json.dumps({"ANSIBLE_MODULE_ARGS": {
                "netns": netns, "bridge": BRIDGE, "taps": [{"name": n} for n in NAMES]}}))
            module = REPO / "plugins" / "modules" / "tap_vnet_hdr.py"
            env = dict(os.environ, PYTHONPATH=str(tree))
            figures["module_process_wall_s"], figures["module_peak_rss_kib"] = _timed(
                [sys.executable, str(module), str(args)], env=env)
            _verify(netns)
            figures["module_unchanged_process_wall_s"], _rss = _timed([sys.executable, str(module), str(args)], env=env)
        finally:
            _drop(netns)

        netns = _netns()
        try:
            params = {"netns": netns, "bridge": BRIDGE, "taps": [{"name": n} for n in NAMES], "name": None,
                      "vnet_hdr": True, "multi_queue": False, "owner": None, "group": None, "mtu": None,
                      "up": True, "link_group": None}
            out = subprocess.run([sys.executable, "-c", IN_PROCESS, json.dumps(params)], check=True,
                                 capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(tree))).stdout
            figures["module_inprocess_work_s"], figures["module_inprocess_unchanged_s"] = json.loads(out)
            _verify(netns)
        finally:
            _drop(netns)

        netns = _netns()
        try:
            out = subprocess.run([sys.executable, "-c", PYROUTE2, netns, json.dumps(NAMES), BRIDGE], check=True,
                                 capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(tree))).stdout
            figures["pyroute2_inprocess_work_s"] = json.loads(out)
            _verify(netns)
        finally:
            _drop(netns)

        netns = _netns()
        try:
            task = {"name": "taps", "microvm.firecracker.tap_vnet_hdr": {
                "netns": netns, "bridge": BRIDGE, "taps": [{"name": n} for n in NAMES]}}
            wall, records = _ansible(tmp, tree, netns, [task], "single")
            _verify(netns)
            figures["single_task_playbook_wall_s"] = wall
            figures["single_task_s"] = records[-1]["seconds"]
            wall, records = _ansible(tmp, tree, netns, [task], "rerun")
            assert records[-1]["result"]["changed"] is False, "the re-run must be unchanged"
            figures["unchanged_rerun_task_s"] = records[-1]["seconds"]
        finally:
            _drop(netns)

        netns = _netns()
        try:
            loop = {"name": "loop", "loop": NAMES, "changed_when": True, "ansible.builtin.command": {"argv": [
                "sh", "-c",
                f"ip -n {netns} tuntap add dev {{{{ item }}}} mode tap vnet_hdr && "
                f"ip -n {netns} link set {{{{ item }}}} master {BRIDGE} up"]}}
            wall, records = _ansible(tmp, tree, netns, [loop], "loop")
            _verify(netns)
            figures["command_loop_playbook_wall_s"] = wall
            figures["command_loop_task_s"] = records[-1]["seconds"]
        finally:
            _drop(netns)

    figures = {k: round(v, 3) if isinstance(v, float) else v for k, v in figures.items()}
    ratios = {
        "module_inprocess_work / ip_batch": round(figures["module_inprocess_work_s"] / figures["ip_batch_wall_s"], 2),
        "pyroute2_inprocess_work / ip_batch": round(figures["pyroute2_inprocess_work_s"] / figures["ip_batch_wall_s"], 2),
        "module_process / ip_batch": round(figures["module_process_wall_s"] / figures["ip_batch_wall_s"], 2),
        "command_loop_task / single_task": round(figures["command_loop_task_s"] / figures["single_task_s"], 1),
    }
    targets = {
        "module work <= 2x ip -batch": ratios["module_inprocess_work / ip_batch"] <= 2,
        "single task >= 20x faster than the loop": ratios["command_loop_task / single_task"] >= 20,
        "unchanged re-run of 200 TAPs < 1 s task time": figures["unchanged_rerun_task_s"] < 1,
    }
    return {"count": COUNT, "figures": figures, "ratios": ratios, "targets": targets}

"""fc_allocation: one allocator per host, persisted under a lock; concurrent runs never collide."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import assert_each_fails

MODULE = Path(__file__).resolve().parents[2] / "plugins" / "modules" / "fc_allocation.py"


def allocation_task(state_dir: Path, **args) -> dict:
    return {"name": "alloc", "microvm.firecracker.fc_allocation": {
        "cidr": "198.18.90.0/24", "state_dir": str(state_dir), **args}}


def test_allocate_check_mode_rerun_diff_release(tmp_path, ansible):
    task = allocation_task(tmp_path, names=["web1", "web2"])
    check = ansible.run([task], check=True, diff=True)
    assert check.rc == 0 and check.task("alloc")["changed"] is True, check.output
    assert not (tmp_path / "allocations.json").exists()

    first = ansible.run([task], diff=True)
    assert first.rc == 0, first.output
    result = first.task("alloc")
    web1 = result["allocations"]["web1"]
    assert (web1["ip"], web1["mac"], web1["tap"], web1["gateway"], web1["prefix"]) == (
        "198.18.90.2", "06:00:c6:12:5a:02", "fc-c6125a02", "198.18.90.1", 24)
    assert result["diff"]["before"] == {"web1": None, "web2": None}
    stored = json.loads((tmp_path / "allocations.json").read_text())["allocations"]
    assert stored == result["all_allocations"]

    for check_mode in (False, True):
        again = ansible.run([task], check=check_mode)
        assert again.rc == 0 and again.task("alloc")["changed"] is False, again.output
        assert again.task("alloc")["allocations"] == result["allocations"]

    released = ansible.run([allocation_task(tmp_path, names=["web1"], state="absent")])
    assert released.rc == 0 and released.task("alloc")["changed_names"] == ["web1"], released.output
    assert "web1" not in json.loads((tmp_path / "allocations.json").read_text())["allocations"]


def test_concurrent_runs_never_hand_out_the_same_address(tmp_path):
    """Eight module processes at once, five new VMs each: forty distinct IPs, MACs and TAPs."""
    tree = os.environ["MICROVM_TEST_COLLECTIONS_PATH"]
    procs = []
    for worker in range(8):
        args = tmp_path / f"args-{worker}.json"
        args.write_text(json.dumps({"ANSIBLE_MODULE_ARGS": {
            "cidr": "198.18.90.0/24", "state_dir": str(tmp_path / "state"),
            "names": [f"w{worker}-vm{i}" for i in range(5)]}}))
        procs.append(subprocess.Popen([sys.executable, str(MODULE), str(args)], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=tree)))
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        results.append(json.loads(out))
    mine = [entry for result in results for entry in result["allocations"].values()]
    assert len(mine) == 40
    for key in ("ip", "mac", "tap"):
        assert len({entry[key] for entry in mine}) == 40, f"duplicate {key}"
    stored = json.loads((tmp_path / "state" / "allocations.json").read_text())["allocations"]
    assert {name: entry["ip"] for name, entry in stored.items()} == {e["name"]: e["ip"] for e in mine}


def test_bad_input_fails_and_writes_nothing(tmp_path, ansible):
    full = tmp_path / "full"
    assert ansible.run([allocation_task(full, cidr="198.18.91.0/29", names=[f"v{i}" for i in range(5)])]).rc == 0
    before = (full / "allocations.json").read_text()
    cases = [
        ("pool outside the CIDR", {"state_dir": str(tmp_path / "a"), "names": ["x"], "pool_start": "198.18.99.10"},
         "pool_start 198.18.99.10 is not a usable host address of 198.18.90.0/24"),
        ("gateway inside the pool", {"state_dir": str(tmp_path / "a"), "names": ["x"], "gateway": "198.18.90.50"},
         "contains the gateway 198.18.90.50"),
        ("duplicate names", {"state_dir": str(tmp_path / "a"), "names": ["x", "x"]}, "VM names listed twice: x"),
        ("exhaustion", {"state_dir": str(full), "cidr": "198.18.91.0/29", "names": ["v5"]},
         "is exhausted (5 addresses, 5 allocated); cannot allocate v5"),
    ]
    assert_each_fails(ansible, "microvm.firecracker.fc_allocation",
                      [(label, {"cidr": "198.18.90.0/24", **args}, message) for label, args, message in cases])
    assert not (tmp_path / "a" / "allocations.json").exists()
    assert (full / "allocations.json").read_text() == before

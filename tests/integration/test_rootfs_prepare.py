"""rootfs_prepare against real ext4 images: a small golden image built with mkfs.ext4 -d (versioned file and
its golden-NAME.ext4 link, as the golden_image role keeps them), VM disks cloned from it and injected, read
back with debugfs. (Stopping a running VM before injecting is proven with real guests by the end-to-end test.)"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import sh

PASSWD = "root:x:0:0:root:/root:/bin/bash\n"
GROUP = "root:x:0:\n"
UNIT = "[Unit]\nDescription=web\n\n[Service]\nExecStart=/bin/true\n\n[Install]\nWantedBy=multi-user.target\n"
PREPARED = "Prepare"


@pytest.fixture
def golden(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    (tree / "etc" / "systemd" / "system").mkdir(parents=True)
    (tree / "etc" / "passwd").write_text(PASSWD)
    (tree / "etc" / "group").write_text(GROUP)
    (tree / "etc" / "hostname").write_text("golden\n")
    (tree / "etc" / "environment").write_text("LANG=C.UTF-8\n")
    versioned = tmp_path / "golden" / "golden-base-00112233445566aa.ext4"
    versioned.parent.mkdir()
    sh("mkfs.ext4", "-q", "-d", str(tree), "-F", str(versioned), "16M")
    link = versioned.parent / "golden-base.ext4"
    link.symlink_to(versioned.name)
    return link


def vm(tmp_path: Path, golden: Path, name: str, **overrides) -> dict:
    vm_dir = tmp_path / "vms" / name
    disk = str(vm_dir / "rootfs.ext4")
    entry = {
        "name": name, "dir": str(vm_dir), "golden": str(golden), "disk": disk,
        "inject": {"image": disk, "hostname": name, "reset_machine_id": True,
                   "environment": {"SESSION_ID": f"s-{name}"}, "environment_secret": False,
                   "systemd_units": [{"name": "web.service", "content": UNIT, "enabled": True}], "files": []},
        "supervisor": "process",
    }
    entry.update(overrides)
    return entry


def prepare(ansible, vms: list[dict], **kwargs):
    return ansible.run([{"name": PREPARED, "ignore_errors": True, "microvm.firecracker.rootfs_prepare": {"vms": vms}}],
                       **kwargs)


def read(image: str, path: str) -> str:
    return subprocess.run(["debugfs", "-R", f"cat {path}", image], capture_output=True, text=True, check=True).stdout


def by_name(result) -> dict[str, dict]:
    return {entry["name"]: entry for entry in result.task(PREPARED)["vms"]}


def test_prepares_new_vms_and_a_rerun_touches_nothing(tmp_path, golden, ansible):
    vms = [vm(tmp_path, golden, "p1"), vm(tmp_path, golden, "p2")]
    first = prepare(ansible, vms)
    assert first.task(PREPARED)["changed"], first.output
    for name, entry in by_name(first).items():
        assert entry["action"] == "clone" and entry["injected"] and not entry["failed"], entry
        assert entry["version"] == "00112233445566aa" and entry["source"] == str(golden.resolve())
        disk = tmp_path / "vms" / name / "rootfs.ext4"
        assert oct((tmp_path / "vms" / name).stat().st_mode & 0o777) == "0o700"
        assert read(str(disk), "/etc/hostname") == f"{name}\n"
        assert f"SESSION_ID=s-{name}" in read(str(disk), "/etc/environment")
        assert read(str(disk), "/etc/systemd/system/web.service") == UNIT
        assert "web.service" in sh("debugfs", "-R", "ls /etc/systemd/system/multi-user.target.wants", str(disk)).stdout
        assert subprocess.run(["e2fsck", "-fn", str(disk)], capture_output=True, check=False).returncode == 0
    stamps = {name: os.stat(tmp_path / "vms" / name / "rootfs.ext4").st_mtime_ns for name in ("p1", "p2")}

    again = prepare(ansible, vms)
    assert again.status(PREPARED) == "ok" and not again.task(PREPARED)["changed"], again.output
    assert all(not entry["changed"] and entry["action"] == "none" for entry in by_name(again).values())
    assert {name: os.stat(tmp_path / "vms" / name / "rootfs.ext4").st_mtime_ns for name in stamps} == stamps, \
        "an unchanged VM's disk is not opened for writing"

    # One VM's environment changes: only its disk is injected again; check mode predicts exactly that.
    vms[1]["inject"]["environment"]["SESSION_ID"] = "rotated"
    predicted = prepare(ansible, vms, check=True)
    assert by_name(predicted)["p2"]["actions"] == ["would inject"] and not by_name(predicted)["p1"]["changed"]
    assert "rotated" not in read(vms[1]["disk"], "/etc/environment")
    changed = prepare(ansible, vms)
    assert by_name(changed)["p2"]["actions"] == ["injected"] and not by_name(changed)["p1"]["changed"]
    assert "SESSION_ID=rotated" in read(vms[1]["disk"], "/etc/environment")
    assert os.stat(vms[0]["disk"]).st_mtime_ns == stamps["p1"]


def test_staged_files_are_part_of_the_fingerprint(tmp_path, golden, ansible):
    staged = tmp_path / "vms" / "st" / "inject" / "file-0"
    staged.parent.mkdir(parents=True)
    staged.write_text("v1\n")
    entry = vm(tmp_path, golden, "st", staged=[str(staged)])
    entry["inject"]["files"] = [{"path": "/opt/agent.txt", "src": str(staged)}]
    assert prepare(ansible, [entry]).task(PREPARED)["changed"]
    assert not prepare(ansible, [entry]).task(PREPARED)["changed"]
    staged.write_text("v2\n")
    result = prepare(ansible, [entry])
    assert by_name(result)["st"]["injected"], result.output
    assert read(entry["disk"], "/opt/agent.txt") == "v2\n"


def test_on_change_fail_refuses_before_anything_and_ignore_warns(tmp_path, golden, ansible):
    fixed, fresh = vm(tmp_path, golden, "fx", on_change="fail"), vm(tmp_path, golden, "nw")
    assert prepare(ansible, [fixed]).task(PREPARED)["changed"]
    fixed["inject"]["environment"]["SESSION_ID"] = "other"
    refused = prepare(ansible, [fresh, fixed])
    assert refused.status(PREPARED) == "failed"
    message = refused.task(PREPARED)["msg"]
    assert message.startswith("rootfs_prepare: nothing was changed: ") and "VM fx:" in message and "on_change is fail" in message
    assert not (tmp_path / "vms" / "nw").exists(), "nothing is touched for any VM when one is refused"
    assert "other" not in read(fixed["disk"], "/etc/environment")

    fixed["on_change"] = "ignore"
    ignored = prepare(ansible, [fixed])
    assert ignored.status(PREPARED) == "ok" and not ignored.task(PREPARED)["changed"], ignored.output
    assert any("on_change is ignore" in warning for warning in ignored.task(PREPARED).get("warnings", []))
    assert "other" not in read(fixed["disk"], "/etc/environment")


def test_a_failing_vm_does_not_stop_the_others_and_secrets_stay_hidden(tmp_path, golden, ansible):
    good = vm(tmp_path, golden, "good")
    good["inject"].update(environment={"TOKEN": "hunter2-9f8e"}, environment_secret=True)
    broken = vm(tmp_path, golden, "broken")
    Path(broken["dir"]).mkdir(parents=True)
    Path(broken["disk"]).write_bytes(b"not an ext4 image" * 1000)  # an existing disk e2fsck refuses
    result = prepare(ansible, [broken, good])
    assert result.status(PREPARED) == "failed"
    task = result.task(PREPARED)
    assert task["failed_names"] == ["broken"], task
    assert task["msg"].startswith("rootfs_prepare: 1 of 2 VMs failed: VM broken: "), task["msg"]
    assert by_name(result)["good"]["injected"] and not by_name(result)["good"]["failed"]
    assert "TOKEN=hunter2-9f8e" in read(good["disk"], "/etc/environment")
    assert "hunter2-9f8e" not in result.output and "hunter2-9f8e" not in json.dumps(result.records)


def test_bad_input_names_the_vm_and_changes_nothing(tmp_path, golden, ansible):
    cases = [
        ("duplicate", [vm(tmp_path, golden, "d1"), vm(tmp_path, golden, "d1")], "vms[1] (VM d1): the name is used by vms[0] too"),
        ("golden", [{**vm(tmp_path, golden, "g1"), "golden": str(golden.parent / "golden-none.ext4")}],
         "vms[0] (VM g1): golden image"),
        ("image", [vm(tmp_path, golden, "i1", inject={"image": "/tmp/other.ext4"})], "is not the VM's disk"),
        ("staged", [vm(tmp_path, golden, "s1", staged=[str(tmp_path / "missing")])], "VM s1: staged file"),
    ]
    for label, vms, expected in cases:
        result = prepare(ansible, vms)
        assert result.status(PREPARED) == "failed", label
        assert expected in result.task(PREPARED)["msg"], (label, result.task(PREPARED)["msg"])
    assert not (tmp_path / "vms").exists()


def test_check_mode_on_new_vms_creates_nothing(tmp_path, golden, ansible):
    result = prepare(ansible, [vm(tmp_path, golden, "c1")], check=True)
    assert result.task(PREPARED)["changed"], result.output
    expected = [f"would create {tmp_path}/vms/c1", "would clone the golden image", "would inject"]
    assert by_name(result)["c1"]["actions"] == expected
    assert not (tmp_path / "vms").exists()

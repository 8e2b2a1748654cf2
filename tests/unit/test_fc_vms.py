"""fc_vms' element checks: each element validated as fc_vm's options, named in every message; duplicate names."""
from __future__ import annotations

import pytest

from ansible_collections.microvm.firecracker.plugins.module_utils import _fc_vm_task
from ansible_collections.microvm.firecracker.plugins.module_utils._fc_vm_task import (
    ARGUMENT_SPEC,
    ELEMENT_SPEC,
    REQUIRED_IF,
    TaskError,
    check_elements,
    element_label,
    run_vms,
)


def vm(name: str, **options) -> dict:
    return {"name": name, "kernel": "/boot/vmlinux", **options}


def test_element_spec_is_fc_vm_spec_without_netns():
    assert "netns" in ARGUMENT_SPEC and "netns" not in ELEMENT_SPEC
    assert set(ARGUMENT_SPEC) - set(ELEMENT_SPEC) == {"netns"}
    assert ELEMENT_SPEC["mmds_metadata"]["no_log"] is True
    assert ("state", "running", ("kernel",)) in REQUIRED_IF


def test_valid_elements_get_fc_vm_defaults():
    checked = check_elements([vm("a"), vm("b", state="stopped", vcpu_count=2)])
    assert checked.errors == []
    first, second = checked.params
    assert first["state"] == "running" and first["mem_size_mib"] == 1024 and first["supervisor"] == "auto"
    assert first["boot_args"] == "console=ttyS0 reboot=k panic=1" and first["drives"] == []
    assert second["state"] == "stopped" and second["vcpu_count"] == 2
    assert "netns" not in first


def test_suboptions_get_their_defaults():
    checked = check_elements([vm("a", drives=[{"drive_id": "rootfs", "path": "/d.ext4", "root": True}])])
    assert checked.errors == []
    assert checked.params[0]["drives"][0]["cache_type"] == "Unsafe"


@pytest.mark.parametrize("element, expected", [
    ({"kernel": "/boot/vmlinux"}, "vms[1]: missing required arguments: name"),
    ({"name": "web"}, "vms[1] (VM web): state is running but all of the following are missing: kernel"),
    (vm("web", state="exploded"), "vms[1] (VM web): value of state must be one of"),
    (vm("web", stop_timeout="soon"), "vms[1] (VM web): argument 'stop_timeout' is of type"),
    (vm("web", drives=[{"path": "/d.ext4"}]), "vms[1] (VM web): missing required arguments: drive_id"),
    (vm("web", colour="blue"), "vms[1] (VM web): Unsupported parameters"),
    (vm("web", netns="other"), "vms[1] (VM web): netns cannot be set per VM"),
    ("web", "vms[1]: 'web' is not a dictionary of fc_vm options"),
])
def test_each_error_names_its_element(element, expected):
    checked = check_elements([vm("ok"), element])
    assert len(checked.errors) >= 1
    assert any(error.startswith(expected) for error in checked.errors), checked.errors
    assert all(not error.startswith("vms[0]") for error in checked.errors)


def test_absent_needs_no_kernel():
    assert check_elements([{"name": "gone", "state": "absent"}]).errors == []


def test_duplicate_names_are_refused_naming_both():
    checked = check_elements([vm("a"), vm("b"), vm("a")])
    assert checked.errors == ["vms[2] (VM a): the name a is also given to vms[0]; each VM must appear once"]


def test_no_log_values_are_collected():
    checked = check_elements([vm("a", mmds_metadata={"agent": {"token": "s3cret-value"}}), vm("b")])
    assert checked.errors == []
    assert "s3cret-value" in checked.no_log_values


@pytest.mark.parametrize("index, element, label", [
    (2, {"name": "web"}, "vms[2] (VM web)"),
    (0, {"name": ""}, "vms[0]"),
    (3, {"name": 5}, "vms[3]"),
    (1, ["x"], "vms[1]"),
])
def test_element_label(index, element, label):
    assert element_label(index, element) == label


def test_run_vms_refuses_bad_input_before_touching_anything(tmp_path):
    """fc_vm's own validation (files, root drive) for every VM before any converge; each VM named."""
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"\0")
    disk = tmp_path / "disk.ext4"
    disk.write_bytes(b"\0")
    good = vm("good", kernel=str(kernel), state_dir=str(tmp_path / "good"),
              drives=[{"drive_id": "rootfs", "path": str(disk), "root": True}])
    bad = vm("bad", kernel=str(tmp_path / "missing"), state_dir=str(tmp_path / "bad"),
             drives=[{"drive_id": "rootfs", "path": str(disk), "root": True}])
    checked = check_elements([good, bad])
    assert checked.errors == []
    with pytest.raises(TaskError) as raised:
        run_vms(checked.params, None, True, False, lambda message: None)
    assert raised.value.msg.startswith("fc_vms: 1 of 2 VMs have invalid input, nothing was started: VM bad")
    assert "kernel" in raised.value.msg and "missing" in raised.value.msg
    assert not (tmp_path / "good").exists() and not (tmp_path / "bad").exists()


def test_deferred_check_records_failure_and_readiness(monkeypatch):
    """run_vms: converge failures and readiness failures are recorded per VM; the others go on."""
    calls = []

    def fake_run_vm(params, check_mode, want_diff, warn, defer_wait=False, prepared=None, assume=None):
        assert defer_wait is True and params["netns"] == "lab"
        calls.append(params["name"])
        if params["name"] == "broken":
            raise TaskError("VM broken: cannot start")
        result = {"changed": True, "state": "running", "ready_seconds": None,
                  "diff": {"before": {"state": "absent"}, "after": {"state": "running"}}}

        def check():
            if params["name"] == "slow":
                raise TaskError("VM slow: 198.18.71.3:8080 did not answer")
            result["ready_seconds"] = 1.5

        return result, check

    monkeypatch.setattr(_fc_vm_task, "run_vm", fake_run_vm)
    monkeypatch.setattr(_fc_vm_task, "validate_vm", lambda params, check_mode, assume: None)
    result = run_vms([{"name": "fast"}, {"name": "broken"}, {"name": "slow"}], "lab", False, True,
                     lambda message: None)
    assert sorted(calls) == ["broken", "fast", "slow"], "every VM converged once (at the same time: any order)"
    assert result["changed"] is True
    assert result["failed_names"] == ["broken", "slow"]
    assert result["msg"] == ("fc_vms: 2 of 3 VMs failed: VM broken: cannot start | "
                             "VM slow: 198.18.71.3:8080 did not answer")
    fast, broken, slow = result["vms"]
    assert fast["name"] == "fast" and fast["failed"] is False and fast["ready_seconds"] == 1.5
    assert broken == {"name": "broken", "failed": True, "msg": "VM broken: cannot start", "changed": False}
    assert slow["failed"] is True and slow["state"] == "running" and slow["ready_seconds"] is None
    assert [d["before_header"] for d in result["diff"]] == ["VM fast", "VM slow"]
    assert "diff" not in fast


def test_a_vm_that_failed_after_it_was_changed_counts_as_changed(monkeypatch):
    """run_vms: a VM whose converge failed once it had started changing the VM (a VMM started, then refused)
    makes the task changed; one that failed before changing anything does not."""
    def fake_run_vm(params, check_mode, want_diff, warn, defer_wait=False, prepared=None, assume=None):
        raise TaskError(f"VM {params['name']}: refused", changed=params["name"] == "halfway")

    monkeypatch.setattr(_fc_vm_task, "run_vm", fake_run_vm)
    monkeypatch.setattr(_fc_vm_task, "validate_vm", lambda params, check_mode, assume: None)
    untouched = run_vms([{"name": "early"}], None, False, False, lambda message: None)
    assert untouched["changed"] is False and untouched["failed_names"] == ["early"]
    halfway = run_vms([{"name": "early"}, {"name": "halfway"}], None, False, False, lambda message: None)
    assert halfway["changed"] is True and halfway["failed_names"] == ["early", "halfway"]
    assert [vm["changed"] for vm in halfway["vms"]] == [False, True]


def test_task_errors_carry_whether_the_vm_was_touched():
    touched = [False]
    with pytest.raises(TaskError) as before:
        with _fc_vm_task._task_errors("v1", touched):
            raise OSError(2, "No such file or directory", "/x")
    assert before.value.changed is False and before.value.msg == "VM v1: No such file or directory: /x"
    touched[0] = True
    with pytest.raises(TaskError) as after:
        with _fc_vm_task._task_errors("v1", touched):
            raise OSError(2, "No such file or directory", "/x")
    assert after.value.changed is True

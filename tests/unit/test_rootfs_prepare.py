"""rootfs_prepare's checks and decisions (no root, no kernel objects): the fingerprint, validation of the
VM list, and what each VM's disk needs."""
from __future__ import annotations

from pathlib import Path

import pytest
from ansible.parsing.dataloader import DataLoader
from ansible.template import Templar

from ansible_collections.microvm.firecracker.plugins.module_utils import _rootfs_prepare


def vm(tmp_path: Path, name: str = "vm1", **overrides) -> dict:
    golden = tmp_path / "golden-base-0123456789abcdef.ext4"
    if not golden.exists():
        golden.write_bytes(b"\0" * 1024)
        (tmp_path / "golden-base.ext4").symlink_to(golden.name)
    vm_dir = tmp_path / "vms" / name
    entry = {
        "name": name, "dir": str(vm_dir), "golden": str(tmp_path / "golden-base.ext4"),
        "disk": str(vm_dir / "rootfs.ext4"),
        "inject": {"image": str(vm_dir / "rootfs.ext4"), "hostname": name, "environment": {"PORT": 8080},
                   "environment_secret": False, "systemd_units": [], "files": [], "reset_machine_id": True},
        "staged": [], "new": False, "on_change": "restart", "supervisor": "process", "stop_timeout": 30,
    }
    entry.update(overrides)
    return entry


def test_fingerprint_is_the_one_the_role_computed_with_jinja(tmp_path):
    staged = [tmp_path / "file-0", tmp_path / "unit-a.service"]
    staged[0].write_bytes(b"agent\n")
    staged[1].write_text("[Service]\nExecStart=/bin/true\n")
    inject = {"image": "/v/rootfs.ext4", "hostname": "vm1", "environment": {"B": "x y", "A": 1, "C": "é"},
              "environment_secret": False, "files": [{"path": "/a", "src": str(staged[0])}],
              "systemd_units": [{"name": "a.service", "src": str(staged[1]), "enabled": True}], "reset_machine_id": True}
    # What launch.yml computed before rootfs_prepare: copy's checksum (sha1) of each staged file.
    templar = Templar(loader=DataLoader(), variables={
        "inject": inject, "checksums": [_sha1(path) for path in staged]})
    expression = "{{ ((inject | to_json(sort_keys=true)) ~ (checksums | join(','))) | hash('sha256') }}"
    expected = templar.template(trusted(expression))
    assert len(expected) == 64
    assert _rootfs_prepare.fingerprint(inject, [str(path) for path in staged]) == expected
    staged[0].write_bytes(b"agent v2\n")
    assert _rootfs_prepare.fingerprint(inject, [str(path) for path in staged]) != expected


def trusted(expression: str) -> object:
    try:
        from ansible.template import trust_as_template  # pylint: disable=import-outside-toplevel
    except ImportError:  # ansible-core < 2.19 templates any string
        return expression
    return trust_as_template(expression)


def _sha1(path: Path) -> str:
    import hashlib  # pylint: disable=import-outside-toplevel
    return hashlib.sha1(path.read_bytes()).hexdigest()  # nosec B324


def test_validation_names_each_bad_vm_and_touches_nothing(tmp_path):
    vms = [
        vm(tmp_path, "ok"),
        vm(tmp_path, "ok"),
        vm(tmp_path, "wrongimage", inject={"image": "/elsewhere.ext4"}),
        vm(tmp_path, "badinject", inject={"image": str(tmp_path / "vms/badinject/rootfs.ext4"), "bogus": 1}),
        vm(tmp_path, "nogolden", golden=str(tmp_path / "golden-missing.ext4")),
        vm(tmp_path, "relative", dir="vms/relative"),
    ]
    problems = _rootfs_prepare.validate(vms)[1]
    text = "\n".join(problems)
    assert "vms[1] (VM ok): the name is used by vms[0] too" in text
    assert "vms[2] (VM wrongimage): inject.image /elsewhere.ext4 is not the VM's disk" in text
    assert "vms[3] (VM badinject): inject: " in text and "bogus" in text
    assert "vms[4] (VM nogolden): golden image: source" in text
    assert "vms[5] (VM relative): dir vms/relative is not an absolute path" in text
    assert len(problems) == 5
    assert not (tmp_path / "vms").exists()


def test_decisions(tmp_path):
    fresh, same, changed, refused, ignored = (
        vm(tmp_path, name) for name in ("fresh", "same", "changed", "refused", "ignored"))
    refused["on_change"], ignored["on_change"] = "fail", "ignore"
    items, problems = _rootfs_prepare.validate([fresh, same, changed, ignored])
    assert not problems
    for item in items[1:]:
        Path(item.dir).mkdir(parents=True)
        Path(item.disk).write_bytes(b"")
    (Path(same["dir"]) / "inject.sha256").write_text(_rootfs_prepare.fingerprint(same["inject"], []) + "\n")
    (Path(changed["dir"]) / "inject.sha256").write_text("0" * 64 + "\n")
    decisions, problems = _rootfs_prepare.decide(items, check_mode=False)
    assert not problems
    by_name = {decision.item.name: decision for decision in decisions}
    assert by_name["fresh"].differs and by_name["fresh"].new
    assert not by_name["same"].differs and not by_name["same"].new
    assert by_name["changed"].differs and not by_name["changed"].new
    assert by_name["ignored"].differs

    items = _rootfs_prepare.validate([refused])[0]
    Path(refused["dir"]).mkdir(parents=True)
    Path(refused["disk"]).write_bytes(b"")
    decisions, problems = _rootfs_prepare.decide(items, check_mode=False)
    assert decisions == [] and problems == [
        "VM refused: the files, units or environment to inject differ from what its disk carries, and on_change is fail"]
    # A new VM is injected whatever its on_change.
    items[0].new = True
    decisions, problems = _rootfs_prepare.decide(items, check_mode=False)
    assert not problems and decisions[0].differs


@pytest.mark.parametrize("check_mode", [False, True])
def test_missing_staged_file(tmp_path, check_mode):
    entry = vm(tmp_path, "staged", staged=[str(tmp_path / "vms/staged/inject/file-0")])
    items, problems = _rootfs_prepare.validate([entry])
    assert not problems
    decisions, problems = _rootfs_prepare.decide(items, check_mode=check_mode)
    if check_mode:
        # Not copied yet in check mode: an injection is predicted.
        assert not problems and decisions[0].differs
    else:
        assert problems == [f"VM staged: staged file {tmp_path}/vms/staged/inject/file-0 does not exist (copy it first)"]


def test_secret_values_are_collected_from_every_vm(tmp_path):
    inject = {"image": "/x", "environment": {"TOKEN": "hunter2"}, "environment_secret": True,
              "files": [{"path": "/k", "content": "key", "secret": True}]}
    secret = vm(tmp_path, "s", inject=inject)
    plain = vm(tmp_path, "p")
    assert _rootfs_prepare.secret_values([secret, plain]) == {"hunter2", "key"}

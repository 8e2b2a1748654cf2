"""The firecracker role: install from a release-shaped archive served over loopback HTTP or from a local
file, checksum mismatches, the KVM check, the unit template, and the host-settings report.

Everything the role writes goes to per-test temporary directories (binaries, state, jailer chroot base,
systemd units). Kernel modules are not loaded and every host-setting "apply" variable is off, so the
machine's modules, sysctls, swap, KSM and SMT are only read, never changed.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import socket
import stat
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
from conftest import AnsibleRunner, PlaybookResult, have, wait_for

ARCH = platform.machine()
GOOD = "1.10.1"
NEXT = "1.11.0"
WRONG_SHA = "0" * 64
ROLE = "microvm.firecracker.firecracker"


# --- a release-shaped archive (layout of Firecracker's tools/release.sh + tools/gh_release.py) ---------

def fake_binary(name: str, version: str) -> bytes:
    label = "Firecracker" if name == "firecracker" else name.capitalize()
    return (
        "#!/bin/sh\n"
        f"# Test double for {name} v{version} in a release-shaped archive (not Firecracker).\n"
        f'if [ "$1" = "--version" ]; then echo "{label} v{version}"; echo; exit 0; fi\n'
        'echo "test double: only --version is implemented" >&2\nexit 1\n'
    ).encode()


def build_release_archive(path: Path, version: str, arch: str) -> str:
    """Write firecracker-v{version}-{arch}.tgz like an official release; return its sha256."""
    prefix = f"release-v{version}-{arch}"
    files: dict[str, tuple[bytes, int]] = {}
    for tool in ("firecracker", "jailer", "seccompiler-bin", "rebase-snap", "cpu-template-helper", "snapshot-editor"):
        files[f"{tool}-v{version}-{arch}"] = (fake_binary(tool, version), 0o755)
        files[f"{tool}-v{version}-{arch}.debug"] = (b"debug info placeholder\n", 0o644)
    files[f"seccomp-filter-v{version}-{arch}.json"] = (b"{}\n", 0o644)
    files[f"firecracker_spec-v{version}.yaml"] = (b"swagger: '2.0'\n", 0o644)
    for name in ("LICENSE", "NOTICE", "THIRD-PARTY"):
        files[name] = (f"{name} placeholder\n".encode(), 0o644)
    sums = "".join(f"{hashlib.sha256(data).hexdigest()}  ./{name}\n" for name, (data, _mode) in sorted(files.items()))
    files["SHA256SUMS"] = (sums.encode(), 0o644)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, (data, mode) in sorted(files.items()):
            info = tarfile.TarInfo(f"{prefix}/{name}")
            info.size, info.mode, info.mtime = len(data), mode, 1700000000
            tar.addfile(info, io.BytesIO(data))
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class ReleaseServer:
    base_url: str
    root: Path
    log: Path
    sha256: dict[str, str]  # version -> sha256 of the archive for this machine's arch

    @property
    def url_template(self) -> str:
        return self.base_url + "/v{version}/firecracker-v{version}-{arch}.tgz"

    def url(self, version: str) -> str:
        return f"{self.base_url}/v{version}/firecracker-v{version}-{ARCH}.tgz"

    def archive(self, version: str) -> Path:
        return self.root / f"v{version}" / f"firecracker-v{version}-{ARCH}.tgz"

    def requests(self) -> list[str]:
        """Request lines seen so far, e.g. 'GET /v1.10.1/firecracker-v1.10.1-x86_64.tgz'."""
        lines = self.log.read_text(errors="replace").splitlines() if self.log.exists() else []
        return [line.split('"')[1].rsplit(" ", 1)[0] for line in lines if line.count('"') >= 2]


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def accepts_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def release_server(tmp_path_factory) -> Iterator[ReleaseServer]:
    """Release archives for GOOD and NEXT served by `python3 -m http.server` on 127.0.0.1 (stopped by PID)."""
    root = tmp_path_factory.mktemp("releases")
    sha = {version: build_release_archive(root / f"v{version}" / f"firecracker-v{version}-{ARCH}.tgz", version, ARCH)
           for version in (GOOD, NEXT)}
    log = root.parent / f"{root.name}-http.log"
    port = free_loopback_port()
    with open(log, "wb") as log_file:
        server = subprocess.Popen(
            [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(root)],
            stdout=log_file, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: server.poll() is not None or accepts_connections(port), 10, "the release HTTP server")
        assert server.poll() is None, f"http.server exited: {log.read_text()}"
        yield ReleaseServer(f"http://127.0.0.1:{port}", root, log, sha)
    finally:
        server.terminate()
        try:
            server.wait(timeout=5)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


# --- running the role --------------------------------------------------------------------------------

@dataclass
class Host:
    """The temporary directories the role is pointed at, and its variables."""
    root: Path
    vars: dict[str, Any]

    @property
    def bin_dir(self) -> Path:
        return Path(self.vars["firecracker_bin_dir"])

    @property
    def state_dir(self) -> Path:
        return Path(self.vars["firecracker_state_dir"])

    @property
    def unit(self) -> Path:
        return Path(self.vars["firecracker_systemd_dir"]) / "firecracker@.service"


def lab_host(root: Path, server: ReleaseServer, **overrides: Any) -> Host:
    host_vars: dict[str, Any] = {
        "firecracker_version": GOOD,
        "firecracker_release_url_template": server.url_template,
        "firecracker_sha256": {ARCH: server.sha256[GOOD]},
        "firecracker_bin_dir": str(root / "usr-local-bin"),
        "firecracker_state_dir": str(root / "var-lib-firecracker"),
        "firecracker_jailer_chroot_base": str(root / "srv-jailer"),
        "firecracker_systemd_dir": str(root / "etc-systemd-system"),
        # This machine is left alone: no modules loaded, no user created, host settings only checked.
        "firecracker_load_modules": [],
        "firecracker_user": "",
        "firecracker_group": "",
        "firecracker_host_swap_off": False,
        "firecracker_host_ksm_off": False,
        "firecracker_host_smt_off": False,
        "firecracker_host_kvm_params_persist": False,
    }
    host_vars.update(overrides)
    return Host(root, host_vars)


def run_role(ansible: AnsibleRunner, host: Host, check: bool = False, **overrides: Any) -> PlaybookResult:
    report = {"installed": "{{ firecracker_installed }}", "host_settings": "{{ firecracker_host_settings }}"}
    return ansible.run_role(ROLE, report, check=check, extra_vars={**host.vars, **overrides})


def report(result: PlaybookResult) -> dict[str, Any]:
    assert result.rc == 0, result.output
    return result.task("Report")["msg"]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def bin_entries(host: Host) -> list[str]:
    return sorted(p.name for p in host.bin_dir.iterdir()) if host.bin_dir.exists() else []


def assert_nothing_staged(host: Host, *manifests: str) -> None:
    releases = host.state_dir / "releases"
    left = sorted(p.name for p in releases.iterdir()) if releases.exists() else []
    assert left == sorted(manifests), f"unexpected files in {releases}: {left}"


def assert_installed(host: Host, version: str, archive_sha: str) -> None:
    fc, jailer = host.bin_dir / "firecracker", host.bin_dir / "jailer"
    for link, name in ((fc, "firecracker"), (jailer, "jailer")):
        assert link.is_symlink() and os.readlink(link) == f"{name}-v{version}", link
        target = host.bin_dir / f"{name}-v{version}"
        assert target.is_file() and not target.is_symlink()
        assert mode(target) == 0o755 and target.stat().st_uid == 0
        assert target.read_bytes() == fake_binary(name, version)
    version_out = subprocess.run([str(fc), "--version"], capture_output=True, text=True, check=True)
    assert version_out.stdout.splitlines()[0] == f"Firecracker v{version}"
    manifest = json.loads((host.state_dir / "releases" / f"firecracker-v{version}-{ARCH}.json").read_text())
    assert manifest["version"] == version and manifest["arch"] == ARCH and manifest["archive_sha256"] == archive_sha
    assert manifest["files"] == {
        str(host.bin_dir / f"{n}-v{version}"): hashlib.sha256(fake_binary(n, version)).hexdigest()
        for n in ("firecracker", "jailer")}


# tun and kvm register misc devices, so /sys/class/misc shows them even when built in without /sys/module.
PRESENT_MODULES = [m for m in ("tun", "kvm") if os.path.exists(f"/sys/module/{m}") or os.path.exists(f"/sys/class/misc/{m}")]


def read_host_setting(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


# --- tests ---------------------------------------------------------------------------------------------

def test_install_from_url_idempotent_then_failed_and_local_file_upgrades(ansible, release_server, tmp_path):
    assert have("systemd-analyze"), "systemd-analyze missing: run `make deps` (Debian package systemd)"
    host = lab_host(tmp_path / "host", release_server,
                    # The unit is verified with systemd-analyze here, although systemd is not PID 1.
                    firecracker_unit_verify="always",
                    # Reported only (persist is off): one parameter as it is, one the kernel does not have.
                    firecracker_host_kvm_params={
                        "min_timer_period_us": read_host_setting("/sys/module/kvm/parameters/min_timer_period_us") or "0",
                        "no_such_parameter": "1"},
                    # Only modules this machine already has (loaded or built in): found, never given to modprobe.
                    firecracker_load_modules=PRESENT_MODULES)
    download = f"/v{GOOD}/firecracker-v{GOOD}-{ARCH}.tgz"

    # Check mode on a fresh host predicts changes, sends only a HEAD request, and creates nothing.
    seen = len(release_server.requests())
    check = run_role(ansible, host, check=True)
    assert check.rc == 0, check.output
    predicted = check.changed_tasks()
    assert any("Download the release archive" in t for t in predicted), predicted
    assert any("Point the firecracker and jailer links" in t for t in predicted), predicted
    assert any("template unit" in t for t in predicted), predicted
    assert release_server.requests()[seen:] == [f"HEAD {download}"]
    assert not host.root.exists()

    # Real run: binaries, links, directories, unit, manifest, facts.
    first = run_role(ansible, host)
    facts = report(first)
    assert release_server.requests()[seen + 1:] == [f"GET {download}"]
    assert first.task(f"{ROLE} : Load the kernel modules that are missing").get("results", []) == []
    assert_installed(host, GOOD, release_server.sha256[GOOD])
    assert bin_entries(host) == sorted(["firecracker", f"firecracker-v{GOOD}", "jailer", f"jailer-v{GOOD}"])
    assert_nothing_staged(host, f"firecracker-v{GOOD}-{ARCH}.json")
    assert mode(host.state_dir) == 0o755
    assert mode(host.state_dir / "vms") == 0o700 and (host.state_dir / "vms").stat().st_uid == 0
    assert mode(host.state_dir / "releases") == 0o755
    assert mode(Path(host.vars["firecracker_jailer_chroot_base"])) == 0o755
    assert mode(host.unit) == 0o644
    unit = host.unit.read_text().splitlines()
    for line in ("Description=Firecracker microVM %i (microvm.firecracker)", "After=network-online.target",
                 "[Service]", "Type=simple", f"ExecStart={host.state_dir}/vms/%i/launch", "Restart=on-failure",
                 "RestartSec=1", "KillMode=mixed", "TimeoutStopSec=30", "LimitNOFILE=4096", "[Install]",
                 "WantedBy=multi-user.target"):
        assert line in unit, f"{line!r} missing from {host.unit}:\n" + "\n".join(unit)
    installed = facts["installed"]
    assert installed["version"] == GOOD and installed["arch"] == ARCH
    assert installed["bin"] == str(host.bin_dir / "firecracker")
    assert installed["jailer"] == str(host.bin_dir / "jailer")
    assert installed["kvm_usable"] is os.access("/dev/kvm", os.R_OK | os.W_OK)
    assert installed["systemd"] is os.path.isdir("/run/systemd/system")
    assert installed["state_dir"] == str(host.state_dir)

    # The host-settings report: what the machine has, read independently, and nothing applied.
    settings = facts["host_settings"]
    assert set(settings) == {"swap", "ksm", "smt", "nofile", "kvm_params"}
    swaps = [line.split()[0] for line in Path("/proc/swaps").read_text().splitlines()[1:]]
    assert settings["swap"]["value"] == swaps and settings["swap"]["meets"] is (not swaps)
    ksm = read_host_setting("/sys/kernel/mm/ksm/run") or "absent"
    assert settings["ksm"]["value"] == ksm and settings["ksm"]["meets"] is (ksm in ("0", "2", "absent"))
    smt = read_host_setting("/sys/devices/system/cpu/smt/control") or "absent"
    assert settings["smt"]["value"] == smt and settings["smt"]["meets"] is (smt != "on")
    nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
    assert settings["nofile"]["value"] == nr_open and settings["nofile"]["meets"] is (nr_open >= 4096)
    kvm_params = settings["kvm_params"]
    assert kvm_params["value"] == {
        "min_timer_period_us": read_host_setting("/sys/module/kvm/parameters/min_timer_period_us") or "absent",
        "no_such_parameter": "absent"}
    assert kvm_params["meets"] is False and kvm_params["compliant"] is False
    for name in ("swap", "ksm", "smt", "nofile", "kvm_params"):
        assert settings[name]["apply"] is False and settings[name]["changed"] is False, (name, settings[name])

    # Second run: nothing changes, nothing is downloaded.
    seen = len(release_server.requests())
    second = run_role(ansible, host)
    assert second.rc == 0, second.output
    assert second.changed_tasks() == [], second.output
    assert release_server.requests()[seen:] == []

    # A new version whose archive does not match its pinned sha256: fails, the installed one is untouched.
    bad = run_role(ansible, host, firecracker_version=NEXT, firecracker_sha256={ARCH: WRONG_SHA})
    message = bad.failure()
    assert release_server.url(NEXT) in message and "checksum mismatch" in message, message
    assert f"expected sha256 {WRONG_SHA}" in message and release_server.sha256[NEXT] in message, message
    assert "Nothing was installed" in message
    assert_installed(host, GOOD, release_server.sha256[GOOD])
    assert bin_entries(host) == sorted(["firecracker", f"firecracker-v{GOOD}", "jailer", f"jailer-v{GOOD}"])
    assert_nothing_staged(host, f"firecracker-v{GOOD}-{ARCH}.json")

    # The new version from a local release archive (firecracker_install_from: file), on a lab host without
    # KVM (firecracker_require_kvm: false): the links switch, the old binaries stay for a rollback.
    archive = release_server.archive(NEXT)
    seen = len(release_server.requests())
    upgrade = run_role(ansible, host, firecracker_version=NEXT, firecracker_sha256={ARCH: release_server.sha256[NEXT]},
                       firecracker_install_from="file", firecracker_archive_path=str(archive),
                       firecracker_kvm_device=str(tmp_path / "no-kvm"), firecracker_require_kvm=False)
    installed = report(upgrade)["installed"]
    assert installed["version"] == NEXT and installed["kvm_usable"] is False
    assert release_server.requests()[seen:] == []
    assert_installed(host, NEXT, release_server.sha256[NEXT])
    assert json.loads((host.state_dir / "releases" / f"firecracker-v{NEXT}-{ARCH}.json").read_text())["source"] == str(archive)
    assert (host.bin_dir / f"firecracker-v{GOOD}").read_bytes() == fake_binary("firecracker", GOOD)
    assert_nothing_staged(host, f"firecracker-v{GOOD}-{ARCH}.json", f"firecracker-v{NEXT}-{ARCH}.json")


def test_local_archive_checksum_mismatch_on_a_fresh_host_installs_nothing(ansible, release_server, tmp_path):
    archive = release_server.archive(GOOD)
    host = lab_host(tmp_path / "host", release_server, firecracker_install_from="file",
                    firecracker_archive_path=str(archive), firecracker_sha256={ARCH: WRONG_SHA, "aarch64": WRONG_SHA})
    message = run_role(ansible, host).failure()
    assert str(archive) in message and "checksum mismatch" in message, message
    assert f"expected sha256 {WRONG_SHA}" in message and release_server.sha256[GOOD] in message, message
    assert "Nothing was installed" in message
    assert bin_entries(host) == []
    assert_nothing_staged(host)


def test_missing_kernel_module_or_kvm_fails_clearly_before_installing(ansible, release_server, tmp_path):
    host = lab_host(tmp_path / "host", release_server, firecracker_kvm_device=str(tmp_path / "dev-kvm"),
                    firecracker_require_kvm=True)
    # A module no kernel has: modprobe fails (changing nothing) and the role says what to do.
    message = run_role(ansible, host, firecracker_load_modules=["fc_test_no_such_module"]).failure()
    assert message.startswith("Cannot load the kernel module(s) Firecracker needs: fc_test_no_such_module ("), message
    assert "set firecracker_load_modules" in message, message

    message = run_role(ansible, host).failure()
    assert message.startswith(f"{tmp_path / 'dev-kvm'} is missing: Firecracker needs KVM; "
                              "set firecracker_require_kvm: false for a lab host where a stand-in runs the VMs"), message
    assert not host.root.exists()

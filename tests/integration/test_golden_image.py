"""The golden_image role: a real build (minbase + systemd + the gstreamer profile) from the host's own apt mirror.

One build per test session (``golden`` fixture, cached by input digest within the run); the tests then
read its files directly (manifest, sha256, the vmlinux banner, the initrd's cpio, the image with debugfs
and e2fsck, GStreamer inside an extracted copy of the image), re-run the role unchanged, change the
package list (a new version, the old one intact), and make a build fail (nothing moves, no mount left).
"""
from __future__ import annotations

import gzip
import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from conftest import PlaybookResult, sh, wait_for
from golden_build import NAME, mounts_under

BUILD_TASK = "Build the golden image"
VIRTIO = ["virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_pci", "virtio_mmio",
          "virtio_blk", "failover", "net_failover", "virtio_net"]
GIB = 1024 ** 3


def build_record(result: PlaybookResult) -> dict[str, Any]:
    records = [r for r in result.records if r["task"].endswith(BUILD_TASK)]
    assert records, result.output
    return records[-1]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def processes_under(path: Path) -> list[str]:
    prefix = str(path.resolve())
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        for link in ("root", "cwd"):
            try:
                target = os.readlink(entry / link)
            except OSError:
                continue
            if target == prefix or target.startswith(prefix + "/"):
                found.append(f"{entry.name} {link}={target}")
    return found


def directory_state(out: Path) -> dict[str, tuple]:
    """Every entry of the output directory: symlink target, or size and mtime."""
    state = {}
    for entry in sorted(out.iterdir()):
        info = entry.lstat()
        state[entry.name] = (os.readlink(entry),) if entry.is_symlink() else (info.st_size, info.st_mtime_ns)
    return state


def debugfs(image: Path, command: str) -> str:
    return subprocess.run(["debugfs", "-R", command, str(image)], capture_output=True, text=True, check=True).stdout


def istat(image: Path, path: str) -> dict[str, Any] | None:
    out = debugfs(image, f"stat {path}")
    head = re.search(r"Type: (\w+)\s+Mode:\s+(\d+)", out)
    if head is None:
        return None
    size = re.search(r"Size: (\d+)", out)
    link = re.search(r'Fast link dest: "(.*)"', out)
    return {"type": head.group(1), "mode": int(head.group(2), 8), "size": int(size.group(1)),
            "target": link.group(1) if link else None}


def cpio_members(data: bytes) -> dict[str, bytes]:
    """newc members of an initramfs: leading uncompressed archives, then one gzip-compressed archive."""
    members: dict[str, bytes] = {}
    pos = 0
    while pos < len(data):
        if data[pos:pos + 1] == b"\0":
            pos += 1
            continue
        if data[pos:pos + 2] == b"\x1f\x8b":
            data, pos = gzip.decompress(data[pos:]), 0
            continue
        assert data[pos:pos + 6] in (b"070701", b"070702"), f"not cpio at {pos}: {data[pos:pos + 8]!r}"
        filesize = int(data[pos + 54:pos + 62], 16)
        namesize = int(data[pos + 94:pos + 102], 16)
        name = data[pos + 110:pos + 110 + namesize - 1].decode()
        start = (pos + 110 + namesize + 3) & ~3
        pos = (start + filesize + 3) & ~3
        if name != "TRAILER!!!":
            members[name.lstrip("./")] = data[start:start + filesize]
    return members


def test_build_writes_versioned_files_manifest_and_symlinks(golden):
    record = build_record(golden.first)["result"]
    assert record["changed"] is True and record["built"] is True, record
    version = record["version"]
    assert re.fullmatch(r"[0-9a-f]{16}", version) and record["input_digest"].startswith(version)
    for kind in ("ext4", "vmlinux", "initrd", "json"):
        assert os.readlink(golden.link(kind)) == golden.artifact(version, kind).name
    artifacts = golden.first.task("Report")["golden_image_artifacts"]
    assert artifacts["version"] == version and artifacts["image"] == str(golden.artifact(version, "ext4"))
    assert artifacts["links"]["image"] == str(golden.link("ext4"))

    manifest = golden.manifest(version)
    assert manifest["version"] == version and manifest["input_digest"] == record["input_digest"]
    assert manifest["name"] == NAME and manifest["built_at"].endswith("Z") and manifest["build_seconds"] > 0
    inputs = manifest["inputs"]
    assert inputs["suite"] == "bookworm" and inputs["variant"] == "minbase"
    assert inputs["bootstrap_tool"] == "mmdebstrap" and inputs["size_bytes"] == 8 * GIB
    assert {"systemd", "gstreamer1.0-plugins-bad", "gstreamer1.0-nice", "initramfs-tools"} <= set(inputs["packages"])
    assert inputs["guest"]["root_password"] == "locked"
    # The mirror is the one this machine's apt uses (read from its sources, never hard-coded).
    host_sources = "".join(p.read_text() for p in Path("/etc/apt").glob("sources.list*") if p.is_file())
    host_sources += "".join(p.read_text() for p in Path("/etc/apt/sources.list.d").glob("*.sources"))
    host_sources += "".join(p.read_text() for p in Path("/etc/apt/sources.list.d").glob("*.list"))
    assert inputs["mirror"] in host_sources

    release = manifest["kernel_release"]
    packages = manifest["packages"]
    assert packages["systemd"] and packages["gstreamer1.0-plugins-bad"]
    assert manifest["kernel"]["package"] == f"linux-image-{release}"
    assert manifest["kernel"]["package_version"] == packages[f"linux-image-{release}"]
    assert manifest["image"]["content_digest"].startswith("sha256:")

    vmlinux = golden.artifact(version, "vmlinux")
    initrd = golden.artifact(version, "initrd")
    assert sha256(vmlinux) == manifest["kernel"]["sha256"]
    assert sha256(initrd) == manifest["initrd"]["sha256"]
    data = vmlinux.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2  # the uncompressed 64-bit ELF Firecracker boots
    assert re.search(rb"Linux version (\S+) ", data).group(1).decode() == release

    checks = manifest["checks"]
    assert checks["machine_id_empty"] is True
    assert checks["versions_match"] == {"kernel": release, "initrd": release,
                                        "modules_dir": f"/usr/lib/modules/{release}"}
    assert checks["virtio"] == {"virtio_blk": "initrd", "virtio_net": "initrd"}
    assert set(checks["gstreamer"]["elements"]) >= {"webrtcbin", "vp8enc"}
    assert "videotestsrc" in checks["gstreamer"]["pipeline"] and "vp8enc" in checks["gstreamer"]["pipeline"]
    assert "systemd-networkd-wait-online.service" in checks["systemd_analyze_verify"]
    assert checks["e2fsck"].startswith("rootfs: ")

    # Nothing of the build is left: no build directory, mount or process under the test's tree.
    assert not [p for p in golden.out.iterdir() if p.name.startswith(".golden-") and p.is_dir()]
    assert mounts_under(golden.root) == []
    assert processes_under(golden.root) == []


def test_kernel_initrd_and_modules_belong_together(golden):
    version = golden.current()
    manifest = golden.manifest(version)
    release = manifest["kernel_release"]
    members = cpio_members(golden.artifact(version, "initrd").read_bytes())
    module_dirs = {match.group(2) for match in map(re.compile(r"(usr/)?lib/modules/([^/]+)/").match, members) if match}
    assert module_dirs == {release}
    present = {re.sub(r"\.ko(\.\w+)?$", "", m.rsplit("/", 1)[1]) for m in members if ".ko" in m}
    assert {"virtio_blk", "virtio_net", "virtio_mmio", "virtio_ring", "virtio", "net_failover"} <= present
    loaded = [line.split()[0] for line in members["conf/modules"].decode().splitlines()
              if line.strip() and not line.startswith("#")]
    assert loaded == VIRTIO  # loaded by the initrd, in dependency order
    assert manifest["initrd"]["modules_loaded"] == VIRTIO

    image = golden.artifact(version, "ext4")
    assert release in debugfs(image, "ls /usr/lib/modules")
    assert istat(image, f"/usr/lib/modules/{release}/kernel/drivers/block/virtio_blk.ko")["type"] == "regular"
    assert istat(image, f"/boot/vmlinuz-{release}")["type"] == "regular"


def test_image_is_sparse_clean_and_configured_for_the_guest(golden):
    version = golden.current()
    image = golden.artifact(version, "ext4")
    info = image.stat()
    assert info.st_size == 8 * GIB
    assert info.st_blocks * 512 < 2 * GIB and info.st_blocks * 512 == golden.manifest(version)["image"]["allocated_bytes"]
    fsck = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True, check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr

    machine_id = istat(image, "/etc/machine-id")
    assert machine_id["type"] == "regular" and machine_id["size"] == 0
    assert debugfs(image, "cat /etc/machine-id") == ""
    resolv = istat(image, "/etc/resolv.conf")
    assert resolv["type"] == "symlink" and resolv["target"] == "../run/systemd/resolve/stub-resolv.conf"
    assert istat(image, "/etc/.resolv.conf.systemd-resolved.bak") is None  # the build host's copy, never kept
    assert debugfs(image, "cat /etc/hostname") == "microvm\n"
    assert "127.0.1.1\tmicrovm" in debugfs(image, "cat /etc/hosts")
    network = debugfs(image, "cat /etc/systemd/network/10-eth0.network")
    assert "Name=eth0" in network and "DHCP=ipv4" in network and "ClientIdentifier=mac" in network
    assert istat(image, "/etc/systemd/network/99-default.link")["target"] == "/dev/null"
    wants = "/etc/systemd/system/multi-user.target.wants"
    assert istat(image, f"{wants}/systemd-networkd.service")["type"] == "symlink"
    assert istat(image, "/etc/systemd/system/sysinit.target.wants/systemd-resolved.service")["type"] == "symlink"
    assert istat(image, "/etc/systemd/system/getty.target.wants/serial-getty@ttyS0.service")["type"] == "symlink"
    dropin = debugfs(image, "cat /etc/systemd/system/systemd-networkd-wait-online.service.d/microvm-golden.conf")
    assert "--any --timeout=30" in dropin
    shadow_root = debugfs(image, "cat /etc/shadow").splitlines()[0].split(":")
    assert shadow_root[0] == "root" and shadow_root[1] == "*"
    assert istat(image, "/usr/sbin/policy-rc.d") is None
    mirror = golden.manifest(version)["inputs"]["mirror"]
    assert f"deb {mirror} bookworm main" in debugfs(image, "cat /etc/apt/sources.list")
    assert not [n for n in debugfs(image, "ls /var/cache/apt/archives").split() if n.endswith(".deb")]


def test_gstreamer_webrtc_and_vp8_work_inside_the_image(golden, tmp_path):
    """Extract the image (debugfs rdump, no mount) and run GStreamer from it with chroot."""
    image = golden.artifact(golden.current(), "ext4")
    tree = tmp_path / "tree"
    tree.mkdir()
    chroot = shutil.which("chroot") or "/usr/sbin/chroot"
    try:
        for top in ("usr", "etc"):
            sh("debugfs", "-R", f"rdump /{top} {tree}", str(image))
        for name in ("bin", "sbin", "lib", "lib64"):
            (tree / name).symlink_to(f"usr/{name}")
        (tree / "tmp").mkdir()
        env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "GST_REGISTRY": "/tmp/registry.bin", "LC_ALL": "C"}
        inspect = subprocess.run([chroot, str(tree), "gst-inspect-1.0", "webrtcbin"], capture_output=True,
                                 text=True, env=env, check=False, timeout=120)
        assert inspect.returncode == 0 and "Factory Details" in inspect.stdout, inspect.stdout + inspect.stderr
        pipeline = subprocess.run([chroot, str(tree), "gst-launch-1.0", "-q", "videotestsrc", "num-buffers=10",
                                   "!", "vp8enc", "deadline=1", "!", "fakesink"], capture_output=True, text=True,
                                  env=env, check=False, timeout=120)
        assert pipeline.returncode == 0, pipeline.stdout + pipeline.stderr
    finally:
        shutil.rmtree(tree, ignore_errors=True)
    assert processes_under(tmp_path) == []


def test_guest_boots_from_a_sparse_clone_with_the_versions_kernel_and_initrd(golden, tmp_path, process_reaper):
    """QEMU microvm (TCG) with virtio-mmio devices, as Firecracker: the initrd loads the virtio modules,
    mounts /dev/vda as root, and systemd reaches the serial login prompt with a machine-id of its own."""
    qemu = shutil.which("qemu-system-x86_64")
    assert qemu, "qemu-system-x86_64 is missing: run `make deps` (Debian package qemu-system-x86)"
    version = golden.current()
    clone = tmp_path / "vm.ext4"
    sh("cp", "--sparse=always", "--reflink=auto", str(golden.artifact(version, "ext4")), str(clone))
    console = tmp_path / "console.log"
    proc = subprocess.Popen([
        # The stand-in's machine: microvm with the legacy PIT, PIC and RTC on; with the QEMU defaults a TCG
        # guest occasionally stalled before its login prompt (once in CI, for more than 240 s).
        qemu, "-M", "microvm,acpi=on,pit=on,pic=on,rtc=on,isa-serial=on", "-accel", "tcg", "-m", "1024",
        "-smp", "1", "-nodefaults",
        "-no-user-config", "-display", "none", "-no-reboot", "-serial", f"file:{console}",
        "-kernel", str(golden.artifact(version, "vmlinux")), "-initrd", str(golden.artifact(version, "initrd")),
        "-append", "console=ttyS0 root=/dev/vda rw panic=-1 reboot=k",
        "-drive", f"id=root,file={clone},format=raw,if=none", "-device", "virtio-blk-device,drive=root",
    ], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    process_reaper.append(proc)

    def booted() -> bool:
        text = console.read_text(errors="replace") if console.exists() else ""
        if proc.poll() is not None or "Kernel panic" in text or "Gave up waiting for root" in text:
            raise AssertionError(f"the guest did not boot (qemu exit {proc.poll()}):\n{text[-3000:]}")
        return "microvm login:" in text

    try:
        try:
            wait_for(booted, timeout=240, what="the guest's serial login prompt", interval=0.5)
        except AssertionError as exc:
            text = console.read_text(errors="replace") if console.exists() else ""
            raise AssertionError(f"{exc}\nthe console's last lines:\n{text[-3000:]}") from None
        text = console.read_text(errors="replace")
        assert "virtio_blk virtio0: [vda]" in text
        assert "Initializing machine ID from random generator" in text  # the image's machine-id is empty
        assert "FAILED" not in text, text[-3000:]  # systemd prints "[FAILED] Failed to start ..." for a failed unit
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        clone.unlink()  # 1 GB of data; pytest keeps the last runs' temp directories


def test_rerun_unchanged_then_new_version_for_new_packages_old_one_intact(golden):
    v1 = golden.current()
    before = directory_state(golden.out)

    for check in (True, False):
        again = golden.run(check=check)
        assert again.rc == 0, again.output
        assert again.changed_tasks() == [], (check, again.output)
        record = build_record(again)["result"]
        assert record["version"] == v1 and record["built"] is False
    assert directory_state(golden.out) == before

    # Check mode predicts the new version without touching anything.
    predicted = golden.run(check=True, golden_image_extra_packages=["less"])
    assert predicted.rc == 0, predicted.output
    record = build_record(predicted)["result"]
    assert record["changed"] is True and record["built"] is True and record["version"] != v1
    assert directory_state(golden.out) == before

    old_manifest = golden.manifest(v1)
    second = golden.run(golden_image_extra_packages=["less"])
    assert second.rc == 0, second.output
    record = build_record(second)["result"]
    v2 = record["version"]
    assert record["changed"] is True and record["built"] is True
    assert v2 == build_record(predicted)["result"]["version"] and record["previous_version"] == v1
    assert golden.current() == v2 and os.readlink(golden.link("vmlinux")) == golden.artifact(v2, "vmlinux").name
    new_manifest = golden.manifest(v2)
    assert "less" in new_manifest["packages"] and "less" not in old_manifest["packages"]
    assert new_manifest["bootstrap"]["tarball_reused"] is True
    # The cached .debs were used: only the new package (and nothing of the base) was downloaded again.
    log = golden.artifact(v2, "log").read_text(errors="replace")
    downloads = re.findall(r"^Get:\d+ \S+ \S+ \S+ (\S+) ", log, re.M)
    assert "less" in downloads and "systemd" not in downloads and "gstreamer1.0-plugins-bad" not in downloads

    # The old version is untouched and still bootable by its path.
    for kind in ("ext4", "vmlinux", "initrd", "json", "log"):
        assert golden.artifact(v1, kind).exists()
    assert golden.manifest(v1) == old_manifest
    assert sha256(golden.artifact(v1, "vmlinux")) == old_manifest["kernel"]["sha256"]
    assert sha256(golden.artifact(v1, "initrd")) == old_manifest["initrd"]["sha256"]
    assert subprocess.run(["e2fsck", "-fn", str(golden.artifact(v1, "ext4"))], capture_output=True,
                          check=False).returncode == 0
    assert before[golden.artifact(v1, "ext4").name] == directory_state(golden.out)[golden.artifact(v1, "ext4").name]

    # Back to the first inputs: the existing version is found again, only the symlinks move.
    back = golden.run()
    record = build_record(back)["result"]
    assert back.rc == 0 and record["changed"] is True and record["built"] is False and record["version"] == v1
    assert golden.current() == v1

    # Pruning keeps the current version and the newest others up to keep_versions.
    pruned = golden.run(golden_image_keep_versions=1)
    record = build_record(pruned)["result"]
    assert pruned.rc == 0 and record["pruned"] == [v2] and record["built"] is False
    assert not any(golden.artifact(v2, kind).exists() for kind in ("ext4", "vmlinux", "initrd", "json", "log"))
    assert golden.artifact(v1, "ext4").exists() and golden.current() == v1


def test_failed_build_moves_nothing_and_leaves_no_mount(golden):
    """debootstrap this time (its bootstrap path), then an apt failure while proc/sys/dev are mounted."""
    before = directory_state(golden.out)
    current = golden.current()
    failed = golden.run(golden_image_bootstrap_tool="debootstrap",
                        golden_image_extra_packages=["microvm-no-such-package"])
    assert failed.rc != 0, failed.output
    record = build_record(failed)
    assert record["status"] == "failed"
    message = record["result"]["msg"]
    assert "apt-get install" in message and "microvm-no-such-package" in message, message
    assert golden.current() == current
    after = directory_state(golden.out)
    failed_log = f"golden-{NAME}-failed.log"
    assert failed_log in after and "Unable to locate package microvm-no-such-package" in (
        golden.out / failed_log).read_text(errors="replace")
    del after[failed_log]
    assert after == before
    assert list(golden.cache.glob("bootstrap-debootstrap-bookworm-*.tar"))
    assert mounts_under(golden.root) == []
    assert processes_under(golden.root) == []

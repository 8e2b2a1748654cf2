"""golden_image_build without a build: inputs and version digest, host apt sources, kernel/initrd parsing,
the output directory's versions, symlinks and pruning (no root, no chroot, no network)."""
from __future__ import annotations

import gzip
import json
import lzma
import os
import struct
from pathlib import Path

import pytest

from ansible_collections.microvm.firecracker.plugins.module_utils import _apt_sources, _golden, _golden_build
from ansible_collections.microvm.firecracker.plugins.module_utils import _kernel_image as kimg
from ansible_collections.microvm.firecracker.plugins.module_utils._golden import GoldenError

HOST = [_apt_sources.Source("http://mirror.example/debian", "bookworm", ("main",), "x"),
        _apt_sources.Source("http://mirror.example/debian", "bookworm-updates", ("main",), "x"),
        _apt_sources.Source("http://security.example/debian-security", "bookworm-security", ("main",), "x")]


def params(**overrides):
    base = {
        "name": "ci", "output_dir": "/srv/golden", "cache_dir": None, "bootstrap_tool": "mmdebstrap",
        "suite": "bookworm", "mirror": None, "components": ["main"], "extra_sources": None, "variant": "minbase",
        "keyring": None, "profiles": ["base"], "extra_packages": [], "kernel_package": "linux-image-cloud-amd64",
        "kernel": None, "initrd": None, "initramfs_modules": list(_golden.DEFAULT_INITRAMFS_MODULES),
        "gstreamer_elements": list(_golden.DEFAULT_GST_ELEMENTS), "hostname": "microvm", "network": "dhcp",
        "resolver": "resolved", "nameservers": [], "wait_online_timeout": 30, "serial_console": True,
        "root_password_hash": None, "ssh_authorized_keys": [], "systemd_units": [], "size": "8G",
        "keep_versions": 3, "revision": "1",
    }
    base.update(overrides)
    return base


def request(**overrides):
    return _golden.build_request(params(**overrides), lambda: HOST, "amd64")


# --------------------------------------------------------------------------
# Inputs and the version


def test_same_inputs_same_version_and_every_input_counts():
    first = request()
    assert first.version == request().version == first.digest[:16]
    changes = [
        dict(extra_packages=["less"]), dict(profiles=["base", "gstreamer"]), dict(suite="trixie", mirror="http://mirror.example/debian"),
        dict(mirror="http://other.example/debian"), dict(components=["main", "contrib"]), dict(variant="buildd"),
        dict(bootstrap_tool="debootstrap"), dict(kernel_package="linux-image-amd64"), dict(size="4G"),
        dict(hostname="vm"), dict(resolver="static", nameservers=["192.0.2.53"]), dict(wait_online_timeout=0),
        dict(serial_console=False), dict(root_password_hash="$y$j9T$abc$def"), dict(revision="2"),
        dict(systemd_units=[{"name": "a.service", "content": "[Service]\nExecStart=/bin/true\n", "enabled": True}]),
        dict(initramfs_modules=["virtio_blk"]), dict(extra_sources=[]), dict(network="none"),
        dict(ssh_authorized_keys=["ssh-ed25519 AAAA test"]),
    ]
    versions = {request(**change).version for change in changes}
    assert first.version not in versions and len(versions) == len(changes)


def test_inputs_that_do_not_shape_the_image_do_not_change_the_version():
    first = request()
    assert request(output_dir="/elsewhere", cache_dir="/var/cache/x", keep_versions=1).version == first.version
    assert request(extra_packages=["less", "less"]).version == request(extra_packages=["less"]).version
    # gstreamer_elements only count with the gstreamer profile
    assert request(gstreamer_elements=["vp8enc"]).version == first.version


def test_profiles_expand_and_resolver_package_depends_on_the_suite():
    req = request(profiles=["base", "gstreamer"], extra_packages=["python3"])
    assert {"systemd", "udev", "gstreamer1.0-plugins-bad", "gstreamer1.0-nice", "systemd-resolved",
            "initramfs-tools", "python3"} <= set(req.packages)
    assert req.packages == sorted(req.packages)
    assert "linux-image-cloud-amd64" not in req.packages and req.kernel_package == "linux-image-cloud-amd64"
    assert "systemd-resolved" not in request(suite="jammy", mirror="http://archive.ubuntu.com/ubuntu").packages
    assert "systemd-resolved" not in request(resolver="static", nameservers=["192.0.2.1"]).packages
    assert "openssh-server" in request(ssh_authorized_keys=["ssh-ed25519 AAAA k"]).packages


def test_mirror_and_companion_suites_come_from_the_host():
    req = request()
    assert req.inputs["mirror"] == "http://mirror.example/debian"
    assert [(e["uri"], e["suite"]) for e in req.inputs["extra_sources"]] == [
        ("http://mirror.example/debian", "bookworm-updates"),
        ("http://security.example/debian-security", "bookworm-security")]
    assert request(extra_sources=[]).inputs["extra_sources"] == []
    with pytest.raises(GoldenError, match="no apt source of this host serves the suite 'noble'"):
        request(suite="noble")
    assert request(suite="noble", mirror="http://archive.ubuntu.com/ubuntu/", extra_sources=[]).inputs["mirror"] \
        == "http://archive.ubuntu.com/ubuntu"


@pytest.mark.parametrize("overrides, message", [
    (dict(name="../x"), "name"),
    (dict(size="7.5G"), "not a size"),
    (dict(size="1M"), "below the minimum"),
    (dict(extra_packages=["bad name"]), "package 'bad name' is not valid"),
    (dict(profiles=["base", "nope"]), "unknown profile"),
    (dict(profiles=[], extra_packages=["bash"]), "needs systemd"),
    (dict(resolver="static"), "needs at least one address"),
    (dict(resolver="none", nameservers=["192.0.2.1"]), "cannot be used with resolver none"),
    (dict(nameservers=["dns.example"]), "not an IP address"),
    (dict(initrd="/boot/initrd.img"), "only used with kernel"),
    (dict(kernel_package=""), "either kernel_package or kernel"),
    (dict(systemd_units=[{"name": "x", "content": "[Service]\n", "enabled": True}]), "unit name 'x'"),
    (dict(systemd_units=[{"name": "a.service", "content": " ", "enabled": True}]), "has no content"),
    (dict(root_password_hash="a:b"), "crypt"),
    (dict(keep_versions=0), "keep_versions"),
    (dict(wait_online_timeout=-1), "wait_online_timeout"),
    (dict(mirror="deb.debian.org/debian"), "not an http"),
])
def test_invalid_inputs_are_refused(overrides, message):
    with pytest.raises(GoldenError, match=message):
        request(**overrides)


def test_size_units():
    assert _golden.parse_size("8G") == _golden.parse_size("8GiB") == 8 * 1024 ** 3
    assert _golden.parse_size("512M") == 512 * 1024 ** 2
    assert _golden.parse_size(str(2 ** 30)) == 2 ** 30


def test_manifest_inputs_hide_the_password_hash():
    shown = _golden.public_inputs(request(root_password_hash="$y$j9T$salt$hash").inputs)
    assert shown["guest"]["root_password"] == "set" and "$y$" not in json.dumps(shown)
    assert _golden.public_inputs(request().inputs)["guest"]["root_password"] == "locked"


def test_user_kernel_is_hashed_into_the_inputs(tmp_path):
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"one")
    first = request(kernel=str(kernel))
    assert first.kernel_package is None and "initramfs-tools" not in first.packages
    kernel.write_bytes(b"two")
    assert request(kernel=str(kernel)).version != first.version


# --------------------------------------------------------------------------
# apt sources


def test_apt_sources_one_line_and_deb822(tmp_path):
    (tmp_path / "sources.list").write_text(
        "# comment\ndeb-src http://src.example/debian bookworm main\n"
        "deb [arch=amd64 signed-by=/usr/share/keyrings/x.gpg] http://one.example/debian bookworm main contrib\n")
    parts = tmp_path / "sources.list.d"
    parts.mkdir()
    (parts / "debian.sources").write_text(
        "Types: deb deb-src\nURIs: http://two.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
        "Enabled: no\nTypes: deb\nURIs: http://off.example/debian\nSuites: bookworm-security\nComponents: main\n")
    (parts / "extra.list.disabled").write_text("deb http://ignored.example/debian bookworm main\n")
    sources = _apt_sources.host_sources(str(tmp_path / "sources.list"), str(parts))
    assert [(s.uri, s.suite) for s in sources] == [
        ("http://one.example/debian", "bookworm"), ("http://two.example/debian", "bookworm"),
        ("http://two.example/debian", "bookworm-updates")]
    assert _apt_sources.pick_mirror(sources, "bookworm") == "http://one.example/debian"
    assert _apt_sources.companion_suites(sources, "bookworm") == [("http://two.example/debian", "bookworm-updates")]


# --------------------------------------------------------------------------
# Kernel and initrd


def fake_vmlinux(release: str = "6.1.0-99-cloud-amd64") -> bytes:
    header = bytearray(64)
    header[:4] = b"\x7fELF"
    header[4], header[5] = 2, 1
    struct.pack_into("<HH", header, 16, 2, kimg.EM_X86_64)
    return bytes(header) + b"\0" * 100 + b"Linux version %s (debian-kernel@lists.debian.org) #1 SMP\0" % release.encode()


def fake_bzimage(payload: bytes, appended_size: int | None = None) -> bytes:
    setup_sects = 4
    data = bytearray((setup_sects + 1) * 512)
    data[0x1F1] = setup_sects
    data[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", data, 0x206, 0x20F)
    body = payload if appended_size is None else payload + struct.pack("<I", appended_size)
    struct.pack_into("<II", data, 0x248, 16, len(body))
    return bytes(data) + b"\0" * 16 + body + b"\0" * 64


def test_vmlinux_from_gzip_and_xz_bzimages():
    elf = fake_vmlinux()
    gz = kimg.vmlinux_from_bzimage(fake_bzimage(gzip.compress(elf)))
    assert gz.data == elf and gz.compression == "gzip" and gz.machine == kimg.EM_X86_64
    xz = kimg.vmlinux_from_bzimage(fake_bzimage(lzma.compress(elf, format=lzma.FORMAT_XZ), len(elf)))
    assert xz.data == elf and xz.compression == "xz"
    assert kimg.kernel_release(xz.data) == "6.1.0-99-cloud-amd64"
    assert kimg.vmlinux_from_bzimage(elf).compression == "none"


def test_bzimage_errors_name_the_cause():
    elf = fake_vmlinux()
    with pytest.raises(kimg.KernelImageError, match="says"):
        kimg.vmlinux_from_bzimage(fake_bzimage(lzma.compress(elf, format=lzma.FORMAT_XZ), len(elf) + 1))
    with pytest.raises(kimg.KernelImageError, match="not an ELF"):
        kimg.vmlinux_from_bzimage(fake_bzimage(gzip.compress(b"not a kernel at all")))
    with pytest.raises(kimg.KernelImageError, match="HdrS"):
        kimg.vmlinux_from_bzimage(b"MZ" + b"\0" * 2000)


def cpio(entries: list[tuple[str, bytes]]) -> bytes:
    out = bytearray()
    for index, (name, data) in enumerate(entries + [("TRAILER!!!", b"")]):
        raw = name.encode() + b"\0"
        fields = [index + 1, 0o100644, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(raw), 0]
        out += b"070701" + b"".join(b"%08X" % value for value in fields) + raw
        out += b"\0" * (-len(out) % 4)
        out += data + b"\0" * (-len(data) % 4)
    return bytes(out)


def test_initrd_early_cpio_then_compressed_archive():
    release = "6.1.0-99-cloud-amd64"
    early = cpio([("kernel/x86/microcode/GenuineIntel.bin", b"ucode")])
    main = cpio([("conf/modules", b"virtio_blk \nvirtio_net\n"),
                 (f"usr/lib/modules/{release}/kernel/drivers/block/virtio_blk.ko", b"ko"),
                 (f"usr/lib/modules/{release}/kernel/drivers/net/virtio_net.ko.xz", b"ko")])
    initrd = kimg.read_initrd(early + b"\0" * 512 + gzip.compress(main), ["conf/modules"])
    assert initrd.compression == ["none", "gzip"]
    assert initrd.module_releases() == {release}
    assert initrd.module_names(release) == {"virtio_blk", "virtio_net"}
    assert initrd.files["conf/modules"].startswith(b"virtio_blk")
    assert kimg.missing_modules(["virtio_blk", "virtio-net", "virtio_mmio"], initrd.module_names(release),
                                kimg.parse_modules_builtin("kernel/drivers/virtio/virtio_mmio.ko\n")) == []


# --------------------------------------------------------------------------
# The output directory


def make_version(paths: _golden.Paths, version: str, built_at: str, manifest: bool = True) -> None:
    for kind in ("ext4", "vmlinux", "initrd", "log"):
        Path(paths.artifact(version, kind)).write_bytes(b"x")
    if manifest:
        Path(paths.artifact(version, "json")).write_text(json.dumps({"version": version, "built_at": built_at}))


def test_prune_keeps_current_and_newest_and_drops_incomplete(tmp_path):
    paths = _golden.Paths(str(tmp_path), "ci")
    make_version(paths, "a" * 16, "2026-01-01T00:00:00Z")
    make_version(paths, "b" * 16, "2026-01-02T00:00:00Z")
    make_version(paths, "c" * 16, "2026-01-03T00:00:00Z")
    make_version(paths, "d" * 16, "2026-01-04T00:00:00Z", manifest=False)
    other = _golden.Paths(str(tmp_path), "ci-other")
    make_version(other, "e" * 16, "2026-01-05T00:00:00Z")
    assert _golden.plan_prune(paths, 3, "a" * 16, None) == ["d" * 16]
    assert _golden.plan_prune(paths, 2, "a" * 16, None) == ["d" * 16, "b" * 16]
    assert _golden.plan_prune(paths, 1, "c" * 16, None) == ["d" * 16, "b" * 16, "a" * 16]
    _golden.remove_version(paths, "b" * 16)
    assert sorted(_golden.versions_on_disk(paths)) == ["a" * 16, "c" * 16, "d" * 16]
    assert list(_golden.versions_on_disk(other)) == ["e" * 16]


def test_switch_link_is_atomic_and_refuses_a_regular_file(tmp_path):
    link = tmp_path / "golden-ci.ext4"
    assert _golden.switch_link(str(link), "golden-ci-aaaa.ext4") is True
    assert _golden.switch_link(str(link), "golden-ci-aaaa.ext4") is False
    assert _golden.switch_link(str(link), "golden-ci-bbbb.ext4") is True
    assert os.readlink(link) == "golden-ci-bbbb.ext4" and sorted(os.listdir(tmp_path)) == ["golden-ci.ext4"]
    (tmp_path / "golden-x.ext4").write_text("a real image")
    with pytest.raises(GoldenError, match="not a symlink"):
        _golden.switch_link(str(tmp_path / "golden-x.ext4"), "golden-x-aaaa.ext4")


def test_current_version_reads_the_image_link(tmp_path):
    paths = _golden.Paths(str(tmp_path), "ci")
    assert _golden.current_version(paths) is None
    os.symlink("golden-ci-0123456789abcdef.ext4", paths.link("ext4"))
    assert _golden.current_version(paths) == "0123456789abcdef"


def test_verify_version_names_what_is_wrong(tmp_path):
    paths = _golden.Paths(str(tmp_path), "ci")
    version = "f" * 16
    assert _golden.verify_version(paths, version, "digest", "e2fsck") == "no readable manifest"
    Path(paths.artifact(version, "json")).write_text(json.dumps({"version": version, "input_digest": "other"}))
    assert "other inputs" in _golden.verify_version(paths, version, "digest", "e2fsck")
    Path(paths.artifact(version, "json")).write_text(json.dumps({"version": version, "input_digest": "digest"}))
    assert "is missing" in _golden.verify_version(paths, version, "digest", "e2fsck")


# --------------------------------------------------------------------------
# Guest configuration and the tree


def test_guest_files():
    assert "ClientIdentifier=mac" in _golden.network_file("dhcp") and _golden.network_file("none") is None
    assert "127.0.1.1\tvm.example.org vm\n" in _golden.hosts_file("vm.example.org")
    assert _golden.resolv_conf("static", ["192.0.2.1", "2001:db8::1"]) == "nameserver 192.0.2.1\nnameserver 2001:db8::1\n"
    assert _golden.resolv_conf("resolved", []) is None
    assert "--any --timeout=30" in _golden.wait_online_dropin("/usr/lib/systemd/systemd-networkd-wait-online", 30)


def test_tree_writes_never_follow_the_trees_symlinks(tmp_path):
    tree = tmp_path / "tree"
    outside = tmp_path / "outside"
    (tree / "etc").mkdir(parents=True)
    outside.mkdir()
    (tree / "etc" / "resolv.conf").symlink_to(outside / "resolv.conf")
    _golden_build.tree_write(str(tree), "/etc/resolv.conf", "nameserver 192.0.2.1\n")
    assert not (outside / "resolv.conf").exists() and not (tree / "etc" / "resolv.conf").is_symlink()
    (tree / "etc" / "linked").symlink_to(outside)
    with pytest.raises(GoldenError, match="not a directory"):
        _golden_build.tree_write(str(tree), "/etc/linked/file", "x")
    assert list(outside.iterdir()) == []
    assert _golden_build.tree_read(str(tree), "/etc/linked/file") is None
    _golden_build.tree_clear_dir(str(tree), "/etc/linked")  # through a symlink: nothing happens
    assert (tree / "etc" / "linked").is_symlink()


def test_tree_digest_covers_content_modes_and_links_not_times(tmp_path):
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "a").write_text("one")
    (tree / "lib").symlink_to("usr/lib")
    first = _golden_build.tree_digest(str(tree))
    os.utime(tree / "etc" / "a", (1, 1))
    assert _golden_build.tree_digest(str(tree)) == first
    (tree / "etc" / "a").chmod(0o600)
    second = _golden_build.tree_digest(str(tree))
    assert second != first
    (tree / "lib").unlink()
    (tree / "lib").symlink_to("usr/lib64")
    assert _golden_build.tree_digest(str(tree)) not in (first, second)


def test_dpkg_query_names():
    text = ("bash\tamd64\t5.2.15-2+b7\tii \nlibc6\tamd64\t2.36-9\tii \ntzdata\tall\t2025b\tii \n"
            "libfoo\ti386\t1.0\tii \nremoved\tamd64\t1\trc \n")
    assert _golden_build.parse_dpkg_query(text, "amd64") == {
        "bash": "5.2.15-2+b7", "libc6": "2.36-9", "libfoo:i386": "1.0", "tzdata": "2025b"}


# --------------------------------------------------------------------------
# Kernel, initrd and /lib/modules of a (fake) built tree


RELEASE = "6.1.0-99-cloud-amd64"


def fake_tree(work: Path, initrd_entries=None, modules=("virtio_blk", "virtio_net"), release=RELEASE) -> Path:
    tree = work / "tree"
    moddir = tree / "usr" / "lib" / "modules" / release
    (moddir / "kernel").mkdir(parents=True)
    (moddir / "modules.dep").write_text("")
    (moddir / "modules.builtin").write_text("kernel/fs/ext4/ext4.ko\n")
    for module in modules:
        (moddir / "kernel" / f"{module}.ko").write_bytes(b"ko")
    (tree / "lib").symlink_to("usr/lib")
    (tree / "boot").mkdir()
    (tree / "boot" / f"vmlinuz-{release}").write_bytes(fake_bzimage(gzip.compress(fake_vmlinux(release))))
    if initrd_entries is None:
        initrd_entries = [("conf/modules", b"virtio_blk \nvirtio_net\n")] + [
            (f"usr/lib/modules/{release}/kernel/{module}.ko", b"ko") for module in modules]
    (tree / "boot" / f"initrd.img-{release}").write_bytes(gzip.compress(cpio(initrd_entries)))
    return tree


def builder(work: Path, warnings: list, **overrides) -> _golden_build.Builder:
    req = request(initramfs_modules=["virtio_blk", "virtio_net", "virtio_mmio"], **overrides)
    log = _golden_build.CommandLog(str(work / "build.log"))
    return _golden_build.Builder(req, str(work), _golden.Tools(), log, warnings.append)


def test_kernel_initrd_and_modules_of_one_release(tmp_path):
    fake_tree(tmp_path)
    warnings: list = []
    build = builder(tmp_path, warnings)
    vmlinux, initrd, kernel, initrd_entry, release = build.kernel_files()
    assert release == RELEASE and vmlinux.startswith(b"\x7fELF") and kernel["compression"] == "gzip"
    assert initrd_entry["modules_loaded"] == ["virtio_blk", "virtio_net"] and initrd_entry["source"] == "package"
    assert build.checks["versions_match"] == {"kernel": RELEASE, "initrd": RELEASE,
                                              "modules_dir": f"/usr/lib/modules/{RELEASE}"}
    assert build.checks["virtio"] == {"virtio_blk": "initrd", "virtio_net": "initrd"}
    assert warnings == [f"kernel {RELEASE} has no module virtio_mmio (skipped in the initrd)"]
    assert initrd_entry["sha256"] == _golden.sha256_bytes(initrd)


@pytest.mark.parametrize("entries, message", [
    ([("conf/modules", b"virtio_blk\nvirtio_net\n"), ("usr/lib/modules/6.0.0-1-amd64/kernel/virtio_blk.ko", b"")],
     "the initrd holds modules for 6.0.0-1-amd64"),
    ([("conf/modules", b"virtio_blk\n"), (f"usr/lib/modules/{RELEASE}/kernel/virtio_blk.ko", b"")],
     "virtio_net neither in the initrd nor built into kernel"),
    ([("conf/modules", b"virtio_blk\n"), (f"usr/lib/modules/{RELEASE}/kernel/virtio_blk.ko", b""),
      (f"usr/lib/modules/{RELEASE}/kernel/virtio_net.ko", b"")],
     "modules virtio_net are not loaded by the initrd"),
])
def test_kernel_initrd_mismatches_fail_the_build(tmp_path, entries, message):
    fake_tree(tmp_path, initrd_entries=entries)
    with pytest.raises(GoldenError, match=message):
        builder(tmp_path, []).kernel_files()


def test_image_modules_must_match_the_kernel(tmp_path):
    tree = fake_tree(tmp_path)
    for kind in ("vmlinuz", "initrd.img"):
        (tree / "boot" / f"{kind}-{RELEASE}").rename(tree / "boot" / f"{kind}-6.1.0-98-cloud-amd64")
    with pytest.raises(GoldenError, match="differs from its file name vmlinuz-6.1.0-98-cloud-amd64"):
        builder(tmp_path, []).kernel_files()
    for kind in ("vmlinuz", "initrd.img"):
        (tree / "boot" / f"{kind}-6.1.0-98-cloud-amd64").rename(tree / "boot" / f"{kind}-{RELEASE}")
    (tree / "usr" / "lib" / "modules" / RELEASE).rename(tree / "usr" / "lib" / "modules" / "6.1.0-98-cloud-amd64")
    with pytest.raises(GoldenError, match=f"/lib/modules/{RELEASE} .* is missing from the image"):
        builder(tmp_path, []).kernel_files()


def test_user_kernel_with_built_in_virtio_and_no_initrd(tmp_path):
    (tmp_path / "tree" / "boot").mkdir(parents=True)
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(fake_vmlinux("6.6.0-fc") + b"virtio_blk\0virtio_net\0")
    build = builder(tmp_path, [], kernel=str(kernel))
    _vmlinux, initrd, kernel_entry, initrd_entry, release = build.kernel_files()
    assert release == "6.6.0-fc" and initrd == b"" and kernel_entry["compression"] == "none"
    assert initrd_entry["source"] == "none" and build.checks["virtio"]["virtio_blk"] == "built-in"
    moddir = tmp_path / "tree" / "usr" / "lib" / "modules" / "6.1.0-1-amd64"
    moddir.mkdir(parents=True)
    with pytest.raises(GoldenError, match="the image has modules for 6.1.0-1-amd64 but the kernel is 6.6.0-fc"):
        builder(tmp_path, [], kernel=str(kernel)).kernel_files()

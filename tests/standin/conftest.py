"""Fixtures for fc-standin's own conformance tests.

Every stand-in process a test starts is stopped by its PID in teardown (with
the QEMU processes it started, also by PID); every network namespace is
removed in teardown.  Tests poll with deadlines; they never sleep for a
fixed time to wait for something.  Helpers live in standin_support.py.
"""
from __future__ import annotations

import os
import platform
import secrets
import shutil
import subprocess
from pathlib import Path
from typing import Callable, Iterator

import pytest

from standin_support import (GUEST_INIT, GuestArtifacts, StandinProcess, _apt_download,
                             _cpio_newc, load_standin_module)


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., StandinProcess]]:
    """Factory: spawn(args..., netns=None, env=None, api=True) -> StandinProcess.

    With api=True (default) an --api-sock in tmp_path is added and the
    fixture waits for the socket."""
    procs: list[StandinProcess] = []

    def _spawn(*args: str, netns: str | None = None, env: dict[str, str] | None = None,
               api: bool = True, wait: bool = True, use_shebang: bool = False) -> StandinProcess:
        argv = list(args)
        if api and "--api-sock" not in argv:
            argv = ["--api-sock", str(tmp_path / f"fc-{secrets.token_hex(3)}.sock")] + argv
        p = StandinProcess(tmp_path, argv, netns=netns, env=env, use_shebang=use_shebang)
        procs.append(p)
        if api and wait:
            p.wait_socket()
        return p

    yield _spawn
    for p in procs:
        p.stop()


@pytest.fixture
def standin(spawn) -> StandinProcess:
    """A fresh fc-standin with an API socket, nothing configured."""
    return spawn()


@pytest.fixture(scope="session")
def fcs():
    """fc-standin imported as a Python module (for unit-level checks)."""
    return load_standin_module()


@pytest.fixture
def netns() -> Iterator[str]:
    """A private network namespace (removed in teardown).  Request it before
    `spawn` so that processes are stopped before the namespace goes."""
    if os.geteuid() != 0:
        pytest.fail("network namespace tests need root")
    name = f"fcsi-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


@pytest.fixture(scope="session")
def guest(tmp_path_factory) -> GuestArtifacts:
    """Debian's cloud kernel + a busybox-static initramfs (built once per session)."""
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        pytest.skip("boot tests need an x86_64 Linux host")
    if shutil.which("qemu-system-x86_64") is None and not os.environ.get("FC_STANDIN_QEMU"):
        pytest.fail("qemu-system-x86_64 not found: install Debian's qemu-system-x86 "
                    "(apt-get install -y --no-install-recommends qemu-system-x86)")
    for tool in ("apt-get", "apt-cache", "dpkg-deb"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is needed to fetch the test guest kernel")
    d = tmp_path_factory.mktemp("guest")
    deps = subprocess.run(["apt-cache", "depends", "linux-image-cloud-amd64"],
                          capture_output=True, text=True, check=False).stdout
    image = next((l.split(":", 1)[1].strip() for l in deps.splitlines()
                  if l.strip().startswith("Depends:") and "linux-image-" in l), None)
    if image is None:
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, check=False)
        deps = subprocess.run(["apt-cache", "depends", "linux-image-cloud-amd64"],
                              capture_output=True, text=True, check=False).stdout
        image = next((l.split(":", 1)[1].strip() for l in deps.splitlines()
                      if l.strip().startswith("Depends:") and "linux-image-" in l), None)
    if image is None:
        pytest.fail(f"cannot resolve linux-image-cloud-amd64: {deps}")
    _apt_download([image, "busybox-static", "lz4"], d)
    root = d / "root"
    for deb in sorted(d.glob("*.deb")):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    bzimage = next(iter(sorted(root.glob("boot/vmlinuz-*"))))
    moddir = next(iter(sorted(root.glob("lib/modules/*/kernel"))))
    # extract-vmlinux: the Debian kernel's payload is LZ4 (legacy frame)
    data = bzimage.read_bytes()
    off = data.find(b"\x02\x21\x4c\x18")
    assert off > 0, "no LZ4 payload in the kernel image"
    lz4 = subprocess.run([str(root / "usr/bin/lz4"), "-d", "-c"], input=data[off:],
                         capture_output=True, check=False)
    vmlinux = d / "vmlinux"
    vmlinux.write_bytes(lz4.stdout)
    assert lz4.stdout[:4] == b"\x7fELF", "extract-vmlinux did not produce an ELF image"
    mods = {
        "virtio_ring": "drivers/virtio/virtio_ring.ko", "virtio": "drivers/virtio/virtio.ko",
        "virtio_mmio": "drivers/virtio/virtio_mmio.ko", "virtio_blk": "drivers/block/virtio_blk.ko",
        "failover": "net/core/failover.ko", "net_failover": "drivers/net/net_failover.ko",
        "virtio_net": "drivers/net/virtio_net.ko",
    }
    entries = [(n, 0o40755, b"") for n in ("bin", "dev", "proc", "sys", "lib", "lib/fcsi")]
    entries += [("bin/busybox", 0o100755, (root / "bin/busybox").read_bytes()),
                ("bin/sh", 0o120777, b"busybox"),
                ("init", 0o100755, GUEST_INIT.encode())]
    for name, rel in mods.items():
        entries.append((f"lib/fcsi/{name}.ko", 0o100644, (moddir / rel).read_bytes()))
    initrd = d / "initrd.cpio"
    initrd.write_bytes(_cpio_newc(entries))
    return GuestArtifacts(bzimage, vmlinux, initrd)

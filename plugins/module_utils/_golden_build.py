# -*- coding: utf-8 -*-
# Copyright: (c) 2026, microvm.firecracker contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""golden_image_build: building a version, and the module's run (plan, build, publish, prune).

A build happens in a temporary directory next to the output (same filesystem,
so finished files are renamed into place):

1. bootstrap a minimal tree with mmdebstrap or debootstrap, cached as a
   tarball in the cache directory keyed by the bootstrap inputs;
2. in a private mount namespace (see ``_buildroot``), mount proc/sys/dev/run
   (and the .deb cache) into the tree and install the packages with apt in a
   chroot, then the kernel package, whose initramfs-tools hook builds the
   initrd with the virtio modules listed; configure the guest; run the
   checks that need the tree (GStreamer elements and a pipeline,
   ``systemd-analyze verify``); unmount everything and verify;
3. extract the ELF vmlinux from the image's bzImage and copy the initrd; check
   that kernel, initrd and ``/lib/modules`` are the same release and that the
   virtio modules are there;
4. ``mkfs.ext4 -d TREE`` into a sparse file (no loop device, no mount),
   ``e2fsck -fn``, read back the empty machine-id with debugfs;
5. write the manifest, fsync, rename into place, switch the
   ``golden-<name>.*`` symlinks, prune old versions.

Anything failing before step 5 leaves the symlinks and existing versions
untouched; the temporary directory is removed after verifying that nothing
is mounted below it. Files are written into the tree only through real
directories, never through a symlink the tree holds (which could point at
the host).
"""
from __future__ import annotations

import datetime
import glob
import hashlib
import json
import os
import re
import stat as stat_mod
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ansible_collections.microvm.firecracker.plugins.module_utils import _apt_sources, _buildroot, _ext4, _kernel_image
from ansible_collections.microvm.firecracker.plugins.module_utils._buildroot import BuildrootError, CommandLog
from ansible_collections.microvm.firecracker.plugins.module_utils._golden import (
    ARTIFACTS,
    BOOTSTRAP_CACHE_DAYS,
    FS_LABEL,
    GST_PIPELINE,
    INITRAMFS_CONF,
    INITRAMFS_MODULES_FILE,
    LINK_FILE,
    MANIFEST_FORMAT,
    NETWORK_FILE,
    REQUIRED_MODULES,
    RESOLVED_DROPIN,
    SSH_KEYS_UNIT,
    SSH_KEYS_UNIT_CONTENT,
    STUB_RESOLV,
    WAIT_ONLINE_DROPIN,
    GoldenError,
    OutputLock,
    Paths,
    Request,
    Tools,
    bootstrap_digest,
    build_request,
    current_version,
    fsync_dir,
    fsync_file,
    hosts_file,
    network_file,
    plan_prune,
    public_inputs,
    read_manifest,
    remove_version,
    resolv_conf,
    sha256_bytes,
    sha256_file,
    switch_link,
    verify_version,
    wait_online_dropin,
)
from ansible_collections.microvm.firecracker.plugins.module_utils._kernel_image import KernelImageError


# --------------------------------------------------------------------------
# Writing inside the tree without following its symlinks


def tree_path(tree: str, path: str, create_parents: bool = True) -> str:
    """Host path of in-image ``path``; every parent must be a real directory (created when missing)."""
    if not path.startswith("/") or "/../" in path + "/" or "//" in path:
        raise GoldenError("internal: bad in-image path %r" % path)
    current = tree
    for part in path.strip("/").split("/")[:-1]:
        current = os.path.join(current, part)
        try:
            info = os.lstat(current)
        except FileNotFoundError:
            if not create_parents:
                raise GoldenError("%s: %s does not exist in the image" % (path, current[len(tree):]))
            os.mkdir(current, 0o755)
            continue
        if not stat_mod.S_ISDIR(info.st_mode):
            raise GoldenError("%s: %s in the image is not a directory (a symlink?); refusing to write through it"
                              % (path, current[len(tree):]))
    return os.path.join(tree, path.lstrip("/"))


def tree_write(tree: str, path: str, content: str, mode: int = 0o644) -> None:
    target = tree_path(tree, path)
    if os.path.lexists(target):
        if os.path.isdir(target) and not os.path.islink(target):
            raise GoldenError("%s is a directory in the image" % path)
        os.unlink(target)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(content.encode("utf-8"))
    os.chmod(target, mode)
    os.chown(target, 0, 0)


def tree_symlink(tree: str, path: str, target: str) -> None:
    host = tree_path(tree, path)
    if os.path.lexists(host):
        if os.path.isdir(host) and not os.path.islink(host):
            raise GoldenError("%s is a directory in the image" % path)
        os.unlink(host)
    os.symlink(target, host)


def existing_path(tree: str, path: str) -> Optional[str]:
    """Host path of in-image ``path`` when every parent is a real directory; None otherwise."""
    current = tree
    for part in path.strip("/").split("/")[:-1]:
        current = os.path.join(current, part)
        try:
            info = os.lstat(current)
        except FileNotFoundError:
            return None
        if not stat_mod.S_ISDIR(info.st_mode):
            return None
    return os.path.join(tree, path.lstrip("/"))


def _is_real_dir(path: Optional[str]) -> bool:
    return path is not None and os.path.isdir(path) and not os.path.islink(path)


def tree_remove(tree: str, path: str) -> None:
    """Remove a file or symlink (never a directory, never through a symlinked parent)."""
    host = existing_path(tree, path)
    if host and os.path.lexists(host) and not _is_real_dir(host):
        os.unlink(host)


def tree_clear_dir(tree: str, path: str, keep: Sequence[str] = ()) -> None:
    """Remove the non-directory entries of an in-image directory (not recursive, never through symlinks)."""
    host = existing_path(tree, path)
    if host is None or not _is_real_dir(host):
        return
    for entry in os.listdir(host):
        full = os.path.join(host, entry)
        if entry not in keep and not _is_real_dir(full):
            os.unlink(full)


def tree_read(tree: str, path: str) -> Optional[bytes]:
    """Content of an in-image regular file, never following a symlink; None when it is not one."""
    host = existing_path(tree, path)
    if host is None:
        return None
    try:
        fd = os.open(host, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as handle:
        if not stat_mod.S_ISREG(os.fstat(handle.fileno()).st_mode):
            return None
        return handle.read()


def modules_root(tree: str) -> Optional[str]:
    """In-image directory holding ``<release>/`` module trees: /usr/lib/modules (merged /usr) or /lib/modules."""
    for candidate in ("/usr/lib/modules", "/lib/modules"):
        host = existing_path(tree, candidate)
        if _is_real_dir(host):
            return candidate
    return None


# --------------------------------------------------------------------------
# Build


@dataclass
class BuildResult:
    manifest: Dict[str, Any]
    files: Dict[str, str]  # kind -> path in the build directory
    seconds: float


class Builder:
    """One build in ``workdir`` (a fresh directory next to the output)."""

    def __init__(self, request: Request, workdir: str, tools: Tools, log: CommandLog,
                 warn: Callable[[str], None]) -> None:
        self.request = request
        self.inputs = request.inputs
        self.workdir = workdir
        self.tree = os.path.join(workdir, "tree")
        self.tools = tools
        self.log = log
        self.warn = warn
        self.checks: Dict[str, Any] = {}
        self.apt_proxy = _host_apt_proxy()

    # -- step 1: bootstrap -------------------------------------------------

    def bootstrap_tarball(self) -> Tuple[str, bool]:
        """Path of the bootstrap tarball (built now or reused from the cache) and whether it was reused."""
        digest = bootstrap_digest(self.inputs)[:16]
        name = "bootstrap-%s-%s-%s.tar" % (self.inputs["bootstrap_tool"], self.inputs["suite"], digest)
        directory = self.request.cache_dir or self.workdir
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            os.utime(path)
            self.log.note("bootstrap: reusing %s" % path)
            return path, True
        partial = os.path.join(self.workdir, name + ".partial")
        env = dict(os.environ, TMPDIR=self.workdir, LC_ALL="C")
        components = ",".join(self.inputs["components"])
        if self.inputs["bootstrap_tool"] == "mmdebstrap":
            argv = [self.tools.bootstrap, "--mode=root", "--format=tar", "--components=" + components,
                    "--variant=" + ("debootstrap" if self.inputs["variant"] == "default" else self.inputs["variant"])]
            if self.request.keyring:
                argv.append("--keyring=" + self.request.keyring)
            if self.apt_proxy:
                argv.append('--aptopt=Acquire::http::Proxy "%s"' % self.apt_proxy)
            argv += [self.inputs["suite"], partial, self.inputs["mirror"]]
            self.log.run(argv, "bootstrap (mmdebstrap)", env=env, timeout=3600)
        else:
            os.mkdir(self.tree, 0o755)
            argv = [self.tools.bootstrap, "--components=" + components]
            if self.inputs["variant"] != "default":
                argv.append("--variant=" + self.inputs["variant"])
            if self.request.keyring:
                argv.append("--keyring=" + self.request.keyring)
            if self.request.cache_dir:
                cache = os.path.join(self.request.cache_dir, "debootstrap")
                os.makedirs(cache, mode=0o755, exist_ok=True)
                argv.append("--cache-dir=" + cache)
            if self.apt_proxy:
                env["http_proxy"] = self.apt_proxy
            argv += [self.inputs["suite"], self.tree, self.inputs["mirror"]]
            self.log.run(argv, "bootstrap (debootstrap)", env=env, timeout=3600)
            self.log.run([self.tools.tar, "--create", "--file", partial, "--numeric-owner", "--xattrs",
                          "--xattrs-include=*", "-C", self.tree, "."], "bootstrap: tar the tree")
        os.replace(partial, path)
        return path, False

    def extract(self, tarball: str) -> None:
        if os.path.isdir(self.tree):
            return  # debootstrap just made it
        os.mkdir(self.tree, 0o755)
        self.log.run([self.tools.tar, "--extract", "--file", tarball, "--numeric-owner", "--xattrs",
                      "--xattrs-include=*", "--preserve-permissions", "-C", self.tree], "bootstrap: extract the tree")

    # -- step 2: packages and configuration in the chroot -------------------

    def apt(self, args: Sequence[str], what: str) -> None:
        self._temporary_resolver()
        options = ["-o", "APT::Sandbox::User=root", "-o", "Dpkg::Use-Pty=0", "-o", "Acquire::Languages=none",
                   "-o", "APT::Install-Recommends=false", "-o", "APT::Install-Suggests=false",
                   "-o", "Dpkg::Options::=--force-confdef", "-o", "Dpkg::Options::=--force-confold",
                   "-o", "Dpkg::Options::=--force-unsafe-io",
                   "-o", "APT::Keep-Downloaded-Packages=true", "-o", "Acquire::Retries=3"]
        if self.apt_proxy:
            options += ["-o", "Acquire::http::Proxy=%s" % self.apt_proxy]
        self.log.chroot(self.tree, ["apt-get", "-q", "-y"] + options + list(args), what, timeout=3600)

    def _temporary_resolver(self) -> None:
        """The build host's resolver, for apt only; replaced by the guest's before the image is made."""
        try:
            with open("/etc/resolv.conf", encoding="utf-8", errors="replace") as handle:
                content = handle.read()
        except OSError:
            content = ""
        tree_write(self.tree, "/etc/resolv.conf", content)

    def sources_list(self) -> str:
        lines = ["deb %s %s %s" % (self.inputs["mirror"], self.inputs["suite"], " ".join(self.inputs["components"]))]
        for entry in self.inputs["extra_sources"]:
            lines.append("deb %s %s %s" % (entry["uri"], entry["suite"], " ".join(entry["components"])))
        return "# Written by microvm.firecracker.golden_image\n" + "\n".join(lines) + "\n"

    def install(self) -> None:
        tree = self.tree
        tree_write(tree, "/usr/sbin/policy-rc.d", "#!/bin/sh\n# No daemons start while the image is built.\nexit 101\n",
                   0o755)
        tree_write(tree, "/etc/apt/sources.list", self.sources_list())
        tree_clear_dir(tree, "/etc/apt/sources.list.d")
        self.apt(["update"], "apt-get update")
        self.apt(["dist-upgrade"], "apt-get dist-upgrade")
        self.apt(["install"] + self.request.packages, "apt-get install (packages)")
        if self.request.kernel_package:
            tree_write(tree, INITRAMFS_CONF,
                       "# Written by microvm.firecracker.golden_image: only the listed modules (MODULES=dep cannot\n"
                       "# work in a chroot), gzip so the initrd can be inspected anywhere.\n"
                       "MODULES=list\nCOMPRESS=gzip\n")
            tree_write(tree, INITRAMFS_MODULES_FILE,
                       "# Written by microvm.firecracker.golden_image: loaded in this order by the initrd, so\n"
                       "# the root filesystem on virtio-blk (virtio-mmio) is found.\n"
                       + "".join(module + "\n" for module in self.request.initramfs_modules))
            self.apt(["install", self.request.kernel_package], "apt-get install (kernel %s)" % self.request.kernel_package)
        self.apt(["autoclean"], "apt-get autoclean")

    def configure(self) -> List[str]:
        """Guest configuration; returns the units to check with ``systemd-analyze verify``."""
        tree = self.tree
        guest = self.inputs["guest"]
        verify: List[str] = []
        tree_write(tree, "/etc/hostname", guest["hostname"] + "\n")
        tree_write(tree, "/etc/hosts", hosts_file(guest["hostname"]))
        network = network_file(guest["network"])
        if network:
            tree_write(tree, NETWORK_FILE, network)
        tree_symlink(tree, LINK_FILE, "/dev/null")  # keep the kernel's eth0 name (no predictable renaming)
        enable = ["systemd-networkd.service"]
        mask = []
        if guest["resolver"] == "resolved":
            enable.append("systemd-resolved.service")
            if guest["nameservers"]:
                tree_write(tree, RESOLVED_DROPIN, "[Resolve]\nDNS=%s\n" % " ".join(guest["nameservers"]))
        if guest["wait_online_timeout"]:
            binary = "/usr/lib/systemd/systemd-networkd-wait-online"
            if tree_read(tree, binary) is None:
                binary = "/lib/systemd/systemd-networkd-wait-online"
            tree_write(tree, WAIT_ONLINE_DROPIN, wait_online_dropin(binary, guest["wait_online_timeout"]))
            verify.append("/etc/systemd/system/systemd-networkd-wait-online.service")
        else:
            mask.append("systemd-networkd-wait-online.service")
        if guest["serial_console"]:
            enable.append("serial-getty@ttyS0.service")
        if tree_read(tree, "/usr/sbin/sshd") is not None:
            tree_write(tree, "/etc/systemd/system/" + SSH_KEYS_UNIT, SSH_KEYS_UNIT_CONTENT)
            enable.append(SSH_KEYS_UNIT)
            verify.append("/etc/systemd/system/" + SSH_KEYS_UNIT)
        if self.request.ssh_keys:
            root_ssh = tree_path(tree, "/root/.ssh/authorized_keys")
            os.chmod(os.path.dirname(root_ssh), 0o700)
            tree_write(tree, "/root/.ssh/authorized_keys", "".join(key + "\n" for key in self.request.ssh_keys), 0o600)
        for unit in self.request.units:
            tree_write(tree, "/etc/systemd/system/" + unit["name"], unit["content"])
            verify.append("/etc/systemd/system/" + unit["name"])
            if unit["enabled"]:
                enable.append(unit["name"])
        self.log.chroot(tree, ["systemctl", "enable"] + enable, "systemctl enable")
        if mask:
            self.log.chroot(tree, ["systemctl", "mask"] + mask, "systemctl mask")
        if self.request.root_password_hash:
            self.log.chroot(tree, ["chpasswd", "--encrypted"], "set the root password",
                            input_data=("root:%s\n" % self.request.root_password_hash).encode("utf-8"))
        else:
            self.log.chroot(tree, ["usermod", "--password", "*", "root"], "lock the root password")
        return verify

    def check_in_tree(self, verify_units: Sequence[str]) -> None:
        tree = self.tree
        if verify_units:
            self.log.chroot(tree, ["systemd-analyze", "verify", "--man=no"] + list(verify_units),
                            "systemd-analyze verify")
            self.checks["systemd_analyze_verify"] = [os.path.basename(unit) for unit in verify_units]
        if self.request.gst_elements:
            env = {"GST_REGISTRY": "/tmp/.golden-gst-registry.bin", "XDG_CACHE_HOME": "/tmp/.golden-cache",
                   "HOME": "/tmp"}
            missing = []
            for element in self.request.gst_elements:
                code, output = self.log.chroot(tree, ["gst-inspect-1.0", element], "gst-inspect-1.0 %s" % element,
                                               env=env, ok_codes=(0, 1), timeout=300)
                if code != 0 or b"Factory Details" not in output:
                    missing.append(element)
            if missing:
                raise GoldenError("GStreamer elements missing from the image: %s (gst-inspect-1.0 does not find "
                                  "them; see the build log)" % ", ".join(missing))
            self.log.chroot(tree, ["gst-launch-1.0", "-q"] + list(GST_PIPELINE), "GStreamer pipeline", env=env,
                            timeout=300)
            self.checks["gstreamer"] = {"elements": list(self.request.gst_elements),
                                        "pipeline": " ".join(GST_PIPELINE)}

    def package_versions(self) -> Dict[str, str]:
        """Installed packages and versions; names carry ``:arch`` only for a foreign architecture."""
        _code, output = self.log.chroot(self.tree, ["dpkg-query", "-W", "-f",
                                                    "${Package}\\t${Architecture}\\t${Version}\\t${db:Status-Abbrev}\\n"],
                                        "dpkg-query")
        return parse_dpkg_query(output.decode("utf-8", "replace"), self.inputs["architecture"])

    def kernel_owner(self, release: str) -> Optional[str]:
        code, output = self.log.chroot(self.tree, ["dpkg-query", "-S", "/boot/vmlinuz-%s" % release],
                                       "dpkg-query -S vmlinuz", ok_codes=(0, 1))
        if code != 0:
            return None
        return output.decode("utf-8", "replace").split(":", 1)[0].strip() or None

    def cleanup_tree(self) -> None:
        """Remove what the build needed but the guest must not inherit (run after unmounting)."""
        tree = self.tree
        guest = self.inputs["guest"]
        tree_remove(tree, "/usr/sbin/policy-rc.d")
        # systemd-resolved's postinst keeps the resolv.conf it replaced (the build host's copy).
        tree_remove(tree, "/etc/.resolv.conf.systemd-resolved.bak")
        dbus_id = existing_path(tree, "/var/lib/dbus/machine-id")
        if dbus_id and os.path.isfile(dbus_id) and not os.path.islink(dbus_id):
            os.unlink(dbus_id)  # a copy of the build's id; dbus falls back to /etc/machine-id
        content = resolv_conf(guest["resolver"], guest["nameservers"])
        if content is None:
            tree_symlink(tree, "/etc/resolv.conf", STUB_RESOLV)
        else:
            tree_write(tree, "/etc/resolv.conf", content)
        tree_clear_dir(tree, "/var/lib/apt/lists", keep=("lock",))
        tree_clear_dir(tree, "/var/cache/apt/archives", keep=("lock",))
        tree_clear_dir(tree, "/var/cache/apt")
        for directory in ("/tmp", "/var/tmp"):
            host = existing_path(tree, directory)
            if _is_real_dir(host):
                for entry in os.listdir(host):
                    _buildroot.remove_tree(os.path.join(host, entry))
        ssh_dir = existing_path(tree, "/etc/ssh")
        if _is_real_dir(ssh_dir):
            for entry in os.listdir(ssh_dir):
                if entry.startswith("ssh_host_"):
                    os.unlink(os.path.join(ssh_dir, entry))
        tree_write(tree, "/etc/machine-id", "", 0o444)

    # -- step 3: kernel and initrd ------------------------------------------

    def kernel_files(self) -> Tuple[bytes, bytes, Dict[str, Any], Dict[str, Any], str]:
        """(vmlinux, initrd, kernel entry, initrd entry, release), checked against each other and the image."""
        tree = self.tree
        release_file = ""
        if self.request.kernel_file:
            with open(self.request.kernel_file, "rb") as handle:
                raw = handle.read()
            initrd_data = b""
            if self.request.initrd_file:
                with open(self.request.initrd_file, "rb") as handle:
                    initrd_data = handle.read()
            source = "file"
        else:
            kernels = boot_kernels(tree)
            if len(kernels) != 1:
                raise GoldenError("the image must hold exactly one kernel in /boot, found %s"
                                  % (", ".join("vmlinuz-" + k for k in kernels) or "none"))
            release_file = kernels[0]
            kernel_data = tree_read(tree, "/boot/vmlinuz-" + release_file)
            initrd_read = tree_read(tree, "/boot/initrd.img-" + release_file)
            if kernel_data is None:
                raise GoldenError("/boot/vmlinuz-%s in the image is not a regular file" % release_file)
            if initrd_read is None:
                raise GoldenError("no initrd /boot/initrd.img-%s was built in the image (initramfs-tools)"
                                  % release_file)
            raw, initrd_data = kernel_data, initrd_read
            source = "package"
        try:
            vmlinux = _kernel_image.vmlinux_from_bzimage(raw, self.tools.decompressors)
            release = _kernel_image.kernel_release(vmlinux.data)
        except KernelImageError as exc:
            raise GoldenError("kernel: %s" % exc)
        if vmlinux.machine != _kernel_image.EM_X86_64:
            raise GoldenError("kernel: not an x86_64 vmlinux (ELF machine %#x)" % vmlinux.machine)
        root = modules_root(tree)
        image_releases = sorted(os.listdir(existing_path(tree, root) or "")) if root else []
        modules_dir = "%s/%s" % (root, release) if root and release in image_releases else None
        if source == "package":
            if release != release_file:
                raise GoldenError("kernel release %s (from the vmlinux banner) differs from its file name "
                                  "vmlinuz-%s" % (release, release_file))
            if modules_dir is None or tree_read(tree, modules_dir + "/modules.dep") is None:
                raise GoldenError("/lib/modules/%s (with modules.dep) is missing from the image" % release)
        elif image_releases and release not in image_releases:
            raise GoldenError("the image has modules for %s but the kernel is %s" % (", ".join(image_releases), release))

        builtin = set()
        builtin_text = tree_read(tree, modules_dir + "/modules.builtin") if modules_dir else None
        if builtin_text is not None:
            builtin = _kernel_image.parse_modules_builtin(builtin_text.decode("utf-8", "replace"))
        initrd_entry: Dict[str, Any] = {"source": source if initrd_data else "none"}
        in_initrd: set = set()
        loaded: List[str] = []
        initrd_release = None
        if initrd_data:
            try:
                initrd = _kernel_image.read_initrd(initrd_data, ["conf/modules"], self.tools.decompressors)
            except KernelImageError as exc:
                raise GoldenError("initrd: %s" % exc)
            releases = initrd.module_releases()
            if releases and releases != {release}:
                raise GoldenError("the initrd holds modules for %s, the kernel is %s"
                                  % (", ".join(sorted(releases)), release))
            in_initrd = initrd.module_names(release)
            initrd_release = release if releases else None
            loaded = [line.split()[0] for line in initrd.files.get("conf/modules", b"").decode("utf-8", "replace")
                      .splitlines() if line.strip() and not line.startswith("#")]
            initrd_entry.update(compression=initrd.compression, module_release=initrd_release, modules_loaded=loaded)
        # Required drivers: in the initrd or built into the kernel; with a user kernel and no module list,
        # the driver names in the kernel itself count as built in.
        if source == "file" and builtin_text is None:
            builtin = {name for name in REQUIRED_MODULES if name.encode() in vmlinux.data}
        missing = _kernel_image.missing_modules(REQUIRED_MODULES, in_initrd, builtin)
        if missing:
            raise GoldenError("%s neither in the initrd nor built into kernel %s" % (", ".join(missing), release))
        if source == "package" and modules_dir:
            norm = _kernel_image.normalise_module
            modules_on_disk = self._modules_of(modules_dir)
            loaded_names = {norm(name) for name in loaded}
            absent = [m for m in self.request.initramfs_modules if norm(m) not in modules_on_disk | builtin]
            not_loaded = [m for m in self.request.initramfs_modules
                          if norm(m) in modules_on_disk and (norm(m) not in in_initrd or norm(m) not in loaded_names)]
            if not_loaded:
                raise GoldenError("initrd: modules %s are not loaded by the initrd (conf/modules)" % ", ".join(not_loaded))
            if absent:
                self.warn("kernel %s has no module %s (skipped in the initrd)" % (release, ", ".join(absent)))
        self.checks["versions_match"] = {"kernel": release, "initrd": initrd_release, "modules_dir": modules_dir}
        self.checks["virtio"] = {name: ("initrd" if name in in_initrd else "built-in") for name in REQUIRED_MODULES}
        kernel_entry = {"source": source, "release": release, "compression": vmlinux.compression,
                        "sha256": sha256_bytes(vmlinux.data), "size_bytes": len(vmlinux.data)}
        initrd_entry.update(sha256=sha256_bytes(initrd_data), size_bytes=len(initrd_data))
        return vmlinux.data, initrd_data, kernel_entry, initrd_entry, release

    def _modules_of(self, modules_dir: str) -> set:
        names = set()
        base = existing_path(self.tree, modules_dir)
        if not _is_real_dir(base):
            return names
        for _root, _dirs, files in os.walk(base):
            for entry in files:
                if ".ko" in entry:
                    names.add(_kernel_image.normalise_module(entry.split(".ko", 1)[0]))
        return names

    # -- step 4: the image ---------------------------------------------------

    def make_image(self, path: str) -> Dict[str, Any]:
        with open(path, "wb") as handle:
            handle.truncate(self.request.size)
        fs_uuid = str(uuid.uuid5(uuid.NAMESPACE_URL, "microvm-golden:%s:%s" % (self.request.name, self.request.version)))
        self.log.run([self.tools.mkfs, "-q", "-F", "-t", "ext4", "-L", FS_LABEL, "-U", fs_uuid,
                      "-E", "root_owner=0:0,hash_seed=%s" % fs_uuid, "-d", self.tree, path], "mkfs.ext4 -d",
                     env=dict(os.environ, LC_ALL="C"), timeout=3600)
        fsck = _ext4.e2fsck(path, self.tools.e2fsck)
        if not fsck.ok:
            raise GoldenError("e2fsck -fn on the new image found problems (exit %d): %s"
                              % (fsck.returncode, fsck.describe()))
        self.checks["e2fsck"] = fsck.summary
        debugfs = _ext4.Debugfs(path, self.tools.debugfs)
        try:
            stats = debugfs.stat_many(["/etc/machine-id", "/etc/resolv.conf"])
        except _ext4.Ext4Error as exc:
            raise GoldenError("cannot read the new image back with debugfs: %s" % exc)
        machine_id = stats["/etc/machine-id"]
        if machine_id is None or machine_id.kind != _ext4.KIND_REGULAR or machine_id.size != 0:
            raise GoldenError("/etc/machine-id in the new image is not an empty file")
        self.checks["machine_id_empty"] = True
        resolv = stats["/etc/resolv.conf"]
        self.checks["resolv_conf"] = ("symlink to %s" % resolv.target.decode("utf-8", "replace")
                                      if resolv is not None and resolv.target is not None
                                      else "file (%d bytes)" % (resolv.size if resolv else 0))
        info = os.stat(path)
        return {"file": os.path.basename(path), "size_bytes": info.st_size, "allocated_bytes": info.st_blocks * 512,
                "fs_uuid": fs_uuid, "label": FS_LABEL}

    # -- the whole build -----------------------------------------------------

    def run(self, names: Dict[str, str]) -> BuildResult:
        started = time.monotonic()
        tarball, reused = self.bootstrap_tarball()
        self.extract(tarball)
        binds = []
        if self.request.cache_dir:
            debs = os.path.join(self.request.cache_dir, "debs")
            os.makedirs(os.path.join(debs, "partial"), mode=0o755, exist_ok=True)
            binds.append((debs, "/var/cache/apt/archives"))
        try:
            with _buildroot.ChrootMounts(self.tree, binds):
                try:
                    self.install()
                    verify_units = self.configure()
                    self.check_in_tree(verify_units)
                    packages = self.package_versions()
                    kernel_owner = None
                    kernels = boot_kernels(self.tree)
                    if self.request.kernel_package and len(kernels) == 1:
                        kernel_owner = self.kernel_owner(kernels[0])
                finally:
                    killed = _buildroot.kill_processes_in(self.tree)
                    if killed:
                        self.log.note("killed processes left in the tree: %s" % killed)
        except BuildrootError as exc:
            raise GoldenError(str(exc))
        self.cleanup_tree()
        vmlinux, initrd, kernel_entry, initrd_entry, release = self.kernel_files()
        if kernel_owner:
            kernel_entry["package"] = kernel_owner
            kernel_entry["package_version"] = packages.get(kernel_owner)
        content_digest = tree_digest(self.tree)
        image_entry = self.make_image(names["ext4"])
        image_entry["content_digest"] = "sha256:" + content_digest
        with open(names["vmlinux"], "wb") as handle:
            handle.write(vmlinux)
        with open(names["initrd"], "wb") as handle:
            handle.write(initrd)
        _buildroot.remove_tree(self.tree)  # free the space before the manifest; nothing is mounted there
        kernel_entry["file"] = os.path.basename(names["vmlinux"])
        initrd_entry["file"] = os.path.basename(names["initrd"])
        seconds = round(time.monotonic() - started, 1)
        manifest = {
            "format": MANIFEST_FORMAT,
            "name": self.request.name,
            "version": self.request.version,
            "input_digest": self.request.digest,
            "built_at": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "build_seconds": seconds,
            "inputs": public_inputs(self.inputs),
            "bootstrap": {"tool": self.inputs["bootstrap_tool"], "tarball_reused": reused},
            "image": image_entry,
            "kernel": kernel_entry,
            "initrd": initrd_entry,
            "kernel_release": release,
            "modules_dir": self.checks["versions_match"]["modules_dir"],
            "packages": packages,
            "checks": self.checks,
        }
        return BuildResult(manifest=manifest, files=names, seconds=seconds)


def parse_dpkg_query(text: str, native: str) -> Dict[str, str]:
    packages = {}
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) == 4 and parts[3].startswith("ii"):
            name = parts[0] if parts[1] in (native, "all") else "%s:%s" % (parts[0], parts[1])
            packages[name] = parts[2]
    return dict(sorted(packages.items()))


def boot_kernels(tree: str) -> List[str]:
    """Releases of the ``/boot/vmlinuz-<release>`` files in the tree."""
    boot = existing_path(tree, "/boot")
    if boot is None or not _is_real_dir(boot):
        return []
    return sorted(entry[len("vmlinuz-"):] for entry in os.listdir(boot) if entry.startswith("vmlinuz-"))


def tree_digest(tree: str) -> str:
    """sha256 over every path's type, mode, owner, size, content or link target (sorted; times excluded)."""
    digest = hashlib.sha256()
    base = len(tree.rstrip("/"))
    for root, dirs, files in os.walk(tree):
        dirs.sort()
        for entry in sorted(dirs + files):
            path = os.path.join(root, entry)
            info = os.lstat(path)
            rel = path[base:]
            head = "%s\0%o\0%d\0%d\0" % (rel, info.st_mode, info.st_uid, info.st_gid)
            digest.update(head.encode("utf-8", "surrogateescape"))
            if stat_mod.S_ISREG(info.st_mode):
                digest.update(b"%d\0" % info.st_size)
                digest.update(bytes.fromhex(sha256_file(path)))
            elif stat_mod.S_ISLNK(info.st_mode):
                digest.update(os.fsencode(os.readlink(path)) + b"\0")
            elif stat_mod.S_ISCHR(info.st_mode) or stat_mod.S_ISBLK(info.st_mode):
                digest.update(b"%d\0" % info.st_rdev)
        # os.walk does not descend into symlinked directories (followlinks=False).
    return digest.hexdigest()


def _host_apt_proxy() -> Optional[str]:
    """``Acquire::http::Proxy`` of the build host's apt, so the build goes where the host's apt goes."""
    try:
        proc = subprocess.run(["apt-config", "shell", "PROXY", "Acquire::http::Proxy"], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, check=False)
    except OSError:
        return None
    match = re.search(r"^PROXY='([^']*)'", proc.stdout.decode("utf-8", "replace"), re.M)
    value = match.group(1) if match else ""
    return value if value and value.upper() != "DIRECT" else None


def remove_stale_builds(paths: Paths, warn: Callable[[str], None]) -> None:
    """Build directories of interrupted runs (we hold the lock, so no build is running)."""
    for path in glob.glob(os.path.join(glob.escape(paths.output_dir), paths.build_prefix + "*")):
        try:
            # A killed run's children (apt in the chroot) may still be working there.
            _buildroot.kill_processes_in(path)
            _buildroot.remove_tree(path)
            warn("removed %s, left by an interrupted build" % path)
        except BuildrootError as exc:
            raise GoldenError("cannot remove the leftover build directory: %s" % exc)


# --------------------------------------------------------------------------
# The module's run


def run(params: Dict[str, Any], *, check_mode: bool, tools: Tools, host_arch: str,
        warn: Callable[[str], None] = lambda msg: None) -> Dict[str, Any]:
    request = build_request(params, _apt_sources.host_sources, host_arch)
    paths = Paths(request.output_dir, request.name)
    version = request.version
    previous = current_version(paths)
    result: Dict[str, Any] = {
        "changed": False, "built": False, "name": request.name, "version": version, "previous_version": previous,
        "input_digest": request.digest, "image": paths.artifact(version, "ext4"),
        "kernel": paths.artifact(version, "vmlinux"), "initrd": paths.artifact(version, "initrd"),
        "manifest": paths.artifact(version, "json"),
        "links": {"image": paths.link("ext4"), "kernel": paths.link("vmlinux"), "initrd": paths.link("initrd"),
                  "manifest": paths.link("json")},
        "pruned": [], "build_log": None, "rebuild_reason": None,
    }
    exists = os.path.lexists(paths.artifact(version, "json"))
    if exists and not tools.e2fsck:
        raise GoldenError("e2fsck (e2fsprogs) is not installed; it is needed to verify the existing version")
    problem = verify_version(paths, version, request.digest, tools.e2fsck) if exists else "not built yet"
    need_build = problem is not None
    if need_build and exists:
        result["rebuild_reason"] = problem
    links_to_switch = [kind for kind in ARTIFACTS if _link_target(paths.link(kind)) !=
                       os.path.basename(paths.artifact(version, kind))]
    prune = plan_prune(paths, request.keep_versions, version, None)
    result["pruned"] = prune
    result["changed"] = bool(need_build or links_to_switch or prune)
    result["built"] = need_build
    result["diff"] = {"before": "version: %s\n" % (previous or "none"), "after": "version: %s\n" % version}
    if check_mode or not result["changed"]:
        if not need_build:
            result["manifest_data"] = read_manifest(paths.artifact(version, "json"))
        return result

    missing = tools.missing(need_build)
    if missing:
        raise GoldenError("missing tools on the build host: %s (install %s)" % (
            ", ".join(params["bootstrap_tool"] if name == "bootstrap" else name for name in missing),
            "e2fsprogs, tar, coreutils and " + params["bootstrap_tool"]))
    os.makedirs(paths.output_dir, mode=0o755, exist_ok=True)
    if request.cache_dir:
        os.makedirs(request.cache_dir, mode=0o755, exist_ok=True)
    with OutputLock(paths.lock):
        remove_stale_builds(paths, warn)
        if need_build:
            result.update(_build(request, paths, tools, warn))
        for kind in ARTIFACTS:
            switch_link(paths.link(kind), os.path.basename(paths.artifact(version, kind)))
        fsync_dir(paths.output_dir)
        prune = plan_prune(paths, request.keep_versions, version, None)
        for old in prune:
            remove_version(paths, old)
        result["pruned"] = prune
    result["manifest_data"] = read_manifest(paths.artifact(version, "json"))
    return result


def _link_target(link: str) -> Optional[str]:
    try:
        return os.readlink(link)
    except OSError:
        return None


def _build(request: Request, paths: Paths, tools: Tools, warn: Callable[[str], None]) -> Dict[str, Any]:
    _buildroot.private_mount_namespace()
    workdir = tempfile.mkdtemp(prefix=paths.build_prefix, dir=paths.output_dir)
    os.chmod(workdir, 0o700)
    log_path = os.path.join(workdir, "build.log")
    log = CommandLog(log_path, tools.chroot or "chroot")
    names = {kind: os.path.join(workdir, os.path.basename(paths.artifact(request.version, kind)))
             for kind in ARTIFACTS}
    failure: Optional[BaseException] = None
    try:
        builder = Builder(request, workdir, tools, log, warn)
        try:
            outcome = builder.run(names)
        except (BuildrootError, KernelImageError, OSError) as exc:
            raise GoldenError(str(exc))
        manifest = outcome.manifest
        with open(names["json"], "w", encoding="utf-8") as handle:
            json.dump(manifest, handle, indent=2, sort_keys=True)
            handle.write("\n")
        os.chmod(names["ext4"], 0o640)
        for kind in ("vmlinux", "initrd", "json"):
            os.chmod(names[kind], 0o644)
        for kind in ARTIFACTS:
            fsync_file(names[kind])
        log.note("build finished in %.1fs" % outcome.seconds)
        log.close()
        os.replace(log_path, paths.artifact(request.version, "log"))
        for kind in ARTIFACTS:  # the manifest last: it marks the version complete
            os.replace(names[kind], paths.artifact(request.version, kind))
        fsync_dir(paths.output_dir)
        if os.path.lexists(paths.failed_log):
            os.unlink(paths.failed_log)  # an earlier failure's log would now mislead
        if request.cache_dir:
            _prune_bootstrap_cache(request.cache_dir)
        return {"build_seconds": outcome.seconds, "build_log": paths.artifact(request.version, "log")}
    except BaseException as exc:
        failure = exc
        raise
    finally:
        log.close()
        if failure is not None and os.path.exists(log_path):
            try:
                os.replace(log_path, paths.failed_log)
            except OSError:
                pass
        cleanup_problem = _cleanup_workdir(workdir)
        if failure is not None:
            if isinstance(failure, GoldenError):
                failure.args = ("%s (full log: %s)%s" % (failure, paths.failed_log,
                                                         "; " + cleanup_problem if cleanup_problem else ""),)
        elif cleanup_problem:
            raise GoldenError(cleanup_problem)


def _cleanup_workdir(workdir: str) -> Optional[str]:
    """Kill leftovers, unmount, verify, remove; returns a problem description instead of raising."""
    problems = []
    try:
        _buildroot.kill_processes_in(workdir)
    except BuildrootError as exc:
        problems.append(str(exc))
    left = _buildroot.mounts_under(workdir)
    for point in reversed(left):
        try:
            _buildroot.umount(point)
        except BuildrootError:
            try:
                _buildroot.umount(point, lazy=True)
            except BuildrootError as exc:
                problems.append(str(exc))
    left = _buildroot.mounts_under(workdir)
    if left:
        problems.append("still mounted under the build directory: %s" % ", ".join(left))
        return "; ".join(problems)
    try:
        _buildroot.remove_tree(workdir)
    except (BuildrootError, OSError) as exc:
        problems.append("cannot remove the build directory %s: %s" % (workdir, exc))
    return "; ".join(problems) or None


def _prune_bootstrap_cache(cache_dir: str) -> None:
    """Bootstrap tarballs unused for BOOTSTRAP_CACHE_DAYS (each use refreshes the mtime)."""
    horizon = time.time() - BOOTSTRAP_CACHE_DAYS * 86400
    for path in glob.glob(os.path.join(glob.escape(cache_dir), "bootstrap-*.tar")):
        try:
            if os.path.getmtime(path) < horizon:
                os.unlink(path)
        except OSError:
            pass

# -*- coding: utf-8 -*-
# Copyright: (c) 2026, microvm.firecracker contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""golden_image_build: the inputs, the version they name, and the output directory's versions and symlinks.

Versions are named by content: every input that shapes the image (suite,
mirror, components, variant, the package list after profile expansion, the
kernel, guest configuration, units, size, bootstrap tool and this recipe's own
version ``RECIPE_VERSION``) goes into one canonical JSON document whose
sha256 is the input digest; its first 16 hex digits are the version. Same
inputs, same version: when ``golden-<name>-<version>.ext4`` and its manifest
exist and verify, nothing is built (``changed: false``).

The output directory holds, per version, ``golden-<name>-<version>.ext4``,
``.vmlinux``, ``.initrd``, ``.log`` and the manifest ``.json`` (renamed into
place last: a version without a manifest is incomplete), and the symlinks
``golden-<name>.ext4``/``.vmlinux``/``.initrd``/``.json``, each switched
atomically (a symlink under a temporary name, then ``rename``).

Everything here is pure or touches only the output directory; the build
itself (chroot, mounts, mkfs) is ``_golden_build``.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import ipaddress
import json
import os
import re
import stat as stat_mod
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ansible_collections.microvm.firecracker.plugins.module_utils import _apt_sources, _ext4

# Bump whenever the build steps change what an image contains: every version is rebuilt.
RECIPE_VERSION = "1"
MANIFEST_FORMAT = 1

PROFILES: Dict[str, Tuple[str, ...]] = {
    "base": ("systemd", "systemd-sysv", "udev", "kmod", "iproute2", "dbus", "ca-certificates", "netbase", "procps",
             "iputils-ping"),
    "gstreamer": ("gstreamer1.0-tools", "gstreamer1.0-plugins-base", "gstreamer1.0-plugins-good",
                  "gstreamer1.0-plugins-bad", "gstreamer1.0-plugins-ugly", "gstreamer1.0-nice"),
}
DEFAULT_INITRAMFS_MODULES = ("virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_pci",
                             "virtio_mmio", "virtio_blk", "failover", "net_failover", "virtio_net")
REQUIRED_MODULES = ("virtio_blk", "virtio_net")
DEFAULT_GST_ELEMENTS = ("videotestsrc", "vp8enc", "vp8dec", "rtpvp8pay", "webrtcbin", "nicesrc", "nicesink",
                        "dtlssrtpenc", "opusenc")
GST_PIPELINE = ("videotestsrc", "num-buffers=30", "!", "video/x-raw,width=320,height=240", "!", "vp8enc",
                "deadline=1", "!", "fakesink")
# Suites whose systemd package still contains systemd-resolved (no separate package).
RESOLVED_IN_SYSTEMD = frozenset(("buster", "bullseye", "focal", "jammy"))

NETWORK_FILE = "/etc/systemd/network/10-eth0.network"
LINK_FILE = "/etc/systemd/network/99-default.link"
WAIT_ONLINE_DROPIN = "/etc/systemd/system/systemd-networkd-wait-online.service.d/microvm-golden.conf"
RESOLVED_DROPIN = "/etc/systemd/resolved.conf.d/microvm-golden.conf"
SSH_KEYS_UNIT = "microvm-ssh-host-keys.service"
INITRAMFS_CONF = "/etc/initramfs-tools/conf.d/microvm-golden.conf"
INITRAMFS_MODULES_FILE = "/etc/initramfs-tools/modules"
STUB_RESOLV = "../run/systemd/resolve/stub-resolv.conf"
FS_LABEL = "rootfs"
BOOTSTRAP_CACHE_DAYS = 14

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_PACKAGE_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+(?::[a-z0-9-]+)?(?:=[A-Za-z0-9.+~:-]+)?$")
_COMPONENT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")
_MODULE_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_ELEMENT_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_HOST_LABEL_RE = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_UNIT_RE = re.compile(r"^[A-Za-z0-9:_.\\-]+(?:@[A-Za-z0-9:_.\\-]*)?\.(service|socket|target|path|timer|mount|"
                      r"automount|swap|slice)$")
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*$", re.I)
_VERSION_FILE_RE = re.compile(r"^golden-(?P<name>.+)-(?P<version>[0-9a-f]{16})\.(?P<kind>ext4|vmlinux|initrd|json|log)$")
ARTIFACTS = ("ext4", "vmlinux", "initrd", "json")
MIN_SIZE = 64 * 1024 * 1024


class GoldenError(Exception):
    """Invalid input, or a build or check that failed; the message names the step and the cause."""

# --------------------------------------------------------------------------
# Inputs


@dataclass
class Tools:
    """Paths of the host tools; None for one that is not installed (required only when it is used)."""

    mkfs: Optional[str] = "mkfs.ext4"
    e2fsck: Optional[str] = "e2fsck"
    debugfs: Optional[str] = "debugfs"
    tar: Optional[str] = "tar"
    chroot: Optional[str] = "chroot"
    bootstrap: Optional[str] = None  # mmdebstrap or debootstrap
    decompressors: Dict[str, str] = field(default_factory=dict)  # lz4/zstd/lzo -> path

    def missing(self, building: bool) -> List[str]:
        needed = {"e2fsck": self.e2fsck}
        if building:
            needed.update(mkfs=self.mkfs, debugfs=self.debugfs, tar=self.tar, chroot=self.chroot,
                          bootstrap=self.bootstrap)
        return sorted(name for name, path in needed.items() if not path)


@dataclass
class Request:
    name: str
    output_dir: str
    cache_dir: Optional[str]
    keep_versions: int
    inputs: Dict[str, Any]  # the canonical, digested document
    packages: List[str]  # without the kernel package
    kernel_package: Optional[str]
    kernel_file: Optional[str]
    initrd_file: Optional[str]
    initramfs_modules: List[str]
    gst_elements: List[str]
    units: List[Dict[str, Any]]
    root_password_hash: Optional[str]
    ssh_keys: List[str]
    keyring: Optional[str]
    size: int
    digest: str = ""
    version: str = ""


def parse_size(value: Any) -> int:
    """``8G``, ``8GiB``, ``512M``, or a number of bytes -> bytes (binary units)."""
    if isinstance(value, bool):
        raise GoldenError("size %r is not a size" % (value,))
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE_RE.match(str(value))
        if not match:
            raise GoldenError("size %r is not a size such as 8G, 8GiB, 512M or a number of bytes" % (value,))
        size = int(match.group(1)) * 1024 ** " KMGT".index((match.group(2) or " ").upper())
    if size < MIN_SIZE:
        raise GoldenError("size %d bytes is below the minimum of %d MiB" % (size, MIN_SIZE // 1024 // 1024))
    if size % 4096:
        raise GoldenError("size %d bytes is not a multiple of 4096" % size)
    return size


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1024 * 1024), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _unique(items: Sequence[str]) -> List[str]:
    return list(dict.fromkeys(items))


def _check_list(values: Any, what: str, pattern: "re.Pattern[str]") -> List[str]:
    result = []
    for value in values or []:
        if not isinstance(value, str) or not pattern.match(value):
            raise GoldenError("%s %r is not valid" % (what, value))
        result.append(value)
    return result


def expand_packages(profiles: Sequence[str], extra: Sequence[str], resolver: str, suite: str,
                    with_ssh: bool, with_initramfs: bool) -> List[str]:
    """The package list after profile expansion, sorted and without duplicates (kernel package excluded)."""
    packages: List[str] = []
    for profile in profiles:
        if profile not in PROFILES:
            raise GoldenError("unknown profile %r (known: %s)" % (profile, ", ".join(sorted(PROFILES))))
        packages += PROFILES[profile]
    if resolver == "resolved" and suite not in RESOLVED_IN_SYSTEMD:
        packages.append("systemd-resolved")
    if with_ssh:
        packages.append("openssh-server")
    if with_initramfs:
        packages.append("initramfs-tools")
    packages += _check_list(extra, "package", _PACKAGE_RE)
    if "systemd" not in {p.split("=")[0] for p in packages}:
        raise GoldenError("the image needs systemd (profile base, or systemd in extra_packages): the guest "
                          "configuration (networkd, getty, units) is systemd's")
    return sorted(set(packages))


def build_request(params: Dict[str, Any], host_sources: Callable[[], List[_apt_sources.Source]],
                  host_arch: str) -> Request:
    """Validate the module parameters and produce the canonical inputs (nothing is touched)."""
    name = params["name"]
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise GoldenError("name %r must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
                          % (name,))
    if int(params["keep_versions"]) < 1:
        raise GoldenError("keep_versions must be at least 1")
    try:
        suite = _apt_sources.check_suite(params["suite"])
        sources = None
        mirror = params.get("mirror")
        if not mirror:
            sources = host_sources()
            mirror = _apt_sources.pick_mirror(sources, suite)
        mirror = _apt_sources.check_uri(mirror).rstrip("/")
        components = _check_list(params["components"], "component", _COMPONENT_RE)
        if not components:
            raise GoldenError("components must not be empty")
        extra_sources: List[Dict[str, Any]] = []
        if params.get("extra_sources") is None:
            if sources is None:
                sources = host_sources()
            for uri, extra_suite in _apt_sources.companion_suites(sources, suite):
                extra_sources.append({"uri": uri.rstrip("/"), "suite": extra_suite, "components": components})
        else:
            for entry in params["extra_sources"]:
                extra_sources.append({
                    "uri": _apt_sources.check_uri(entry["uri"]).rstrip("/"),
                    "suite": _apt_sources.check_suite(entry["suite"]),
                    "components": _check_list(entry.get("components") or components, "component", _COMPONENT_RE),
                })
    except _apt_sources.SourcesError as exc:
        raise GoldenError(str(exc))

    kernel_file = params.get("kernel")
    initrd_file = params.get("initrd")
    if initrd_file and not kernel_file:
        raise GoldenError("initrd is only used with kernel (a user-supplied kernel); the kernel package's own "
                          "initrd is built in the image otherwise")
    kernel_package = None if kernel_file else params.get("kernel_package")
    if not kernel_file and not kernel_package:
        raise GoldenError("either kernel_package or kernel must be set: Firecracker needs a guest kernel")
    if kernel_package and not _PACKAGE_RE.match(kernel_package):
        raise GoldenError("kernel_package %r is not a package name" % (kernel_package,))
    kernel_inputs: Dict[str, Any] = {"package": kernel_package}
    for key, path in (("kernel_sha256", kernel_file), ("initrd_sha256", initrd_file)):
        if path:
            try:
                kernel_inputs[key] = sha256_file(path)
            except OSError as exc:
                raise GoldenError("cannot read %s %s: %s" % (key.split("_", maxsplit=1)[0], path, exc.strerror or exc))

    modules = _check_list(params["initramfs_modules"], "initramfs module", _MODULE_RE)
    profiles = _unique(params["profiles"])
    gst_elements = _check_list(params["gstreamer_elements"], "GStreamer element", _ELEMENT_RE) \
        if "gstreamer" in profiles else []

    hostname = params["hostname"]
    if not isinstance(hostname, str) or len(hostname) > 64 or \
            not all(_HOST_LABEL_RE.match(label) for label in hostname.split(".")):
        raise GoldenError("hostname %r is not a valid host name" % (hostname,))
    resolver = params["resolver"]
    nameservers = []
    for server in params.get("nameservers") or []:
        try:
            nameservers.append(str(ipaddress.ip_address(server)))
        except ValueError:
            raise GoldenError("nameserver %r is not an IP address" % (server,))
    if resolver == "static" and not nameservers:
        raise GoldenError("resolver static needs at least one address in nameservers")
    if resolver == "none" and nameservers:
        raise GoldenError("nameservers cannot be used with resolver none (the resolver is written per VM)")
    timeout = int(params["wait_online_timeout"])
    if timeout < 0:
        raise GoldenError("wait_online_timeout must be 0 (mask the service) or a number of seconds")
    ssh_keys = []
    for key in params.get("ssh_authorized_keys") or []:
        if not isinstance(key, str) or not key.strip() or "\n" in key.strip():
            raise GoldenError("every ssh_authorized_keys entry must be one public key line")
        ssh_keys.append(key.strip())
    password = params.get("root_password_hash")
    if password is not None and (not password or ":" in password or "\n" in password):
        raise GoldenError("root_password_hash must be a crypt(3) hash (no ':' or newline)")

    units = []
    for unit in params.get("systemd_units") or []:
        unit_name = unit.get("name")
        if not isinstance(unit_name, str) or not _UNIT_RE.match(unit_name):
            raise GoldenError("systemd unit name %r is not valid (e.g. agent.service)" % (unit_name,))
        content = unit.get("content")
        if not isinstance(content, str) or not content.strip():
            raise GoldenError("systemd unit %s has no content" % unit_name)
        if not content.endswith("\n"):
            content += "\n"
        units.append({"name": unit_name, "content": content, "enabled": bool(unit.get("enabled", True))})
    if len({unit["name"] for unit in units}) != len(units):
        raise GoldenError("systemd_units names a unit twice")

    packages = expand_packages(profiles, params.get("extra_packages") or [], resolver, suite, bool(ssh_keys),
                               kernel_package is not None)
    size = parse_size(params["size"])
    tool = params["bootstrap_tool"]
    inputs = {
        "recipe_version": RECIPE_VERSION,
        "architecture": host_arch,
        "bootstrap_tool": tool,
        "variant": params["variant"],
        "suite": suite,
        "mirror": mirror,
        "components": components,
        "extra_sources": extra_sources,
        "profiles": profiles,
        "packages": packages,
        "kernel": kernel_inputs,
        "initramfs_modules": modules if kernel_package else [],
        "gstreamer_elements": gst_elements,
        "guest": {
            "hostname": hostname,
            "network": params["network"],
            "resolver": resolver,
            "nameservers": nameservers,
            "wait_online_timeout": timeout,
            "serial_console": bool(params["serial_console"]),
            "root_password_sha256": sha256_bytes(password.encode("utf-8")) if password else None,
            "ssh_authorized_keys": ssh_keys,
        },
        "systemd_units": [{"name": u["name"], "enabled": u["enabled"], "sha256": sha256_bytes(u["content"].encode())}
                          for u in units],
        "size_bytes": size,
        "revision": str(params["revision"]),
    }
    request = Request(
        name=name, output_dir=params["output_dir"], cache_dir=params.get("cache_dir"),
        keep_versions=int(params["keep_versions"]), inputs=inputs, packages=packages,
        kernel_package=kernel_package, kernel_file=kernel_file, initrd_file=initrd_file,
        initramfs_modules=modules, gst_elements=gst_elements, units=units, root_password_hash=password,
        ssh_keys=ssh_keys, keyring=params.get("keyring"), size=size,
    )
    request.digest = input_digest(inputs)
    request.version = request.digest[:16]
    return request


def canonical_json(document: Any) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def input_digest(inputs: Dict[str, Any]) -> str:
    return sha256_bytes(canonical_json(inputs))


def bootstrap_digest(inputs: Dict[str, Any]) -> str:
    """What the bootstrap tarball depends on (a subset of the inputs)."""
    keys = ("recipe_version", "architecture", "bootstrap_tool", "variant", "suite", "mirror", "components")
    return sha256_bytes(canonical_json({key: inputs[key] for key in keys}))


def public_inputs(inputs: Dict[str, Any]) -> Dict[str, Any]:
    """The inputs as recorded in the manifest (the password hash's digest replaced by set/unset)."""
    shown = json.loads(canonical_json(inputs))
    guest = shown["guest"]
    guest["root_password"] = "set" if guest.pop("root_password_sha256") else "locked"
    return shown

# --------------------------------------------------------------------------
# The output directory


@dataclass
class Paths:
    output_dir: str
    name: str

    def artifact(self, version: str, kind: str) -> str:
        return os.path.join(self.output_dir, "golden-%s-%s.%s" % (self.name, version, kind))

    def link(self, kind: str) -> str:
        return os.path.join(self.output_dir, "golden-%s.%s" % (self.name, kind))

    @property
    def lock(self) -> str:
        return os.path.join(self.output_dir, ".golden-%s.lock" % self.name)

    @property
    def failed_log(self) -> str:
        return os.path.join(self.output_dir, "golden-%s-failed.log" % self.name)

    @property
    def build_prefix(self) -> str:
        return ".golden-%s-build-" % self.name


def current_version(paths: Paths) -> Optional[str]:
    """The version the ``golden-<name>.ext4`` symlink points to (None when there is none)."""
    try:
        target = os.readlink(paths.link("ext4"))
    except OSError:
        return None
    match = _VERSION_FILE_RE.match(os.path.basename(target))
    if match and match.group("name") == paths.name and match.group("kind") == "ext4":
        return match.group("version")
    return None


def versions_on_disk(paths: Paths) -> Dict[str, Dict[str, str]]:
    """version -> {kind: path} for every ``golden-<name>-<version>.*`` file."""
    found: Dict[str, Dict[str, str]] = {}
    try:
        entries = os.listdir(paths.output_dir)
    except FileNotFoundError:
        return found
    for entry in entries:
        match = _VERSION_FILE_RE.match(entry)
        if match and match.group("name") == paths.name:
            found.setdefault(match.group("version"), {})[match.group("kind")] = os.path.join(paths.output_dir, entry)
    return found


def read_manifest(path: str) -> Optional[Dict[str, Any]]:
    try:
        with open(path, encoding="utf-8") as handle:
            manifest = json.load(handle)
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def verify_version(paths: Paths, version: str, digest: str, e2fsck_bin: str) -> Optional[str]:
    """None when the version's files are complete and match its manifest; else why not."""
    manifest = read_manifest(paths.artifact(version, "json"))
    if manifest is None:
        return "no readable manifest"
    if manifest.get("version") != version or manifest.get("input_digest") != digest:
        return "the manifest belongs to other inputs"
    for kind in ("ext4", "vmlinux", "initrd"):
        path = paths.artifact(version, kind)
        try:
            info = os.lstat(path)
        except OSError:
            return "%s is missing" % os.path.basename(path)
        if not stat_mod.S_ISREG(info.st_mode):
            return "%s is not a regular file" % os.path.basename(path)
    image = manifest.get("image") or {}
    if os.path.getsize(paths.artifact(version, "ext4")) != image.get("size_bytes"):
        return "the image's size differs from the manifest"
    for kind in ("kernel", "initrd"):
        entry = manifest.get(kind) or {}
        suffix = "vmlinux" if kind == "kernel" else "initrd"
        if sha256_file(paths.artifact(version, suffix)) != entry.get("sha256"):
            return "the %s's sha256 differs from the manifest" % kind
    try:
        superblock = _ext4.read_superblock(paths.artifact(version, "ext4"))
    except _ext4.Ext4Error as exc:
        return "the image cannot be read: %s" % exc
    if not superblock.magic_ok or not superblock.clean or superblock.has_errors or superblock.needs_recovery:
        return "the image's ext4 superblock is not clean"
    fsck = _ext4.e2fsck(paths.artifact(version, "ext4"), e2fsck_bin)
    if not fsck.ok:
        return "e2fsck -fn found problems: %s" % fsck.describe(5)
    return None


def plan_prune(paths: Paths, keep: int, current: str, now_built: Optional[str]) -> List[str]:
    """Versions to remove: beyond the ``keep`` newest (by manifest build time), never ``current``; and
    incomplete leftovers (files without a manifest)."""
    dated: List[Tuple[str, str]] = []
    incomplete = []
    for version, files in versions_on_disk(paths).items():
        if version in (current, now_built):
            continue
        manifest = read_manifest(files["json"]) if "json" in files else None
        if manifest is None:
            incomplete.append(version)
        else:
            dated.append((str(manifest.get("built_at", "")), version))
    dated.sort(reverse=True)
    return sorted(incomplete) + [version for _built, version in dated[max(keep - 1, 0):]]

# --------------------------------------------------------------------------
# Guest configuration (pure: what files to write)


def network_file(network: str) -> Optional[str]:
    if network != "dhcp":
        return None
    return ("# Written by microvm.firecracker.golden_image. Replace per VM for static addressing.\n"
            "[Match]\nName=eth0\n\n"
            "[Network]\nDHCP=ipv4\nLinkLocalAddressing=no\nIPv6AcceptRA=no\n\n"
            "[DHCPv4]\n# The lease follows the VM's MAC address, not the (per-VM) machine-id.\n"
            "ClientIdentifier=mac\nUseDNS=yes\nUseDomains=yes\n")


def hosts_file(hostname: str) -> str:
    short = hostname.split(".")[0]
    names = hostname if short == hostname else "%s %s" % (hostname, short)
    return ("127.0.0.1\tlocalhost\n127.0.1.1\t%s\n\n"
            "# The following lines are desirable for IPv6 capable hosts\n"
            "::1\tlocalhost ip6-localhost ip6-loopback\nff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n" % names)


def wait_online_dropin(binary: str, timeout: int) -> str:
    return ("# Written by microvm.firecracker.golden_image: online as soon as any link is, never a boot-long hang.\n"
            "[Service]\nExecStart=\nExecStart=%s --any --timeout=%d\n" % (binary, timeout))


SSH_KEYS_UNIT_CONTENT = """# Written by microvm.firecracker.golden_image: every VM gets its own SSH host keys on first boot.
[Unit]
Description=Generate this VM's own SSH host keys
Before=ssh.service
ConditionPathExistsGlob=!/etc/ssh/ssh_host_*_key

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A

[Install]
WantedBy=multi-user.target ssh.service
"""


def resolv_conf(resolver: str, nameservers: Sequence[str]) -> Optional[str]:
    if resolver == "static":
        return "".join("nameserver %s\n" % server for server in nameservers)
    if resolver == "none":
        return "# No resolver in the golden image: written per VM (microvm.firecracker.rootfs_inject).\n"
    return None  # resolved: a symlink to systemd-resolved's stub

# --------------------------------------------------------------------------
# Publishing


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def switch_link(link: str, target: str) -> bool:
    """Point ``link`` at ``target`` (a name in the same directory) atomically; False when it already does."""
    try:
        if os.readlink(link) == target:
            return False
    except OSError:
        pass
    if os.path.lexists(link) and not os.path.islink(link):
        raise GoldenError("%s exists and is not a symlink; refusing to replace it" % link)
    temporary = "%s.tmp-%d" % (link, os.getpid())
    if os.path.lexists(temporary):
        os.unlink(temporary)
    os.symlink(target, temporary)
    os.replace(temporary, link)
    return True


def remove_version(paths: Paths, version: str) -> None:
    for kind in ARTIFACTS[:-1] + ("log", "json"):  # the manifest last: a version without one is incomplete
        path = paths.artifact(version, kind)
        if os.path.lexists(path):
            os.unlink(path)


class OutputLock:
    """An exclusive ``flock`` on ``.golden-<name>.lock`` in the output directory for the whole run."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = -1

    def __enter__(self) -> "OutputLock":
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self.fd)
            self.fd = -1
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise GoldenError("another golden_image_build run holds %s" % self.path)
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: (c) 2026, microvm.firecracker contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations

DOCUMENTATION = r"""
module: golden_image_build
short_description: Build a versioned golden root filesystem with its guest kernel and initrd
version_added: 0.1.0
description:
  - Builds C(golden-NAME-VERSION.ext4), the uncompressed ELF C(golden-NAME-VERSION.vmlinux) that Firecracker boots,
    C(golden-NAME-VERSION.initrd) and the manifest C(golden-NAME-VERSION.json) in O(output_dir), then points the
    symlinks C(golden-NAME.ext4), C(.vmlinux), C(.initrd) and C(.json) at them (each switched atomically) and removes
    versions beyond O(keep_versions).
  - The version is the first 16 hex digits of the sha256 of every input that shapes the image (suite, mirror,
    components, variant, the package list after profile expansion, the kernel, the guest configuration, units, size,
    bootstrap tool, O(revision) and the module's own recipe version). Unchanged inputs find their version on disk,
    verify it (manifest, sizes, kernel and initrd sha256, C(e2fsck -fn)) and report no change; changed inputs build a
    new version and leave the old one in place (until pruned), bootable by its path.
  - The tree is bootstrapped with C(mmdebstrap) or C(debootstrap) (cached as a tarball in O(cache_dir)), then packages
    are installed with apt in a C(chroot). proc, sys, dev, run and the package cache are mounted only inside a private
    mount namespace of the module (never visible in the host's mount table, removed by the kernel even if the module is
    killed), unmounted explicitly, and verified gone before the build directory is removed.
  - The kernel comes from O(kernel_package) installed in the image; its bzImage is unpacked to the ELF vmlinux, and its
    initrd is built in the image by initramfs-tools with O(initramfs_modules) listed and loaded in order, so kernel,
    initrd and C(/lib/modules) are always the same release. A user-supplied O(kernel) (and O(initrd)) is accepted too.
  - The image is written with C(mkfs.ext4 -d) into a sparse file of O(size) bytes (apparent size); it is never
    mounted and no loop device is used.
  - >-
    The build fails, and the symlinks stay where they were, unless all checks pass: C(e2fsck -fn) clean; kernel,
    initrd and C(/lib/modules) releases equal; C(virtio_blk) and C(virtio_net) in the initrd (or built in); every
    module of O(initramfs_modules) the kernel has is in the initrd and loaded by it; with the V(gstreamer) profile,
    C(gst-inspect-1.0) finds every O(gstreamer_elements) entry and a C(videotestsrc ! vp8enc ! fakesink) pipeline
    runs in the image; C(systemd-analyze verify) passes for every unit the build writes or O(systemd_units) bakes in;
    C(/etc/machine-id) in the image is empty.
  - >-
    Guest configuration: an empty C(/etc/machine-id); O(hostname) in C(/etc/hostname) and C(/etc/hosts);
    systemd-networkd enabled with C(/etc/systemd/network/10-eth0.network) (DHCP, client identifier from the MAC)
    unless O(network=none), and C(99-default.link) masked so the interface keeps the kernel name C(eth0); the
    resolver strategy O(resolver) (the build host's C(/etc/resolv.conf) is only used during the build and never
    kept); C(systemd-networkd-wait-online) limited to O(wait_online_timeout) seconds for any link (or masked); a
    serial getty on C(ttyS0); the root password locked unless O(root_password_hash) is given; no SSH host keys (they
    are generated on each VM's first boot when openssh-server is installed).
author:
  - microvm.firecracker contributors (@microvm)
requirements:
  - root on the managed host (chroot, mounts in a private mount namespace)
  - mmdebstrap or debootstrap (O(bootstrap_tool)), e2fsprogs >= 1.46.2 (C(mkfs.ext4 -d), C(e2fsck), C(debugfs)), GNU
    tar, and the C(lz4) or C(zstd) command-line tool when the kernel package's bzImage is compressed with it (Debian
    12's kernels use lz4)
  - a Debian or Ubuntu build host on x86_64 (the image has the host's architecture)
attributes:
  check_mode:
    support: full
    description: Check mode computes the version, verifies an existing one, and predicts build, symlink switch and
      pruning without writing anything.
  diff_mode:
    support: full
    description: The version the C(golden-NAME.ext4) symlink points to, before and after.
  platform:
    platforms: [linux]
    support: full
    description: Linux (Debian, Ubuntu) only.
options:
  name:
    description:
      - Name of the image family; files are named C(golden-NAME-VERSION.*) and C(golden-NAME.*).
      - 1 to 64 letters, digits, C(.), C(_) or C(-), starting with a letter or digit.
    type: str
    required: true
  output_dir:
    description:
      - Directory for the images, kernels, initrds, manifests and symlinks (created when missing). The build works in a
        temporary directory inside it, so it needs room for the tree and the image's data twice over.
    type: path
    required: true
  cache_dir:
    description:
      - Directory that keeps the bootstrap tarballs and the downloaded C(.deb) files between builds, so a new version
        with one more package downloads only that package. Unset means no cache (everything is downloaded again).
      - Bootstrap tarballs not used for 14 days are removed after a successful build.
    type: path
  bootstrap_tool:
    description:
      - The tool that creates the minimal tree; the packages are then installed with apt in the tree either way.
        C(mmdebstrap) is about twice as fast.
    type: str
    choices: [mmdebstrap, debootstrap]
    default: mmdebstrap
  suite:
    description:
      - Distribution suite, such as V(bookworm) (Debian 12), V(jammy) (Ubuntu 22.04) or V(noble) (Ubuntu 24.04).
    type: str
    default: bookworm
  mirror:
    description:
      - Mirror URL for O(suite). Unset means the mirror the build host's apt already uses for that suite (the first
        C(deb) entry of C(/etc/apt/sources.list), C(/etc/apt/sources.list.d/*.list) or C(*.sources) naming the suite);
        the module fails when the host has none.
    type: str
  components:
    description:
      - Archive components, for example V([main]) for Debian or V([main, universe]) for Ubuntu (GStreamer's bad and
        ugly plugins are in universe there).
    type: list
    elements: str
    default: [main]
  extra_sources:
    description:
      - Additional apt sources of the image (updates, security). Unset means the build host's own
        C(SUITE-updates) and C(SUITE-security) entries, if it has them; V([]) means none.
    type: list
    elements: dict
    suboptions:
      uri:
        description: Repository URL.
        type: str
        required: true
      suite:
        description: Suite, such as V(bookworm-security).
        type: str
        required: true
      components:
        description: Components; unset means O(components).
        type: list
        elements: str
  variant:
    description:
      - Bootstrap variant. V(minbase) is the essential packages plus apt; V(default) is the tools' default set
        (priority important).
    type: str
    choices: [minbase, buildd, default]
    default: minbase
  keyring:
    description:
      - Keyring file that signs O(mirror), passed to the bootstrap tool (for example the Ubuntu archive keyring when
        building Ubuntu on Debian). Unset uses the build host's trusted keys.
    type: path
  profiles:
    description:
      - >-
        Package profiles. V(base): systemd, systemd-sysv, udev, kmod, iproute2, dbus, ca-certificates, netbase,
        procps, iputils-ping. V(gstreamer): gstreamer1.0-tools and the base, good, bad and ugly plugins and
        gstreamer1.0-nice, so that webrtcbin, vp8enc and the ICE/DTLS/SRTP elements are present (the names are the
        same on Debian 12 and Ubuntu 22.04/24.04).
      - systemd must be in the image (from V(base) or O(extra_packages)).
    type: list
    elements: str
    choices: [base, gstreamer]
    default: [base]
  extra_packages:
    description:
      - More packages, installed without recommends. C(name=version) pins a version.
    type: list
    elements: str
    default: []
  kernel_package:
    description:
      - The kernel package installed in the image, whose vmlinuz (unpacked to an ELF vmlinux), initrd and modules are
        used. Debian V(linux-image-cloud-amd64); on Ubuntu V(linux-image-kvm) or V(linux-image-virtual).
      - Ignored (no kernel package is installed) when O(kernel) is set.
    type: str
    default: linux-image-cloud-amd64
  kernel:
    description:
      - A user-supplied kernel on the managed host (ELF vmlinux, or an x86 bzImage that is unpacked) instead of
        O(kernel_package). Its release must match the image's C(/lib/modules) if the image has any, and its
        virtio_blk/virtio_net drivers must be built in or in O(initrd).
    type: path
  initrd:
    description:
      - A user-supplied initrd to go with O(kernel) (only with O(kernel)); its modules must be for the kernel's release.
    type: path
  initramfs_modules:
    description:
      - Modules the initrd built in the image carries and loads, in this order (initramfs-tools C(MODULES=list),
        C(/etc/initramfs-tools/modules)). Modules the kernel does not have are skipped with a warning.
    type: list
    elements: str
    default: [virtio_ring, virtio, virtio_pci_legacy_dev, virtio_pci_modern_dev, virtio_pci, virtio_mmio, virtio_blk,
              failover, net_failover, virtio_net]
  gstreamer_elements:
    description:
      - Elements C(gst-inspect-1.0) must find in the image when O(profiles) has V(gstreamer).
    type: list
    elements: str
    default: [videotestsrc, vp8enc, vp8dec, rtpvp8pay, webrtcbin, nicesrc, nicesink, dtlssrtpenc, opusenc]
  hostname:
    description:
      - Host name in C(/etc/hostname) and C(/etc/hosts) (the C(127.0.1.1) line); normally replaced per VM with
        M(microvm.firecracker.rootfs_inject).
    type: str
    default: microvm
  network:
    description:
      - V(dhcp) writes C(/etc/systemd/network/10-eth0.network) for DHCPv4 on C(eth0). V(none) writes no network file
        (inject one per VM). systemd-networkd is enabled either way; for static addressing inject
        C(/etc/systemd/network/10-eth0.network) with C(Address=), C(Gateway=) and C(DNS=) per VM.
    type: str
    choices: [dhcp, none]
    default: dhcp
  resolver:
    description:
      - >-
        How the guest resolves names; the build host's C(/etc/resolv.conf) is never kept. V(resolved):
        systemd-resolved (installed when it is a separate package), C(/etc/resolv.conf) a symlink to its stub,
        servers from DHCP or the VM's network file (and O(nameservers) as configured servers). V(static):
        C(/etc/resolv.conf) lists O(nameservers). V(none): a placeholder C(/etc/resolv.conf), to be written per VM.
    type: str
    choices: [resolved, static, none]
    default: resolved
  nameservers:
    description:
      - Resolver addresses for O(resolver=static) (required there) or O(resolver=resolved).
    type: list
    elements: str
    default: []
  wait_online_timeout:
    description:
      - Seconds C(systemd-networkd-wait-online) waits for any link to be online before giving up, so a unit ordered
        after C(network-online.target) never hangs the boot. V(0) masks the service.
    type: int
    default: 30
  serial_console:
    description:
      - Enable a getty on C(ttyS0) (Firecracker's serial console).
    type: bool
    default: true
  root_password_hash:
    description:
      - crypt(3) hash for root (for example from C(mkpasswd -m yescrypt)). Unset locks the root password.
    type: str
  ssh_authorized_keys:
    description:
      - Public keys for C(/root/.ssh/authorized_keys). Non-empty installs openssh-server; every VM generates its own host
        keys on first boot (the image has none).
    type: list
    elements: str
    default: []
  systemd_units:
    description:
      - Units baked into C(/etc/systemd/system), checked with C(systemd-analyze verify) in the image.
    type: list
    elements: dict
    default: []
    suboptions:
      name:
        description: Unit file name, such as V(agent.service).
        type: str
        required: true
      content:
        description: Unit file content.
        type: str
        required: true
      enabled:
        description: Enable the unit (the links of its C([Install]) section).
        type: bool
        default: true
  size:
    description:
      - Apparent size of the image file, such as V(8G) or V(8GiB) (binary units) or a number of bytes. Only the data is
        allocated (the file is sparse). At least 64 MiB and a multiple of 4096.
    type: str
    default: 8G
  keep_versions:
    description:
      - How many versions to keep (by build time, the current one included); older ones are removed.
    type: int
    default: 3
  revision:
    description:
      - Free-form input that is only part of the version digest. Change it to build a fresh version from the same
        inputs (for example to pick up security updates from the mirror).
    type: str
    default: '1'
notes:
  - Package versions are not inputs (the mirror's state at build time decides them, and the manifest records them);
    change O(revision) to rebuild against a newer mirror state.
  - The manifest (C(golden-NAME-VERSION.json)) records the inputs (with the root password only as set or locked), the
    dpkg package versions, the kernel release, sha256 of the kernel and initrd, a content digest of the tree (paths,
    types, modes, owners, contents; times excluded), the check results and the build time. The build log is kept as
    C(golden-NAME-VERSION.log); a failed build's log is C(golden-NAME-failed.log).
  - Consumers should resolve C(golden-NAME.ext4) once and use the version's own files, or use this module's returned
    paths; the four symlinks are switched one after the other, the image last.
seealso:
  - module: microvm.firecracker.rootfs_inject
  - name: mmdebstrap(1)
    description: The default bootstrap tool.
    link: https://manpages.debian.org/bookworm/mmdebstrap/mmdebstrap.1.en.html
  - name: initramfs.conf(5)
    description: MODULES=list and COMPRESS, as the build configures initramfs-tools.
    link: https://manpages.debian.org/bookworm/initramfs-tools-core/initramfs.conf.5.en.html
"""

EXAMPLES = r"""
- name: Debian 12 golden image with GStreamer
  microvm.firecracker.golden_image_build:
    name: media
    output_dir: /var/lib/microvm/golden
    cache_dir: /var/cache/microvm/golden
    profiles: [base, gstreamer]
    extra_packages: [python3]
  register: golden

- name: Ubuntu 24.04 from the host's Ubuntu mirror, static resolver
  microvm.firecracker.golden_image_build:
    name: noble
    output_dir: /var/lib/microvm/golden
    suite: noble
    components: [main, universe]
    kernel_package: linux-image-kvm
    resolver: static
    nameservers: [192.168.100.1]

- name: With a baked-in unit and SSH access for root
  microvm.firecracker.golden_image_build:
    name: agent
    output_dir: /var/lib/microvm/golden
    ssh_authorized_keys:
      - "{{ lookup('ansible.builtin.file', 'files/ops.pub') }}"
    systemd_units:
      - name: agent.service
        content: |
          [Unit]
          Description=VM agent
          [Service]
          ExecStart=/usr/bin/sleep infinity
          [Install]
          WantedBy=multi-user.target
"""

RETURN = r"""
version:
  description: The version of the requested inputs (16 hex digits of the input digest).
  returned: always
  type: str
  sample: 3f6c1a9e0b7d2c45
previous_version:
  description: The version C(golden-NAME.ext4) pointed to before this run (null when there was none).
  returned: always
  type: str
  sample: 9a0b1c2d3e4f5a6b
built:
  description: Whether this run built (in check mode, would build) the version.
  returned: always
  type: bool
input_digest:
  description: sha256 of the canonical inputs.
  returned: always
  type: str
image:
  description: Path of the version's ext4 image.
  returned: always
  type: str
  sample: /var/lib/microvm/golden/golden-media-3f6c1a9e0b7d2c45.ext4
kernel:
  description: Path of the version's uncompressed ELF vmlinux.
  returned: always
  type: str
initrd:
  description: Path of the version's initrd.
  returned: always
  type: str
manifest:
  description: Path of the version's JSON manifest.
  returned: always
  type: str
links:
  description: Paths of the C(golden-NAME.*) symlinks.
  returned: always
  type: dict
  contains:
    image:
      description: C(golden-NAME.ext4).
      type: str
    kernel:
      description: C(golden-NAME.vmlinux).
      type: str
    initrd:
      description: C(golden-NAME.initrd).
      type: str
    manifest:
      description: C(golden-NAME.json).
      type: str
pruned:
  description: Versions removed (in check mode, to be removed).
  returned: always
  type: list
  elements: str
rebuild_reason:
  description: Why an existing version with the same inputs was built again (it failed verification), else null.
  returned: always
  type: str
build_log:
  description: The build log of this run's build (null when nothing was built).
  returned: always
  type: str
build_seconds:
  description: Wall time of the build.
  returned: when built
  type: float
manifest_data:
  description: The version's manifest (absent in check mode when the version is not built yet).
  returned: when the version exists
  type: dict
  sample:
    version: 3f6c1a9e0b7d2c45
    kernel_release: 6.1.0-50-cloud-amd64
    kernel: {"file": "golden-media-3f6c1a9e0b7d2c45.vmlinux", "sha256": "5b2c...", "compression": "lz4"}
    packages: {"systemd": "252.39-1~deb12u1"}
"""

import platform

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.microvm.firecracker.plugins.module_utils import _golden, _golden_build

ARGUMENT_SPEC = dict(
    name=dict(type="str", required=True),
    output_dir=dict(type="path", required=True),
    cache_dir=dict(type="path"),
    bootstrap_tool=dict(type="str", choices=["mmdebstrap", "debootstrap"], default="mmdebstrap"),
    suite=dict(type="str", default="bookworm"),
    mirror=dict(type="str"),
    components=dict(type="list", elements="str", default=["main"]),
    extra_sources=dict(type="list", elements="dict", options=dict(
        uri=dict(type="str", required=True),
        suite=dict(type="str", required=True),
        components=dict(type="list", elements="str"),
    )),
    variant=dict(type="str", choices=["minbase", "buildd", "default"], default="minbase"),
    keyring=dict(type="path"),
    profiles=dict(type="list", elements="str", choices=sorted(_golden.PROFILES), default=["base"]),
    extra_packages=dict(type="list", elements="str", default=[]),
    kernel_package=dict(type="str", default="linux-image-cloud-amd64"),
    kernel=dict(type="path"),
    initrd=dict(type="path"),
    initramfs_modules=dict(type="list", elements="str", default=list(_golden.DEFAULT_INITRAMFS_MODULES)),
    gstreamer_elements=dict(type="list", elements="str", default=list(_golden.DEFAULT_GST_ELEMENTS)),
    hostname=dict(type="str", default="microvm"),
    network=dict(type="str", choices=["dhcp", "none"], default="dhcp"),
    resolver=dict(type="str", choices=["resolved", "static", "none"], default="resolved"),
    nameservers=dict(type="list", elements="str", default=[]),
    wait_online_timeout=dict(type="int", default=30),
    serial_console=dict(type="bool", default=True),
    root_password_hash=dict(type="str", no_log=True),
    ssh_authorized_keys=dict(type="list", elements="str", default=[], no_log=False),
    systemd_units=dict(type="list", elements="dict", default=[], options=dict(
        name=dict(type="str", required=True),
        content=dict(type="str", required=True),
        enabled=dict(type="bool", default=True),
    )),
    size=dict(type="str", default="8G"),
    keep_versions=dict(type="int", default=3),
    revision=dict(type="str", default="1"),
)

_ARCHES = {"x86_64": "amd64", "aarch64": "arm64"}


def main() -> None:
    module = AnsibleModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    params = module.params
    sbin = ["/usr/sbin", "/sbin"]
    # Missing tools are reported by the run only when they are needed (check mode on a host whose
    # prerequisites are not installed yet still works).
    tools = _golden.Tools(
        mkfs=module.get_bin_path("mkfs.ext4", opt_dirs=sbin),
        e2fsck=module.get_bin_path("e2fsck", opt_dirs=sbin),
        debugfs=module.get_bin_path("debugfs", opt_dirs=sbin),
        tar=module.get_bin_path("tar"),
        chroot=module.get_bin_path("chroot", opt_dirs=sbin),
        bootstrap=module.get_bin_path(params["bootstrap_tool"], opt_dirs=sbin),
    )
    for kind, tool in (("lz4", "lz4"), ("zstd", "zstd"), ("lzo", "lzop")):
        path = module.get_bin_path(tool)
        if path:
            tools.decompressors[kind] = path
    machine = platform.machine()
    if machine != "x86_64":
        module.fail_json(msg="golden_image_build: the build host is %s; only x86_64 hosts (amd64 images) are "
                             "supported" % machine)
    try:
        result = _golden_build.run(params, check_mode=module.check_mode, tools=tools,
                                   host_arch=_ARCHES[machine], warn=module.warn)
    except _golden.GoldenError as exc:
        module.fail_json(msg="golden_image_build %s: %s" % (params["name"], exc))
    module.exit_json(**result)


if __name__ == "__main__":
    main()

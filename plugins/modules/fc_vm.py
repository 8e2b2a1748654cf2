#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: (c) 2026, microvm.firecracker contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations

DOCUMENTATION = r"""
module: fc_vm
short_description: One Firecracker microVM's whole lifecycle through the Firecracker API
version_added: 0.1.0
description:
  - Renders the VM's Firecracker configuration (config-file format) into its state directory, starts the VMM
    under a supervisor (C(firecracker@<name>.service) from the C(microvm.firecracker.firecracker) role on systemd
    hosts, a daemonized process with a pidfile elsewhere), waits for the API socket and C(GET /) to say
    C(Running), then compares C(GET /vm/config) with what was asked.
  - A running VM with the asked configuration is left alone (C(changed=false)). A changed configuration follows
    O(on_change). MMDS metadata changes are applied to a running VM with C(PUT /mmds), without a restart.
  - Readiness is real; O(wait_for) polls a TCP port or an HTTP URL on the guest while the serial console is
    watched; a kernel panic, a failed unit or the VMM exiting fails the task at once with the console lines
    in the message.
  - Stopping is graceful first (C(SendCtrlAltDel)), then C(SIGTERM), then C(SIGKILL), each with a deadline.
    V(paused) and V(running) switch with C(PATCH /vm). V(hibernated) pauses, writes a full snapshot
    (memory and state files) and stops the VMM; V(running) later restores it on a fresh VMM
    (C(snapshot/load) with the network interfaces re-bound to their TAPs) and removes the snapshot files.
  - V(absent) stops the VM and removes its state directory, API socket, pidfile and systemd instance drop-in
    (console and VMM logs optionally archived first).
  - All input is validated before anything starts, and every error names the field.
author:
  - microvm.firecracker contributors (@microvm)
requirements:
  - A Firecracker binary (or, on a lab host without KVM, the collection's stand-in) on the managed host
  - Python >= 3.9 on the managed host; no third-party Python library
attributes:
  check_mode:
    support: full
    description: Check mode observes the VM, plans the same steps and changes nothing.
  diff_mode:
    support: full
    description: The VM's state and its configuration (as the VMM reports it) before and after.
  platform:
    platforms: [linux]
    support: full
    description: Linux only.
options:
  name:
    description: VM id (letters, digits and C(-), at most 64 characters); also the VMM's C(--id).
    type: str
    required: true
  state:
    description:
      - V(running) boots (or resumes, or restores from hibernation) the VM; V(paused) keeps it in memory but
        stopped; V(stopped) stops the VMM and keeps the VM's files; V(hibernated) snapshots and stops it;
        V(absent) removes it entirely.
    type: str
    choices: [running, paused, stopped, hibernated, absent]
    default: running
  kernel:
    description: Guest kernel (uncompressed ELF C(vmlinux)) on the managed host. Required unless O(state=absent).
    type: path
  initrd:
    description: Guest initrd on the managed host.
    type: path
  boot_args:
    description:
      - Kernel command line. Values that look like credentials (C(user:password@), C(password=), C(token=), ...)
        are refused; the command line is visible to every process in the guest and to the VMM's logs.
    type: str
    default: console=ttyS0 reboot=k panic=1
  vcpu_count:
    description: Number of vCPUs, a whole number 1..32 (fractions are refused).
    type: raw
    default: 1
  mem_size_mib:
    description: Guest memory in MiB, a whole number of at least 512 (smaller Debian guests die of OOM at boot).
    type: raw
    default: 1024
  smt:
    description: Simultaneous multithreading in the guest.
    type: bool
    default: false
  cpu_template:
    description: Firecracker CPU template.
    type: str
    choices: [None, C3, T2, T2S, T2CL, T2A, V1N1]
  drives:
    description: Block devices; exactly one must have O(drives[].root=true).
    type: list
    elements: dict
    default: []
    suboptions:
      drive_id:
        description: Drive id (letters, digits, C(_)).
        type: str
        required: true
      path:
        description: Image file on the managed host.
        type: path
        required: true
      root:
        description: The root device.
        type: bool
        default: false
      read_only:
        description: Attach read-only.
        type: bool
        default: false
      cache_type:
        description: Firecracker cache type.
        type: str
        choices: [Unsafe, Writeback]
        default: Unsafe
      io_engine:
        description: Firecracker I/O engine.
        type: str
        choices: [Sync, Async]
        default: Sync
      rate_limiter:
        description: Firecracker rate limiter (C(bandwidth)/C(ops) token buckets with C(size), C(refill_time), C(one_time_burst)).
        type: dict
  network_interfaces:
    description: Network interfaces, each backed by an existing TAP (see M(microvm.firecracker.tap_vnet_hdr)).
    type: list
    elements: dict
    default: []
    suboptions:
      iface_id:
        description: Interface id (letters, digits, C(_)).
        type: str
        required: true
      tap:
        description: Name of the TAP device on the host; it must exist and be a TAP.
        type: str
        required: true
      guest_mac:
        description: Guest MAC address (unicast).
        type: str
      rx_rate_limiter:
        description: Receive rate limiter.
        type: dict
      tx_rate_limiter:
        description: Transmit rate limiter.
        type: dict
  mmds:
    description:
      - Enables the microVM metadata service (MMDS) on some interfaces. Keys C(version) (default V(V2)),
        C(network_interfaces) (default the first interface), C(ipv4_address).
    type: dict
  mmds_metadata:
    description:
      - MMDS contents (a JSON object). Always treated as secret; never shown in output or diffs. Given to the
        VMM at start (C(--metadata), a file readable by root only) and updated live with C(PUT /mmds).
    type: raw
  vsock:
    description: A vsock device; keys C(guest_cid) (>= 3) and C(uds_path) (default C(<state_dir>/vsock.sock)).
    type: dict
  balloon:
    description: A balloon device; keys C(amount_mib), C(deflate_on_oom), C(stats_polling_interval_s).
    type: dict
  log_level:
    description: VMM log level.
    type: str
    choices: [Error, Warning, Info, Debug, Trace, "Off"]
    default: Warning
  log_path:
    description: VMM log file (created before the VMM is told about it). Default C(<state_dir>/vmm.log).
    type: path
  metrics_path:
    description: VMM metrics file.
    type: path
  console_log:
    description: Where the guest's serial console (the VMM's standard output) is appended. Default C(<state_dir>/console.log).
    type: path
  firecracker_bin:
    description: The VMM binary.
    type: path
    default: /usr/local/bin/firecracker
  jailer:
    description:
      - Run the VMM under Firecracker's jailer (Firecracker's production setup), as the unprivileged O(jailer.uid)
        and O(jailer.gid), chrooted in C(<chroot_base_dir>/<file name of firecracker_bin, symlinks resolved>/<name>/root),
        in its own cgroup v2 C(<cgroup2 mount>/<parent_cgroup>/<name>) with the given limits, and in O(netns) when set
        (the jailer's C(--netns)).
      - fc_vm hard-links the kernel, initrd and drives into the jail (C(/boot/kernel), C(/boot/initrd),
        C(/drives/<drive_id>)) and gives writable drives to the VMM's uid, so drives must be on the chroot base's
        filesystem; the API socket is C(<jail root>/run/firecracker.socket), the VMM log C(<jail root>/vmm.log), the
        config and metadata files (root, group O(jailer.gid), mode 0640) C(/config.json) and C(/mmds.json).
      - Every TAP of O(network_interfaces) must be owned by O(jailer.uid) (M(microvm.firecracker.tap_vnet_hdr)
        C(owner)); O(log_path), O(metrics_path) and C(vsock.uds_path) cannot be set (the VMM sees only its jail).
      - O(state=absent) removes the jail and the cgroup too, found from what fc_vm recorded at launch.
    type: dict
    suboptions:
      uid:
        description: The VMM's user id (not 0); one per VM is the production guidance.
        type: int
        required: true
      gid:
        description: The VMM's group id (not 0).
        type: int
        required: true
      jailer_bin:
        description: The jailer binary.
        type: path
        default: /usr/local/bin/jailer
      chroot_base_dir:
        description: The jailer's C(--chroot-base-dir).
        type: path
        default: /srv/jailer
      cgroups:
        description:
          - cgroup v2 files and values for the VM's cgroup (the jailer's C(--cgroup file=value)), for example
            C(cpu.max) V(100000 100000) and C(memory.max) V(1610612736).
        type: dict
        default: {}
      parent_cgroup:
        description: The cgroup the VM's cgroup is made under (default the binary's file name).
        type: str
      resource_limits:
        description: The jailer's C(--resource-limit); keys C(fsize) and C(no_file).
        type: dict
        default: {}
  supervisor:
    description:
      - V(systemd) runs the VMM as C(firecracker@<name>.service); V(process) as a daemonized process with a
        pidfile; V(auto) picks V(systemd) when systemd is running.
    type: str
    choices: [auto, systemd, process]
    default: auto
  autostart:
    description: With the V(systemd) supervisor, enable the unit so the VM starts at boot.
    type: bool
    default: false
  recreate_taps:
    description:
      - Record each TAP of O(network_interfaces) as it is when the VM is started (C(IFF_VNET_HDR),
        multi-queue, owner, group, MTU, link group and bridge) in the VM's launch script, which recreates a
        missing one as recorded before it starts the VMM, first waiting up to 60 seconds for the bridge.
      - A host restart removes TAPs (kernel objects) while the VM's unit stays enabled; with this, a VM with
        O(autostart) comes back by itself once the bridge exists (the C(host_network) role's boot unit makes
        it). V(false) leaves TAPs entirely to you; the VMM then fails to start without its TAP.
      - A TAP that exists is left as it is. The script changes, and so the recipe, only when fc_vm starts the
        VM; a VM already running keeps the launch script it was started with.
    type: bool
    default: true
  state_dir:
    description: The VM's directory (mode 0700). Default C(/var/lib/firecracker/vms/<name>).
    type: path
  netns:
    description:
      - Run the VMM inside this named network namespace (C(/run/netns/NAME)); its TAPs must be there, and
        O(wait_for) is probed from there. The launch script enters it with C(nsenter) (util-linux).
    type: str
  wait_for:
    description:
      - A readiness check on the guest, polled after boot (and verified on every run while the VM runs).
        Keys C(host), C(port), optional C(http_path) (then an HTTP GET must answer C(http_status), default 200,
        and contain C(contains) when given) and C(timeout) in seconds (default 120).
    type: dict
  on_change:
    description:
      - What to do when a running VM's configuration differs from the asked one; V(restart) it, V(fail) the task
        naming the differences, or V(ignore) them (with a warning).
    type: str
    choices: [restart, fail, ignore]
    default: restart
  stop_timeout:
    description: Seconds to wait for the guest to shut down after C(SendCtrlAltDel) before C(SIGTERM).
    type: int
    default: 30
  archive_logs_to:
    description: With O(state=absent), a directory where the console log, VMM log and config are archived first.
    type: path
notes:
  - The jailer is not driven by this module yet; run the VMM unjailed or wrap it in your own launcher.
seealso:
  - module: microvm.firecracker.tap_vnet_hdr
  - module: microvm.firecracker.rootfs_inject
"""

EXAMPLES = r"""
- name: A VM whose injected service answers on port 8080
  microvm.firecracker.fc_vm:
    name: web1
    kernel: /var/lib/microvm/images/vmlinux-6.1.0-28-cloud-amd64
    initrd: /var/lib/microvm/images/initrd.img-6.1.0-28-cloud-amd64
    vcpu_count: 2
    mem_size_mib: 1024
    drives:
      - drive_id: rootfs
        path: /var/lib/firecracker/vms/web1.ext4
        root: true
    network_interfaces:
      - iface_id: eth0
        tap: fc-web1
        guest_mac: "06:00:c0:a8:64:0a"
    wait_for:
      host: 192.168.100.10
      port: 8080
      http_path: /health
      timeout: 90

- name: Hibernate it (memory and state snapshot, VMM stopped)
  microvm.firecracker.fc_vm:
    name: web1
    state: hibernated
    kernel: /var/lib/microvm/images/vmlinux-6.1.0-28-cloud-amd64
    drives: [{drive_id: rootfs, path: /var/lib/firecracker/vms/web1.ext4, root: true}]

- name: Remove it, keeping its logs
  microvm.firecracker.fc_vm:
    name: web1
    state: absent
    archive_logs_to: /var/log/microvm-archive
"""

RETURN = r"""
state:
  description: The VM's state after the call (predicted in check mode).
  returned: always
  type: str
  sample: running
pid:
  description: The VMM's process id (null when not running).
  returned: always
  type: int
api_socket:
  description: Path of the VMM's API socket.
  returned: always
  type: str
firecracker_version:
  description: What the VMM reports from C(GET /version) (null when not running).
  returned: always
  type: str
config:
  description: The rendered Firecracker configuration (config-file format).
  returned: unless state is absent
  type: dict
console_log:
  description: Path of the serial console log.
  returned: always
  type: str
state_dir:
  description: The VM's directory.
  returned: always
  type: str
jail_root:
  description: With O(jailer), the jail's root directory on the host (what the VMM sees as C(/)); else null.
  returned: always
  type: str
supervisor:
  description: The supervisor used, V(systemd) or V(process).
  returned: always
  type: str
actions:
  description: What was done, in order.
  returned: always
  type: list
  elements: str
  sample: ["started"]
differences:
  description: How the running (or stored) configuration differed from the asked one.
  returned: always
  type: list
  elements: str
api_seconds:
  description: Seconds from starting the VMM to its API answering (null when it was not started).
  returned: always
  type: float
ready_seconds:
  description: Seconds from starting the VMM (or from this check, for a VM already running) to O(wait_for) answering.
  returned: always
  type: float
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.microvm.firecracker.plugins.module_utils._fc_vm_task import (
    ARGUMENT_SPEC, REQUIRED_IF, TaskError, enter_task_netns, run_vm,
)


def main() -> None:
    module = AnsibleModule(argument_spec=ARGUMENT_SPEC, required_if=REQUIRED_IF, supports_check_mode=True)
    try:
        enter_task_netns(module.params["netns"], module.params["name"])
        result = run_vm(module.params, module.check_mode, module._diff, module.warn)[0]
    except TaskError as exc:
        module.fail_json(msg=exc.msg, changed=exc.changed)
    module.exit_json(**result)


if __name__ == "__main__":
    main()

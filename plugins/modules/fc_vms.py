#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: (c) 2026, microvm.firecracker contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations

DOCUMENTATION = r"""
module: fc_vms
short_description: Many Firecracker microVMs in one task, each exactly as M(microvm.firecracker.fc_vm) does it
version_added: 0.1.0
description:
  - Converges every microVM of O(vms) with the semantics of M(microvm.firecracker.fc_vm), up to eight VMs at
    the same time, then awaits the readiness checks (C(wait_for)) of all of them at the same time. It exists so that
    launching many VMs costs one task, instead of a loop of one M(microvm.firecracker.fc_vm) task (and one
    readiness wait) per VM.
  - Each element of O(vms) takes the options of M(microvm.firecracker.fc_vm), all of them but C(netns), with
    the same defaults and rules; see that module for what each option means. The VMs' network namespace is
    the task's O(netns), entered once.
  - All input is validated before anything is touched, fc_vm's whole validation included (the files, the TAPs,
    the VMM binary). One invalid VM, or two VMs with the same name, fails the task with nothing started, and
    the message names the VM.
  - A VM that fails (its converge, or its readiness check with the console lines that show why) does not stop
    the others; the task then fails, naming every failed VM, and reports every VM.
  - C(mmds_metadata) is secret, as in M(microvm.firecracker.fc_vm); its values never appear in output.
author:
  - microvm.firecracker contributors (@microvm)
requirements:
  - A Firecracker binary (or, on a lab host without KVM, the collection's stand-in) on the managed host
  - Python >= 3.9 on the managed host; no third-party Python library
attributes:
  check_mode:
    support: full
    description: Check mode observes each VM, plans the same steps as M(microvm.firecracker.fc_vm) and changes nothing.
  diff_mode:
    support: full
    description: For each VM, its state and configuration before and after, under a header naming it.
  platform:
    platforms: [linux]
    support: full
    description: Linux only.
options:
  vms:
    description:
      - The VMs, each a dictionary of M(microvm.firecracker.fc_vm)'s options except C(netns) (C(name), C(state),
        C(kernel), C(drives), C(network_interfaces), C(wait_for), ...), with the same defaults and rules.
      - Names must be unique. The result lists the VMs in this order.
    type: list
    elements: dict
    required: true
  netns:
    description:
      - The named network namespace (C(/run/netns/NAME)) all the VMs' TAPs are in; every VMM runs in it and
        every C(wait_for) is probed from it (as M(microvm.firecracker.fc_vm)'s C(netns)).
    type: str
  check_mode_stopped:
    description:
      - Check mode only (ignored otherwise). The names of VMs that an earlier task of the same run creates or
        stops, which in check mode changed nothing; for example a new VM whose TAPs and disk do not exist yet,
        or a running VM that M(microvm.firecracker.rootfs_prepare) stops before injecting into its disk.
      - Each is predicted as a VM that is stopped (or absent, when it has no state yet) when this task runs, so
        the prediction matches the real run; its TAPs and drive files need not exist (drive paths must still be
        absolute), and every other option is checked as usual.
    type: list
    elements: str
    default: []
  check_mode_taps:
    description:
      - Check mode only (ignored otherwise). TAPs that an earlier task of the same run creates (M(microvm.firecracker.tap_vnet_hdr),
        which in check mode created nothing), for example after a reboot removed the TAPs of VMs that still have
        their state. They are taken as existing TAPs, as the VMs need them.
    type: list
    elements: str
    default: []
notes:
  - The readiness checks run in threads, one per VM, each with its own C(wait_for.timeout).
  - Each VM's steps (files, supervisor, API) are those of M(microvm.firecracker.fc_vm); VMs share nothing
    (each has its own state directory, TAP, API socket and unit), so up to eight are converged at once in
    threads, which also keeps the first guests' boot from slowing the start of the later VMMs on a busy host.
seealso:
  - module: microvm.firecracker.fc_vm
    description: One microVM; every element of O(vms) takes its options.
  - module: microvm.firecracker.tap_vnet_hdr
  - module: microvm.firecracker.rootfs_inject
"""

EXAMPLES = r"""
- name: Two VMs in one task; both must serve before the task returns
  microvm.firecracker.fc_vms:
    netns: vms
    vms:
      - name: web1
        kernel: /var/lib/microvm/images/vmlinux-6.1.0-28-cloud-amd64
        initrd: /var/lib/microvm/images/initrd.img-6.1.0-28-cloud-amd64
        drives: [{drive_id: rootfs, path: /var/lib/firecracker/vms/web1.ext4, root: true}]
        network_interfaces: [{iface_id: eth0, tap: fc-web1, guest_mac: "06:00:c0:a8:64:0a"}]
        wait_for: {host: 192.168.100.10, port: 8080, http_path: /health, timeout: 90}
      - name: web2
        kernel: /var/lib/microvm/images/vmlinux-6.1.0-28-cloud-amd64
        initrd: /var/lib/microvm/images/initrd.img-6.1.0-28-cloud-amd64
        vcpu_count: 2
        drives: [{drive_id: rootfs, path: /var/lib/firecracker/vms/web2.ext4, root: true}]
        network_interfaces: [{iface_id: eth0, tap: fc-web2, guest_mac: "06:00:c0:a8:64:0b"}]
        wait_for: {host: 192.168.100.11, port: 8080, timeout: 90}

- name: Every VM of a list of VM definitions (each item holds fc_vm options); go on when some fail
  microvm.firecracker.fc_vms:
    vms: "{{ my_vms }}"
  register: launched
  ignore_errors: true

- name: Which VMs failed, if any
  ansible.builtin.debug:
    msg: "{{ launched.failed_names }}"

- name: Remove both
  microvm.firecracker.fc_vms:
    vms:
      - name: web1
        state: absent
      - name: web2
        state: absent
"""

RETURN = r"""
vms:
  description:
    - One entry per VM, in the order of O(vms). An entry has C(name), C(failed), C(changed) and, for a failed
      VM, C(msg); when the VM's converge got that far, also every other key M(microvm.firecracker.fc_vm) returns
      (C(state), C(pid), C(api_socket), C(firecracker_version), C(config), C(console_log), C(state_dir),
      C(jail_root), C(supervisor), C(actions), C(differences), C(api_seconds), C(ready_seconds)).
  returned: always
  type: list
  elements: dict
  contains:
    name:
      description: The VM's name.
      type: str
      returned: always
    failed:
      description: Whether this VM failed (its converge or its readiness check).
      type: bool
      returned: always
    msg:
      description: Why this VM failed (it names the VM; a failed readiness check includes the last console lines).
      type: str
      returned: when failed
    changed:
      description:
        - Whether this VM was changed (predicted in check mode). A VM that failed after its converge had started
          changing it (for example a VMM started, then refused by the configuration check) counts as changed.
      type: bool
      returned: always
    state:
      description: The VM's state after the call (predicted in check mode).
      type: str
      returned: when the converge got that far
      sample: running
    pid:
      description: The VMM's process id (null when not running).
      type: int
      returned: when the converge got that far
    api_socket:
      description: Path of the VMM's API socket.
      type: str
      returned: when the converge got that far
    firecracker_version:
      description: What the VMM reports from C(GET /version) (null when not running).
      type: str
      returned: when the converge got that far
    config:
      description: The rendered Firecracker configuration (config-file format).
      type: dict
      returned: when the converge got that far, unless the VM's state is absent
    console_log:
      description: Path of the serial console log.
      type: str
      returned: when the converge got that far
    state_dir:
      description: The VM's directory.
      type: str
      returned: when the converge got that far
    jail_root:
      description: With C(jailer), the jail's root directory on the host; else null.
      type: str
      returned: when the converge got that far
    supervisor:
      description: The supervisor used, V(systemd) or V(process).
      type: str
      returned: when the converge got that far
    actions:
      description: What was done, in order.
      type: list
      elements: str
      returned: when the converge got that far
      sample: ["started"]
    differences:
      description: How the running (or stored) configuration differed from the asked one.
      type: list
      elements: str
      returned: when the converge got that far
    api_seconds:
      description: Seconds from starting the VMM to its API answering (null when it was not started).
      type: float
      returned: when the converge got that far
    ready_seconds:
      description:
        - Seconds from starting the VMM (or from the check, for a VM already running) to C(wait_for) answering;
          null without C(wait_for) or when the check failed.
      type: float
      returned: when the converge got that far
failed_names:
  description: The names of the VMs that failed, in input order (empty when none did).
  returned: always
  type: list
  elements: str
  sample: ["web2"]
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.microvm.firecracker.plugins.module_utils import _fc_vm_task


class _Module(AnsibleModule):
    """Validates every element of ``vms`` against fc_vm's options before the invocation is first logged, so
    the values fc_vm marks no_log (mmds_metadata) are hidden here too: a static no_log on ``vms`` would hide
    everything, and the elements declare no options."""

    _elements = None

    def vm_elements(self) -> _fc_vm_task.Elements:
        """The checked elements (checked once); their no_log values join the module's."""
        if self._elements is None:
            self._elements = _fc_vm_task.check_elements(self.params["vms"])
            self.no_log_values.update(self._elements.no_log_values)
        return self._elements

    def _log_invocation(self) -> None:
        # Not called for a no_log task: main() then checks the elements itself.
        self.vm_elements()
        super()._log_invocation()


def main() -> None:
    module = _Module(
        argument_spec=dict(
            vms=dict(type="list", elements="dict", required=True),
            netns=dict(type="str"),
            check_mode_stopped=dict(type="list", elements="str", default=[]),
            check_mode_taps=dict(type="list", elements="str", default=[]),
        ),
        supports_check_mode=True,
    )
    elements = module.vm_elements()
    if elements.errors:
        module.fail_json(msg="fc_vms: invalid input, nothing was started: " + " | ".join(elements.errors))
    try:
        _fc_vm_task.enter_task_netns(module.params["netns"])
        assume = _fc_vm_task.CheckModeAssumptions(stopped=frozenset(module.params["check_mode_stopped"]),
                                                  taps=frozenset(module.params["check_mode_taps"]))
        result = _fc_vm_task.run_vms([params for params in elements.params if params is not None],
                                     module.params["netns"], module.check_mode, module._diff, module.warn, assume)
    except _fc_vm_task.TaskError as exc:
        module.fail_json(msg=exc.msg)
    if result["failed_names"]:
        module.fail_json(**result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()

#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: (c) 2026, microvm.firecracker contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations

DOCUMENTATION = r"""
module: rootfs_prepare
short_description: Prepare many microVMs' directories and root disks in one task
version_added: 0.1.0
description:
  - For every VM in O(vms), in one task (so many VMs cost one task, not one per VM and step), creates the VM's
    directory (mode V('0700')), makes its root disk a sparse clone of the current golden image when the disk is
    missing (as M(microvm.firecracker.rootfs_clone) does, recording the golden version; an existing disk is never
    re-cloned), and injects its files, units, environment and hostname (as M(microvm.firecracker.rootfs_inject)
    does) when what the disk should carry changed.
  - Whether a disk needs injecting is decided by a fingerprint of the injection request and the staged files'
    content, kept beside the disk in C(inject.sha256); an unchanged VM's disk is not opened at all, so a running
    VM is never disturbed by a re-run.
  - An existing VM whose disk must change is handled by its O(vms[].on_change), V(restart) stops it first (its
    disk is never written while in use; M(microvm.firecracker.fc_vm) or M(microvm.firecracker.fc_vms) with
    V(state=running) starts it again), V(fail) refuses, V(ignore) leaves the disk as it is with a warning.
    A new VM (O(vms[].new), or its disk did not exist) is always injected.
  - Everything is checked for every VM before anything is touched (options, unique names, the golden images,
    staged files, on_change=fail refusals). Then each VM is prepared independently, several at a time; a VM that
    fails does not stop the others, and the task fails naming every failed VM (RV(failed_names)).
author:
  - microvm.firecracker contributors (@microvm)
requirements:
  - e2fsprogs >= 1.46.2 (C(debugfs), C(e2fsck)) and coreutils C(cp) on the managed host
  - root on the managed host
attributes:
  check_mode:
    support: full
    description:
      - Check mode runs the same checks and reports, per VM, what would be created, cloned, stopped and injected.
      - A VM whose fingerprint differs is reported as to be injected without reading its disk (a running VM's disk is
        in use).
  diff_mode:
    support: none
    description: No diff is returned; RV(vms[].changes) lists what an injection changed.
  platform:
    platforms: [linux]
    support: full
    description: Linux only.
options:
  vms:
    description:
      - The VMs, each prepared as described above.
    type: list
    elements: dict
    required: true
    suboptions:
      name:
        description: The VM's name (unique in the list; used in messages and to stop it).
        type: str
        required: true
      dir:
        description:
          - The VM's directory (its M(microvm.firecracker.fc_vm) O(microvm.firecracker.fc_vm#module:state_dir)),
            created with mode V('0700') when missing. The fingerprint C(inject.sha256) is kept here.
        type: path
        required: true
      golden:
        description:
          - The golden image (usually the C(golden-NAME.ext4) link the golden_image role keeps pointing at the current
            version). A missing disk is cloned from the file it points at.
        type: path
        required: true
      disk:
        description: The VM's root disk (an ext4 image), cloned from O(vms[].golden) when missing.
        type: path
        required: true
      inject:
        description:
          - The M(microvm.firecracker.rootfs_inject) options for this VM's disk (its O(microvm.firecracker.rootfs_inject#module:image)
            must be O(vms[].disk)), validated like that module's.
          - Values marked secret there (O(microvm.firecracker.rootfs_inject#module:environment_secret),
            O(microvm.firecracker.rootfs_inject#module:files[].secret)) are hidden here the same way.
        type: dict
        required: true
      staged:
        description:
          - Files on the managed host that O(vms[].inject) copies into the disk (staged there by an earlier task);
            their content is part of the fingerprint, so a changed staged file means injecting again.
        type: list
        elements: path
        default: []
      new:
        description:
          - The VM is created by this run (for example its address was allocated just now), so it is injected whatever
            its O(vms[].on_change).
        type: bool
        default: false
      on_change:
        description:
          - What to do when an existing VM's disk should carry something else than it does.
          - V(restart) stops the VM first (gracefully, as M(microvm.firecracker.fc_vm) stops it) and injects; V(fail)
            fails before anything is touched; V(ignore) warns and leaves the disk alone.
        type: str
        choices: [restart, fail, ignore]
        default: restart
      supervisor:
        description: How the VM's VMM is supervised (see M(microvm.firecracker.fc_vm)), to find and stop it.
        type: str
        choices: [auto, systemd, process]
        default: auto
      stop_timeout:
        description: Seconds a stop waits for the guest to shut down after Ctrl+Alt+Del before signals.
        type: int
        default: 30
notes:
  - The fingerprint is the one the microvm role wrote before this module existed, so VMs injected then are not
    injected (or restarted) again.
  - A disk whose fingerprint is unchanged is trusted; if the image was changed behind its back, run
    M(microvm.firecracker.rootfs_inject) on it directly, which compares with what the image holds.
seealso:
  - module: microvm.firecracker.rootfs_clone
  - module: microvm.firecracker.rootfs_inject
  - module: microvm.firecracker.fc_vms
"""

EXAMPLES = r"""
- name: Prepare two VMs' disks from the current golden image
  microvm.firecracker.rootfs_prepare:
    vms:
      - name: web1
        dir: /var/lib/microvm/vms/web1
        golden: /var/lib/microvm/golden/golden-base.ext4
        disk: /var/lib/microvm/vms/web1/rootfs.ext4
        inject:
          image: /var/lib/microvm/vms/web1/rootfs.ext4
          hostname: web1
          reset_machine_id: true
          environment:
            SESSION_ID: abc123
          systemd_units:
            - name: web.service
              enabled: true
              content: |
                [Service]
                EnvironmentFile=/etc/environment
                ExecStart=/usr/local/bin/web
                [Install]
                WantedBy=multi-user.target
      - name: web2
        dir: /var/lib/microvm/vms/web2
        golden: /var/lib/microvm/golden/golden-base.ext4
        disk: /var/lib/microvm/vms/web2/rootfs.ext4
        inject:
          image: /var/lib/microvm/vms/web2/rootfs.ext4
          hostname: web2
          environment:
            HTTPS_PROXY: "http://user:{{ proxy_password }}@proxy.internal:3128"
          environment_secret: true
        on_change: fail
  register: prepared
"""

RETURN = r"""
vms:
  description: Per VM, in the order of O(vms), what was (in check mode, would be) done.
  returned: always
  type: list
  elements: dict
  contains:
    name:
      description: The VM's name.
      type: str
      sample: web1
    failed:
      description: Whether this VM failed (RV(vms[].msg) says why).
      type: bool
      sample: false
    msg:
      description: Why the VM failed.
      type: str
      returned: when failed
    changed:
      description: Whether anything of this VM changed.
      type: bool
    actions:
      description: What was done, in order.
      type: list
      elements: str
      sample: [created /var/lib/microvm/vms/web1, cloned the golden image, injected]
    action:
      description: The clone's action, V(clone) or V(none) (the disk existed).
      type: str
      sample: clone
    source:
      description: The golden image file the disk was cloned from (recorded beside the disk).
      type: str
      sample: /var/lib/microvm/golden/golden-base-0123456789abcdef.ext4
    version:
      description: The golden version of RV(vms[].source), or null for an unversioned image.
      type: str
      sample: 0123456789abcdef
    outdated:
      description: The disk came from another golden version than the one O(vms[].golden) points at now.
      type: bool
    injected:
      description: The disk was (would be) injected.
      type: bool
    stopped:
      description: The VM was (would be) stopped to inject its disk; a start brings it back.
      type: bool
    changes:
      description: The injection's changes (see M(microvm.firecracker.rootfs_inject)'s C(changes)); never content.
      type: list
      elements: dict
failed_names:
  description:
    - The VMs that failed while being prepared. Empty when the checks before anything is touched failed (then nothing
      was changed and RV(vms) is empty).
  returned: always
  type: list
  elements: str
  sample: []
"""

import os
import shutil
import tempfile

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.microvm.firecracker.plugins.module_utils import _rootfs_inject, _rootfs_prepare

ARGUMENT_SPEC = dict(
    vms=dict(type="list", elements="dict", required=True, options=dict(
        name=dict(type="str", required=True),
        dir=dict(type="path", required=True),
        golden=dict(type="path", required=True),
        disk=dict(type="path", required=True),
        inject=dict(type="dict", required=True, no_log=False),
        staged=dict(type="list", elements="path", default=[]),
        new=dict(type="bool", default=False),
        on_change=dict(type="str", choices=list(_rootfs_prepare.ON_CHANGE), default="restart"),
        supervisor=dict(type="str", choices=["auto", "systemd", "process"], default="auto"),
        stop_timeout=dict(type="int", default=30),
    )),
)


class _Module(AnsibleModule):
    """Hides the injections' secret values before the invocation is first logged (see rootfs_inject)."""

    def _log_invocation(self) -> None:
        self.no_log_values.update(_rootfs_prepare.secret_values(self.params.get("vms") or []))
        super()._log_invocation()


def main() -> None:
    module = _Module(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    module.no_log_values.update(_rootfs_prepare.secret_values(module.params["vms"]))
    items, problems = _rootfs_prepare.validate(module.params["vms"])
    if not problems:
        decisions, problems = _rootfs_prepare.decide(items, module.check_mode)
    if problems:
        module.fail_json(msg="rootfs_prepare: nothing was changed: " + "; ".join(problems), vms=[], failed_names=[])
    tools = _rootfs_inject.find_tools(module.get_bin_path)
    tmpdir = tempfile.mkdtemp(prefix="rootfs-prepare-", dir=module.tmpdir)
    os.chmod(tmpdir, 0o700)
    try:
        outcomes = _rootfs_prepare.prepare(decisions, module.check_mode, tools, tmpdir, module.warn,
                                           workers=min(4, os.cpu_count() or 1))
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    results = [outcome.result() for outcome in outcomes]
    failed = [outcome for outcome in outcomes if outcome.failed]
    changed = any(outcome.changed for outcome in outcomes)
    if failed:
        module.fail_json(msg=f"rootfs_prepare: {len(failed)} of {len(outcomes)} VMs failed: "
                         + " | ".join(outcome.msg or "" for outcome in failed),
                         changed=changed, vms=results, failed_names=[outcome.name for outcome in failed])
    module.exit_json(changed=changed, vms=results, failed_names=[])


if __name__ == "__main__":
    main()

#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: (c) 2026, microvm.firecracker contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations

DOCUMENTATION = r"""
module: rootfs_clone
short_description: A VM's own sparse copy of a golden image, with the golden version recorded
version_added: 0.1.0
description:
  - Copies a golden image (for example C(golden-base.ext4), the link M(microvm.firecracker.golden_image_build)
    maintains) to a VM's disk with C(cp --sparse=always --reflink=auto) into a temporary file that is renamed
    into place, so an 8 GiB image holding 400 MB of data costs 400 MB and well under a second, and a failed
    copy never leaves a half-written disk.
  - The link is resolved when the clone is made; the versioned file it pointed at is recorded in
    C(DEST.source.json), so the VM keeps the golden version it was created from after the link moves on.
  - An existing disk is never overwritten unless O(refresh=true) and the golden version differs; a disk that a
    process (a running VMM) or a loop device holds is never replaced or removed.
author:
  - microvm.firecracker contributors (@microvm)
attributes:
  check_mode:
    support: full
    description: Reports whether the disk would be cloned, re-cloned or removed.
  diff_mode:
    support: none
    description: Nothing to show beyond RV(action).
  platform:
    platforms: [linux]
    support: full
    description: Linux (reads C(/proc) to find processes holding the disk).
options:
  src:
    description: The golden image (a file or a link to one). Required with O(state=present).
    type: path
  dest:
    description: The VM's disk file. Its directory must exist.
    type: path
    required: true
  state:
    description: V(present) makes the clone when it is missing; V(absent) removes the disk and its record.
    type: str
    choices: [present, absent]
    default: present
  refresh:
    description:
      - Replace an existing disk whose recorded source differs from what O(src) points at now (the VM's own
        changes on that disk are lost). The default keeps the disk and returns RV(outdated=true).
    type: bool
    default: false
"""

EXAMPLES = r"""
- name: Disk for web1 from the current golden version
  microvm.firecracker.rootfs_clone:
    src: /var/lib/microvm/golden/golden-base.ext4
    dest: /var/lib/firecracker/vms/web1/rootfs.ext4
  register: web1_disk

- name: Remove it (refused while a VMM has it open)
  microvm.firecracker.rootfs_clone:
    dest: /var/lib/firecracker/vms/web1/rootfs.ext4
    state: absent
"""

RETURN = r"""
action:
  description: What was (or in check mode would be) done.
  returned: always
  type: str
  choices: [none, clone, reclone, remove]
source:
  description: The versioned golden file the disk was cloned from (as recorded).
  returned: when known
  type: str
  sample: /var/lib/microvm/golden/golden-base-0123456789abcdef.ext4
version:
  description: The golden version of RV(source) (the 16 hex digits of its name), or null for other names.
  returned: when known
  type: str
outdated:
  description: The disk was kept although O(src) points at another golden version now.
  returned: always
  type: bool
apparent_bytes:
  description: Apparent size of the disk.
  returned: when the disk exists
  type: int
allocated_bytes:
  description: Bytes the disk really occupies.
  returned: when the disk exists
  type: int
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.microvm.firecracker.plugins.module_utils._clone import CloneError, apply, describe


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(
            src=dict(type="path"),
            dest=dict(type="path", required=True),
            state=dict(type="str", default="present", choices=["present", "absent"]),
            refresh=dict(type="bool", default=False),
        ),
        required_if=[("state", "present", ["src"])],
        supports_check_mode=True,
    )
    params = module.params
    try:
        steps = apply(params["src"], params["dest"], params["state"], params["refresh"], module.check_mode)
    except CloneError as exc:
        module.fail_json(msg="rootfs_clone: %s" % exc)
    except OSError as exc:
        module.fail_json(msg="rootfs_clone: %s: %s" % (params["dest"], exc.strerror or exc))
    record = steps.get("record") or {}
    source = steps.get("source")
    result = dict(
        changed=steps["action"] != "none",
        action=steps["action"],
        outdated=bool(steps.get("outdated", False)),
        source=record.get("source") or (source.path if source else None),
        version=record.get("version") if record else (source.version if source else None),
    )
    result.update({k: v for k, v in describe(params["dest"]).items() if k != "exists"})
    module.exit_json(**result)


if __name__ == "__main__":
    main()

#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: (c) 2026, microvm.firecracker contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations

DOCUMENTATION = r"""
module: rootfs_inject
short_description: Write a microVM's own files into its ext4 root image without mounting it
version_added: 0.1.0
description:
  - Writes files, directories, symlinks, systemd units (with their enablement links), C(/etc/environment),
    the hostname and an empty C(/etc/machine-id) into an ext4 image file with e2fsprogs C(debugfs).
  - The image is never mounted and never attached to a loop device, so no stale mount is left behind and a
    symlink inside the image is only ever resolved inside the image, never on the host.
  - Idempotent by reading back what the image holds (full content, mode, owner, group, link targets);
    a second run with the same options reports no change. Check mode runs the same plan without writing.
  - Before anything is written, every check passes or nothing is touched; the image must be a regular file,
    not open by any process (every C(/proc/*/fd) is compared by device and inode, so a jailed VMM using a
    hard link or bind mount is found too), not attached to a loop device, its superblock clean with no
    journal waiting for recovery, and C(e2fsck -fn) must find it clean; every O(files[].src) must be readable;
    destination paths must be absolute and normalised, and no parent of a destination may be a symlink
    or a non-directory inside the image.
  - All writes of a run go through one C(debugfs -w) batch. A file is written under a temporary name in its own
    directory, given its mode and owner, and then linked in place of the old one. A leftover temporary name from
    an interrupted run is removed by the next run, which then compares and rewrites the file.
  - After writing, the image is read back and compared with the request again, and checked with C(e2fsck -fn);
    either failing fails the task.
author:
  - microvm.firecracker contributors (@microvm)
requirements:
  - e2fsprogs >= 1.46.2 (C(debugfs), C(e2fsck)) on the managed host (Debian 12, Ubuntu 22.04 and 24.04 ship it)
  - root on the managed host, to see every process's open files (else a warning says the in-use check was partial)
attributes:
  check_mode:
    support: full
    description: Check mode reads the image, runs the same checks (including C(e2fsck -fn)) and plan, and writes nothing.
  diff_mode:
    support: full
    description:
      - One diff per changed path, content before and after for files, targets for symlinks, mode/owner/group
        for attribute changes.
      - Secret files and a secret environment show only that they changed; removed files show only their size.
  platform:
    platforms: [linux]
    support: full
    description: Linux only.
options:
  image:
    description:
      - Path of the ext4 image file on the managed host (the VM's root drive, typically a sparse clone of a golden image).
    type: path
    required: true
  files:
    description:
      - Regular files to write into (or remove from) the image.
    type: list
    elements: dict
    default: []
    suboptions:
      path:
        description:
          - Absolute, normalised path inside the image (no C(//), C(/./), C(..), trailing C(/) or control characters).
          - Missing parent directories are created (mode C(0755), owner root) unless O(directories) says otherwise.
          - An existing symlink at O(files[].path) is replaced by the file (it is not followed).
        type: str
        required: true
        aliases: [dest]
      content:
        description:
          - The file's content, as text (written UTF-8 encoded). Mutually exclusive with O(files[].src).
          - Shown in diffs unless O(files[].secret=true).
        type: str
      src:
        description:
          - A file on the managed host to copy into the image. Mutually exclusive with O(files[].content).
          - Checked (exists, readable, regular file) before anything is written.
        type: path
      mode:
        description:
          - Permission bits, as an octal string such as V('0644') (quote it in YAML). Symbolic modes are not supported.
          - Unset keeps an existing file's mode; a new file gets V('0644'), a secret one always V('0600').
        type: raw
      owner:
        description:
          - User name or numeric uid. Names are resolved from the image's own C(/etc/passwd), never the host's.
          - Unset keeps an existing file's owner; a new file is owned by uid 0.
        type: str
      group:
        description:
          - Group name or numeric gid, resolved from the image's own C(/etc/group).
          - Unset keeps an existing file's group; a new file gets gid 0.
        type: str
      state:
        description:
          - V(present) writes the file; V(absent) removes a file or symlink at O(files[].path) (a directory there is an error).
        type: str
        choices: [present, absent]
        default: present
      secret:
        description:
          - The content is secret. Diffs show only that it changed, the value is hidden from the returned invocation and
            logs, and an unset O(files[].mode) means V('0600').
        type: bool
        default: false
  directories:
    description:
      - Directories to create (with their missing parents) or remove.
    type: list
    elements: dict
    default: []
    suboptions:
      path:
        description: Absolute, normalised path inside the image.
        type: str
        required: true
      mode:
        description:
          - Permission bits as an octal string such as V('0750'). Unset keeps an existing directory's mode; a new one gets
            V('0755').
        type: raw
      owner:
        description: User name (from the image's C(/etc/passwd)) or uid. Unset keeps the existing owner; new ones get uid 0.
        type: str
      group:
        description: Group name (from the image's C(/etc/group)) or gid. Unset keeps the existing group; new ones get gid 0.
        type: str
      state:
        description:
          - V(present) creates the directory; V(absent) removes it, which must then be empty once this run's own removals
            are done (no recursive removal).
        type: str
        choices: [present, absent]
        default: present
  symlinks:
    description:
      - Symbolic links to create or remove inside the image. Targets are stored as given and resolved only by the guest.
    type: list
    elements: dict
    default: []
    suboptions:
      path:
        description: Absolute, normalised path of the link inside the image.
        type: str
        required: true
      target:
        description: What the link points to (absolute or relative, as the guest will see it). Required with V(present).
        type: str
      state:
        description: V(present) creates or retargets the link; V(absent) removes a symlink at O(symlinks[].path).
        type: str
        choices: [present, absent]
        default: present
  systemd_units:
    description:
      - systemd units in C(/etc/systemd/system), with the links C(systemctl enable), C(disable) and C(mask) would make.
    type: list
    elements: dict
    default: []
    suboptions:
      name:
        description: Unit file name, such as V(agent.service) or V(agent@.service).
        type: str
        required: true
      content:
        description: Unit file content, written to C(/etc/systemd/system/NAME) (mode V('0644') when new, owner root).
        type: str
      src:
        description: A unit file on the managed host to copy instead of O(systemd_units[].content).
        type: path
      enabled:
        description:
          - V(true) creates the links named by the unit's C([Install]) section, as C(systemctl enable) does,
            C(WantedBy=X) as C(/etc/systemd/system/X.wants/NAME), C(RequiredBy=) as C(.requires/),
            C(UpheldBy=) as C(.upholds/), each pointing to the unit file, and C(Alias=Y) as C(/etc/systemd/system/Y).
            A template unit needs C(DefaultInstance=). Specifiers (C(%i), ...) in those settings are refused.
          - Links of an earlier version of the unit's C([Install]) section that no longer apply are removed.
          - V(false) removes those links. Unset leaves them as they are.
          - Without O(systemd_units[].content) or O(systemd_units[].src), the unit must already be in the image
            (C(/etc/systemd/system), C(/lib/systemd/system) or C(/usr/lib/systemd/system)); its links then point to
            where it was found.
        type: bool
      masked:
        description:
          - V(true) makes C(/etc/systemd/system/NAME) a symlink to C(/dev/null) (replacing a unit file there);
            V(false) removes such a mask link. Cannot be combined with content or O(systemd_units[].enabled=true).
        type: bool
      state:
        description:
          - V(absent) removes C(/etc/systemd/system/NAME) (unit file or mask link) and the enablement links its
            C([Install]) section names.
        type: str
        choices: [present, absent]
        default: present
  environment:
    description:
      - Variables for C(/etc/environment), read by pam_env at login and by units with
        C(EnvironmentFile=/etc/environment).
      - Keys must match C([A-Za-z_][A-Za-z0-9_]*); values must not contain a newline, NUL or C(#) (pam_env treats C(#)
        as a comment even inside quotes). Values are written bare, single-quoted or double-quoted so that pam_env and
        systemd read back the same string; a value that no quoting can carry is refused.
      - With O(environment_strategy=merge), a key whose value is V(null) is removed.
      - Unset leaves C(/etc/environment) alone.
    type: dict
  environment_strategy:
    description:
      - V(merge) keeps the other lines of the image's C(/etc/environment) and updates the given keys in place.
      - V(replace) writes exactly the given keys.
    type: str
    choices: [merge, replace]
    default: merge
  environment_secret:
    description:
      - The environment values are secret (proxy credentials, tokens). Diffs show only that the file changed, the values
        are hidden from the returned invocation and logs, and the file's mode becomes V('0600') (pam_env and systemd read
        it as root).
    type: bool
    default: false
  hostname:
    description:
      - Host name written to C(/etc/hostname) (a name or FQDN of at most 64 characters).
    type: str
  hosts_entry:
    description:
      - With O(hostname), also set the C(127.0.1.1) line of C(/etc/hosts) to the name (FQDN and short name), as Debian
        does, keeping every other line. A missing C(/etc/hosts) is created with Debian's default content.
    type: bool
    default: true
  reset_machine_id:
    description:
      - Make C(/etc/machine-id) empty (created with mode V('0444') when missing) so the guest generates its own id on
        first boot instead of sharing the golden image's (and with it the DHCP client identity).
    type: bool
    default: false
notes:
  - The image must not be in use. The checks cover processes on this host and loop devices; an image shared over the
    network to another host cannot be seen.
  - Ownership names are looked up in the image, so a user that exists only in the guest (for example the agent's
    service user) works, and a host user of the same name is never used.
  - Secret values are only hidden when marked with O(files[].secret) or O(environment_secret). Use C(no_log) on the
    task to hide everything else as well.
  - A run killed while C(debugfs) writes can leave the filesystem inconsistent; the next run's C(e2fsck -fn) then
    refuses the image (repair it with C(e2fsck -fy)) rather than treating anything as done.
seealso:
  - name: debugfs(8)
    description: The e2fsprogs tool used to read and write the image.
    link: https://man7.org/linux/man-pages/man8/debugfs.8.html
  - name: systemctl enable
    description: What the enablement links mirror.
    link: https://www.freedesktop.org/software/systemd/man/latest/systemctl.html
"""

EXAMPLES = r"""
- name: Inject the agent, its unit and the VM's identity into a fresh clone
  microvm.firecracker.rootfs_inject:
    image: /var/lib/fc/vm1/rootfs.ext4
    hostname: vm1
    reset_machine_id: true
    directories:
      - path: /opt/agent
        owner: agent
        group: agent
        mode: "0750"
    files:
      - path: /opt/agent/agent.py
        src: /srv/artifacts/agent.py
        owner: agent
        group: agent
        mode: "0750"
      - path: /opt/agent/config.json
        content: "{{ agent_config | to_nice_json }}"
        owner: agent
        mode: "0640"
    systemd_units:
      - name: agent.service
        enabled: true
        content: |
          [Unit]
          Description=VM agent
          After=network-online.target
          Wants=network-online.target

          [Service]
          User=agent
          ExecStart=/usr/bin/python3 /opt/agent/agent.py
          Restart=on-failure

          [Install]
          WantedBy=multi-user.target
    environment:
      AGENT_PORT: 8080

- name: Proxy credentials, hidden from diffs and logs
  microvm.firecracker.rootfs_inject:
    image: /var/lib/fc/vm1/rootfs.ext4
    environment:
      HTTPS_PROXY: "http://user:{{ proxy_password }}@proxy.internal:3128"
    environment_secret: true

- name: A token file only the agent can read
  microvm.firecracker.rootfs_inject:
    image: /var/lib/fc/vm1/rootfs.ext4
    files:
      - path: /etc/agent/token
        content: "{{ agent_token }}"
        owner: agent
        secret: true

- name: Mask a unit of the golden image, enable another one it already ships
  microvm.firecracker.rootfs_inject:
    image: /var/lib/fc/vm1/rootfs.ext4
    systemd_units:
      - name: apt-daily.timer
        masked: true
      - name: ssh.service
        enabled: true
"""

RETURN = r"""
image:
  description: The image path, as given.
  returned: always
  type: str
  sample: /var/lib/fc/vm1/rootfs.ext4
changes:
  description:
    - What was (in check mode, would be) changed, in the order it is done. Never contains file content.
  returned: always
  type: list
  elements: dict
  contains:
    path:
      description: In-image path.
      type: str
      sample: /etc/systemd/system/multi-user.target.wants/agent.service
    kind:
      description: V(regular), V(directory) or V(symlink) (what the path is, or was for a removal).
      type: str
      sample: symlink
    action:
      description:
        - V(create), V(update) (new content or target), V(replace) (a different kind of file was there),
          V(attributes) (mode/owner/group only), V(remove), or V(remove_leftover) (a temporary name left
          by an interrupted run).
      type: str
      sample: create
    secret:
      description: Present and true for secret files (O(files[].secret), O(environment_secret)).
      type: bool
      returned: when secret
  sample:
    - {"path": "/etc/hostname", "kind": "regular", "action": "update"}
    - {"path": "/etc/environment", "kind": "regular", "action": "update", "secret": true}
fsck:
  description: The summary line of C(e2fsck -fn) before and after writing (null when that check did not run).
  returned: always
  type: dict
  contains:
    before:
      description: Summary of the check before writing; runs whenever there is something to change (also in check mode).
      type: str
      sample: "rootfs.ext4: 13711/524288 files (0.2% non-contiguous), 123456/2097152 blocks"
    after:
      description: Summary of the check after writing.
      type: str
      sample: "rootfs.ext4: 13720/524288 files (0.2% non-contiguous), 123470/2097152 blocks"
"""

import os
import shutil
import tempfile

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.microvm.firecracker.plugins.module_utils import _rootfs_inject
from ansible_collections.microvm.firecracker.plugins.module_utils._rootfs_inject import ARGUMENT_SPEC


class _Module(AnsibleModule):
    """Hides values marked secret (files[].secret, environment_secret) like no_log values, before the
    invocation is first logged: whether a value is secret depends on another option, which a static
    no_log cannot express."""

    def _log_invocation(self) -> None:
        self.no_log_values.update(_rootfs_inject.secret_values(self.params))
        super()._log_invocation()


def main() -> None:
    module = _Module(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    module.no_log_values.update(_rootfs_inject.secret_values(module.params))
    tools = _rootfs_inject.find_tools(module.get_bin_path)
    workdir = tempfile.mkdtemp(prefix="rootfs-inject-", dir=module.tmpdir)
    os.chmod(workdir, 0o700)
    try:
        result = _rootfs_inject.run(module.params, check_mode=module.check_mode, want_diff=module._diff,
                                    workdir=workdir, tools=tools, warn=module.warn)
    except _rootfs_inject.RunError as exc:
        module.fail_json(msg=str(exc), image=module.params["image"])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    module.exit_json(**result)


if __name__ == "__main__":
    main()

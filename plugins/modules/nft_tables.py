#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: (c) 2026, microvm.firecracker contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations

DOCUMENTATION = r"""
module: nft_tables
short_description: nftables tables owned by one rule file, loaded atomically and kept as the file says
version_added: 0.1.0
description:
  - Loads an nftables rule file that owns whole tables (for each it declares the table, deletes it and declares
    it again, so one C(nft -f) replaces exactly those tables in one transaction and never touches another table),
    or deletes those tables.
  - Idempotent against the kernel, not against a record. The file is loaded into a throw-away network namespace
    (C(unshare --net)) and listed there, and that listing is compared with the live listing of each table in
    O(tables). The file is loaded only when they differ, so a table someone flushed, edited or deleted is
    loaded again, and an unchanged file on an unchanged kernel reports no change.
  - A table listed in O(tables) that the file does not (or no longer) create must be absent; loading the file
    removes it when the file deletes it (C(table X {}) then C(delete table X)).
  - Validate the file when writing it (M(ansible.builtin.template) with C(validate=nft -c -f %s)).
author:
  - microvm.firecracker contributors (@microvm)
requirements:
  - C(nft) (Debian/Ubuntu package nftables) and C(unshare) (util-linux) on the managed host
  - Linux; root (C(CAP_NET_ADMIN), and C(CAP_SYS_ADMIN) for the scratch network namespace)
attributes:
  check_mode:
    support: full
    description: Compares and reports without loading or deleting anything.
  diff_mode:
    support: full
    description: The live listing of each table before and after.
  platform:
    platforms: [linux]
    support: full
    description: Linux only.
options:
  path:
    description:
      - The rule file. Required with O(state=present).
      - In check mode a missing file (a template check mode did not write) is reported as a change.
    type: path
  tables:
    description:
      - The tables the file owns, each as C(<family> <name>), for example V(inet microvm_fcbr0).
      - Names are letters, digits and C(_), at most 64, not starting with a digit.
    type: list
    elements: str
    required: true
  state:
    description: V(present) loads the file when the tables differ from it; V(absent) deletes the tables.
    type: str
    choices: [present, absent]
    default: present
  reload:
    description:
      - Load the file even when the live tables already match it (for example because the file was just rewritten
        and check mode cannot compare a file it did not write).
    type: bool
    default: false
  netns:
    description: Operate inside this named network namespace (C(/run/netns/NAME), as made by C(ip netns add)).
    type: str
seealso:
  - module: ansible.builtin.template
"""

EXAMPLES = r"""
- name: The VM bridge's firewall file
  ansible.builtin.template:
    src: nftables.nft.j2
    dest: /etc/microvm/network/fcbr0/nftables.nft
    mode: "0644"
    validate: nft -c -f %s
  register: fw_file

- name: Load it when the kernel's tables differ from it
  microvm.firecracker.nft_tables:
    path: /etc/microvm/network/fcbr0/nftables.nft
    tables:
      - inet microvm_fcbr0
      - bridge microvm_fcbr0
    reload: "{{ fw_file is changed }}"

- name: Remove them
  microvm.firecracker.nft_tables:
    tables: [inet microvm_fcbr0, bridge microvm_fcbr0]
    state: absent
"""

RETURN = r"""
tables:
  description: Per table, whether it is loaded after the call (predicted in check mode).
  returned: always
  type: dict
  sample: {"inet microvm_fcbr0": true, "bridge microvm_fcbr0": false}
differed:
  description: The tables whose live state differed from the file (V(present)) or that existed (V(absent)).
  returned: always
  type: list
  elements: str
"""

import os

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.microvm.firecracker.plugins.module_utils import _nft
from ansible_collections.microvm.firecracker.plugins.module_utils._netns import NetnsError, enter_netns


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(
            path=dict(type="path"),
            tables=dict(type="list", elements="str", required=True),
            state=dict(type="str", default="present", choices=["present", "absent"]),
            reload=dict(type="bool", default=False),
            netns=dict(type="str"),
        ),
        required_if=[("state", "present", ["path"])],
        supports_check_mode=True,
    )
    params = module.params
    tables: list = []
    before: dict = {}
    after: dict = {}
    wanted = None
    differed: list = []
    changed = False
    try:
        tables = [_nft.parse_table(text) for text in params["tables"]]
        if not tables:
            raise _nft.NftError("tables: list at least one table")
        if params["netns"]:
            enter_netns(params["netns"])
        if _nft.find_nft() is None and (module.check_mode or params["state"] == "absent"):
            # Without nft there are no tables to delete; in check mode an earlier task would install it.
            present = params["state"] == "present"
            if present:
                module.warn("nft_tables: nft is not installed yet; check mode assumes the tables would be loaded")
            module.exit_json(changed=present, differed=[str(t) for t in tables] if present else [],
                             tables={str(t): present for t in tables})
        before = _nft.live(tables)
        if params["state"] == "absent":
            differed = [str(t) for t in tables if before[t] is not None]
            changed = bool(differed)
            if changed and not module.check_mode:
                _nft.delete(tables)
            after = {t: None for t in tables}
        else:
            path = params["path"]
            if os.path.isfile(path):
                wanted = _nft.rendered(path, tables)
            elif module.check_mode:
                wanted = None  # a file check mode did not write: it will be loaded
            else:
                raise _nft.NftError(f"{path}: no such rule file")
            differed = [str(t) for t in tables if wanted is None or wanted[t] != before[t]]
            changed = bool(differed) or params["reload"]
            if changed and not module.check_mode:
                _nft.load(path)
                after = _nft.live(tables)
                if wanted is not None and after != wanted:
                    module.warn(f"nft_tables: after nft -f {path}, table(s) "
                                + ", ".join(str(t) for t in tables if after[t] != wanted[t])
                                + " still differ from the file (another process changing them?)")
            else:
                after = wanted if wanted is not None else before
    except (_nft.NftError, NetnsError) as exc:
        module.fail_json(msg=f"nft_tables: {exc}")
    result = dict(changed=changed, differed=differed,
                  tables={str(t): after[t] is not None for t in tables})
    if params["state"] == "present" and wanted is None:
        result["tables"] = {str(t): True for t in tables}
    if module._diff:
        result["diff"] = {"before": _listing(before), "after": _listing(after)}
    module.exit_json(**result)


def _listing(tables: dict) -> str:
    return "".join(text or f"# table {table}: absent\n" for table, text in tables.items())


if __name__ == "__main__":
    main()

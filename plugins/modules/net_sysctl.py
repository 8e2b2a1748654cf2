#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: (c) 2026, microvm.firecracker contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations

DOCUMENTATION = r"""
module: net_sysctl
short_description: Live network sysctls of the host or of a named network namespace
version_added: 0.1.0
description:
  - Sets network sysctls (C(net.*)) in the running kernel, writing only those whose value differs, and reports
    which ones changed. Nothing is written to C(/etc/sysctl.d); persist values with a file of your own (the
    C(microvm.firecracker.host_network) role writes one).
  - With O(netns), the values of that network namespace are read and set (C(/proc/sys/net) is per namespace).
    Some C(net.*) sysctls exist only in the host's namespace (for example C(net.ipv4.neigh.default.gc_thresh*),
    which are global); they are reported missing inside another namespace.
  - All keys and values are validated before anything is written.
author:
  - microvm.firecracker contributors (@microvm)
requirements:
  - Linux; root
attributes:
  check_mode:
    support: full
    description: Reports the values that would change. A key that does not exist yet (for example for a bridge an
      earlier task would create) is reported as a change instead of failing.
  diff_mode:
    support: full
    description: The changed keys' values before and after.
  platform:
    platforms: [linux]
    support: full
    description: Linux only.
options:
  values:
    description:
      - Keys in sysctl(8) notation (levels separated by dots; a dot inside an interface name written as C(/), for
        example V(net.ipv4.conf.eth0/100.rp_filter)) mapped to their values. Only keys under C(net.).
      - Values are compared as the kernel prints them, with whitespace runs treated as one separator.
    type: dict
    required: true
  netns:
    description: Read and set the values of this named network namespace (C(/run/netns/NAME)).
    type: str
"""

EXAMPLES = r"""
- name: Route the VMs' traffic, loose reverse-path filtering on their bridge
  microvm.firecracker.net_sysctl:
    values:
      net.ipv4.ip_forward: 1
      net.ipv4.conf.fcbr0.rp_filter: 2

- name: The same inside a lab namespace
  microvm.firecracker.net_sysctl:
    netns: fclab
    values:
      net.ipv4.ip_forward: 1
"""

RETURN = r"""
values:
  description: Every key with its value after the call (predicted in check mode).
  returned: always
  type: dict
  sample: {"net.ipv4.ip_forward": "1", "net.ipv4.conf.fcbr0.rp_filter": "2"}
changed_keys:
  description: The keys that were (or in check mode would be) set.
  returned: always
  type: list
  elements: str
"""

from typing import Optional

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.microvm.firecracker.plugins.module_utils import _sysctl
from ansible_collections.microvm.firecracker.plugins.module_utils._netns import NetnsError, enter_netns


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(
            values=dict(type="dict", required=True),
            netns=dict(type="str"),
        ),
        supports_check_mode=True,
    )
    before: dict[str, Optional[str]] = {}
    after: dict[str, str] = {}
    changed_keys: list[str] = []
    try:
        wanted = {}
        for key, value in sorted(module.params["values"].items()):
            _sysctl.key_path(key)
            wanted[key] = _sysctl.normalize(value)
        if module.params["netns"]:
            enter_netns(module.params["netns"])
        before = {key: _sysctl.read(key) for key in wanted}
        missing = [key for key in wanted if before[key] is None]
        if missing and not module.check_mode:
            where = f" in netns {module.params['netns']}" if module.params["netns"] else ""
            raise _sysctl.SysctlError(f"no such sysctl{where}: {', '.join(missing)}")
        changed_keys = [key for key in wanted if before[key] != wanted[key]]
        if not module.check_mode:
            for key in changed_keys:
                _sysctl.write(key, wanted[key])
        after = dict(wanted)
    except (_sysctl.SysctlError, NetnsError) as exc:
        module.fail_json(msg=f"net_sysctl: {exc}")
    result = dict(changed=bool(changed_keys), changed_keys=changed_keys, values=after)
    if module._diff:
        result["diff"] = {"before": "".join(f"{k} = {before[k]}\n" for k in changed_keys),
                          "after": "".join(f"{k} = {after[k]}\n" for k in changed_keys)}
    module.exit_json(**result)


if __name__ == "__main__":
    main()

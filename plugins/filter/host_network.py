# -*- coding: utf-8 -*-
# Copyright: (c) 2026, microvm.firecracker contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Filter of the host_network role: the VMs' network derived from one CIDR, exactly as the allocator derives it."""
from __future__ import annotations

from typing import Any

from ansible.errors import AnsibleFilterError

from ansible_collections.microvm.firecracker.plugins.module_utils._allocator import AllocationError, make_pool


def _vm_network(cidr: Any, gateway: Any = None, pool_start: Any = None, pool_end: Any = None,
                errors: str = "strict") -> dict[str, Any]:
    if errors not in ("strict", "return"):
        raise AnsibleFilterError("vm_network: errors must be 'strict' or 'return', not %r" % (errors,))
    optional = [None if value in (None, "") else str(value).strip() for value in (gateway, pool_start, pool_end)]
    try:
        pool = make_pool(str(cidr).strip(), *optional)
    except AllocationError as exc:
        if errors == "return":
            return {"error": str(exc)}
        raise AnsibleFilterError("vm_network: %s" % exc) from exc
    network = pool.network
    return {
        "cidr": str(network),
        "network": str(network.network_address),
        "prefix": network.prefixlen,
        "netmask": str(network.netmask),
        "broadcast": str(network.broadcast_address),
        "gateway": str(pool.gateway),
        "pool_start": str(pool.first),
        "pool_end": str(pool.last),
        "pool_size": pool.size,
        "error": "",
    }


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {"vm_network": _vm_network}

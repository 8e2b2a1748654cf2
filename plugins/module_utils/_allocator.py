# -*- coding: utf-8 -*-
# Copyright: (c) 2026, microvm.firecracker contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The host's one address allocator: VM name -> IP, MAC, TAP name, persisted under a lock.

Everything that needs a VM's address (the TAP, the DHCP reservation or the static
network file, the readiness check) reads it from here, so they can never disagree.
The MAC and the TAP name are derived from the IP, so they are unique whenever the
IPs are, and the same after a restart.
"""
from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional

STATE_FILE = "allocations.json"
LOCK_FILE = "allocations.lock"
FORMAT_VERSION = 1
_VM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,63}$")


class AllocationError(Exception):
    """Invalid network settings, an exhausted pool, or a damaged state file; nothing was written."""


@dataclass(frozen=True)
class Pool:
    network: ipaddress.IPv4Network
    gateway: ipaddress.IPv4Address
    first: ipaddress.IPv4Address
    last: ipaddress.IPv4Address

    @property
    def size(self) -> int:
        return int(self.last) - int(self.first) + 1

    def addresses(self) -> Iterator[ipaddress.IPv4Address]:
        for value in range(int(self.first), int(self.last) + 1):
            yield ipaddress.IPv4Address(value)


def make_pool(cidr: str, gateway: Optional[str] = None, pool_start: Optional[str] = None,
              pool_end: Optional[str] = None) -> Pool:
    """Gateway, pool and prefix all derived from one CIDR; every problem named at once."""
    try:
        network = ipaddress.IPv4Network(cidr, strict=True)
    except ValueError as exc:
        raise AllocationError(f"cidr {cidr}: not an IPv4 network in CIDR form ({exc})") from None
    if network.prefixlen > 29:
        raise AllocationError(f"cidr {cidr}: too small for a gateway and guests (at most /29)")
    problems: list[str] = []

    def address(label: str, text: Optional[str], default: ipaddress.IPv4Address) -> ipaddress.IPv4Address:
        if text in (None, ""):
            return default
        try:
            value = ipaddress.IPv4Address(str(text))
        except ValueError:
            problems.append(f"{label} {text}: not an IPv4 address")
            return default
        if value not in network or value in (network.network_address, network.broadcast_address):
            problems.append(f"{label} {value} is not a usable host address of {network}")
        return value

    first_host = network.network_address + 1
    last_host = network.broadcast_address - 1
    gw = address("gateway", gateway, first_host)
    start = address("pool_start", pool_start, first_host + 1 if gw == first_host else first_host)
    end = address("pool_end", pool_end, last_host)
    if not problems:
        if start > end:
            problems.append(f"pool {start}-{end}: pool_start is after pool_end")
        elif start <= gw <= end:
            problems.append(f"pool {start}-{end} contains the gateway {gw}")
    if problems:
        raise AllocationError(f"cidr {network}: " + "; ".join(problems))
    return Pool(network=network, gateway=gw, first=start, last=end)


def mac_for(ip: ipaddress.IPv4Address) -> str:
    """A locally administered unicast MAC (06:00:...) carrying the IPv4 address."""
    return "06:00:" + ":".join(f"{octet:02x}" for octet in ip.packed)


def tap_for(ip: ipaddress.IPv4Address, prefix: str = "fc-") -> str:
    """A TAP name carrying the whole IPv4 address in hex (never truncated, so never shared)."""
    return f"{prefix}{int(ip):08x}"


def entry_for(name: str, ip: ipaddress.IPv4Address, pool: Pool, tap_prefix: str) -> dict[str, Any]:
    return {"name": name, "ip": str(ip), "prefix": pool.network.prefixlen, "gateway": str(pool.gateway),
            "netmask": str(pool.network.netmask), "mac": mac_for(ip), "tap": tap_for(ip, tap_prefix)}


class Allocator:
    """allocations.json in ``state_dir``, read and written only while holding allocations.lock."""

    def __init__(self, state_dir: str, pool: Pool, tap_prefix: str = "fc-") -> None:
        if len(tap_prefix.encode()) + 8 > 15:
            raise AllocationError(f"tap_prefix {tap_prefix!r}: with 8 hex digits the TAP name would exceed 15 bytes")
        if not re.fullmatch(r"[A-Za-z0-9_.-]*", tap_prefix):
            raise AllocationError(f"tap_prefix {tap_prefix!r}: only letters, digits, '_', '.', '-'")
        self.state_dir = state_dir
        self.pool = pool
        self.tap_prefix = tap_prefix
        self.path = os.path.join(state_dir, STATE_FILE)

    @contextmanager
    def locked(self, exclusive: bool) -> Iterator[None]:
        if not os.path.isdir(self.state_dir):
            if not exclusive:
                yield
                return
            os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        fd = os.open(os.path.join(self.state_dir, LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    def read(self) -> dict[str, dict[str, Any]]:
        try:
            with open(self.path, encoding="utf-8") as handle:
                data = json.load(handle)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise AllocationError(f"{self.path}: cannot read the allocations ({exc}); fix or restore it") from None
        if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION:
            raise AllocationError(f"{self.path}: not an allocations file of format {FORMAT_VERSION}")
        return data.get("allocations", {})

    def _write(self, allocations: dict[str, dict[str, Any]]) -> None:
        payload = json.dumps({"version": FORMAT_VERSION, "network": str(self.pool.network),
                              "allocations": dict(sorted(allocations.items()))}, indent=2) + "\n"
        temp = f"{self.path}.tmp-{os.getpid()}"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, self.path)

    def plan(self, allocations: dict[str, dict[str, Any]], names: list[str], state: str) -> tuple[dict, list[str]]:
        """The allocations after the request, and the names that change."""
        for name in names:
            if not _VM_NAME.match(name):
                raise AllocationError(f"VM name {name!r}: letters, digits and '-', at most 64 characters")
        if len(set(names)) != len(names):
            duplicates = sorted({n for n in names if names.count(n) > 1})
            raise AllocationError(f"VM names listed twice: {', '.join(duplicates)}")
        result = dict(allocations)
        changed = []
        if state == "absent":
            for name in names:
                if result.pop(name, None) is not None:
                    changed.append(name)
            return result, changed
        used = {entry["ip"] for entry in result.values()}
        used.add(str(self.pool.gateway))
        free = (ip for ip in self.pool.addresses() if str(ip) not in used)
        for name in names:
            current = result.get(name)
            if current is not None:
                ip = ipaddress.IPv4Address(current["ip"])
                if ip not in self.pool.network:
                    raise AllocationError(f"VM {name}: allocated {ip}, which is outside {self.pool.network}; "
                                          "release it (state=absent) before changing the network")
                wanted = entry_for(name, ip, self.pool, self.tap_prefix)
                if {k: current.get(k) for k in wanted} != wanted:
                    result[name] = {**current, **wanted}
                    changed.append(name)
                continue
            ip = next(free, None)
            if ip is None:
                raise AllocationError(f"pool {self.pool.first}-{self.pool.last} of {self.pool.network} is exhausted "
                                      f"({self.pool.size} addresses, {len(result)} allocated); cannot allocate {name}")
            result[name] = {**entry_for(name, ip, self.pool, self.tap_prefix),
                            "allocated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            changed.append(name)
        return result, changed

    def apply(self, names: list[str], state: str, check_mode: bool) -> tuple[dict, dict, list[str]]:
        """(allocations before, after, changed names), read and written under one lock."""
        with self.locked(exclusive=not check_mode):
            allocations = self.read()
            result, changed = self.plan(allocations, names, state)
            if changed and not check_mode:
                self._write(result)
        return allocations, result, changed

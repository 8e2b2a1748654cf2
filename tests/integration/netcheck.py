"""Read kernel state inside a test namespace directly (iproute2 and sysfs), independent of the modules."""
from __future__ import annotations

import json
import subprocess
from typing import Any, Optional


def _run(netns: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", netns, *argv], capture_output=True, text=True, check=False)


def links(netns: str) -> dict[str, dict[str, Any]]:
    """``ip -j -d link`` keyed by interface name."""
    out = _run(netns, "ip", "-j", "-d", "link", "show").stdout
    return {entry["ifname"]: entry for entry in json.loads(out or "[]")}


def link_names(netns: str) -> set[str]:
    return set(links(netns))


def tun_flags(netns: str, name: str) -> Optional[str]:
    """sysfs tun_flags; ``ip netns exec`` mounts the namespace's own /sys for the command."""
    proc = _run(netns, "cat", f"/sys/class/net/{name}/tun_flags")
    return proc.stdout.strip() if proc.returncode == 0 else None


def tun_info(netns: str, name: str) -> dict[str, Any]:
    return links(netns)[name]["linkinfo"]["info_data"]


def master(netns: str, name: str) -> Optional[str]:
    return links(netns)[name].get("master")


def addresses(netns: str, name: str) -> list[str]:
    out = _run(netns, "ip", "-j", "addr", "show", "dev", name).stdout
    entries = json.loads(out or "[]")
    return sorted(f"{a['local']}/{a['prefixlen']}" for e in entries for a in e.get("addr_info", [])
                  if a.get("scope") != "link")


def snapshot(netns: str) -> list[tuple[Any, ...]]:
    """Links (name, kind, tun data, master, mtu, admin flags, group) and addresses, for unchanged-host checks."""
    result = []
    for name, entry in sorted(links(netns).items()):
        info = entry.get("linkinfo", {})
        data = {key: value for key, value in (info.get("info_data") or {}).items() if not key.endswith("_timer")}
        result.append((name, info.get("info_kind"), json.dumps(data, sort_keys=True),
                       entry.get("master"), entry["mtu"], "UP" in entry["flags"], entry.get("group"),
                       tuple(addresses(netns, name))))
    return result

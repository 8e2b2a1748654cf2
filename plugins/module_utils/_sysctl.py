# -*- coding: utf-8 -*-
# Copyright: (c) 2026, microvm.firecracker contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Live network sysctls (``/proc/sys/net``) of the network namespace the process is in.

``/proc/sys/net`` shows the network namespace of the process that opens it, so after
entering a named namespace (``_netns.enter_netns``) these functions read and write
that namespace's values. Keys use sysctl(8)'s notation: dots separate the levels, and
a dot inside an interface name is written as ``/`` (``net.ipv4.conf.eth0/100.rp_filter``).
Importable without Ansible.
"""
from __future__ import annotations

import os
import re
from typing import Optional

PROC_SYS = "/proc/sys"
_KEY = re.compile(r"^net(\.[A-Za-z0-9_/:@+-]+)+$")


class SysctlError(Exception):
    """An invalid key or value, or a sysctl the kernel refused."""


def key_path(key: str) -> str:
    """``net.ipv4.conf.eth0/100.rp_filter`` -> ``/proc/sys/net/ipv4/conf/eth0.100/rp_filter``."""
    if not _KEY.match(key) or any(part in ("", ".", "..") for part in key.split(".")):
        raise SysctlError(f"sysctl {key!r}: not a network sysctl key (net.<...>, sysctl(8) notation)")
    return os.path.join(PROC_SYS, *(part.replace("/", ".") for part in key.split(".")))


def normalize(value: object) -> str:
    """Values compare as the kernel prints them: whitespace-separated fields joined by one tab."""
    if isinstance(value, bool):
        value = int(value)
    text = str(value).strip()
    if not text or "\n" in text:
        raise SysctlError(f"sysctl value {value!r}: must be one line, not empty")
    return "\t".join(text.split())


def read(key: str) -> Optional[str]:
    """The current value, or None when the key does not exist (e.g. an interface not created yet)."""
    path = key_path(key)
    try:
        with open(path, encoding="ascii", errors="replace") as handle:
            return "\t".join(handle.read().split())
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise SysctlError(f"sysctl {key}: cannot read {path}: {exc.strerror}") from None


def write(key: str, value: str) -> None:
    path = key_path(key)
    try:
        with open(path, "w", encoding="ascii") as handle:
            handle.write(value.replace("\t", " ") + "\n")
    except FileNotFoundError:
        raise SysctlError(f"sysctl {key}: no such sysctl ({path} does not exist)") from None
    except OSError as exc:
        raise SysctlError(f"sysctl {key}: cannot set {value!r}: {exc.strerror}") from None
    now = read(key)
    if now != value:
        raise SysctlError(f"sysctl {key}: set {value!r}, but the kernel reports {now!r}")

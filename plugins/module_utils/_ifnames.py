# -*- coding: utf-8 -*-
# Copyright: (c) 2026, microvm.firecracker contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Interface-name and identity validation shared by the networking modules."""
from __future__ import annotations

import grp
import pwd
import re
from typing import Optional, Union

IFNAMSIZ = 16  # including the terminating NUL: 15 usable bytes
_IFNAME = re.compile(r"^[A-Za-z0-9_.+-]+$")


def ifname_problem(name: object) -> Optional[str]:
    """Why ``name`` cannot be a Linux interface name, or None when it can."""
    if not isinstance(name, str) or not name:
        return "the name is empty"
    encoded = name.encode("utf-8", "surrogatepass")
    if len(encoded) >= IFNAMSIZ:
        return f"the name is {len(encoded)} bytes long; Linux allows at most {IFNAMSIZ - 1}"
    if name in (".", ".."):
        return "'.' and '..' are not valid interface names"
    if not _IFNAME.match(name):
        return "the name may only contain letters, digits, '_', '.', '+' and '-'"
    return None


def resolve_uid(value: Union[int, str]) -> int:
    """A user name or numeric uid → uid; KeyError with a message when unknown."""
    text = str(value).strip()
    if text.isdigit():
        return int(text)
    try:
        return pwd.getpwnam(text).pw_uid
    except KeyError:
        raise KeyError(f"unknown user {text!r}") from None


def resolve_gid(value: Union[int, str]) -> int:
    text = str(value).strip()
    if text.isdigit():
        return int(text)
    try:
        return grp.getgrnam(text).gr_gid
    except KeyError:
        raise KeyError(f"unknown group {text!r}") from None

# -*- coding: utf-8 -*-
# Copyright: (c) 2026, microvm.firecracker contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Named network namespaces (the ``ip netns`` convention: /run/netns/NAME).

The calling process enters the namespace once, so everything that follows
(ioctls on /dev/net/tun, netlink sockets) acts inside it without the
per-call helper process pyroute2 forks for ``IPRoute(netns=...)``.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import re

NETNS_RUN_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000
_NETNS_NAME = re.compile(r"^[A-Za-z0-9_.+-]{1,255}$")


class NetnsError(Exception):
    """A namespace is invalid, missing or cannot be entered."""


def netns_path(name: str) -> str:
    if not _NETNS_NAME.match(name) or name in (".", ".."):
        raise NetnsError(f"netns {name!r}: invalid name (letters, digits, '_', '.', '+', '-' only)")
    return os.path.join(NETNS_RUN_DIR, name)


def netns_exists(name: str) -> bool:
    return os.path.exists(netns_path(name))


def _setns(fd: int) -> None:
    if hasattr(os, "setns"):  # Python >= 3.12
        os.setns(fd, CLONE_NEWNET)
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def enter_netns(name: str) -> None:
    """Move the calling process (single-threaded) into the named network namespace."""
    path = netns_path(name)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NetnsError(f"netns {name}: no such network namespace ({path} does not exist)") from None
    except OSError as exc:
        raise NetnsError(f"netns {name}: cannot open {path}: {exc.strerror}") from None
    try:
        _setns(fd)
    except OSError as exc:
        raise NetnsError(f"netns {name}: cannot enter: {exc.strerror}") from None
    finally:
        os.close(fd)

# -*- coding: utf-8 -*-
# Copyright: (c) 2026, microvm.firecracker contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""TUN/TAP character-device ioctls (the kernel has no netlink call to create a TAP).

Opening /dev/net/tun and calling TUNSETIFF on an existing persistent TAP
*replaces* its feature flags (NO_PI, VNET_HDR, MULTI_QUEUE) with the
opener's; that is how flags and ownership are set on a TAP nobody holds.
"""
from __future__ import annotations

import errno
import os
import platform
import struct
from fcntl import ioctl

TUN_DEVICE = "/dev/net/tun"

IFF_TUN = 0x0001
IFF_TAP = 0x0002
IFF_MULTI_QUEUE = 0x0100
IFF_PERSIST = 0x0800
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000

# _IOW('T', 202..206, int); the direction bit differs on ppc/mips/sparc.
_IOW_BASE = 0x80000000 if platform.machine().startswith(("ppc", "mips", "sparc")) else 0x40000000
TUNSETIFF = _IOW_BASE | 0x000454CA
TUNSETPERSIST = _IOW_BASE | 0x000454CB
TUNSETOWNER = _IOW_BASE | 0x000454CC
TUNSETGROUP = _IOW_BASE | 0x000454CE


class TunTapError(Exception):
    """An ioctl on /dev/net/tun failed."""


def tap_flags(vnet_hdr: bool, multi_queue: bool) -> int:
    flags = IFF_TAP | IFF_NO_PI
    if vnet_hdr:
        flags |= IFF_VNET_HDR
    if multi_queue:
        flags |= IFF_MULTI_QUEUE
    return flags


def _ifreq(name: str, flags: int) -> bytes:
    return struct.pack("16sH22x", name.encode("ascii"), flags)


def ensure_persistent_tap(name: str, *, vnet_hdr: bool, multi_queue: bool,
                          owner: int | None, group: int | None) -> None:
    """Create the TAP, or re-open an existing unattached one, and persist its flags and owner.

    ``owner``/``group`` None leaves them as they are (the kernel cannot unset them).
    """
    try:
        fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise TunTapError(f"TAP {name}: cannot open {TUN_DEVICE}: {exc.strerror}") from None
    step = "attach (TUNSETIFF)"
    try:
        ioctl(fd, TUNSETIFF, _ifreq(name, tap_flags(vnet_hdr, multi_queue)))
        if owner is not None:
            step = f"set owner uid {owner} (TUNSETOWNER)"
            ioctl(fd, TUNSETOWNER, owner)
        if group is not None:
            step = f"set group gid {group} (TUNSETGROUP)"
            ioctl(fd, TUNSETGROUP, group)
        step = "make persistent (TUNSETPERSIST)"
        ioctl(fd, TUNSETPERSIST, 1)
    except OSError as exc:
        hint = ""
        if exc.errno == errno.EBUSY:
            hint = " (a process holds it open)"
        elif exc.errno == errno.EINVAL and step.startswith("attach"):
            hint = " (an existing device of this name has another type or multi_queue setting)"
        raise TunTapError(f"TAP {name}: cannot {step}: {exc.strerror}{hint}") from None
    finally:
        os.close(fd)

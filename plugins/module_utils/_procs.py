# -*- coding: utf-8 -*-
# Copyright: (c) 2026, microvm.firecracker contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Processes as /proc shows them: alive or not, start time, command line; and polling until a condition holds.

Private to the collection. A zombie (exited, not yet reaped) or dead process counts as gone. Every reader
takes the /proc root as an argument so that tests can point it at a fake tree. Importable without Ansible.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Optional

PROC_ROOT = "/proc"
# /proc/<pid>/stat states of a process that has exited.
GONE_STATES = ("Z", "X")


def _read(path: str) -> Optional[bytes]:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError:
        return None


def parse_stat(text: str) -> Optional[tuple[str, int]]:
    """(state letter, start time) from /proc/<pid>/stat; the command name may contain spaces and ')'."""
    fields = text.rsplit(")", 1)[-1].split()
    if len(fields) < 20:
        return None
    try:
        return fields[0], int(fields[19])
    except ValueError:
        return None


def _state(pid: Optional[int], proc_root: str) -> Optional[str]:
    """The state letter of a process, None when there is no such process."""
    if not pid or pid <= 0:
        return None
    raw = _read(f"{proc_root}/{pid}/stat")
    fields = raw.decode("ascii", "replace").rsplit(")", 1)[-1].split() if raw else []
    return fields[0] if fields else None


def pid_alive(pid: Optional[int], proc_root: str = PROC_ROOT) -> bool:
    """True for a live process; a zombie (exited, not yet reaped) counts as gone."""
    state = _state(pid, proc_root)
    return state is not None and state not in GONE_STATES


def start_time(pid: int, proc_root: str = PROC_ROOT) -> Optional[int]:
    """The process's start time (stat field 22, which tells a recycled pid apart), or None when it is gone
    or a zombie."""
    raw = _read(f"{proc_root}/{pid}/stat") if pid > 0 else None
    parsed = parse_stat(raw.decode("ascii", "replace")) if raw else None
    if parsed is None or parsed[0] in GONE_STATES:
        return None
    return parsed[1]


def argv_of(pid: int, proc_root: str = PROC_ROOT) -> tuple[str, ...]:
    """A process's command line as its arguments (empty for a kernel thread or a process that is gone)."""
    raw = _read(f"{proc_root}/{pid}/cmdline")
    if not raw:
        return ()
    return tuple(part.decode("utf-8", "replace") for part in raw.rstrip(b"\0").split(b"\0"))


def wait_until(condition: Callable[[], Any], timeout: float, interval: float = 0.05) -> Any:
    """Poll ``condition`` until it is truthy or ``timeout`` seconds passed; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)

# -*- coding: utf-8 -*-
# Copyright: (c) 2026, microvm.firecracker contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""nftables tables owned by one rule file, compared with what the kernel has loaded.

A rule file owns whole tables: for each one it declares the table, deletes it and
declares it again, so one ``nft -f FILE`` replaces exactly those tables in one
transaction and never touches another table.

Whether the kernel already has what the file describes is decided by listing: the
file is loaded into a throw-away network namespace (``unshare --net``, gone when the
command exits) and listed there with the same ``nft`` that lists the live tables,
so both sides are in nft's own canonical form. No state is recorded anywhere: a
table someone flushed, edited or deleted is found different and loaded again.
Importable without Ansible.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Optional

FAMILIES = ("ip", "ip6", "inet", "arp", "bridge", "netdev")
_TABLE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_MARKER = "### microvm.firecracker table "
_ABSENT = "### absent"


class NftError(Exception):
    """nft is missing, a table name is invalid, or nft refused a command."""


@dataclass(frozen=True)
class Table:
    family: str
    name: str

    def __str__(self) -> str:
        return f"{self.family} {self.name}"


def parse_table(text: str) -> Table:
    """``"inet microvm_fcbr0"`` -> Table; family and a plain identifier only."""
    parts = str(text).split()
    if len(parts) != 2 or parts[0] not in FAMILIES or not _TABLE_NAME.match(parts[1]):
        raise NftError(f"table {text!r}: expected '<family> <name>' with family one of {', '.join(FAMILIES)} "
                       "and a name of letters, digits and '_' (at most 64, not starting with a digit)")
    return Table(parts[0], parts[1])


def find_nft() -> Optional[str]:
    return shutil.which("nft") or next((p for p in ("/usr/sbin/nft", "/sbin/nft") if os.path.exists(p)), None)


def nft_binary() -> str:
    path = find_nft()
    if not path:
        raise NftError("nft not found (install the nftables package)")
    return path


def _run(argv: list[str], what: str) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise NftError(f"{what}: cannot run {argv[0]}: {exc.strerror}") from None
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip() or f"exit status {proc.returncode}"
        raise NftError(f"{what}: {detail}")
    return proc.stdout


def _split(output: str, tables: list[Table]) -> dict[Table, Optional[str]]:
    """The marker-separated listing printed by _LIST_SCRIPT, per table (None: absent)."""
    result: dict[Table, Optional[str]] = {}
    current: Optional[Table] = None
    lines: list[str] = []
    for line in output.splitlines() + [_MARKER + "end"]:
        if line.startswith(_MARKER):
            if current is not None:
                body = "\n".join(lines).strip("\n")
                result[current] = None if body == _ABSENT else body + "\n"
            name = line[len(_MARKER):]
            current = next((t for t in tables if str(t) == name), None)
            lines = []
        else:
            lines.append(line)
    for table in tables:
        result.setdefault(table, None)
    return result


# Lists each table given as "family name" argument pairs, or prints the absent marker.
_LIST_SCRIPT = (
    'nft="$1"; shift; '
    'while [ "$#" -ge 2 ]; do '
    f'echo "{_MARKER}$1 $2"; '
    f'"$nft" --stateless list table "$1" "$2" 2>/dev/null || echo "{_ABSENT}"; '
    'shift 2; done'
)


def live(tables: list[Table]) -> dict[Table, Optional[str]]:
    """What the kernel of the current network namespace has loaded, per table (None: no such table)."""
    nft = nft_binary()
    argv = ["/bin/sh", "-c", _LIST_SCRIPT, "nft-list", nft]
    for table in tables:
        argv += [table.family, table.name]
    return _split(_run(argv, "nft list"), tables)


def rendered(path: str, tables: list[Table]) -> dict[Table, Optional[str]]:
    """What ``nft -f path`` makes of the tables, listed in a throw-away network namespace."""
    nft = nft_binary()
    unshare = shutil.which("unshare") or "/usr/bin/unshare"
    script = '"$1" -f "$2" || exit 3; f="$1"; shift 2; set -- "$f" "$@"; ' + _LIST_SCRIPT
    argv = [unshare, "--net", "--", "/bin/sh", "-c", script, "nft-render", nft, path]
    for table in tables:
        argv += [table.family, table.name]
    return _split(_run(argv, f"{path}: load into a scratch network namespace (unshare --net) and list"), tables)


def differences(path: str, tables: list[Table]) -> tuple[dict[Table, Optional[str]], dict[Table, Optional[str]], list[str]]:
    """(wanted, live, names of the tables that differ)."""
    wanted = rendered(path, tables)
    current = live(tables)
    return wanted, current, [str(t) for t in tables if wanted[t] != current[t]]


def load(path: str) -> None:
    _run([nft_binary(), "-f", path], f"nft -f {path}")


def delete(tables: list[Table]) -> list[str]:
    """Delete the tables that exist; return their names."""
    current = live(tables)
    present = [t for t in tables if current[t] is not None]
    if present:
        script = "".join(f"delete table {t.family} {t.name}\n" for t in present)
        proc = subprocess.run([nft_binary(), "-f", "-"], input=script, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise NftError(f"delete table(s) {', '.join(map(str, present))}: {proc.stderr.strip()}")
    return [str(t) for t in present]

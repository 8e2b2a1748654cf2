# -*- coding: utf-8 -*-
# Copyright: (c) 2026, microvm.firecracker contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Sparse per-VM clones of a golden image, with the golden version they came from recorded beside them."""
from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Optional

from ansible_collections.microvm.firecracker.plugins.module_utils._ext4 import Ext4Error, ensure_not_in_use

RECORD_SUFFIX = ".source.json"
_VERSIONED = re.compile(r"^golden-.+-([0-9a-f]{16})\.ext4$")


class CloneError(Exception):
    pass


@dataclass
class Source:
    path: str
    version: Optional[str]


def resolve_source(src: str) -> Source:
    """The file a golden link points at now (clones never follow a later change of the link)."""
    try:
        real = os.path.realpath(src, strict=True)
    except OSError as exc:
        raise CloneError("source %s: cannot resolve: %s" % (src, exc.strerror or exc))
    if not os.path.isfile(real):
        raise CloneError("source %s: %s is not a regular file" % (src, real))
    match = _VERSIONED.match(os.path.basename(real))
    return Source(real, match.group(1) if match else None)


def read_record(dest: str) -> Optional[dict[str, Any]]:
    try:
        with open(dest + RECORD_SUFFIX, encoding="utf-8") as handle:
            record = json.load(handle)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise CloneError("%s: cannot read %s: %s" % (dest, dest + RECORD_SUFFIX, exc))
    return record if isinstance(record, dict) else None


def _write_record(dest: str, record: dict[str, Any]) -> None:
    directory = os.path.dirname(dest) or "."
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".clone-record-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(record, handle, indent=2, sort_keys=True)
            handle.write("\n")
        os.replace(tmp, dest + RECORD_SUFFIX)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _refuse_in_use(dest: str) -> None:
    try:
        ensure_not_in_use(dest, os.stat(dest))
    except Ext4Error as exc:
        raise CloneError("%s: %s" % (dest, exc))


def copy_sparse(source: str, dest: str) -> None:
    """Clone ``source`` to ``dest`` sharing extents where the filesystem can, sparse otherwise; atomic."""
    directory = os.path.dirname(dest) or "."
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".clone-", suffix=".ext4")
    os.close(fd)
    try:
        proc = subprocess.run(["cp", "--sparse=always", "--reflink=auto", source, tmp],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise CloneError("%s: cannot clone %s: %s" % (dest, source, proc.stderr.strip() or "cp failed"))
        os.chmod(tmp, 0o600)
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def plan(src: str, dest: str, state: str, refresh: bool, check_mode: bool = False) -> dict[str, Any]:
    """What a run would do: ``action`` is one of none, clone, reclone, remove.

    In check mode a missing directory is no error: an earlier task of the same run would create it."""
    exists = os.path.lexists(dest)
    if exists and not os.path.isfile(dest):
        raise CloneError("%s: exists and is not a regular file" % dest)
    record = read_record(dest) if exists else None
    if state == "absent":
        return {"action": "remove" if exists or os.path.exists(dest + RECORD_SUFFIX) else "none",
                "record": record, "source": None}
    source = resolve_source(src)
    if not check_mode and not os.path.isdir(os.path.dirname(os.path.abspath(dest))):
        raise CloneError("%s: directory %s does not exist" % (dest, os.path.dirname(os.path.abspath(dest))))
    if not exists:
        return {"action": "clone", "record": None, "source": source}
    outdated = record is None or record.get("source") != source.path
    if outdated and refresh:
        return {"action": "reclone", "record": record, "source": source}
    return {"action": "none", "record": record, "source": source, "outdated": outdated}


def apply(src: str, dest: str, state: str, refresh: bool, check_mode: bool) -> dict[str, Any]:
    steps = plan(src, dest, state, refresh, check_mode)
    action = steps["action"]
    if action in ("reclone", "remove") and os.path.exists(dest):
        _refuse_in_use(dest)
    if check_mode or action == "none":
        return steps
    if action == "remove":
        for path in (dest, dest + RECORD_SUFFIX):
            if os.path.lexists(path):
                os.unlink(path)
        return steps
    source: Source = steps["source"]
    started = time.monotonic()
    copy_sparse(source.path, dest)
    record = {"source": source.path, "version": source.version, "link": os.path.abspath(src),
              "cloned_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    _write_record(dest, record)
    steps["record"] = record
    steps["seconds"] = round(time.monotonic() - started, 3)
    return steps


def describe(dest: str) -> dict[str, Any]:
    try:
        info = os.stat(dest)
    except FileNotFoundError:
        return {"exists": False}
    return {"exists": True, "apparent_bytes": info.st_size, "allocated_bytes": info.st_blocks * 512}

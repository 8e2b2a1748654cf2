# -*- coding: utf-8 -*-
# Copyright: (c) 2026, microvm.firecracker contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Desired-state logic for rootfs_inject: validate, read the image, plan, apply, verify, report.

Planning is pure given an image reader (``stat``/content/listing of in-image
paths), so check mode and the real run share it and unit tests can feed it a
fake image. Applying turns the plan into one ``debugfs -w`` batch.

Atomic replacement. debugfs has no ``rename``; ``ln`` adds a directory entry
without touching the inode's link count and ``unlink`` removes one the same
way. A file (or symlink) is therefore written as ``.rootfs-inject-<hash>.tmp``
in the destination's own directory, given its mode and owner, then the old
destination is removed (``rm``), the temporary inode linked under the real
name (``ln``) and the temporary name dropped (``unlink``): the link count ends
at 1 with one entry. The temporary name is derived from the destination, so
every run looks for it and removes a leftover before doing anything else; and
a destination counts as done only when its full content (and mode, owner,
group, link target) matches, so a half-written file is never taken for done.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple

from ansible_collections.microvm.firecracker.plugins.module_utils import _ext4
from ansible_collections.microvm.firecracker.plugins.module_utils._ext4 import (
    KIND_DIRECTORY,
    KIND_REGULAR,
    KIND_SYMLINK,
    S_IFDIR,
    S_IFLNK,
    S_IFREG,
    Debugfs,
    Ext4Error,
    Inode,
    command,
    parse_ls,
    parse_stat,
)

# rootfs_inject's options (also what rootfs_prepare validates each VM's injection against).
_STATES = dict(type="str", choices=["present", "absent"], default="present")

ARGUMENT_SPEC = dict(
    image=dict(type="path", required=True),
    files=dict(type="list", elements="dict", default=[], options=dict(
        path=dict(type="str", required=True, aliases=["dest"]),
        content=dict(type="str", no_log=False),
        src=dict(type="path"),
        mode=dict(type="raw"),
        owner=dict(type="str"),
        group=dict(type="str"),
        state=_STATES,
        secret=dict(type="bool", default=False),
    ), mutually_exclusive=[("content", "src")]),
    directories=dict(type="list", elements="dict", default=[], options=dict(
        path=dict(type="str", required=True),
        mode=dict(type="raw"),
        owner=dict(type="str"),
        group=dict(type="str"),
        state=_STATES,
    )),
    symlinks=dict(type="list", elements="dict", default=[], options=dict(
        path=dict(type="str", required=True),
        target=dict(type="str"),
        state=_STATES,
    ), required_if=[("state", "present", ("target",))]),
    systemd_units=dict(type="list", elements="dict", default=[], options=dict(
        name=dict(type="str", required=True),
        content=dict(type="str"),
        src=dict(type="path"),
        enabled=dict(type="bool"),
        masked=dict(type="bool"),
        state=_STATES,
    ), mutually_exclusive=[("content", "src")]),
    environment=dict(type="dict", no_log=False),
    environment_strategy=dict(type="str", choices=["merge", "replace"], default="merge"),
    environment_secret=dict(type="bool", default=False),
    hostname=dict(type="str"),
    hosts_entry=dict(type="bool", default=True),
    reset_machine_id=dict(type="bool", default=False),
)

UNIT_DIR = "/etc/systemd/system"
UNIT_SEARCH_PATH = ("/etc/systemd/system", "/lib/systemd/system", "/usr/lib/systemd/system")
ENVIRONMENT_PATH = "/etc/environment"
HOSTNAME_PATH = "/etc/hostname"
HOSTS_PATH = "/etc/hosts"
MACHINE_ID_PATH = "/etc/machine-id"
PASSWD_PATH = "/etc/passwd"
GROUP_PATH = "/etc/group"
TMP_PREFIX = ".rootfs-inject-"
TMP_SUFFIX = ".tmp"
SECRET_BEFORE = "<secret content>\n"
SECRET_AFTER = "<secret content changed>\n"
MAX_DIFF_BYTES = 100 * 1024
MAX_PATH_BYTES = 4095
MAX_NAME_BYTES = 255
MAX_ID = 2**32 - 2

ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_ENV_BARE_RE = re.compile(r"^[A-Za-z0-9_@%+=:,./-]*$")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_UNIT_SUFFIXES = ("service", "socket", "device", "mount", "automount", "swap", "target", "path", "timer",
                  "slice", "scope")
_UNIT_NAME_RE = re.compile(r"^[A-Za-z0-9:_.\\-]+(?:@[A-Za-z0-9:_.\\-]*)?\.(%s)$" % "|".join(_UNIT_SUFFIXES))
_HOST_LABEL_RE = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_MODE_RE = re.compile(r"^(?:0o|0)?([0-7]{1,4})$")
_INSTALL_LINK_KEYS = (("WantedBy", ".wants"), ("RequiredBy", ".requires"), ("UpheldBy", ".upholds"))

DEFAULT_HOSTS = (
    "127.0.0.1\tlocalhost\n"
    "{entry}\n"
    "\n"
    "# The following lines are desirable for IPv6 capable hosts\n"
    "::1\tlocalhost ip6-localhost ip6-loopback\n"
    "ff02::1\tip6-allnodes\n"
    "ff02::2\tip6-allrouters\n"
)


class InjectError(Exception):
    """Invalid input or an image state that rootfs_inject refuses; nothing is written when planning raises it."""

    def __init__(self, path: Optional[str], cause: str) -> None:
        super().__init__(cause)
        self.path = path
        self.cause = cause

    def __str__(self) -> str:
        return "%s: %s" % (self.path, self.cause) if self.path else self.cause


# --------------------------------------------------------------------------
# Validation helpers (pure)


def check_guest_path(path: Any, what: str = "path") -> str:
    """An in-guest path must be absolute and already normalised: no //, /./, .., trailing / or NUL."""
    if not isinstance(path, str) or not path:
        raise InjectError(None, "%s must be a non-empty string, got %r" % (what, path))
    shown = path if not _CONTROL_RE.search(path) else repr(path)
    if "\x00" in path:
        raise InjectError(shown, "%s contains a NUL byte" % what)
    if _CONTROL_RE.search(path):
        raise InjectError(shown, "%s contains a control character (newline, tab, ...)" % what)
    if not path.startswith("/"):
        raise InjectError(shown, "%s must be absolute (start with /)" % what)
    if path == "/":
        raise InjectError(shown, "the root directory itself cannot be managed")
    if path.endswith("/"):
        raise InjectError(shown, "%s must not end with /" % what)
    if "//" in path:
        raise InjectError(shown, "%s must be normalised (contains //)" % what)
    parts = path.split("/")[1:]
    if "." in parts:
        raise InjectError(shown, "%s must be normalised (contains a . component)" % what)
    if ".." in parts:
        raise InjectError(shown, "%s must not contain .. components" % what)
    if len(path.encode("utf-8", "surrogateescape")) > MAX_PATH_BYTES:
        raise InjectError(shown[:80] + "...", "%s is longer than %d bytes" % (what, MAX_PATH_BYTES))
    for part in parts:
        if len(part.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
            raise InjectError(shown, "component %r is longer than %d bytes" % (part[:40] + "...", MAX_NAME_BYTES))
    return path


def check_link_target(target: Any, path: str) -> str:
    if not isinstance(target, str) or not target:
        raise InjectError(path, "a symlink needs a non-empty target")
    if _CONTROL_RE.search(target):
        raise InjectError(path, "symlink target %r contains a control character" % target)
    if len(target.encode("utf-8", "surrogateescape")) > MAX_PATH_BYTES:
        raise InjectError(path, "symlink target is longer than %d bytes" % MAX_PATH_BYTES)
    return target


def ancestors(path: str) -> List[str]:
    """``/a/b/c`` -> ``['/a', '/a/b']`` (the root directory is never listed)."""
    parts = path.split("/")[1:-1]
    return ["/" + "/".join(parts[:index]) for index in range(1, len(parts) + 1)]


def parent_of(path: str) -> str:
    head = path.rsplit("/", 1)[0]
    return head or "/"


def tmp_name(path: str) -> str:
    """The in-image temporary name used while replacing ``path`` (same directory, fixed length)."""
    base = path.rsplit("/", 1)[1]
    digest = hashlib.sha256(base.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    parent = parent_of(path)
    return ("" if parent == "/" else parent) + "/" + TMP_PREFIX + digest + TMP_SUFFIX


def parse_mode(value: Any, path: str) -> Optional[int]:
    """Octal string (``'0644'``, ``'644'``) or an int (YAML ``0644``); symbolic modes are refused."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise InjectError(path, "mode must be an octal string such as '0644', got %r" % value)
    if isinstance(value, int):
        mode = value
    elif isinstance(value, str):
        match = _MODE_RE.match(value.strip())
        if not match:
            raise InjectError(path, "mode %r is not an octal mode such as '0644' (symbolic modes are not supported)" % value)
        mode = int(match.group(1), 8)
    else:
        raise InjectError(path, "mode must be an octal string such as '0644', got %r" % (value,))
    if not 0 <= mode <= 0o7777:
        raise InjectError(path, "mode %r is out of range (0000..7777 octal)" % (value,))
    return mode


def check_unit_name(name: Any) -> str:
    if not isinstance(name, str) or not _UNIT_NAME_RE.match(name) or len(name) > MAX_NAME_BYTES:
        raise InjectError(None, "systemd unit name %r is not valid (expected e.g. agent.service, "
                                "with one of the suffixes %s)" % (name, ", ".join(_UNIT_SUFFIXES)))
    return name


def check_hostname(name: Any) -> str:
    if not isinstance(name, str) or not name or len(name) > 64:
        raise InjectError(HOSTNAME_PATH, "hostname %r must be 1..64 characters" % (name,))
    if not all(_HOST_LABEL_RE.match(label) for label in name.split(".")):
        raise InjectError(HOSTNAME_PATH, "hostname %r is not a valid host name (letters, digits and -, "
                                         "dot-separated labels, no leading or trailing -)" % name)
    return name


# --------------------------------------------------------------------------
# /etc/environment


def env_value(key: str, value: Any) -> Optional[str]:
    """Coerce one environment value; None means 'remove the key' (merge strategy)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise InjectError(ENVIRONMENT_PATH, "the value of %s is a boolean; quote it (e.g. 'true')" % key)
    if isinstance(value, (int, float)):
        value = str(value)
    if not isinstance(value, str):
        raise InjectError(ENVIRONMENT_PATH, "the value of %s must be a string" % key)
    return value


def check_environment(env: Any) -> Dict[str, Optional[str]]:
    """Validate keys and values without ever echoing a value (they may be secret)."""
    if not isinstance(env, dict):
        raise InjectError(ENVIRONMENT_PATH, "environment must be a dict")
    result: Dict[str, Optional[str]] = {}
    for key, raw in env.items():
        if not isinstance(key, str) or not ENV_KEY_RE.match(key):
            raise InjectError(ENVIRONMENT_PATH, "environment key %r is not a valid name ([A-Za-z_][A-Za-z0-9_]*)"
                              % (key,))
        value = env_value(key, raw)
        if value is not None:
            if "\n" in value or "\r" in value:
                raise InjectError(ENVIRONMENT_PATH, "the value of %s contains a newline" % key)
            if "\x00" in value:
                raise InjectError(ENVIRONMENT_PATH, "the value of %s contains a NUL byte" % key)
            if "#" in value:
                raise InjectError(ENVIRONMENT_PATH, "the value of %s contains '#', which pam_env reads as the start "
                                  "of a comment (percent-encode it in URLs: %%23)" % key)
            render_env_value(key, value)
        result[key] = value
    return result


def render_env_value(key: str, value: str) -> str:
    """Render so that pam_env and systemd's EnvironmentFile= both read back exactly ``value``.

    Plain values stay bare; others are single-quoted (literal for systemd,
    quotes stripped by pam_env); values holding a single quote are
    double-quoted when they need no escaping. Anything else cannot be written
    unambiguously and is refused.
    """
    if _ENV_BARE_RE.match(value):
        return value
    if "'" not in value:
        return "'" + value + "'"
    if not any(ch in value for ch in '"\\$`'):
        return '"' + value + '"'
    raise InjectError(ENVIRONMENT_PATH, "the value of %s holds both a single quote and one of \" \\ $ `; "
                      "it cannot be written to /etc/environment so that pam_env and systemd read the same value" % key)


def parse_env_line(line: str) -> Optional[Tuple[str, str]]:
    """``KEY=value`` (optionally ``export``-prefixed, quoted) -> (key, value); None for anything else."""
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    if text.startswith("export "):
        text = text[len("export "):].lstrip()
    if "=" not in text:
        return None
    key, raw = text.split("=", 1)
    if not ENV_KEY_RE.match(key):
        return None
    if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"":
        raw = raw[1:-1]
    return key, raw


def parse_environment(text: str) -> Dict[str, str]:
    values: Dict[str, str] = {}
    for line in text.splitlines():
        parsed = parse_env_line(line)
        if parsed:
            values[parsed[0]] = parsed[1]
    return values


def render_environment(desired: Dict[str, Optional[str]], strategy: str, existing: Optional[str]) -> str:
    """The new /etc/environment text.

    ``replace``: exactly the desired keys, in the order given. ``merge``: the
    existing file with desired keys updated in place (a line whose value is
    already right is kept as written), removed where the value is None,
    duplicates of managed keys dropped, new keys appended in order.
    """
    if strategy == "replace" or existing is None:
        lines = ["%s=%s" % (key, render_env_value(key, value)) for key, value in desired.items() if value is not None]
        return "".join(line + "\n" for line in lines)
    out: List[str] = []
    seen: Set[str] = set()
    for line in existing.splitlines():
        parsed = parse_env_line(line)
        if parsed is None or parsed[0] not in desired:
            out.append(line)
            continue
        key, value = parsed
        if key in seen:
            continue
        seen.add(key)
        wanted = desired[key]
        if wanted is None:
            continue
        out.append(line if value == wanted else "%s=%s" % (key, render_env_value(key, wanted)))
    for key, value in desired.items():
        if key not in seen and value is not None:
            out.append("%s=%s" % (key, render_env_value(key, value)))
    return "".join(line + "\n" for line in out)


# --------------------------------------------------------------------------
# /etc/hostname and /etc/hosts


def hosts_names(hostname: str) -> List[str]:
    names = [hostname]
    if "." in hostname:
        names.append(hostname.split(".", 1)[0])
    return names


def render_hosts(existing: Optional[str], hostname: str) -> str:
    """/etc/hosts with a ``127.0.1.1 <fqdn> [<short>]`` line (Debian's convention), other lines kept."""
    names = hosts_names(hostname)
    entry = "127.0.1.1\t" + " ".join(names)
    if existing is None:
        return DEFAULT_HOSTS.format(entry=entry)
    out: List[str] = []
    placed = False
    for line in existing.splitlines():
        fields = line.split("#", 1)[0].split()
        if fields and fields[0] == "127.0.1.1":
            if placed:
                continue
            placed = True
            out.append(line if fields[1:] == names else entry)
        else:
            out.append(line)
    if not placed:
        index = 0
        for position, line in enumerate(out):
            if line.split("#", 1)[0].split()[:1] == ["127.0.0.1"]:
                index = position + 1
        out.insert(index, entry)
    return "".join(line + "\n" for line in out)


# --------------------------------------------------------------------------
# /etc/passwd and /etc/group of the image


def parse_id_table(text: Optional[str]) -> Dict[str, int]:
    """name -> id from passwd/group format (third field)."""
    table: Dict[str, int] = {}
    if not text:
        return table
    for line in text.splitlines():
        fields = line.split(":")
        if len(fields) >= 3 and fields[0] and fields[2].isdigit() and fields[0] not in table:
            table[fields[0]] = int(fields[2])
    return table


def resolve_id(value: Optional[str], table: Dict[str, int], table_path: str, what: str, path: str) -> Optional[int]:
    if value is None:
        return None
    text = str(value).strip()
    if text.isdigit():
        number = int(text)
        if number > MAX_ID:
            raise InjectError(path, "%s id %s is out of range" % (what, text))
        return number
    if text in table:
        return table[text]
    raise InjectError(path, "%s %r is not defined in the image's %s" % (what, text, table_path))


def id_label(number: int, table: Dict[str, int]) -> str:
    for name, value in table.items():
        if value == number:
            return "%s (%d)" % (name, number)
    return str(number)


# --------------------------------------------------------------------------
# systemd [Install] sections


def parse_install_section(text: str) -> Dict[str, List[str]]:
    """WantedBy=/RequiredBy=/UpheldBy=/Alias=/Also=/DefaultInstance= of a unit file's [Install] section.

    Follows systemd's rules: list settings accumulate over lines and an empty
    assignment resets them; ``#``/``;`` start comments; a trailing backslash
    continues a line.
    """
    result: Dict[str, List[str]] = {key: [] for key in ("WantedBy", "RequiredBy", "UpheldBy", "Alias", "Also")}
    result["DefaultInstance"] = []
    section = None
    logical: List[str] = []
    pending = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if pending and stripped.startswith(("#", ";")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    if pending:
        logical.append(pending)
    for line in logical:
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1].strip()
            continue
        if section != "Install" or "=" not in line:
            continue
        key, value = (part.strip() for part in line.split("=", 1))
        if key == "DefaultInstance":
            result[key] = [value] if value else []
        elif key in result:
            if value:
                result[key].extend(value.split())
            else:
                result[key] = []
    return result


def install_links(name: str, unit_path: str, text: str) -> List[Tuple[str, str]]:
    """(link path, link target) pairs ``systemctl enable`` would create for this unit file."""
    install = parse_install_section(text)
    for key in ("WantedBy", "RequiredBy", "UpheldBy", "Alias", "DefaultInstance"):
        for value in install[key]:
            if "%" in value:
                raise InjectError(unit_path, "[Install] %s=%s uses a specifier (%%...), which rootfs_inject does "
                                  "not expand; write the unit name out" % (key, value))
    link_name = name
    stem, suffix = name.rsplit(".", 1)
    if stem.endswith("@"):
        instance = install["DefaultInstance"][-1] if install["DefaultInstance"] else None
        if instance is None:
            if any(install[key] for key, _suffix in _INSTALL_LINK_KEYS):
                raise InjectError(unit_path, "template unit %s has no DefaultInstance= in [Install]; "
                                  "it cannot be enabled without an instance" % name)
        else:
            link_name = "%s%s.%s" % (stem, instance, suffix)
            check_unit_name(link_name)
    links: List[Tuple[str, str]] = []
    for key, directory_suffix in _INSTALL_LINK_KEYS:
        for target_unit in install[key]:
            try:
                check_unit_name(target_unit)
            except InjectError:
                raise InjectError(unit_path, "[Install] %s=%s is not a valid unit name" % (key, target_unit))
            links.append(("%s/%s%s/%s" % (UNIT_DIR, target_unit, directory_suffix, link_name), unit_path))
    for alias in install["Alias"]:
        try:
            check_unit_name(alias)
        except InjectError:
            raise InjectError(unit_path, "[Install] Alias=%s is not a valid unit name" % alias)
        if alias.rsplit(".", 1)[1] != suffix:
            raise InjectError(unit_path, "[Install] Alias=%s must have the unit's own suffix .%s" % (alias, suffix))
        links.append(("%s/%s" % (UNIT_DIR, alias), unit_path))
    return list(dict.fromkeys(links))


def enable_links(name: str, unit_path: str, text: str) -> List[Tuple[str, str]]:
    """install_links for a unit to enable: refused when there is nothing to link."""
    links = install_links(name, unit_path, text)
    if not links:
        raise InjectError(unit_path, "unit %s has no WantedBy=, RequiredBy=, UpheldBy= or Alias= in its "
                          "[Install] section; it cannot be enabled" % name)
    return links


def check_unit_to_enable(name: str, content: str) -> None:
    """Raise InjectError when a unit (its name already checked) with this content could not be enabled
    (checked before any image is read)."""
    enable_links(name, "%s/%s" % (UNIT_DIR, name), content)


# --------------------------------------------------------------------------
# Content of a file to write


@dataclass
class Content:
    """Bytes given inline, or a host file (a private snapshot of ``src``)."""

    data: Optional[bytes] = None
    host_path: Optional[str] = None

    def size(self) -> int:
        if self.data is not None:
            return len(self.data)
        return os.path.getsize(self.host_path or "")

    def read(self, limit: Optional[int] = None) -> bytes:
        if self.data is not None:
            return self.data if limit is None else self.data[:limit]
        with open(self.host_path or "", "rb") as handle:
            return handle.read() if limit is None else handle.read(limit)

    def same_as(self, host_file: str) -> bool:
        if os.path.getsize(host_file) != self.size():
            return False
        if self.data is not None:
            with open(host_file, "rb") as handle:
                return handle.read() == self.data
        with open(self.host_path or "", "rb") as mine, open(host_file, "rb") as theirs:
            while True:
                left = mine.read(1 << 20)
                right = theirs.read(1 << 20)
                if left != right:
                    return False
                if not left:
                    return True


def snapshot_src(src: Any, dest: str, workdir: str, index: int) -> Content:
    """Copy a ``src`` file of the managed host into the private work directory (checked before any write)."""
    if not isinstance(src, str) or not src:
        raise InjectError(dest, "src must be a path on the managed host")
    try:
        info = os.stat(src)
    except FileNotFoundError:
        raise InjectError(dest, "src %s does not exist on the managed host" % src)
    except OSError as exc:
        raise InjectError(dest, "src %s cannot be read: %s" % (src, exc.strerror or exc))
    if not os.path.isfile(src):
        raise InjectError(dest, "src %s is not a regular file (mode %o)" % (src, info.st_mode))
    target = os.path.join(workdir, "src-%04d" % index)
    try:
        shutil.copyfile(src, target)
    except OSError as exc:
        raise InjectError(dest, "src %s cannot be read: %s" % (src, exc.strerror or exc))
    return Content(host_path=target)


# --------------------------------------------------------------------------
# Requests


@dataclass
class FileReq:
    path: str
    content: Content
    origin: str
    mode: Optional[int] = None
    owner: Optional[str] = None
    group: Optional[str] = None
    secret: bool = False
    default_mode: int = 0o644


@dataclass
class DirReq:
    path: str
    origin: str
    mode: Optional[int] = None
    owner: Optional[str] = None
    group: Optional[str] = None


@dataclass
class LinkReq:
    path: str
    target: str
    origin: str


@dataclass
class AbsentReq:
    path: str
    origin: str
    kinds: Tuple[str, ...]
    strict: bool = True  # a different kind at the path is an error (else it is left alone)
    targets: Optional[Tuple[str, ...]] = None  # symlinks only: remove only when pointing there


@dataclass
class UnitReq:
    name: str
    origin: str
    content: Optional[Content] = None
    enabled: Optional[bool] = None
    masked: Optional[bool] = None
    state: str = "present"

    @property
    def path(self) -> str:
        return "%s/%s" % (UNIT_DIR, self.name)


@dataclass
class Request:
    files: List[FileReq] = field(default_factory=list)
    dirs: List[DirReq] = field(default_factory=list)
    links: List[LinkReq] = field(default_factory=list)
    absent: List[AbsentReq] = field(default_factory=list)
    units: List[UnitReq] = field(default_factory=list)
    environment: Optional[Dict[str, Optional[str]]] = None
    environment_strategy: str = "merge"
    environment_secret: bool = False
    hostname: Optional[str] = None
    hosts_entry: bool = True
    reset_machine_id: bool = False


_ANY_NON_DIR = (KIND_REGULAR, KIND_SYMLINK, "FIFO", "socket", "character special", "block special", "bad type")


def build_request(params: Dict[str, Any], workdir: str) -> Request:
    """Validate module parameters into a Request; ``src`` files are snapshotted here (before any write)."""
    request = Request()
    sources = 0
    for index, item in enumerate(params.get("files") or []):
        origin = "files[%d]" % index
        path = check_guest_path(item.get("path"), "%s path" % origin)
        state = item.get("state") or "present"
        if state == "absent":
            if item.get("content") is not None or item.get("src") is not None:
                raise InjectError(path, "%s: content/src make no sense with state=absent" % origin)
            request.absent.append(AbsentReq(path, origin, _ANY_NON_DIR))
            continue
        if (item.get("content") is None) == (item.get("src") is None):
            raise InjectError(path, "%s: give exactly one of content or src" % origin)
        if item.get("content") is not None:
            content = Content(data=str(item["content"]).encode("utf-8"))
        else:
            sources += 1
            content = snapshot_src(item["src"], path, workdir, sources)
        request.files.append(FileReq(
            path=path, content=content, origin=origin, mode=parse_mode(item.get("mode"), path),
            owner=item.get("owner"), group=item.get("group"), secret=bool(item.get("secret")),
        ))
    for index, item in enumerate(params.get("directories") or []):
        origin = "directories[%d]" % index
        path = check_guest_path(item.get("path"), "%s path" % origin)
        if (item.get("state") or "present") == "absent":
            request.absent.append(AbsentReq(path, origin, (KIND_DIRECTORY,)))
        else:
            request.dirs.append(DirReq(path, origin, parse_mode(item.get("mode"), path), item.get("owner"),
                                       item.get("group")))
    for index, item in enumerate(params.get("symlinks") or []):
        origin = "symlinks[%d]" % index
        path = check_guest_path(item.get("path"), "%s path" % origin)
        if (item.get("state") or "present") == "absent":
            request.absent.append(AbsentReq(path, origin, (KIND_SYMLINK,)))
        else:
            request.links.append(LinkReq(path, check_link_target(item.get("target"), path), origin))
    for index, item in enumerate(params.get("systemd_units") or []):
        origin = "systemd_units[%d]" % index
        name = check_unit_name(item.get("name"))
        path = "%s/%s" % (UNIT_DIR, name)
        state = item.get("state") or "present"
        content = None
        if item.get("content") is not None and item.get("src") is not None:
            raise InjectError(path, "%s: give only one of content or src" % origin)
        if state == "absent":
            if item.get("content") is not None or item.get("src") is not None or item.get("enabled") or item.get("masked"):
                raise InjectError(path, "%s: content, src, enabled and masked make no sense with state=absent" % origin)
        elif item.get("content") is not None:
            content = Content(data=str(item["content"]).encode("utf-8"))
            if item.get("enabled") is True and not item.get("masked"):
                check_unit_to_enable(name, str(item["content"]))
        elif item.get("src") is not None:
            sources += 1
            content = snapshot_src(item["src"], path, workdir, sources)
        if item.get("masked"):
            if content is not None:
                raise InjectError(path, "%s: a masked unit cannot have content or src" % origin)
            if item.get("enabled"):
                raise InjectError(path, "%s: a unit cannot be both masked and enabled" % origin)
        if state == "present" and content is None and item.get("enabled") is None and item.get("masked") is None:
            raise InjectError(path, "%s: give content, src, enabled or masked (or state=absent)" % origin)
        request.units.append(UnitReq(name, origin, content, item.get("enabled"), item.get("masked"), state))
    if params.get("environment") is not None:
        request.environment = check_environment(params["environment"])
    request.environment_strategy = params.get("environment_strategy") or "merge"
    request.environment_secret = bool(params.get("environment_secret"))
    if params.get("hostname") is not None:
        request.hostname = check_hostname(params["hostname"])
    request.hosts_entry = params.get("hosts_entry") is not False
    request.reset_machine_id = bool(params.get("reset_machine_id"))
    return request


def secret_values(params: Dict[str, Any]) -> Set[str]:
    """Parameter values that must never be shown (added to the module's no_log values)."""
    values: Set[str] = set()
    for item in params.get("files") or []:
        if isinstance(item, dict) and item.get("secret") and isinstance(item.get("content"), str) and item["content"]:
            values.add(item["content"])
    env = params.get("environment")
    if params.get("environment_secret") and isinstance(env, dict):
        for value in env.values():
            if value is not None and not isinstance(value, bool) and str(value):
                values.add(str(value))
    return values


# --------------------------------------------------------------------------
# Reading the image


class ImageReader:
    """Cached, batched reads of one image through debugfs (stat, content via dump, ls)."""

    def __init__(self, debugfs: Debugfs, workdir: str) -> None:
        self.debugfs = debugfs
        self.workdir = workdir
        self.stats: Dict[str, Optional[Inode]] = {}
        self.files: Dict[str, Optional[str]] = {}
        self.targets: Dict[str, Optional[str]] = {}
        self.listings: Dict[str, Optional[List[str]]] = {}
        self._counter = 0

    def _host_path(self) -> str:
        self._counter += 1
        return os.path.join(self.workdir, "read-%05d" % self._counter)

    def prefetch(self, stats: Iterable[str] = (), contents: Iterable[str] = (), listings: Iterable[str] = ()) -> None:
        """Fetch what is not cached yet, in as few debugfs runs as possible (usually one).

        ``contents`` are dumped in the same run as their ``stat``, before
        their type is known: dumping a path that turns out not to be a
        regular file only writes a throw-away file into the private work
        directory (debugfs never writes to the host outside the path it is
        given), and its output is then ignored.
        """
        stats, contents, listings = list(stats), list(contents), list(listings)
        batch: List[Tuple[str, str, str, Optional[str]]] = []  # (kind, image path, command, host path)
        for path in dict.fromkeys(stats + contents + listings):
            if path not in self.stats:
                batch.append(("stat", path, command("stat", path), None))
        for path in dict.fromkeys(contents):
            if path in self.files or path in self.targets:
                continue
            if path in self.stats and not self._wants_dump(path):
                self.files[path] = None
                continue
            host = self._host_path()
            batch.append(("dump", path, command("dump", path, host), host))
        self._run(batch)
        second: List[Tuple[str, str, str, Optional[str]]] = []
        for path in dict.fromkeys(stats + contents):
            if self._is_slow_link(path) and path not in self.targets:
                host = self._host_path()
                second.append(("dump", path, command("dump", path, host), host))
        for path in dict.fromkeys(listings):
            if path in self.listings:
                continue
            inode = self.stats.get(path)
            if inode is None or inode.kind != KIND_DIRECTORY:
                self.listings[path] = []
            else:
                second.append(("ls", path, command("ls", "-p", path), None))
        self._run(second)

    def _wants_dump(self, path: str) -> bool:
        inode = self.stats.get(path)
        return inode is not None and (inode.kind == KIND_REGULAR or (inode.kind == KIND_SYMLINK and inode.target is None))

    def _run(self, batch: List[Tuple[str, str, str, Optional[str]]]) -> None:
        if not batch:
            return
        chunks = self.debugfs.run([item[2] for item in batch])
        for (kind, path, _cmd, _host), chunk in zip(batch, chunks):
            if kind == "stat":
                self.stats[path] = parse_stat(chunk, path)
        for (kind, path, _cmd, host), chunk in zip(batch, chunks):
            if kind == "ls":
                self.listings[path] = parse_ls(chunk)
            elif kind == "dump" and host is not None:
                self._take_dump(path, host, chunk)

    def _take_dump(self, path: str, host: str, chunk: bytes) -> None:
        inode = self.stats.get(path)
        if not self._wants_dump(path) or inode is None:
            self.files.setdefault(path, None)
            if os.path.lexists(host):
                os.unlink(host)
            return
        if chunk.strip() != b"":
            raise Ext4Error("debugfs dump %s failed: %s" % (path, chunk.decode("utf-8", "replace").strip()))
        if inode.kind == KIND_SYMLINK:
            with open(host, "rb") as handle:
                self.targets[path] = handle.read(inode.size).decode("utf-8", "surrogateescape")
            os.unlink(host)
        else:
            self.files[path] = host

    def _is_slow_link(self, path: str) -> bool:
        inode = self.stats.get(path)
        return inode is not None and inode.kind == KIND_SYMLINK and inode.target is None

    def stat(self, path: str) -> Optional[Inode]:
        if path not in self.stats:
            self.prefetch(stats=[path])
        return self.stats[path]

    def content_file(self, path: str) -> Optional[str]:
        if path not in self.files:
            self.prefetch(contents=[path])
        return self.files.get(path)

    def text(self, path: str) -> Optional[str]:
        host = self.content_file(path)
        if host is None:
            return None
        with open(host, "rb") as handle:
            return handle.read().decode("utf-8", "surrogateescape")

    def symlink_target(self, path: str) -> Optional[str]:
        inode = self.stat(path)
        if inode is None or inode.kind != KIND_SYMLINK:
            return None
        if inode.target is not None:
            return inode.target.decode("utf-8", "surrogateescape")
        if path not in self.targets:
            self.prefetch(stats=[path])
        return self.targets.get(path)

    def listing(self, path: str) -> Optional[List[str]]:
        if path not in self.listings:
            self.prefetch(listings=[path])
        return self.listings[path]


# --------------------------------------------------------------------------
# Plan


@dataclass
class Op:
    action: str  # remove_leftover, mkdir, attributes, write, symlink, remove, rmdir
    path: str
    kind: str = KIND_REGULAR
    mode: Optional[int] = None
    uid: Optional[int] = None
    gid: Optional[int] = None
    content: Optional[Content] = None
    target: Optional[str] = None
    replace: bool = False
    attrs: Tuple[str, ...] = ()


@dataclass
class Plan:
    ops: List[Op] = field(default_factory=list)
    changes: List[Dict[str, Any]] = field(default_factory=list)
    diffs: List[Dict[str, Any]] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.ops)


def _mode_text(mode: Optional[int]) -> Optional[str]:
    return None if mode is None else "%04o" % mode


def _content_text(data: bytes, size: int) -> str:
    if size > MAX_DIFF_BYTES:
        return "<%d bytes, too large to show>\n" % size
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "<binary content, %d bytes>\n" % size


class Planner:
    """Compares a Request with what an image holds and produces the operations, changes and diffs."""

    def __init__(self, request: Request, reader: Any) -> None:
        self.request = request
        self.reader = reader
        self.files: List[FileReq] = list(request.files)
        self.dirs: List[DirReq] = list(request.dirs)
        self.links: List[LinkReq] = list(request.links)
        self.absent: List[AbsentReq] = list(request.absent)
        self.users: Dict[str, int] = {}
        self.groups: Dict[str, int] = {}
        self.plan = Plan()

    # -- reading -----------------------------------------------------------

    def _fixed_files(self) -> List[str]:
        paths = []
        if self.request.environment is not None:
            paths.append(ENVIRONMENT_PATH)
        if self.request.hostname is not None:
            paths.append(HOSTNAME_PATH)
            if self.request.hosts_entry:
                paths.append(HOSTS_PATH)
        if self.request.reset_machine_id:
            paths.append(MACHINE_ID_PATH)
        return paths

    def _requested_paths(self) -> List[str]:
        paths = [req.path for req in self.files] + [req.path for req in self.dirs]
        paths += [req.path for req in self.links] + [req.path for req in self.absent]
        paths += [unit.path for unit in self.request.units] + self._fixed_files()
        return paths

    @staticmethod
    def _with_context(paths: Iterable[str], tmp: bool = True) -> List[str]:
        out: List[str] = []
        for path in paths:
            out += ancestors(path)
            out.append(path)
            if tmp:
                out.append(tmp_name(path))
        return list(dict.fromkeys(out))

    def check_parents(self, path: str) -> Optional[str]:
        """Refuse a symlinked or non-directory parent; return the first missing ancestor, if any."""
        for parent in ancestors(path):
            inode = self.reader.stat(parent)
            if inode is None:
                return parent
            if inode.kind == KIND_SYMLINK:
                target = self.reader.symlink_target(parent)
                raise InjectError(path, "parent %s is a symlink in the image (-> %s); refusing" % (parent, target))
            if inode.kind != KIND_DIRECTORY:
                raise InjectError(path, "parent %s is not a directory in the image (%s); refusing" % (parent, inode.kind))
        return None

    def _exists_safely(self, path: str) -> Optional[Inode]:
        """The inode at path when every parent is a real directory (None when a parent is missing)."""
        if self.check_parents(path) is not None:
            return None
        return self.reader.stat(path)

    # -- main --------------------------------------------------------------

    def _predicted_links(self) -> List[str]:
        """Enablement links known from the request alone, so the first read already covers them."""
        paths: List[str] = []
        for unit in self.request.units:
            if unit.content is not None and unit.enabled is not None:
                try:
                    text = unit.content.read().decode("utf-8", "surrogateescape")
                    paths += [link for link, _target in install_links(unit.name, unit.path, text)]
                except InjectError:
                    pass  # reported with its context when the unit is planned
        return paths

    def build(self) -> Plan:
        requested = self._requested_paths()
        lookups = ["%s/%s" % (base, unit.name) for unit in self.request.units if unit.content is None
                   for base in UNIT_SEARCH_PATH[1:]]
        contents = [PASSWD_PATH, GROUP_PATH] + lookups + [req.path for req in self.files]
        contents += [unit.path for unit in self.request.units] + self._fixed_files()
        self.reader.prefetch(stats=self._with_context(requested + self._predicted_links()), contents=contents)
        for path in requested:
            self.check_parents(path)
        self.users = parse_id_table(self.reader.text(PASSWD_PATH))
        self.groups = parse_id_table(self.reader.text(GROUP_PATH))

        self._derive_fixed_files()
        for unit in self.request.units:
            self._derive_unit(unit)
        self._check_conflicts()

        derived = [req.path for req in self.links] + [req.path for req in self.absent]
        self.reader.prefetch(stats=self._with_context(derived))
        for path in derived:
            self.check_parents(path)
        absent_dirs = [req.path for req in self.absent if req.kinds == (KIND_DIRECTORY,)]
        self.reader.prefetch(stats=[req.path for req in self.links],
                             listings=[p for p in absent_dirs if self._exists_safely(p) is not None])

        self._plan_leftovers()
        self._plan_directories()
        self._plan_files()
        self._plan_links()
        self._plan_removals()
        return self.plan

    # -- deriving files, links and removals from the higher-level options ----

    def _existing_text(self, path: str) -> Optional[str]:
        inode = self._exists_safely(path)
        if inode is None:
            return None
        if inode.kind == KIND_DIRECTORY:
            raise InjectError(path, "is a directory in the image; refusing to replace it with a file")
        return self.reader.text(path) if inode.kind == KIND_REGULAR else None

    def _derive_fixed_files(self) -> None:
        req = self.request
        if req.environment is not None:
            existing = self._existing_text(ENVIRONMENT_PATH)
            text = render_environment(req.environment, req.environment_strategy, existing)
            self.files.append(FileReq(ENVIRONMENT_PATH, Content(data=text.encode("utf-8")), "environment",
                                      secret=req.environment_secret))
        if req.hostname is not None:
            self.files.append(FileReq(HOSTNAME_PATH, Content(data=(req.hostname + "\n").encode("utf-8")), "hostname"))
            if req.hosts_entry:
                text = render_hosts(self._existing_text(HOSTS_PATH), req.hostname)
                self.files.append(FileReq(HOSTS_PATH, Content(data=text.encode("utf-8")), "hostname (hosts_entry)"))
        if req.reset_machine_id:
            self.files.append(FileReq(MACHINE_ID_PATH, Content(data=b""), "reset_machine_id", default_mode=0o444))

    def _derive_unit(self, unit: UnitReq) -> None:
        path = unit.path
        inode = self._exists_safely(path)
        if inode is not None and inode.kind == KIND_DIRECTORY:
            raise InjectError(path, "is a directory in the image; refusing")
        current_target = self.reader.symlink_target(path) if inode is not None and inode.kind == KIND_SYMLINK else None
        masked_now = current_target == "/dev/null"
        old_text = self.reader.text(path) if inode is not None and inode.kind == KIND_REGULAR else None
        old_links: List[Tuple[str, str]] = []
        if old_text is not None:
            try:
                old_links = install_links(unit.name, path, old_text)
            except InjectError:
                old_links = []  # an [Install] section we cannot read is not ours to clean up
        stale = [AbsentReq(link, unit.origin, (KIND_SYMLINK,), strict=False, targets=(path,)) for link, _target in old_links]

        if unit.state == "absent":
            if inode is not None:
                self.absent.append(AbsentReq(path, unit.origin, _ANY_NON_DIR))
                self.absent.extend(stale)
            return
        if unit.masked:
            self.links.append(LinkReq(path, "/dev/null", unit.origin))
            self.absent.extend(stale)
            return

        text: Optional[str] = None
        unit_path = path
        if unit.content is not None:
            self.files.append(FileReq(path, unit.content, unit.origin))
            text = unit.content.read().decode("utf-8", "surrogateescape")
        else:
            if masked_now:
                if unit.masked is False:
                    self.absent.append(AbsentReq(path, unit.origin, (KIND_SYMLINK,), strict=False, targets=("/dev/null",)))
                elif unit.enabled:
                    raise InjectError(path, "unit %s is masked in the image (-> /dev/null); set masked: false to "
                                      "unmask it" % unit.name)
            elif old_text is not None:
                text = old_text
            if text is None and unit.enabled is not None:
                for candidate in ["%s/%s" % (base, unit.name) for base in UNIT_SEARCH_PATH[1:]]:
                    found = self.reader.text(candidate)
                    if found is not None:
                        text, unit_path = found, candidate
                        break
                else:
                    raise InjectError(path, "unit %s is not in the image (%s); give content or src"
                                      % (unit.name, ", ".join(UNIT_SEARCH_PATH)))
        if unit.enabled is True:
            links = enable_links(unit.name, unit_path, text or "")
            for link, target in links:
                self.links.append(LinkReq(link, target, unit.origin))
            wanted = {link for link, _target in links}
            self.absent.extend(req for req in stale if req.path not in wanted)
        elif unit.enabled is False:
            links = install_links(unit.name, unit_path, text) if text is not None else []
            for link in dict.fromkeys([link for link, _target in links] + [link for link, _target in old_links]):
                self.absent.append(AbsentReq(link, unit.origin, (KIND_SYMLINK,), strict=False))

    def _check_conflicts(self) -> None:
        owners: Dict[str, str] = {}
        for req in [*self.files, *self.dirs, *self.links]:
            if req.path in owners:
                raise InjectError(req.path, "is managed twice (%s and %s)" % (owners[req.path], req.origin))
            owners[req.path] = req.origin
        kept: List[AbsentReq] = []
        removed: Dict[str, str] = {}
        for req in self.absent:
            if req.path in owners:
                if req.strict:
                    raise InjectError(req.path, "is both present (%s) and absent (%s)" % (owners[req.path], req.origin))
                continue
            if req.path in removed:
                continue
            removed[req.path] = req.origin
            kept.append(req)
        self.absent = kept
        directories = {req.path for req in self.dirs}
        for req in [*self.files, *self.dirs, *self.links]:
            for parent in ancestors(req.path):
                if parent in owners and parent not in directories:
                    raise InjectError(req.path, "its parent %s is managed as a file or symlink (%s)"
                                      % (parent, owners[parent]))
                if parent in removed:
                    raise InjectError(req.path, "its parent %s is to be removed (%s)" % (parent, removed[parent]))

    # -- planning ----------------------------------------------------------

    def _add(self, op: Op, action: str, kind: str, secret: bool = False,
             diff: Optional[Dict[str, Any]] = None) -> None:
        self.plan.ops.append(op)
        change: Dict[str, Any] = {"path": op.path, "kind": kind, "action": action}
        if secret:
            change["secret"] = True
        self.plan.changes.append(change)
        if diff is not None:
            self.plan.diffs.append(diff)

    def _attrs_view(self, mode: Optional[int], uid: Optional[int], gid: Optional[int], kind: str) -> Dict[str, Any]:
        view: Dict[str, Any] = {"state": kind}
        if mode is not None:
            view["mode"] = _mode_text(mode)
        if uid is not None:
            view["owner"] = id_label(uid, self.users)
        if gid is not None:
            view["group"] = id_label(gid, self.groups)
        return view

    def _managed_non_dirs(self) -> List[str]:
        return [req.path for req in self.files] + [req.path for req in self.links] + \
               [req.path for req in self.absent if req.kinds != (KIND_DIRECTORY,)]

    def _plan_leftovers(self) -> None:
        for path in dict.fromkeys(self._managed_non_dirs()):
            tmp = tmp_name(path)
            if self.check_parents(tmp) is not None:
                continue
            inode = self.reader.stat(tmp)
            if inode is None:
                continue
            if inode.kind == KIND_DIRECTORY:
                raise InjectError(path, "a directory %s is in the way of rootfs_inject's temporary name" % tmp)
            self._add(Op("remove_leftover", tmp), "remove_leftover", inode.kind,
                      diff={"before_header": tmp, "after_header": tmp,
                            "before": "<leftover of an interrupted rootfs_inject run>\n", "after": ""})

    def _plan_directories(self) -> None:
        declared = {req.path: req for req in self.dirs}
        wanted: Dict[str, DirReq] = {}
        present = [req.path for req in self.files] + [req.path for req in self.links] + list(declared)
        for path in present:
            missing = self.check_parents(path)
            if missing is not None:
                chain = ancestors(path)
                for parent in chain[chain.index(missing):]:
                    wanted.setdefault(parent, declared.get(parent) or DirReq(parent, "parent of %s" % path))
        for path, req in declared.items():
            wanted.setdefault(path, req)
        for path in sorted(wanted, key=lambda p: (p.count("/"), p)):
            req = wanted[path]
            inode = self._exists_safely(path)
            uid = resolve_id(req.owner, self.users, PASSWD_PATH, "owner", path)
            gid = resolve_id(req.group, self.groups, GROUP_PATH, "group", path)
            if inode is None:
                mode = 0o755 if req.mode is None else req.mode
                uid = 0 if uid is None else uid
                gid = 0 if gid is None else gid
                self._add(Op("mkdir", path, KIND_DIRECTORY, mode, uid, gid), "create", KIND_DIRECTORY,
                          diff={"before_header": path, "after_header": path, "before": {"state": "absent"},
                                "after": self._attrs_view(mode, uid, gid, KIND_DIRECTORY)})
                continue
            if inode.kind == KIND_SYMLINK:
                raise InjectError(path, "is a symlink in the image (-> %s); refusing to treat it as a directory"
                                  % self.reader.symlink_target(path))
            if inode.kind != KIND_DIRECTORY:
                raise InjectError(path, "exists in the image and is not a directory (%s); refusing" % inode.kind)
            self._plan_attributes(path, KIND_DIRECTORY, inode, req.mode, uid, gid, secret=False)

    def _plan_attributes(self, path: str, kind: str, inode: Inode, mode: Optional[int], uid: Optional[int],
                         gid: Optional[int], secret: bool) -> None:
        changed = []
        if mode is not None and mode != inode.mode:
            changed.append("mode")
        if uid is not None and uid != inode.uid:
            changed.append("owner")
        if gid is not None and gid != inode.gid:
            changed.append("group")
        if not changed:
            return
        new_mode = mode if mode is not None else inode.mode
        new_uid = uid if uid is not None else inode.uid
        new_gid = gid if gid is not None else inode.gid
        self._add(Op("attributes", path, kind, new_mode, new_uid, new_gid, attrs=tuple(changed)), "attributes", kind,
                  secret=secret,
                  diff={"before_header": path, "after_header": path,
                        "before": self._attrs_view(inode.mode, inode.uid, inode.gid, kind),
                        "after": self._attrs_view(new_mode, new_uid, new_gid, kind)})

    def _describe_existing(self, path: str, inode: Inode, show_content: bool, secret: bool = False) -> str:
        if inode.kind == KIND_SYMLINK:
            return "symlink -> %s\n" % self.reader.symlink_target(path)
        if inode.kind != KIND_REGULAR:
            return "<%s>\n" % inode.kind
        if secret:
            return SECRET_BEFORE
        if not show_content:
            return "<regular file, %d bytes>\n" % inode.size
        host = self.reader.content_file(path)
        if host is None:
            return ""
        with open(host, "rb") as handle:
            return _content_text(handle.read(MAX_DIFF_BYTES + 1), inode.size)

    def _plan_files(self) -> None:
        for req in sorted(self.files, key=lambda r: r.path):
            path = req.path
            missing_parent = self.check_parents(path)
            inode = None if missing_parent else self.reader.stat(path)
            if inode is not None and inode.kind == KIND_DIRECTORY:
                raise InjectError(path, "is a directory in the image; refusing to replace it with a file")
            uid = resolve_id(req.owner, self.users, PASSWD_PATH, "owner", path)
            gid = resolve_id(req.group, self.groups, GROUP_PATH, "group", path)
            mode = req.mode
            if mode is None and req.secret:
                mode = 0o600
            existing_regular = inode is not None and inode.kind == KIND_REGULAR
            if existing_regular:
                host = self.reader.content_file(path)
                if host is not None and req.content.same_as(host):
                    self._plan_attributes(path, KIND_REGULAR, inode, mode, uid, gid, req.secret)
                    continue
            final_mode = mode if mode is not None else (inode.mode if existing_regular else req.default_mode)
            final_uid = uid if uid is not None else (inode.uid if existing_regular else 0)
            final_gid = gid if gid is not None else (inode.gid if existing_regular else 0)
            action = "create" if inode is None else ("update" if existing_regular else "replace")
            if req.secret:
                after = SECRET_AFTER
            else:
                after = _content_text(req.content.read(MAX_DIFF_BYTES + 1), req.content.size())
            before = "" if inode is None else self._describe_existing(path, inode, True, req.secret)
            diff = {"before_header": path, "after_header": path, "before": before, "after": after}
            self._add(Op("write", path, KIND_REGULAR, final_mode, final_uid, final_gid, content=req.content,
                         replace=inode is not None), action, KIND_REGULAR, secret=req.secret, diff=diff)
            if inode is not None and existing_regular and (final_mode, final_uid, final_gid) != (inode.mode, inode.uid, inode.gid):
                self.plan.diffs.append({"before_header": path + " (attributes)", "after_header": path + " (attributes)",
                                        "before": self._attrs_view(inode.mode, inode.uid, inode.gid, KIND_REGULAR),
                                        "after": self._attrs_view(final_mode, final_uid, final_gid, KIND_REGULAR)})

    def _plan_links(self) -> None:
        for req in sorted(self.links, key=lambda r: r.path):
            path = req.path
            inode = self._exists_safely(path)
            if inode is not None and inode.kind == KIND_DIRECTORY:
                raise InjectError(path, "is a directory in the image; refusing to replace it with a symlink")
            if inode is not None and inode.kind == KIND_SYMLINK and self.reader.symlink_target(path) == req.target:
                continue
            action = "create" if inode is None else ("update" if inode.kind == KIND_SYMLINK else "replace")
            before = "" if inode is None else self._describe_existing(path, inode, show_content=False)
            self._add(Op("symlink", path, KIND_SYMLINK, target=req.target, replace=inode is not None), action,
                      KIND_SYMLINK, diff={"before_header": path, "after_header": path, "before": before,
                                          "after": "symlink -> %s\n" % req.target})

    def _plan_removals(self) -> None:
        removing: Set[str] = {op.path for op in self.plan.ops if op.action == "remove_leftover"}
        dirs: List[Tuple[AbsentReq, Inode]] = []
        for req in sorted(self.absent, key=lambda r: r.path):
            inode = self._exists_safely(req.path)
            if inode is None:
                continue
            if inode.kind not in req.kinds:
                if req.strict:
                    raise InjectError(req.path, "is a %s in the image, not a %s; refusing to remove it"
                                      % (inode.kind, " or ".join(sorted(set(req.kinds) & {KIND_REGULAR, KIND_SYMLINK, KIND_DIRECTORY}))))
                continue
            if req.targets is not None and self.reader.symlink_target(req.path) not in req.targets:
                continue
            if inode.kind == KIND_DIRECTORY:
                dirs.append((req, inode))
                continue
            removing.add(req.path)
            # Removed content is never shown: it may be a secret an earlier run wrote.
            before = self._describe_existing(req.path, inode, show_content=False)
            self._add(Op("remove", req.path, inode.kind), "remove", inode.kind,
                      diff={"before_header": req.path, "after_header": req.path, "before": before, "after": ""})
        for req, inode in sorted(dirs, key=lambda item: (-item[0].path.count("/"), item[0].path)):
            names = self.reader.listing(req.path)
            if names is None:
                raise InjectError(req.path, "directory holds entries that cannot be listed; refusing to remove it")
            left = [name for name in names if name not in (".", "..")
                    and "%s/%s" % (req.path, name) not in removing]
            if left:
                raise InjectError(req.path, "directory is not empty (%d entries, e.g. %r); remove them first"
                                  % (len(left), sorted(left)[0]))
            removing.add(req.path)
            self._add(Op("rmdir", req.path, KIND_DIRECTORY), "remove", KIND_DIRECTORY,
                      diff={"before_header": req.path, "after_header": req.path,
                            "before": self._attrs_view(inode.mode, inode.uid, inode.gid, KIND_DIRECTORY),
                            "after": {"state": "absent"}})


def plan(request: Request, reader: Any) -> Plan:
    return Planner(request, reader).build()


# --------------------------------------------------------------------------
# Applying


def compile_ops(ops: Sequence[Op], workdir: str) -> List[str]:
    """debugfs commands for a plan, in order; inline content is written to private host files first."""
    commands: List[str] = []
    for index, op in enumerate(ops):
        if op.action in ("remove_leftover", "remove"):
            commands.append(command("rm", op.path))
        elif op.action == "rmdir":
            commands.append(command("rmdir", op.path))
        elif op.action == "mkdir":
            commands.append(command("mkdir", op.path))
            commands += _set_attrs(op.path, S_IFDIR, op.mode, op.uid, op.gid)
        elif op.action == "attributes":
            type_bits = {KIND_DIRECTORY: S_IFDIR, KIND_SYMLINK: S_IFLNK}.get(op.kind, S_IFREG)
            commands += _set_attrs(op.path, type_bits, op.mode if "mode" in op.attrs else None,
                                   op.uid if "owner" in op.attrs else None, op.gid if "group" in op.attrs else None)
        elif op.action == "write":
            content = op.content
            if content is None:
                raise InjectError(op.path, "internal error: nothing to write")
            host = content.host_path
            if host is None:
                host = os.path.join(workdir, "write-%05d" % index)
                fd = os.open(host, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as handle:
                    handle.write(content.data or b"")
            tmp = tmp_name(op.path)
            commands.append(command("write", host, tmp))
            commands += _set_attrs(tmp, S_IFREG, op.mode, op.uid, op.gid)
            commands += _swap_in(tmp, op.path, op.replace)
        elif op.action == "symlink":
            tmp = tmp_name(op.path)
            commands.append(command("symlink", tmp, op.target or ""))
            commands += _swap_in(tmp, op.path, op.replace)
        else:
            raise InjectError(op.path, "internal error: unknown operation %s" % op.action)
    return commands


def _set_attrs(path: str, type_bits: int, mode: Optional[int], uid: Optional[int], gid: Optional[int]) -> List[str]:
    commands = []
    if mode is not None:
        commands.append(command("sif", path, "mode", "0%o" % (type_bits | mode)))
    if uid is not None:
        commands.append(command("sif", path, "uid", str(uid)))
    if gid is not None:
        commands.append(command("sif", path, "gid", str(gid)))
    return commands


def _swap_in(tmp: str, path: str, replace: bool) -> List[str]:
    commands = []
    if replace:
        commands.append(command("rm", path))
    commands.append(command("ln", tmp, path))
    commands.append(command("unlink", tmp))
    return commands


# --------------------------------------------------------------------------
# Orchestration


@dataclass
class Tools:
    debugfs: str = "debugfs"
    e2fsck: str = "e2fsck"


def find_tools(get_bin_path: Callable[..., str]) -> Tools:
    """debugfs and e2fsck on the managed host (``get_bin_path``: AnsibleModule's, which fails the task when one
    is missing)."""
    return Tools(debugfs=get_bin_path("debugfs", required=True, opt_dirs=["/usr/sbin", "/sbin"]),
                 e2fsck=get_bin_path("e2fsck", required=True, opt_dirs=["/usr/sbin", "/sbin"]))


class RunError(Exception):
    """A failed run, already worded for the user (names the image)."""


def verify(ops: Sequence[Op], debugfs: Debugfs, workdir: str) -> List[str]:
    """Read back every path a plan wrote or removed (one debugfs run); return what does not match."""
    expect: Dict[str, Optional[Op]] = {}
    for op in ops:
        expect[op.path] = None if op.action in ("remove", "rmdir", "remove_leftover") else op
    for op in ops:
        if op.action in ("write", "symlink"):
            expect.setdefault(tmp_name(op.path), None)
    reader = ImageReader(debugfs, workdir)
    reader.prefetch(stats=list(expect),
                    contents=[path for path, op in expect.items() if op is not None and op.action == "write"])
    problems: List[str] = []
    for path, op in expect.items():
        inode = reader.stat(path)
        if op is None:
            if inode is not None:
                problems.append("%s is still there" % path)
            continue
        kind = KIND_SYMLINK if op.action == "symlink" else op.kind
        if inode is None or inode.kind != kind:
            problems.append("%s is %s, expected a %s" % (path, inode.kind if inode else "missing", kind))
            continue
        if op.action == "symlink":
            if reader.symlink_target(path) != op.target:
                problems.append("%s points elsewhere" % path)
            continue
        fields = op.attrs if op.action == "attributes" else ("mode", "owner", "group")
        for name, want, got in (("mode", op.mode, inode.mode), ("owner", op.uid, inode.uid), ("group", op.gid, inode.gid)):
            if name in fields and want != got:
                problems.append("%s has %s %s, expected %s" % (path, name, got, want))
        if op.action == "write" and op.content is not None:
            host = reader.content_file(path)
            if host is None or not op.content.same_as(host):
                problems.append("%s has other content than written" % path)
    return problems


def run(params: Dict[str, Any], *, check_mode: bool, want_diff: bool, workdir: str, tools: Tools,
        warn: Callable[[str], None] = lambda msg: None) -> Dict[str, Any]:
    """Do (or, in check mode, predict) one rootfs_inject call; returns the module result.

    Order: validate the request and snapshot every ``src``; check the image
    (regular file, locked, not open by any process, not on a loop device,
    superblock clean); read and plan while ``e2fsck -fn`` runs alongside;
    if anything is to change, require e2fsck's clean result, then write
    (one ``debugfs -w`` batch), then read back and re-check with e2fsck.
    """
    image = params["image"]
    prefix = "rootfs_inject %s" % image

    def fail(cause: Any) -> RunError:
        return RunError("%s: %s" % (prefix, cause))

    def unclean(result: _ext4.FsckResult, when: str) -> RunError:
        return fail("%s e2fsck -fn found problems (exit %d)%s: %s" % (
            when, result.returncode, ", nothing was written" if when == "before writing," else "", result.describe()))

    try:
        info = _ext4.image_identity(image)
    except Ext4Error as exc:
        raise fail(exc)
    try:
        request = build_request(params, workdir)
    except InjectError as exc:
        raise fail(exc)
    if not check_mode and not os.access(image, os.W_OK):
        raise fail("the image is not writable by this user")

    fsck: Dict[str, Optional[str]] = {"before": None, "after": None}
    debugfs = Debugfs(image, tools.debugfs)
    background: Optional[_ext4.BackgroundFsck] = None
    try:
        with _ext4.ImageLock(image):
            for message in _ext4.ensure_not_in_use(image, info):
                warn("%s: %s" % (prefix, message))
            superblock = _ext4.read_superblock(image)
            if not superblock.magic_ok:
                result = _ext4.e2fsck(image, tools.e2fsck)
                raise fail("not an ext2/3/4 filesystem (bad superblock magic), nothing was written; e2fsck -fn: %s"
                           % result.describe())
            if superblock.needs_recovery:
                raise fail("the filesystem journal needs recovery (the image was not cleanly unmounted: is a VM "
                           "still running on it, or did one crash?); nothing was written; run e2fsck -fy on it first")
            if not superblock.clean or superblock.has_errors:
                result = _ext4.e2fsck(image, tools.e2fsck)
                raise fail("the filesystem is marked %s, nothing was written; run e2fsck -fy on it first; "
                           "e2fsck -fn: %s" % ("as having errors" if superblock.has_errors else "not clean",
                                               result.describe()))
            background = _ext4.BackgroundFsck(image, tools.e2fsck)
            read_dir = os.path.join(workdir, "read")
            os.mkdir(read_dir, 0o700)
            try:
                the_plan = plan(request, ImageReader(debugfs, read_dir))
            except Ext4Error as exc:
                result = background.result()
                if not result.ok:
                    raise unclean(result, "before writing,")
                raise fail(exc)
            if not the_plan.changed:
                background.cancel()
            else:
                before = background.result()
                if not before.ok:
                    raise unclean(before, "before writing,")
                fsck["before"] = before.summary
                if not check_mode:
                    write_dir = os.path.join(workdir, "write")
                    os.mkdir(write_dir, 0o700)
                    commands = compile_ops(the_plan.ops, write_dir)
                    try:
                        debugfs.apply(commands)
                    finally:
                        shutil.rmtree(write_dir, ignore_errors=True)
                    background = _ext4.BackgroundFsck(image, tools.e2fsck)
                    verify_dir = os.path.join(workdir, "verify")
                    os.mkdir(verify_dir, 0o700)
                    problems = verify(the_plan.ops, debugfs, verify_dir)
                    after = background.result()
                    fsck["after"] = after.summary
                    if not after.ok:
                        raise unclean(after, "after writing,")
                    if problems:
                        raise fail("after writing, the image does not hold what was written: %s" % "; ".join(problems))
    except (Ext4Error, InjectError) as exc:
        raise fail(exc)
    finally:
        if background is not None:
            background.cancel()
        for name in ("read", "write", "verify"):
            shutil.rmtree(os.path.join(workdir, name), ignore_errors=True)

    result: Dict[str, Any] = {
        "changed": the_plan.changed,
        "image": image,
        "changes": the_plan.changes,
        "fsck": fsck,
    }
    if want_diff:
        result["diff"] = the_plan.diffs
    return result

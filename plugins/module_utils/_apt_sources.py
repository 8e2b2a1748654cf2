# -*- coding: utf-8 -*-
# Copyright: (c) 2026, microvm.firecracker contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The host's apt sources: where apt on this machine downloads packages from.

A golden image is bootstrapped from the mirror the build host's apt already
uses (never a hard-coded one): ``/etc/apt/sources.list`` and
``/etc/apt/sources.list.d/*.list`` in the one-line format, and
``/etc/apt/sources.list.d/*.sources`` in the deb822 format, in the order apt
reads them. Only ``deb`` entries count (not ``deb-src``); deb822 stanzas with
``Enabled: no`` and files with other extensions (``*.disabled``, ...) are
ignored, as apt ignores them.
"""
from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

SOURCES_LIST = "/etc/apt/sources.list"
SOURCES_PARTS = "/etc/apt/sources.list.d"
URI_SCHEMES = ("http://", "https://", "ftp://", "file:")

_OPTIONS_RE = re.compile(r"^(deb(?:-src)?)\s+\[[^\]]*\]")
_SUITE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")


class SourcesError(Exception):
    """The host's apt sources do not name a usable mirror for the requested suite."""


@dataclass(frozen=True)
class Source:
    uri: str
    suite: str
    components: Tuple[str, ...]
    origin: str  # file it came from, for messages


def parse_one_line(text: str, origin: str = "sources.list") -> List[Source]:
    """``deb [options] URI SUITE [COMPONENT...]`` lines; ``deb-src`` and comments are skipped."""
    found: List[Source] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        # options: deb [arch=amd64 signed-by=...] URI ...
        fields = _OPTIONS_RE.sub(r"\1 ", line, count=1).split()
        if len(fields) < 3 or fields[0] != "deb":
            continue
        found.append(Source(uri=fields[1], suite=fields[2], components=tuple(fields[3:]), origin=origin))
    return found


def parse_deb822(text: str, origin: str = "sources") -> List[Source]:
    """deb822 stanzas (``Types:``, ``URIs:``, ``Suites:``, ``Components:``, ``Enabled:``)."""
    found: List[Source] = []
    for stanza in _stanzas(text):
        if stanza.get("enabled", "yes").strip().lower() in ("no", "false", "0"):
            continue
        if "deb" not in stanza.get("types", "").split():
            continue
        uris = stanza.get("uris", "").split()
        suites = stanza.get("suites", "").split()
        components = tuple(stanza.get("components", "").split())
        for uri in uris:
            for suite in suites:
                found.append(Source(uri=uri, suite=suite, components=components, origin=origin))
    return found


def _stanzas(text: str) -> List[dict]:
    stanzas: List[dict] = []
    current: dict = {}
    key: Optional[str] = None
    for raw in text.splitlines():
        if raw.startswith("#"):
            continue
        if not raw.strip():
            if current:
                stanzas.append(current)
            current, key = {}, None
            continue
        if raw[0] in " \t":
            if key is not None:
                current[key] += " " + raw.strip()
            continue
        name, sep, value = raw.partition(":")
        if not sep:
            continue
        key = name.strip().lower()
        current[key] = value.strip()
    if current:
        stanzas.append(current)
    return stanzas


def host_sources(sources_list: str = SOURCES_LIST, parts: str = SOURCES_PARTS) -> List[Source]:
    """Every ``deb`` source of the host, in apt's reading order."""
    found: List[Source] = []
    if os.path.isfile(sources_list):
        found += parse_one_line(_read(sources_list), sources_list)
    for path in sorted(glob.glob(os.path.join(glob.escape(parts), "*"))):
        if path.endswith(".list") and os.path.isfile(path):
            found += parse_one_line(_read(path), path)
        elif path.endswith(".sources") and os.path.isfile(path):
            found += parse_deb822(_read(path), path)
    return [source for source in found if source.uri.startswith(URI_SCHEMES)]


def _read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as handle:
        return handle.read()


def pick_mirror(sources: Sequence[Source], suite: str) -> str:
    """The first host source serving ``suite`` (exactly), as apt would use it."""
    for source in sources:
        if source.suite == suite:
            return source.uri
    listed = sorted({"%s %s" % (s.uri, s.suite) for s in sources})
    raise SourcesError("no apt source of this host serves the suite %r (host sources: %s); set the mirror explicitly"
                       % (suite, "; ".join(listed) or "none"))


def companion_suites(sources: Sequence[Source], suite: str) -> List[Tuple[str, str]]:
    """The host's ``<suite>-updates`` and ``<suite>-security`` sources as (uri, suite), first of each."""
    found: List[Tuple[str, str]] = []
    for wanted in (suite + "-updates", suite + "-security"):
        for source in sources:
            if source.suite == wanted:
                found.append((source.uri, wanted))
                break
    return found


def check_suite(suite: str) -> str:
    if not isinstance(suite, str) or not _SUITE_RE.match(suite):
        raise SourcesError("suite %r is not a valid suite name" % (suite,))
    return suite


def check_uri(uri: str) -> str:
    if not isinstance(uri, str) or not uri.startswith(URI_SCHEMES) or any(ch.isspace() for ch in uri):
        raise SourcesError("mirror %r is not an http(s)://, ftp:// or file: URI without spaces" % (uri,))
    return uri

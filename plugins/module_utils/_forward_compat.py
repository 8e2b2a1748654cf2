# -*- coding: utf-8 -*-
# Copyright: (c) 2026, microvm.firecracker contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""ACCEPT rules for a VM bridge in iptables' FORWARD path, for hosts where Docker or libvirt drop it.

Docker sets the iptables ``filter FORWARD`` policy to DROP (and libvirt setups often do);
with ``br_netfilter`` even bridged frames go through it. An accept in our own nftables
table does not override a drop in another table, so the VMs' traffic dies there. The fix
is two rules in iptables itself: in from the bridge, and established/related out to it,
in ``DOCKER-USER`` when that chain exists (Docker's documented place for user rules,
which it never flushes) or else at the top of ``FORWARD``. Every rule carries a comment
naming the bridge, which is how they are found again and removed.

The same two rules are in the role's boot script (templates/apply.sh.j2); keep them equal.
Importable without Ansible.
"""
from __future__ import annotations

import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Optional

DOCKER_USER = "DOCKER-USER"
FORWARD = "FORWARD"
MODES = ("auto", "always", "never")


class CompatError(Exception):
    """iptables is missing where it is required, or refused a command."""


def comment_for(bridge: str) -> str:
    return f"microvm.firecracker host_network {bridge}"


def wanted_rules(bridge: str, comment: str) -> list[list[str]]:
    """The rule specifications (without chain), in the order they end up at the top of the chain."""
    return [
        ["-i", bridge, "-m", "comment", "--comment", comment, "-j", "ACCEPT"],
        ["-o", bridge, "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED",
         "-m", "comment", "--comment", comment, "-j", "ACCEPT"],
    ]


@dataclass
class FilterState:
    """What ``iptables -S`` (table filter) shows."""
    available: bool
    forward_policy: Optional[str] = None
    chains: set[str] = field(default_factory=set)
    ours: list[tuple[str, list[str]]] = field(default_factory=list)  # (chain, rule spec) carrying our comment

    @property
    def docker_user(self) -> bool:
        return DOCKER_USER in self.chains

    @property
    def forward_drops(self) -> bool:
        return self.forward_policy in ("DROP", "REJECT")


def iptables_binary() -> Optional[str]:
    return shutil.which("iptables") or next(
        (p for p in ("/usr/sbin/iptables", "/sbin/iptables") if shutil.which(p)), None)


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise CompatError(f"cannot run {argv[0]}: {exc.strerror}") from None


def read_state(comment: str) -> FilterState:
    binary = iptables_binary()
    if binary is None:
        return FilterState(available=False)
    proc = _run([binary, "-w", "-t", "filter", "-S"])
    if proc.returncode != 0:
        raise CompatError(f"iptables -S (table filter): {(proc.stderr or proc.stdout).strip()}")
    state = FilterState(available=True)
    for line in proc.stdout.splitlines():
        words = shlex.split(line)
        if len(words) >= 3 and words[0] == "-P":
            state.chains.add(words[1])
            if words[1] == FORWARD:
                state.forward_policy = words[2]
        elif len(words) >= 2 and words[0] == "-N":
            state.chains.add(words[1])
        elif len(words) >= 2 and words[0] == "-A" and comment in words:
            state.ours.append((words[1], words[2:]))
    return state


@dataclass
class Plan:
    needed: bool
    reason: str
    chain: Optional[str]
    insert: list[list[str]] = field(default_factory=list)  # specs to insert at the top of chain
    remove: list[tuple[str, list[str]]] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.insert or self.remove)


def plan(state: FilterState, bridge: str, comment: str, mode: str, present: bool) -> Plan:
    if mode not in MODES:
        raise CompatError(f"mode {mode!r}: one of {', '.join(MODES)}")
    if not present or mode == "never":
        reason = "state absent" if not present else "forward_compat is never"
        return Plan(False, reason, None, remove=list(state.ours))
    if not state.available:
        if mode == "always":
            raise CompatError("forward_compat is always, but iptables is not installed")
        return Plan(False, "iptables is not installed", None)
    if state.docker_user:
        reason = "a DOCKER-USER chain exists (Docker)"
    elif state.forward_drops:
        reason = f"the iptables FORWARD policy is {state.forward_policy}"
    elif mode == "always":
        reason = "forward_compat is always"
    else:
        # Rules from an earlier run are kept: they are harmless, and the drop may come back (Docker restarts).
        return Plan(False, "the iptables FORWARD policy is ACCEPT and there is no DOCKER-USER chain", None)
    chain = DOCKER_USER if state.docker_user else FORWARD
    wanted = wanted_rules(bridge, comment)
    in_chain = [spec for c, spec in state.ours if c == chain]
    insert = [spec for spec in wanted if spec not in in_chain]
    remove = [(c, spec) for c, spec in state.ours
              if c != chain or spec not in wanted]
    return Plan(True, reason, chain, insert=insert, remove=remove)


def apply(p: Plan) -> None:
    binary = iptables_binary()
    if binary is None:
        raise CompatError("iptables is not installed")
    for chain, spec in p.remove:
        proc = _run([binary, "-w", "-t", "filter", "-D", chain, *spec])
        if proc.returncode != 0:
            raise CompatError(f"iptables: cannot delete rule from {chain} ({shlex.join(spec)}): {proc.stderr.strip()}")
    # Inserted bottom-up at position 1, so they end up in the order of wanted_rules.
    for spec in reversed(p.insert):
        proc = _run([binary, "-w", "-t", "filter", "-I", p.chain or FORWARD, "1", *spec])
        if proc.returncode != 0:
            raise CompatError(f"iptables: cannot insert into {p.chain} ({shlex.join(spec)}): {proc.stderr.strip()}")


def blocked(state: FilterState) -> bool:
    """Whether iptables would drop forwarded VM traffic without our rules."""
    return state.available and (state.docker_user or state.forward_drops)


def rule_lines(state: FilterState) -> list[str]:
    return [f"-A {chain} {shlex.join(spec)}" for chain, spec in state.ours]

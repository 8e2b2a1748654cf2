# -*- coding: utf-8 -*-
# Copyright: (c) 2026, microvm.firecracker contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""A dnsmasq instance dedicated to one VM bridge: its process, its reservations and its leases.

The process is found through the pid file its configuration names (``pid-file=``), and
is only taken to be ours when that pid is alive and its command line names our
configuration file, so a recycled pid is never signalled. The reservations are a
``dhcp-hostsfile`` (``MAC,IP,hostname`` per line), which dnsmasq re-reads on SIGHUP
without dropping leases; a lease whose MAC/IP pair is no longer reserved is given back
with ``dhcp_release`` (dnsmasq-utils) so that nothing outlives the VM it belonged to.
Importable without Ansible.
"""
from __future__ import annotations

import ipaddress
import os
import re
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

from ansible_collections.microvm.firecracker.plugins.module_utils._procs import (
    argv_of,
    pid_alive,
    wait_until,
)

HOSTSFILE_HEADER = ("# DHCP reservations (MAC,IP,hostname) of this VM bridge, written by microvm.firecracker;\n"
                    "# dnsmasq re-reads this file on SIGHUP. Changes made by hand are replaced on the next run.\n")
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")


class DnsmasqError(Exception):
    """Invalid reservations, a configuration without a pid file, or dnsmasq failing to start, stop or release."""


def config_value(config: str, key: str) -> Optional[str]:
    """The last ``key=value`` of a dnsmasq configuration file (None when unset or unreadable)."""
    value = None
    try:
        with open(config, encoding="utf-8") as handle:
            for line in handle:
                line = line.strip()
                if line.startswith(f"{key}="):
                    value = line.split("=", 1)[1].strip()
    except OSError:
        return None
    return value


def names_config(argv: Sequence[str], config: str) -> bool:
    """Whether a dnsmasq command line reads ``config`` (``-C FILE``, ``-CFILE``, ``--conf-file[=]FILE``)."""
    if not argv or os.path.basename(argv[0]) != "dnsmasq":
        return False
    for index, arg in enumerate(argv[1:], start=1):
        following = argv[index + 1] if index + 1 < len(argv) else None
        if arg in ("-C", "--conf-file") and following == config:
            return True
        if arg in (f"-C{config}", f"--conf-file={config}"):
            return True
    return False


def read_pid(pidfile: str) -> Optional[int]:
    try:
        with open(pidfile, encoding="ascii") as handle:
            return int(handle.read().strip())
    except (OSError, ValueError):
        return None


def running_pid(pidfile: str, config: Optional[str]) -> Optional[int]:
    """The pid in ``pidfile`` when it is a live dnsmasq reading ``config`` (any dnsmasq when config is None)."""
    pid = read_pid(pidfile)
    if not pid_alive(pid):
        return None
    argv = argv_of(pid or 0)
    if config is None:
        return pid if argv and os.path.basename(argv[0]) == "dnsmasq" else None
    return pid if names_config(argv, config) else None


def dnsmasq_binary(binary: str = "dnsmasq") -> str:
    path = shutil.which(binary) or (binary if os.path.isabs(binary) and os.access(binary, os.X_OK) else None)
    if not path:
        for candidate in ("/usr/sbin/dnsmasq", "/sbin/dnsmasq"):
            if binary == "dnsmasq" and os.access(candidate, os.X_OK):
                return candidate
        raise DnsmasqError(f"{binary} not found (install dnsmasq-base)")
    return path


def start(binary: str, config: str, pidfile: str, timeout: float) -> int:
    """Start a daemonizing dnsmasq on ``config`` and return the pid it wrote to ``pidfile``."""
    path = dnsmasq_binary(binary)
    # stderr goes to a file, not a pipe: the daemon keeps inherited descriptors until it detaches them.
    with tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace") as errors:
        try:
            proc = subprocess.Popen([path, "-C", config], stdin=subprocess.DEVNULL, stdout=errors, stderr=errors,
                                    close_fds=True, start_new_session=True)
        except OSError as exc:
            raise DnsmasqError(f"dnsmasq {config}: cannot run {path}: {exc.strerror}") from None
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise DnsmasqError(f"dnsmasq {config}: did not detach within {timeout:g}s") from None
        errors.seek(0)
        output = errors.read().strip()
    if rc != 0:
        raise DnsmasqError(f"dnsmasq {config}: failed to start (exit status {rc}): {output or 'no message'}")
    pid = wait_until(lambda: running_pid(pidfile, config), timeout)
    if not pid:
        raise DnsmasqError(f"dnsmasq {config}: started, but {pidfile} names no running dnsmasq after {timeout:g}s"
                           + (f" ({output})" if output else ""))
    return pid


def stop(pid: int, timeout: float) -> None:
    """SIGTERM, then SIGKILL when it is still alive after ``timeout`` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        if wait_until(lambda: not pid_alive(pid), timeout):
            return
    raise DnsmasqError(f"dnsmasq pid {pid}: still alive after SIGKILL")


def remove_file(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


# --- reservations ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reservation:
    name: str
    mac: str
    ip: str

    def line(self) -> str:
        return f"{self.mac},{self.ip},{self.name}"


def parse_reservations(entries: list[dict[str, Any]], network: ipaddress.IPv4Network,
                       gateway: Optional[ipaddress.IPv4Address]) -> list[Reservation]:
    """Validated reservations (other keys ignored), sorted by address; every problem named at once."""
    problems: list[str] = []
    result: list[Reservation] = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            problems.append(f"reservation {index}: a dict with name, mac and ip, not {entry!r}")
            continue
        name, mac, ip = (str(entry.get(key) or "").strip() for key in ("name", "mac", "ip"))
        label = f"reservation {name or index}"
        if not _HOSTNAME.match(name):
            problems.append(f"{label}: name {name!r} is not a host name (letters, digits, '-', at most 63)")
        mac = mac.lower().replace("-", ":")
        if not _MAC.match(mac):
            problems.append(f"{label}: mac {entry.get('mac')!r} is not a MAC address (six hex octets)")
        elif int(mac[:2], 16) & 1:
            problems.append(f"{label}: mac {mac} is a multicast address")
        try:
            address = ipaddress.IPv4Address(ip)
        except ValueError:
            problems.append(f"{label}: ip {ip!r} is not an IPv4 address")
        else:
            if address not in network or address in (network.network_address, network.broadcast_address):
                problems.append(f"{label}: ip {address} is not a host address of {network}")
            elif gateway is not None and address == gateway:
                problems.append(f"{label}: ip {address} is the gateway")
        result.append(Reservation(name, mac, ip))
    for what in ("name", "mac", "ip"):
        values = [getattr(r, what) for r in result]
        duplicates = sorted({v for v in values if values.count(v) > 1})
        if duplicates:
            problems.append(f"{what} reserved more than once: {', '.join(duplicates)}")
    if problems:
        raise DnsmasqError("DHCP reservations: " + "; ".join(problems))
    return sorted(result, key=lambda r: int(ipaddress.IPv4Address(r.ip)))


def hostsfile_content(reservations: list[Reservation]) -> str:
    return HOSTSFILE_HEADER + "".join(r.line() + "\n" for r in reservations)


def read_text(path: str) -> Optional[str]:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise DnsmasqError(f"{path}: cannot read: {exc.strerror}") from None


def write_atomic(path: str, content: str, mode: int = 0o644) -> None:
    directory = os.path.dirname(path) or "."
    fd, temp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp, mode)
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.unlink(temp)
        raise


# --- leases ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Lease:
    """One IPv4 lease of a dnsmasq lease file (MAC in lower case; ``*`` for an unknown hostname or client id)."""

    expiry: str
    mac: str
    ip: str
    hostname: str = "*"
    client_id: str = "*"
    line: str = field(default="", compare=False)  # the lease file line it was read from ("" when built by hand)

    def describe(self) -> str:
        return f"{self.ip} ({self.mac}{'' if self.hostname in ('', '*') else ', ' + self.hostname})"

    def release_argv(self, binary: str, interface: str) -> list[str]:
        """``dhcp_release IFACE IP MAC [CLIENT-ID]``: dnsmasq matches the client id when the lease has one."""
        argv = [binary, interface, self.ip, self.mac]
        if self.client_id not in ("", "*"):
            argv.append(self.client_id)
        return argv


def parse_leases(text: Optional[str]) -> list[Lease]:
    """IPv4 Ethernet leases of a dnsmasq lease file (``expiry mac ip hostname client-id``); DUID lines, IPv6
    leases and lines without a MAC address are skipped."""
    leases = []
    for line in (text or "").splitlines():
        fields = line.split()
        if len(fields) < 4 or fields[0] == "duid" or not _MAC.match(fields[1].lower()):
            continue
        try:
            ipaddress.IPv4Address(fields[2])
        except ValueError:
            continue
        leases.append(Lease(expiry=fields[0], mac=fields[1].lower(), ip=fields[2], hostname=fields[3],
                            client_id=fields[4] if len(fields) > 4 else "*", line=line))
    return leases


def still_leased(leases: Iterable[Lease], current: Iterable[Lease]) -> list[Lease]:
    """Those of ``leases`` whose MAC and address ``current`` (a fresh read of the lease file) still holds."""
    held = {(lease.mac.lower(), lease.ip) for lease in current}
    return [lease for lease in leases if (lease.mac.lower(), lease.ip) in held]


def stale_leases(leases: list[Lease], reservations: list[Reservation]) -> list[Lease]:
    reserved = {(r.mac, r.ip) for r in reservations}
    return [lease for lease in leases if (lease.mac, lease.ip) not in reserved]


# Where dnsmasq-utils puts it, and the sbin directories Ansible's get_bin_path also looks in.
DHCP_RELEASE_PATHS = ("/usr/bin/dhcp_release", "/usr/sbin/dhcp_release", "/usr/local/sbin/dhcp_release",
                      "/sbin/dhcp_release")


def find_dhcp_release() -> Optional[str]:
    """The path of dnsmasq-utils' ``dhcp_release`` (on PATH or in the usual places), None when not installed."""
    return shutil.which("dhcp_release") or next(
        (path for path in DHCP_RELEASE_PATHS if os.access(path, os.X_OK)), None)


def dhcp_release_binary() -> str:
    path = find_dhcp_release()
    if not path:
        raise DnsmasqError("dhcp_release not found (install dnsmasq-utils): needed to release leases")
    return path


def release(interface: str, leases: list[Lease], leasefile: str, timeout: float) -> None:
    """Ask the running dnsmasq to drop each lease (``dhcp_release``) and wait until its lease file agrees."""
    binary = dhcp_release_binary()
    for lease in leases:
        proc = subprocess.run(lease.release_argv(binary, interface), capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise DnsmasqError(f"lease {lease.describe()}: dhcp_release on {interface} failed: "
                               f"{(proc.stderr or proc.stdout).strip() or proc.returncode}")

    def left() -> list[Lease]:
        return still_leased(leases, parse_leases(read_text(leasefile)))

    if wait_until(lambda: not left(), timeout):
        return
    remaining = left()
    if remaining:
        raise DnsmasqError(f"{leasefile}: dnsmasq did not release {', '.join(l.describe() for l in remaining)} "
                           f"within {timeout:g}s of dhcp_release on {interface}")


def drop_from_leasefile(leasefile: str, leases: list[Lease]) -> None:
    """Remove lease lines while no dnsmasq runs (it would rewrite the file from memory otherwise)."""
    text = read_text(leasefile) or ""
    drop = {lease.line for lease in leases if lease.line}
    write_atomic(leasefile, "".join(line + "\n" for line in text.splitlines() if line not in drop))

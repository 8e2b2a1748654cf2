# -*- coding: utf-8 -*-
# Copyright: (c) 2026, microvm.firecracker contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""One microVM's lifecycle: its files, its supervised VMM process, readiness, stop, hibernation."""
from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tarfile
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from ansible_collections.microvm.firecracker.plugins.module_utils._fc_api import (
    FirecrackerAPI,
    FirecrackerAPIError,
    wait_for_socket,
)
from ansible_collections.microvm.firecracker.plugins.module_utils import _jail
from ansible_collections.microvm.firecracker.plugins.module_utils._fc_config import (
    MARKER,
    VMSpec,
    differences,
    marker_jail,
    read_marker,
)
from ansible_collections.microvm.firecracker.plugins.module_utils._procs import argv_of, pid_alive, wait_until

API_START_SECONDS = 10.0
TERM_SECONDS = 10.0
KILL_SECONDS = 5.0
CONSOLE_TAIL_LINES = 25
# What a guest prints when it is not going to come up: the task fails on sight instead of timing out.
CONSOLE_FAILURES = re.compile(
    r"Kernel panic - not syncing|end Kernel panic|\[FAILED\]|Failed to start |"
    r"You are in emergency mode|Give root password for maintenance|Unable to mount root fs"
)


# Terminal colour and cursor sequences systemd writes to the console.
ANSI_ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class VMError(Exception):
    """A lifecycle step failed; the message names the VM, the step and the cause (with console lines)."""


class Paths:
    """Where one VM's files live: inside its state dir, and the VMM's own files inside its jail when jailed."""

    def __init__(self, state_dir: str, name: str = "", jail: Optional[_jail.Jail] = None) -> None:
        self.state_dir = state_dir
        self.name = name
        self.jail = jail
        self.config = os.path.join(state_dir, "config.json")
        self.socket = os.path.join(state_dir, "api.sock")
        self.pidfile = os.path.join(state_dir, "firecracker.pid")
        self.launch = os.path.join(state_dir, "launch")
        self.metadata = os.path.join(state_dir, "mmds.json")
        self.marker = os.path.join(state_dir, MARKER)
        self.snapshot_dir = os.path.join(state_dir, "snapshot")
        self.hibernation = os.path.join(self.snapshot_dir, "hibernated.json")
        self.snapshot_state = os.path.join(self.snapshot_dir, "vm.state")
        self.snapshot_mem = os.path.join(self.snapshot_dir, "vm.mem")
        # Present while the running VMM was restored from a snapshot rather than booted.
        self.restored = os.path.join(state_dir, "restored-from-snapshot")
        if jail is not None:
            self.config = jail.host_path(_jail.JAIL_CONFIG)
            self.socket = jail.host_path(_jail.JAIL_SOCKET)
            self.metadata = jail.host_path(_jail.JAIL_METADATA)
            self.snapshot_dir = jail.host_path(_jail.JAIL_SNAPSHOT_DIR)
            self.snapshot_state = os.path.join(self.snapshot_dir, "vm.state")
            self.snapshot_mem = os.path.join(self.snapshot_dir, "vm.mem")
            # Outside the jail: the VMM may write its snapshot dir, not fc_vm's record of it.
            self.hibernation = os.path.join(state_dir, "hibernated.json")

    def vmm_path(self, host_path: str) -> str:
        """A path as the VMM sees it (inside its chroot when jailed)."""
        return self.jail.jail_path(host_path) if self.jail is not None else host_path

    def is_our_vmm(self, argv: Sequence[str]) -> bool:
        """Whether a process's argv is this VM's VMM (a recycled pid runs something else), jailed or not:
        a VM may be switching between the two."""
        if self.socket in " ".join(argv):
            return True
        # Every jailed VMM uses the same socket path inside its own jail; the jailer passes --id.
        return _jail.JAIL_SOCKET in argv and any(
            list(argv[index:index + 2]) == ["--id", self.name] for index in range(len(argv) - 1))


def supports_network_overrides(version: str) -> bool:
    """``network_overrides`` in ``PUT /snapshot/load`` exists from Firecracker 1.12 on."""
    match = re.match(r"v?(\d+)\.(\d+)", version or "")
    return bool(match) and (int(match.group(1)), int(match.group(2))) >= (1, 12)


def _write(path: str, content: str, mode: int = 0o600) -> bool:
    """Write atomically; True when the content changed."""
    try:
        with open(path, encoding="utf-8") as handle:
            if handle.read() == content:
                os.chmod(path, mode)
                return False
    except OSError:
        pass
    temp = f"{path}.tmp-{os.getpid()}"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(content)
    os.replace(temp, path)
    return True


def _shell_quote(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"


# How long a launch script waits for a TAP's bridge to appear (the host network's boot unit makes it).
BRIDGE_WAIT_TENTHS = 600


@dataclass
class TapRecipe:
    """A TAP as it was when the VM was launched: enough to recreate it after a host restart."""

    name: str
    vnet_hdr: bool
    multi_queue: bool
    owner: Optional[int]
    group: Optional[int]
    mtu: int
    bridge: Optional[str]
    link_group: int


def tap_recreate_lines(recipes: list[TapRecipe], netns_file: Optional[str]) -> list[str]:
    """Shell lines that recreate each missing TAP as recorded; nothing for a TAP that exists.

    TAPs are kernel objects: a host restart removes them while the VM's unit stays enabled. Without this
    the VMM would fail to open its TAP (or a real Firecracker would make a fresh one on no bridge).
    """
    if not recipes:
        return []
    ip = "ip" if not netns_file else f"nsenter --net={_shell_quote(netns_file)} -- ip"
    lines = [
        "# Recreate a TAP the host lost (a restart removes kernel objects) as it was when the VM was launched.",
        "wait_for_bridge() {",
        "\ttenths=0",
        f"\tuntil {ip} link show dev \"$1\" >/dev/null 2>&1; do",
        f"\t\tif [ \"$tenths\" -ge {BRIDGE_WAIT_TENTHS} ]; then",
        f"\t\t\techo \"fc_vm launch: bridge $1 of TAP $2 did not appear within {BRIDGE_WAIT_TENTHS // 10} s\" >&2",
        "\t\t\texit 1",
        "\t\tfi",
        "\t\tsleep 0.1",
        "\t\ttenths=$((tenths + 1))",
        "\tdone",
        "}",
    ]
    for recipe in recipes:
        tap = _shell_quote(recipe.name)
        flags = " vnet_hdr" if recipe.vnet_hdr else ""
        flags += " multi_queue" if recipe.multi_queue else ""
        flags += f" user {recipe.owner}" if recipe.owner is not None else ""
        flags += f" group {recipe.group}" if recipe.group is not None else ""
        settings = [f"mtu {recipe.mtu}"] if recipe.mtu else []
        settings += [f"group {recipe.link_group}"] if recipe.link_group else []
        settings += [f"master {_shell_quote(recipe.bridge)}"] if recipe.bridge else []
        lines.append(f"if ! {ip} link show dev {tap} >/dev/null 2>&1; then")
        if recipe.bridge:
            lines.append(f"\twait_for_bridge {_shell_quote(recipe.bridge)} {tap}")
        lines.append(f"\t{ip} tuntap add dev {tap} mode tap{flags}")
        lines.append(f"\t{ip} link set dev {tap} {' '.join(settings + ['up'])}")
        lines.append(f"\techo \"fc_vm launch: recreated TAP {recipe.name}\"")
        lines.append("fi")
    return lines


class ProcessSupervisor:
    """A daemonized VMM in its own session, found again through its pidfile (hosts without systemd)."""

    kind = "process"

    def __init__(self, name: str, paths: Paths) -> None:
        self.name = name
        self.paths = paths

    def pid(self) -> Optional[int]:
        try:
            with open(self.paths.pidfile, encoding="ascii") as handle:
                pid = int(handle.read().strip())
        except (OSError, ValueError):
            return None
        if pid_alive(pid) and self.paths.is_our_vmm(argv_of(pid)):
            return pid
        return None

    def start(self) -> int:
        proc = subprocess.Popen([self.paths.launch], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)
        _write(self.paths.pidfile, f"{proc.pid}\n")
        return proc.pid

    def terminate(self, pid: int, sig: int) -> None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    def cleanup(self) -> None:
        if os.path.exists(self.paths.pidfile):
            os.unlink(self.paths.pidfile)

    def set_autostart(self, enabled: bool) -> bool:
        return False


class SystemdSupervisor:
    """``firecracker@<name>.service`` (the firecracker role's template) with an instance drop-in."""

    kind = "systemd"

    def __init__(self, name: str, paths: Paths, systemd_dir: str = "/etc/systemd/system") -> None:
        self.name = name
        self.paths = paths
        self.unit = f"firecracker@{name}.service"
        self.dropin_dir = os.path.join(systemd_dir, f"{self.unit}.d")
        self.dropin = os.path.join(self.dropin_dir, "50-fc-vm.conf")

    def _systemctl(self, *args: str, check: bool = True) -> str:
        proc = subprocess.run(["systemctl", *args], capture_output=True, text=True, check=False)
        if check and proc.returncode != 0:
            raise VMError(f"VM {self.name}: systemctl {' '.join(args)} failed: {proc.stderr.strip() or proc.stdout.strip()}")
        return proc.stdout.strip()

    def pid(self) -> Optional[int]:
        value = self._systemctl("show", "--property=MainPID", "--value", self.unit, check=False)
        pid = int(value) if value.isdigit() else 0
        return pid if pid and pid_alive(pid) else None

    def start(self) -> int:
        content = f"# Written by microvm.firecracker.fc_vm for VM {self.name}.\n[Service]\nExecStart=\nExecStart={self.paths.launch}\n"
        os.makedirs(self.dropin_dir, mode=0o755, exist_ok=True)
        if _write(self.dropin, content, 0o644):
            self._systemctl("daemon-reload")
        self._systemctl("reset-failed", self.unit, check=False)
        self._systemctl("start", self.unit)
        pid = self.pid()
        if pid is None:
            raise VMError(f"VM {self.name}: {self.unit} started but has no main process")
        return pid

    def terminate(self, pid: int, sig: int) -> None:
        if sig == signal.SIGKILL:
            self._systemctl("kill", "--signal=SIGKILL", self.unit, check=False)
        else:
            self._systemctl("stop", "--no-block", self.unit, check=False)

    def cleanup(self) -> None:
        self._systemctl("reset-failed", self.unit, check=False)

    def set_autostart(self, enabled: bool) -> bool:
        current = self._systemctl("is-enabled", self.unit, check=False) == "enabled"
        if current != enabled:
            self._systemctl("enable" if enabled else "disable", self.unit)
            return True
        return False

    def remove(self) -> None:
        self.set_autostart(False)
        if os.path.exists(self.dropin):
            os.unlink(self.dropin)
            try:
                os.rmdir(self.dropin_dir)
            except OSError:
                pass
            self._systemctl("daemon-reload", check=False)


def choose_supervisor(kind: str, name: str, paths: Paths) -> Any:
    if kind == "auto":
        kind = "systemd" if os.path.isdir("/run/systemd/system") and shutil.which("systemctl") else "process"
    return SystemdSupervisor(name, paths) if kind == "systemd" else ProcessSupervisor(name, paths)


class ConsoleWatcher:
    """Reads what the guest prints after ``offset`` and spots the lines that mean it will not come up."""

    def __init__(self, path: str, offset: int) -> None:
        self.path = path
        self.offset = offset
        self.text = ""

    def scan(self) -> Optional[str]:
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self.offset)
                chunk = handle.read()
        except OSError:
            return None
        self.offset += len(chunk)
        self.text += ANSI_ESCAPES.sub("", chunk.decode("utf-8", "replace"))
        match = CONSOLE_FAILURES.search(self.text)
        if match:
            start = self.text.rfind("\n", 0, match.start()) + 1
            end = self.text.find("\n", match.end())
            return self.text[start:end if end >= 0 else None].strip()
        return None

    def tail(self, lines: int = CONSOLE_TAIL_LINES) -> str:
        self.scan()
        kept = [line.rstrip("\r") for line in self.text.splitlines() if line.strip()]
        return "\n".join(kept[-lines:])


def _probe(check: dict[str, Any]) -> bool:
    host, port = check["host"], int(check["port"])
    try:
        if not check.get("http_path"):
            with socket.create_connection((host, port), timeout=1.0):
                return True
        conn = http.client.HTTPConnection(host, port, timeout=2.0)
        try:
            conn.request("GET", check["http_path"])
            response = conn.getresponse()
            body = response.read().decode("utf-8", "replace")
        finally:
            conn.close()
    except (OSError, http.client.HTTPException):
        return False
    if response.status != int(check.get("http_status") or 200):
        return False
    return not check.get("contains") or check["contains"] in body


@dataclass
class Observed:
    state: str  # absent | stopped | hibernated | running | paused | not-started
    pid: Optional[int] = None
    config: Optional[dict[str, Any]] = None
    version: Optional[str] = None


@dataclass
class Outcome:
    changed: bool = False
    actions: list[str] = field(default_factory=list)
    differences: list[str] = field(default_factory=list)
    ready_seconds: Optional[float] = None
    api_seconds: Optional[float] = None


class MicroVM:
    """Operations on one VM; every public step is safe to repeat."""

    def __init__(self, spec: VMSpec, supervisor_kind: str, firecracker_bin: str,
                 netns_file: Optional[str] = None, tap_recipes: Optional[list[TapRecipe]] = None) -> None:
        self.spec = spec
        self.netns_file = netns_file
        self.tap_recipes = tap_recipes or []
        self.jail = spec.jail
        self.paths = Paths(spec.state_dir, spec.name, spec.jail)
        self.supervisor = choose_supervisor(supervisor_kind, spec.name, self.paths)
        self.firecracker_bin = firecracker_bin
        self.api = FirecrackerAPI(self.paths.socket)
        self.label = f"VM {spec.name}"

    # --- observation -------------------------------------------------------

    def observe(self) -> Observed:
        pid = self.supervisor.pid()
        if pid is not None:
            try:
                info = self.api.instance_info()
                config = self.api.vm_config()
                version = self.api.get("/version").get("firecracker_version")
            except FirecrackerAPIError:
                return Observed(state="not-started", pid=pid)
            state = {"Running": "running", "Paused": "paused"}.get(info.get("state"), "not-started")
            return Observed(state=state, pid=pid, config=config, version=version)
        if os.path.exists(self.paths.hibernation):
            return Observed(state="hibernated", config=self._stored_config())
        if os.path.exists(self.paths.marker):
            return Observed(state="stopped", config=self._stored_config())
        return Observed(state="absent")

    def _stored_config(self) -> Optional[dict[str, Any]]:
        try:
            with open(self.paths.config, encoding="utf-8") as handle:
                return json.load(handle)
        except (OSError, ValueError):
            return None

    def drift(self, observed: Observed, target: str) -> list[str]:
        """How the configuration that matters for ``target`` differs from the asked one."""
        if target == "stopped" or observed.state in ("stopped", "hibernated"):
            # What the next start would use.
            stored = self._stored_config()
            return differences(self.spec.config, stored) if stored is not None else []
        if observed.config is None:
            return []
        wanted = self.spec.config
        if os.path.exists(self.paths.restored):
            # A restored VMM reports no boot source: the kernel was never loaded by this process.
            wanted = {key: value for key, value in wanted.items() if key != "boot-source"}
        return differences(wanted, observed.config)

    # --- files -------------------------------------------------------------

    def write_files(self, restore: bool = False) -> bool:
        """State dir, config, metadata, launch script; True when any of them changed."""
        os.makedirs(self.spec.state_dir, mode=0o700, exist_ok=True)
        os.chmod(self.spec.state_dir, 0o700)
        marker: dict[str, Any] = {"name": self.spec.name}
        if self.jail is not None:
            marker["jail_dir"] = self.jail.jail_dir
            marker["cgroup_dirs"] = self.jail.cgroup_dirs()
        changed = _write(self.paths.marker, json.dumps(marker, sort_keys=True) + "\n")
        if self.jail is not None:
            changed |= _jail.prepare(self.jail)
        changed |= _write(self.paths.config, json.dumps(self.spec.config, indent=2, sort_keys=True) + "\n")
        vmm = self.paths.vmm_path
        args = ["--api-sock", vmm(self.paths.socket)]
        if not restore:
            args += ["--config-file", vmm(self.paths.config)]
        if self.spec.mmds_metadata is not None:
            changed |= _write(self.paths.metadata, json.dumps(self.spec.mmds_metadata, sort_keys=True) + "\n")
            if not restore:
                args += ["--metadata", vmm(self.paths.metadata)]
        elif os.path.exists(self.paths.metadata):
            os.unlink(self.paths.metadata)
            changed = True
        cleanup = [self.paths.socket]
        if self.jail is not None:
            for path in (self.paths.config, self.paths.metadata):
                if os.path.exists(path):
                    _jail.owned_for_vmm(self.jail, path, 0o640)
            # The jailer execs the VMM (same pid), joins the namespace itself and appends --id.
            args = self.jail.argv(self.netns_file, args)
            # What the jailer makes at each start (device nodes, its copy of the binary) must not exist yet.
            cleanup += [os.path.join(self.jail.root, made) for made in self.jail.made_by_jailer()]
        else:
            args = [self.firecracker_bin, *args, "--id", self.spec.name]
            if self.netns_file:
                # The systemd unit starts in the host's namespace; nsenter execs, so the pid stays the VMM's.
                args = ["nsenter", f"--net={self.netns_file}", "--", *args]
        console = _shell_quote(self.spec.console_log)
        taps = tap_recreate_lines(self.tap_recipes, self.netns_file)
        script = (
            "#!/bin/sh\n"
            f"# Written by microvm.firecracker.fc_vm for VM {self.spec.name}; do not edit.\n"
            + ("{\n" + "".join(f"{line}\n" for line in taps) + f"}} >>{console} 2>&1\n" if taps else "")
            + f"rm -rf {' '.join(_shell_quote(path) for path in cleanup)}\n"
            f"exec {' '.join(_shell_quote(arg) for arg in args)} >>{console} 2>&1\n"
        )
        changed |= _write(self.paths.launch, script, 0o700)
        for path in (self.spec.console_log, self.spec.log_path):
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            if not os.path.exists(path):
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        return changed

    def console_tail(self, offset: int = 0) -> str:
        return ConsoleWatcher(self.spec.console_log, offset).tail()

    def _console_size(self) -> int:
        try:
            return os.path.getsize(self.spec.console_log)
        except OSError:
            return 0

    # --- start / readiness ---------------------------------------------------

    def start(self, outcome: Outcome, wait_for: Optional[dict[str, Any]]) -> None:
        self.write_files()
        if os.path.exists(self.paths.restored):
            os.unlink(self.paths.restored)
        offset = self._console_size()
        started = time.monotonic()
        pid = self._launch()
        self._wait_api(pid, started, offset, outcome)
        info = self.api.instance_info()
        if info.get("state") != "Running":
            raise VMError(f"{self.label}: the VMM reports state {info.get('state')!r} after start, not Running")
        left = differences(self.spec.config, self.api.vm_config())
        if left:
            raise VMError(f"{self.label}: the running VMM does not report the requested configuration: "
                          + "; ".join(left))
        outcome.actions.append("started")
        outcome.changed = True
        self.wait_ready(wait_for, pid, offset, started, outcome)

    def _launch(self) -> int:
        try:
            return self.supervisor.start()
        except OSError as exc:
            raise VMError(f"{self.label}: cannot start the VMM ({self.paths.launch}): {exc.strerror}") from None

    def _wait_api(self, pid: int, started: float, offset: int, outcome: Outcome) -> None:
        try:
            wait_for_socket(self.api, started + API_START_SECONDS, lambda: pid_alive(pid))
        except FirecrackerAPIError as exc:
            raise VMError(f"{self.label}: {exc}; console/VMM output:\n{self.console_tail(offset)}") from None
        outcome.api_seconds = round(time.monotonic() - started, 3)

    def wait_ready(self, wait_for: Optional[dict[str, Any]], pid: Optional[int], offset: int,
                   started: float, outcome: Outcome) -> None:
        if not wait_for:
            return
        timeout = float(wait_for.get("timeout") or 120)
        deadline = time.monotonic() + timeout
        watcher = ConsoleWatcher(self.spec.console_log, offset)
        target = f"{wait_for['host']}:{wait_for['port']}{wait_for.get('http_path') or ''}"
        while True:
            failure = watcher.scan()
            if failure:
                raise VMError(f"{self.label}: the guest will not become ready ({target}): the console shows "
                              f"{failure!r}; last console lines:\n{watcher.tail()}")
            if pid is not None and not pid_alive(pid):
                raise VMError(f"{self.label}: the VMM exited before {target} answered; last console lines:\n"
                              f"{watcher.tail()}")
            if _probe(wait_for):
                outcome.ready_seconds = round(time.monotonic() - started, 3)
                return
            if time.monotonic() >= deadline:
                raise VMError(f"{self.label}: {target} did not answer within {timeout:g} s; last console "
                              f"lines:\n{watcher.tail()}")
            time.sleep(0.2)

    # --- stop --------------------------------------------------------------

    def stop(self, outcome: Outcome, graceful_seconds: float, graceful: bool = True) -> None:
        pid = self.supervisor.pid()
        if pid is None:
            self._forget_process()
            return
        steps = []
        if graceful and graceful_seconds > 0:
            steps.append(("SendCtrlAltDel", None, graceful_seconds))
        steps += [("SIGTERM", signal.SIGTERM, TERM_SECONDS), ("SIGKILL", signal.SIGKILL, KILL_SECONDS)]
        for step, sig, seconds in steps:
            if sig is None:
                try:
                    if self.api.instance_info().get("state") != "Running":
                        continue
                    self.api.send_ctrl_alt_del()
                except FirecrackerAPIError:
                    continue
            else:
                self.supervisor.terminate(pid, sig)
            if wait_until(lambda: not pid_alive(pid), seconds, interval=0.005):
                outcome.actions.append(f"stopped ({step})")
                outcome.changed = True
                self._forget_process()
                return
        raise VMError(f"{self.label}: the VMM (pid {pid}) survived SIGKILL")

    def _forget_process(self) -> None:
        if os.path.exists(self.paths.socket):
            os.unlink(self.paths.socket)
        self.supervisor.cleanup()

    # --- pause / hibernation -------------------------------------------------

    def set_paused(self, paused: bool, outcome: Outcome) -> None:
        try:
            (self.api.pause if paused else self.api.resume)()
        except FirecrackerAPIError as exc:
            raise VMError(f"{self.label}: cannot {'pause' if paused else 'resume'}: {exc}") from None
        outcome.actions.append("paused" if paused else "resumed")
        outcome.changed = True

    def hibernate(self, outcome: Outcome) -> None:
        os.makedirs(self.paths.snapshot_dir, mode=0o700, exist_ok=True)
        if self.jail is not None:
            os.chown(self.paths.snapshot_dir, self.jail.uid, self.jail.gid)
        if self.api.instance_info().get("state") == "Running":
            self.set_paused(True, outcome)
        try:
            self.api.snapshot_create(self.paths.vmm_path(self.paths.snapshot_state),
                                     self.paths.vmm_path(self.paths.snapshot_mem))
        except FirecrackerAPIError as exc:
            raise VMError(f"{self.label}: snapshot/create failed: {exc}") from None
        _write(self.paths.hibernation, json.dumps({"config": self.spec.config}, sort_keys=True) + "\n")
        self.stop(outcome, 0, graceful=False)
        outcome.actions.append("hibernated")

    def wake(self, outcome: Outcome, resume: bool, wait_for: Optional[dict[str, Any]]) -> None:
        self.write_files(restore=True)
        offset = self._console_size()
        started = time.monotonic()
        pid = self._launch()
        self._wait_api(pid, started, offset, outcome)
        overrides = None
        if supports_network_overrides(self.api.get("/version").get("firecracker_version", "")):
            overrides = [{"iface_id": i["iface_id"], "host_dev_name": i["host_dev_name"]}
                         for i in self.spec.config["network-interfaces"]]
        # Older VMMs re-open the TAPs recorded in the snapshot: the same names, which exist.
        try:
            self.api.snapshot_load(self.paths.vmm_path(self.paths.snapshot_state),
                                   self.paths.vmm_path(self.paths.snapshot_mem), resume, overrides)
        except FirecrackerAPIError as exc:
            self.stop(Outcome(), 0, graceful=False)
            raise VMError(f"{self.label}: snapshot/load failed: {exc}; console:\n{self.console_tail(offset)}") from None
        if self.spec.mmds_metadata is not None:
            # The metadata store is not part of the snapshot contract: give it back explicitly.
            self.api.put("/mmds", self.spec.mmds_metadata)
        shutil.rmtree(self.paths.snapshot_dir, ignore_errors=True)
        if os.path.exists(self.paths.hibernation):
            os.unlink(self.paths.hibernation)
        _write(self.paths.restored, "")
        # A later restart by the supervisor boots from the config again.
        self.write_files()
        outcome.actions.append("restored from snapshot")
        outcome.changed = True
        if resume:
            self.wait_ready(wait_for, pid, offset, started, outcome)

    # --- removal -----------------------------------------------------------

    def remove(self, outcome: Outcome, graceful_seconds: float, archive_to: Optional[str]) -> None:
        self.stop(outcome, graceful_seconds)
        if isinstance(self.supervisor, SystemdSupervisor):
            self.supervisor.remove()
        if not os.path.isdir(self.spec.state_dir):
            return
        if not os.path.exists(self.paths.marker):
            raise VMError(f"{self.label}: {self.spec.state_dir} has no {MARKER} marker; refusing to delete a "
                          "directory fc_vm did not create")
        if archive_to:
            self._archive(archive_to)
        jail_dir, cgroup_dirs = marker_jail(read_marker(self.spec.state_dir))
        try:
            # Where the VM was jailed is recorded at launch: removal needs no jailer option.
            _jail.remove_recorded(jail_dir, list(cgroup_dirs))
        except _jail.JailError as exc:
            raise VMError(f"{self.label}: {exc}") from None
        shutil.rmtree(self.spec.state_dir)
        for path in (self.spec.console_log, self.spec.log_path):
            if os.path.exists(path) and not path.startswith(self.spec.state_dir + os.sep):
                os.unlink(path)
        outcome.actions.append("removed")
        outcome.changed = True

    def _archive(self, directory: str) -> None:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = os.path.join(directory, f"{self.spec.name}-{stamp}.tar.gz")
        with tarfile.open(target, "w:gz") as archive:
            for path in (self.spec.console_log, self.spec.log_path, self.paths.config):
                if os.path.exists(path):
                    archive.add(path, arcname=os.path.basename(path))
        os.chmod(target, 0o600)


def plan_steps(observed: Observed, target: str, drift: list[str], on_change: str,
               metadata_differs: bool) -> list[str]:
    """The steps that take the VM from ``observed`` to ``target`` (empty: nothing to do).

    ``drift`` only leads to a restart with ``on_change == "restart"``; "fail" is handled by the caller.
    """
    state = observed.state
    if target == "absent":
        return ["remove"] if state != "absent" else []
    restart = bool(drift) and on_change == "restart"
    steps: list[str] = []
    if target == "stopped":
        if state in ("running", "paused", "not-started"):
            steps.append("stop")
        if state == "hibernated":
            steps.append("discard-snapshot")
        if state == "absent" or drift:
            steps.append("write")
        return steps
    if state == "hibernated" and target == "hibernated" and not restart:
        return []
    if state in ("absent", "stopped"):
        steps.append("start")
    elif state == "hibernated":
        steps += ["discard-snapshot", "start"] if restart else ["wake"]
    elif state == "not-started" or restart:
        steps += ["stop", "start"]
    elif metadata_differs:
        steps.append("update-metadata")
    if "start" in steps:
        now = "running"
    elif "wake" in steps:
        now = "running" if target == "running" else "paused"
    else:
        now = state
    if target == "hibernated":
        steps.append("hibernate")
    elif target == "paused" and now == "running":
        steps.append("pause")
    elif target == "running" and now == "paused":
        steps.append("resume")
    return steps


def converge(vm: MicroVM, target: str, steps: list[str], wait_for: Optional[dict[str, Any]],
             graceful_seconds: float, archive_to: Optional[str]) -> Outcome:
    """Carry out ``plan_steps``; then, for a running target, prove readiness."""
    outcome = Outcome()
    for step in steps:
        if step == "start":
            vm.start(outcome, wait_for if target == "running" else None)
        elif step == "stop":
            vm.stop(outcome, graceful_seconds)
        elif step == "write":
            vm.write_files()
            outcome.changed = True
            outcome.actions.append("configuration written")
        elif step == "wake":
            vm.wake(outcome, resume=target == "running", wait_for=wait_for)
        elif step == "discard-snapshot":
            shutil.rmtree(vm.paths.snapshot_dir, ignore_errors=True)
            if os.path.exists(vm.paths.hibernation):
                os.unlink(vm.paths.hibernation)
            outcome.changed = True
            outcome.actions.append("snapshot discarded")
        elif step == "update-metadata":
            vm.write_files()
            vm.api.put("/mmds", vm.spec.mmds_metadata)
            outcome.changed = True
            outcome.actions.append("MMDS metadata updated")
        elif step == "pause":
            vm.set_paused(True, outcome)
        elif step == "resume":
            vm.set_paused(False, outcome)
        elif step == "hibernate":
            vm.hibernate(outcome)
        elif step == "remove":
            vm.remove(outcome, graceful_seconds, archive_to)
    if target == "running" and wait_for and outcome.ready_seconds is None:
        # Already running (or just resumed): the service must still answer, without a restart.
        vm.wait_ready(wait_for, vm.supervisor.pid(), vm._console_size(), time.monotonic(), outcome)
    return outcome

"""fc_vm launch overhead: module start to InstanceStart (Running) and teardown, 1 and 4 VMs, vs the VMM alone.

Baseline, in the same run: the Firecracker API stand-in (standin/fc-standin) started directly with
``--api-sock S --config-file C --id ID`` (C rendered by the module's own ``build_spec``), timed from
Popen until ``GET /`` says ``Running``; teardown is SIGTERM until the process has exited (pidfd).
Module: plugins/modules/fc_vm.py run as its own process (as Ansible runs it on the host) with
``supervisor: process`` and the stand-in as ``firecracker_bin``, timed from start to exit (it returns
once the VMM says Running and ``GET /vm/config`` matches); teardown is ``state: absent`` with
``stop_timeout: 0`` (the SIGTERM path), timed the same way. 4 VMs are started one after another and
then removed one after another. Each measurement runs BENCH_FC_VM_ROUNDS times (default 5), baseline
and module alternating which goes first; figures are medians.

The guest is Debian's cloud kernel (bzImage, fetched once with ``apt-get download`` into
benchmarks/results/cache/) with an empty 64 MiB ext4 as root drive. Its virtio drivers are modules and
there is no initrd, so it never finds its root: ``rootwait`` keeps it idle, waiting (``panic=0`` alone
would spin in the panic loop, a whole host CPU per TCG guest). Measurements end at ``Running``; before
the next one starts, the previous guest's console must show it waiting (so TCG boot work does not
land in the next measurement).
The module's fixed Python cost is measured too: interpreter start, ``import ansible.module_utils.basic``,
all of fc_vm's imports, and fc_vm doing nothing both from the tree and as the AnsiballZ wrapper Ansible
really runs on the host (its module_utils come from a zip, compiled on every run).
"""

from __future__ import annotations

import http.client
import importlib
import json
import os
import secrets
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

from _bench_common import collection_tree

REPO = Path(__file__).resolve().parents[1]
STANDIN = REPO / "standin" / "fc-standin"
MODULE = REPO / "plugins" / "modules" / "fc_vm.py"
CACHE = Path(__file__).resolve().parent / "results" / "cache"
ROUNDS = int(os.environ.get("BENCH_FC_VM_ROUNDS", "5"))
MANY = 4
BOOT_ARGS = "console=ttyS0 panic=0 rootwait"
MEM_MIB = 512
TARGET_MS = 150
START_SECONDS = 30.0       # deadline for a VMM to say Running / a module run to finish
STOP_SECONDS = 10.0        # deadline for a VMM to exit after SIGTERM
SETTLE_SECONDS = 60.0      # deadline for a guest to reach its idle wait
SETTLED = b"Waiting for root device"
PYTHON_SAMPLES = 5

MODULE_IMPORTS = (
    "import ansible.module_utils.basic\n"
    "from ansible_collections.microvm.firecracker.plugins.module_utils import _fc_vm, _fc_api, _fc_config, "
    "_netlink, _netns\n"
)


# --- the guest kernel --------------------------------------------------------------------------

def _kernel_package() -> Optional[str]:
    def resolve() -> Optional[str]:
        out = subprocess.run(["apt-cache", "depends", "linux-image-cloud-amd64"], capture_output=True, text=True,
                             check=False).stdout
        return next((line.split(":", 1)[1].strip() for line in out.splitlines()
                     if line.strip().startswith("Depends:") and "linux-image-" in line), None)
    name = resolve()
    if name is None:
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, check=False)
        name = resolve()
    return name


def _kernel() -> Path:
    """Debian's current cloud kernel bzImage, cached under benchmarks/results/cache/."""
    package = _kernel_package()
    cached = sorted(CACHE.glob(f"{package or 'linux-image-*'}/vmlinuz-*"))
    if cached:
        return cached[-1]
    if package is None:
        raise RuntimeError("cannot resolve linux-image-cloud-amd64 (apt-cache depends) and no cached kernel")
    CACHE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".fetch-", dir=CACHE))
    try:
        proc = subprocess.run(["apt-get", "download", "-o", "APT::Sandbox::User=root", package], cwd=work,
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"apt-get download {package} failed: {proc.stderr.strip()[-500:]}")
        deb = next(work.glob("*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(work / "root")], check=True)
        image = next((work / "root" / "boot").glob("vmlinuz-*"))
        target = CACHE / package
        target.mkdir(exist_ok=True)
        shutil.move(str(image), str(target / image.name))
        return target / image.name
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --- processes ---------------------------------------------------------------------------------

def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            return handle.read().rsplit(")", 1)[-1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return ""


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


def _wait_exit(pid: int, seconds: float) -> bool:
    """True once ``pid`` has exited (pidfd readable), False at the deadline."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        deadline = time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            if poller.poll(max(0, int(left * 1000))):
                return True
            if left <= 0:
                return not _alive(pid)
    finally:
        os.close(fd)


def _poll(what: str, check: Callable[[], Any], seconds: float, interval: float) -> Any:
    deadline = time.monotonic() + seconds
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise RuntimeError(f"{what}: not within {seconds:g} s")
        time.sleep(interval)


class _UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=10)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def _api_state(sock: str) -> Optional[str]:
    """``GET /`` state, or None while the socket does not answer (the stand-in keeps connections open)."""
    connection = _UnixHTTP(sock)
    try:
        connection.request("GET", "/", headers={"Accept": "application/json"})
        return json.loads(connection.getresponse().read()).get("state")
    except (OSError, http.client.HTTPException, ValueError):
        return None
    finally:
        connection.close()


class _Tracker:
    """Every VMM and QEMU this benchmark started, to stop by PID in ``finally``."""

    def __init__(self) -> None:
        self.vmms: dict[int, str] = {}   # pid -> its API socket (proves the pid is still ours)
        self.qemus: dict[int, str] = {}  # pid -> its VM id
        self.popens: list[subprocess.Popen] = []

    def add(self, pid: int, sock: str, vm_id: str) -> None:
        self.vmms[pid] = sock
        for child in _children(pid):
            if "qemu-system" in _cmdline(child):
                self.qemus[child] = vm_id

    def stop_all(self) -> list[str]:
        def kill(pid: int, sig: int) -> None:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        leftovers = []
        for pid, sock in self.vmms.items():
            if _alive(pid) and sock in _cmdline(pid):
                leftovers.append(f"VMM {pid}")
                kill(pid, signal.SIGTERM)
                if not _wait_exit(pid, STOP_SECONDS):
                    kill(pid, signal.SIGKILL)
                    _wait_exit(pid, STOP_SECONDS)
        for pid, vm_id in self.qemus.items():
            if _alive(pid) and "qemu-system" in _cmdline(pid) and f"-name {vm_id} " in _cmdline(pid):
                leftovers.append(f"QEMU {pid}")
                kill(pid, signal.SIGKILL)
                _wait_exit(pid, STOP_SECONDS)
        for proc in self.popens:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        return leftovers


def _settle(console: Path) -> bool:
    """Wait (with a deadline) for the guest to sit idle in its root wait; False on timeout."""
    try:
        _poll(f"guest idle ({console})", lambda: console.exists() and SETTLED in console.read_bytes(),
              SETTLE_SECONDS, 0.02)
    except RuntimeError:
        return False
    return True


# --- the two ways to start and stop a VM ---------------------------------------------------------

class _Bench:
    def __init__(self, tmp: Path, kernel: Path, disks: list[Path], tracker: _Tracker) -> None:
        self.tmp = tmp
        self.kernel = kernel
        self.disks = disks
        self.tracker = tracker
        self.tree = collection_tree(tmp)
        # The stand-in is '#!/usr/bin/env python3': resolve that to this interpreter, not to a version
        # manager's shim (pyenv's costs ~0.1 s per exec here), for the baseline and the module alike.
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        self.env = dict(os.environ, PATH=path, PYTHONPATH=str(self.tree))
        # The module_utils import each other by their collection names: through the tree, like the module.
        sys.path.insert(0, str(self.tree))
        self.fc_config = importlib.import_module(
            "ansible_collections.microvm.firecracker.plugins.module_utils._fc_config")
        self.serial = 0
        self.settle_timeouts = 0

    def _params(self, name: str, slot: int, state_dir: Path) -> dict[str, Any]:
        return {"name": name, "state": "running", "kernel": str(self.kernel), "boot_args": BOOT_ARGS,
                "vcpu_count": 1, "mem_size_mib": MEM_MIB,
                "drives": [{"drive_id": "rootfs", "path": str(self.disks[slot]), "root": True}],
                "firecracker_bin": str(STANDIN), "supervisor": "process", "state_dir": str(state_dir)}

    def _name(self, kind: str) -> str:
        self.serial += 1
        return f"fcbench-{kind}{self.serial}-{secrets.token_hex(2)}"

    # baseline: the stand-in alone
    def baseline_start(self, slot: int) -> tuple[float, dict[str, Any]]:
        name = self._name("b")
        state_dir = self.tmp / name
        state_dir.mkdir(mode=0o700)
        params = self._params(name, slot, state_dir)
        config = self.fc_config.build_spec(params, lambda _tap: None).config
        config_path = state_dir / "config.json"
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        Path(config["logger"]["log_path"]).touch(mode=0o600)
        sock = str(state_dir / "api.sock")
        console = state_dir / "console.log"
        with open(console, "ab") as out:
            started = time.monotonic()
            proc = subprocess.Popen([str(STANDIN), "--api-sock", sock, "--config-file", str(config_path),
                                     "--id", name], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True, close_fds=True, env=self.env)
        self.tracker.popens.append(proc)
        self.tracker.vmms[proc.pid] = sock

        def running() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"stand-in exited {proc.returncode}: {console.read_text()[-800:]}")
            return _api_state(sock) == "Running"
        _poll(f"stand-in {name} Running", running, START_SECONDS, 0.002)
        elapsed = time.monotonic() - started
        self.tracker.add(proc.pid, sock, name)
        return elapsed, {"proc": proc, "console": console}

    def baseline_stop(self, vm: dict[str, Any]) -> float:
        proc = vm["proc"]
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        if not _wait_exit(proc.pid, STOP_SECONDS):
            raise RuntimeError(f"stand-in {proc.pid} still running {STOP_SECONDS:g} s after SIGTERM")
        elapsed = time.monotonic() - started
        proc.wait()
        return elapsed

    # the module, as its own process
    def _module(self, params: dict[str, Any], tag: str) -> tuple[float, int, dict[str, Any]]:
        args = self.tmp / f"{tag}.args.json"
        args.write_text(json.dumps({"ANSIBLE_MODULE_ARGS": params}))
        out_path, err_path = self.tmp / f"{tag}.out", self.tmp / f"{tag}.err"
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            started = time.monotonic()
            proc = subprocess.Popen([sys.executable, str(MODULE), str(args)], stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=err, env=self.env)
            self.tracker.popens.append(proc)
            if not _wait_exit(proc.pid, START_SECONDS + STOP_SECONDS):
                raise RuntimeError(f"fc_vm ({tag}) did not finish")
            _pid, status, usage = os.wait4(proc.pid, 0)
            elapsed = time.monotonic() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        try:
            result = json.loads(out_path.read_text())
        except ValueError:
            result = {"failed": True, "msg": out_path.read_text()[-800:] + err_path.read_text()[-800:]}
        if proc.returncode != 0 or result.get("failed"):
            raise RuntimeError(f"fc_vm ({tag}) failed ({proc.returncode}): {result.get('msg')}")
        return elapsed, usage.ru_maxrss, result

    def module_start(self, slot: int) -> tuple[float, dict[str, Any]]:
        name = self._name("m")
        state_dir = self.tmp / name
        params = self._params(name, slot, state_dir)
        sock = str(state_dir / "api.sock")
        try:
            elapsed, rss, result = self._module(params, name)
        finally:
            # Whatever happened, a VMM the module started is ours to stop.
            pidfile = state_dir / "firecracker.pid"
            if pidfile.exists():
                self.tracker.vmms[int(pidfile.read_text())] = sock
        if result["state"] != "running" or result["actions"] != ["started"]:
            raise RuntimeError(f"fc_vm {name}: unexpected result {result['state']} {result['actions']}")
        self.tracker.add(result["pid"], sock, name)
        return elapsed, {"name": name, "state_dir": state_dir, "pid": result["pid"], "rss": rss,
                         "api_seconds": result["api_seconds"], "console": Path(result["console_log"])}

    def module_stop(self, vm: dict[str, Any]) -> float:
        params = {"name": vm["name"], "state": "absent", "state_dir": str(vm["state_dir"]), "stop_timeout": 0,
                  "supervisor": "process"}
        elapsed, _rss, result = self._module(params, vm["name"] + "-absent")
        if result["actions"] != ["stopped (SIGTERM)", "removed"] or _alive(vm["pid"]):
            raise RuntimeError(f"fc_vm {vm['name']} absent: unexpected result {result['actions']}")
        return elapsed

    # one measurement: start `count` VMs one after another, then remove them one after another
    def measure(self, kind: str, count: int) -> dict[str, Any]:
        start = self.baseline_start if kind == "baseline" else self.module_start
        stop = self.baseline_stop if kind == "baseline" else self.module_stop
        vms, starts, stops = [], [], []
        for slot in range(count):
            elapsed, vm = start(slot)
            vms.append(vm)
            starts.append(elapsed)
            self.settle_timeouts += not _settle(vm["console"])
        for vm in vms:
            stops.append(stop(vm))
        sample = {"start": starts, "stop": stops}
        if kind == "module":
            sample["api_seconds"] = [vm["api_seconds"] for vm in vms]
            sample["peak_rss_kib"] = max(vm["rss"] for vm in vms)
        return sample


def _python_costs(tmp: Path, env: dict[str, str]) -> dict[str, float]:
    """The fixed cost of the module's process, medians of a few runs each: the interpreter alone, with
    ansible.module_utils.basic, with all of fc_vm's imports; and fc_vm doing nothing (state=absent of a VM
    that does not exist) run directly, and as the AnsiballZ payload Ansible really executes on the host."""
    def timed(argv: list[str]) -> float:
        times = []
        for _sample in range(PYTHON_SAMPLES):
            started = time.monotonic()
            subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL)
            times.append(time.monotonic() - started)
        return statistics.median(times)
    noop = {"name": "fcbench-noop", "state": "absent", "state_dir": str(tmp / "noop"), "supervisor": "process"}
    args = tmp / "noop.args.json"
    args.write_text(json.dumps({"ANSIBLE_MODULE_ARGS": noop}))
    figures = {"python_startup_s": timed([sys.executable, "-c", "pass"]),
               "python_import_ansible_basic_s": timed([sys.executable, "-c", "import ansible.module_utils.basic"]),
               "python_import_fc_vm_all_s": timed([sys.executable, "-c", MODULE_IMPORTS]),
               "module_noop_direct_s": timed([sys.executable, str(MODULE), str(args)])}
    # Let Ansible build the AnsiballZ wrapper (kept with ANSIBLE_KEEP_REMOTE_FILES) and time that file alone:
    # its module_utils are imported from a zip, compiled on every run.
    home = tmp / "ansible-home"
    ansible_env = dict(env, ANSIBLE_COLLECTIONS_PATH=env["PYTHONPATH"], ANSIBLE_HOME=str(home),
                       ANSIBLE_LOCAL_TEMP=str(home / "tmp"), ANSIBLE_REMOTE_TMP=str(home / "rtmp"),
                       ANSIBLE_KEEP_REMOTE_FILES="1", ANSIBLE_PYTHON_INTERPRETER=sys.executable)
    ansible_env.pop("PYTHONPATH")
    proc = subprocess.run([str(Path(sys.executable).parent / "ansible"), "localhost", "-i", "localhost,", "-c",
                           "local", "-m", "microvm.firecracker.fc_vm", "-a", json.dumps(noop)], env=ansible_env,
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"ansible -m microvm.firecracker.fc_vm failed: {(proc.stdout + proc.stderr)[-800:]}")
    wrapper = next((home / "rtmp").glob("ansible-tmp-*/AnsiballZ_fc_vm.py"))
    figures["module_noop_ansiballz_s"] = timed([sys.executable, str(wrapper)])
    return figures


def run() -> dict:
    kernel = _kernel()
    samples: dict[str, list[dict[str, Any]]] = {"baseline-1": [], "module-1": [], f"baseline-{MANY}": [],
                                                f"module-{MANY}": []}
    tracker = _Tracker()
    leftovers: list[str] = []
    with tempfile.TemporaryDirectory(prefix="fcbench-") as tmpdir:
        tmp = Path(tmpdir)
        try:
            disks = []
            for slot in range(MANY):
                disk = tmp / f"rootfs{slot}.ext4"
                subprocess.run(["mkfs.ext4", "-q", "-F", str(disk), "64M"], check=True, stdout=subprocess.DEVNULL)
                disks.append(disk)
            bench = _Bench(tmp, kernel, disks, tracker)
            python = _python_costs(tmp, bench.env)
            for index in range(ROUNDS):
                order = ("baseline", "module") if index % 2 == 0 else ("module", "baseline")
                for count in (1, MANY):
                    for kind in order:
                        samples[f"{kind}-{count}"].append(bench.measure(kind, count))
        finally:
            leftovers = tracker.stop_all()
    if leftovers:
        raise RuntimeError(f"had to stop leftover processes: {', '.join(leftovers)}")

    def per_vm(key: str, what: str) -> float:
        return statistics.median(sum(s[what]) / len(s[what]) for s in samples[key])

    def total(key: str, what: str) -> float:
        return statistics.median(sum(s[what]) for s in samples[key])

    figures: dict[str, Any] = {}
    for count in (1, MANY):
        suffix = "1vm" if count == 1 else f"{count}vm_per_vm"
        for what, label in (("start", "start"), ("stop", "teardown")):
            figures[f"baseline_{label}_{suffix}_s"] = per_vm(f"baseline-{count}", what)
            figures[f"module_{label}_{suffix}_s"] = per_vm(f"module-{count}", what)
        figures[f"module_api_seconds_{suffix}_s"] = per_vm(f"module-{count}", "api_seconds")
        if count != 1:
            for what, label in (("start", "start"), ("stop", "teardown")):
                figures[f"baseline_{label}_{count}vm_total_s"] = total(f"baseline-{count}", what)
                figures[f"module_{label}_{count}vm_total_s"] = total(f"module-{count}", what)
    figures["module_peak_rss_kib"] = max(s["peak_rss_kib"] for key in samples if key.startswith("module")
                                         for s in samples[key])
    figures.update(python)
    figures["module_overhead_1vm_ms"] = 1000 * (figures["module_start_1vm_s"] - figures["baseline_start_1vm_s"])
    figures[f"module_overhead_{MANY}vm_per_vm_ms"] = 1000 * (figures[f"module_start_{MANY}vm_per_vm_s"]
                                                             - figures[f"baseline_start_{MANY}vm_per_vm_s"])
    # What is left once the fixed cost of the module's process (fc_vm doing nothing) is taken out.
    figures["module_overhead_1vm_net_of_noop_ms"] = (figures["module_overhead_1vm_ms"]
                                                     - 1000 * python["module_noop_direct_s"])
    # The same overhead with the module run as Ansible runs it (AnsiballZ) instead of from the tree.
    figures["module_overhead_1vm_as_ansiballz_ms"] = figures["module_overhead_1vm_ms"] + 1000 * (
        python["module_noop_ansiballz_s"] - python["module_noop_direct_s"])
    figures["module_teardown_overhead_1vm_ms"] = 1000 * (figures["module_teardown_1vm_s"]
                                                         - figures["baseline_teardown_1vm_s"])
    figures["guest_settle_timeouts"] = bench.settle_timeouts
    figures = {k: round(v, 1 if k.endswith("_ms") else 3) if isinstance(v, float) else v for k, v in figures.items()}
    ratios = {
        "module_start / baseline_start (1 VM)": round(
            figures["module_start_1vm_s"] / figures["baseline_start_1vm_s"], 2),
        f"module_start / baseline_start ({MANY} VMs)": round(
            figures[f"module_start_{MANY}vm_per_vm_s"] / figures[f"baseline_start_{MANY}vm_per_vm_s"], 2),
        "module_teardown / baseline_teardown (1 VM)": round(
            figures["module_teardown_1vm_s"] / figures["baseline_teardown_1vm_s"], 1),
        f"module_teardown / baseline_teardown ({MANY} VMs)": round(
            figures[f"module_teardown_{MANY}vm_per_vm_s"] / figures[f"baseline_teardown_{MANY}vm_per_vm_s"], 1),
    }
    worst = max(figures["module_overhead_1vm_ms"], figures[f"module_overhead_{MANY}vm_per_vm_ms"])
    targets = {f"module adds <= {TARGET_MS} ms per VM": worst <= TARGET_MS}
    return {"rounds": ROUNDS, "kernel": kernel.name, "boot_args": BOOT_ARGS, "figures": figures, "ratios": ratios,
            "targets": targets, "samples": samples}

"""Integration-test fixtures: real network namespaces and real ansible-playbook runs.

Every namespace a test creates is removed in teardown, pass or fail; every
process a test starts is stopped by its PID.
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import yaml

HERE = Path(__file__).resolve().parent
VENV_BIN = Path(sys.executable).parent


def pytest_collection_modifyitems(config, items) -> None:  # noqa: ARG001
    if os.geteuid() != 0:
        raise pytest.UsageError("integration tests need root (network namespaces, TAP devices)")


def sh(*argv: str, check: bool = True, input_text: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=check, capture_output=True, text=True, input=input_text)


def in_netns(netns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run a command inside a named netns (ip netns exec remounts /sys for it)."""
    return sh("ip", "netns", "exec", netns, *argv, check=check)


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``condition`` until it returns a truthy value or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value: {last!r}")


def proc_status(pid: int) -> dict[str, str]:
    """/proc/<pid>/status as field -> value (Uid, Gid, ...)."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def new_netns() -> str:
    name = f"fct-{secrets.token_hex(4)}"
    sh("ip", "netns", "add", name)
    in_netns(name, "ip", "link", "set", "lo", "up")
    return name


def delete_netns(name: str) -> None:
    sh("ip", "netns", "delete", name, check=False)


@pytest.fixture
def netns() -> Iterator[str]:
    """A fresh, uniquely named network namespace, deleted afterwards."""
    name = new_netns()
    try:
        yield name
    finally:
        delete_netns(name)


@dataclass
class PlaybookResult:
    rc: int
    output: str
    records: list[dict[str, Any]] = field(default_factory=list)

    def task(self, name: str) -> dict[str, Any]:
        matches = [r["result"] for r in self.records if r["task"] == name]
        assert matches, f"no result recorded for task {name!r}; output:\n{self.output}"
        return matches[-1]

    def status(self, name: str) -> str:
        return [r["status"] for r in self.records if r["task"] == name][-1]

    def changed_tasks(self) -> list[str]:
        """Names of the tasks that reported a change (role tasks as "role : name")."""
        return [r["task"] for r in self.records if r["result"].get("changed")]

    def failure(self) -> str:
        """The message of the last failed task; the run must have failed."""
        failed = [r for r in self.records if r["status"] == "failed"]
        assert self.rc != 0 and failed, self.output
        return str(failed[-1]["result"].get("msg"))


class AnsibleRunner:
    """Runs generated playbooks against localhost with this checkout as the collection."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.counter = 0
        home = workdir / "ansible-home"
        home.mkdir(exist_ok=True)
        self.env = dict(os.environ)
        self.env.update(
            ANSIBLE_HOME=str(home),
            ANSIBLE_LOCAL_TEMP=str(home / "tmp"),
            ANSIBLE_REMOTE_TMP=str(home / "remote-tmp"),
            ANSIBLE_COLLECTIONS_PATH=os.environ["MICROVM_TEST_COLLECTIONS_PATH"],
            ANSIBLE_CALLBACK_PLUGINS=str(HERE / "callback_plugins"),
            ANSIBLE_CALLBACKS_ENABLED="result_log",
            ANSIBLE_NOCOLOR="1",
            ANSIBLE_RETRY_FILES_ENABLED="0",
            ANSIBLE_DEPRECATION_WARNINGS="0",
            ANSIBLE_PYTHON_INTERPRETER=sys.executable,
        )

    def run_playbook(self, playbook: Path | str, *, check: bool = False, diff: bool = False,
                     extra_vars: dict[str, Any] | None = None, env: dict[str, str] | None = None,
                     verbosity: int = 0) -> PlaybookResult:
        self.counter += 1
        log = self.workdir / f"results-{self.counter}.jsonl"
        argv = [str(VENV_BIN / "ansible-playbook"), "-i", "localhost,", "-c", "local", str(playbook)]
        if check:
            argv.append("--check")
        if diff:
            argv.append("--diff")
        if verbosity:
            argv.append("-" + "v" * verbosity)
        if extra_vars:
            argv += ["-e", json.dumps(extra_vars)]
        run_env = dict(self.env, MICROVM_TEST_RESULT_LOG=str(log))
        if env:
            run_env.update(env)
        proc = subprocess.run(argv, capture_output=True, text=True, env=run_env, cwd=self.workdir, check=False)
        records = []
        if log.exists():
            records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        return PlaybookResult(proc.returncode, proc.stdout + proc.stderr, records)

    def run_role(self, role: str, report: str | dict[str, str], **kwargs: Any) -> PlaybookResult:
        """Run ``role`` on localhost, then a task "Report" showing ``report``: one variable's name, or a
        mapping of labels to templates."""
        shown = {"var": report} if isinstance(report, str) else {"msg": report}
        play = [{"name": f"{role} under test", "hosts": "localhost", "gather_facts": False, "tasks": [
            {"name": "Run the role", "ansible.builtin.import_role": {"name": role}},
            {"name": "Report", "ansible.builtin.debug": shown},
        ]}]
        self.counter += 1
        path = self.workdir / f"role-{self.counter}.yml"
        path.write_text(yaml.safe_dump(play, sort_keys=False))
        return self.run_playbook(path, **kwargs)

    def run(self, tasks: list[dict[str, Any]], **kwargs: Any) -> PlaybookResult:
        """Run ``tasks`` as one play on localhost; tasks without a name get ``t<N>``."""
        named = []
        for index, task in enumerate(tasks):
            task = dict(task)
            task.setdefault("name", f"t{index}")
            named.append(task)
        play = [{"name": "integration", "hosts": "localhost", "gather_facts": False, "tasks": named}]
        self.counter += 1
        path = self.workdir / f"play-{self.counter}.yml"
        path.write_text(yaml.safe_dump(play, sort_keys=False))
        return self.run_playbook(path, **kwargs)


def assert_each_fails(runner: AnsibleRunner, module: str, cases: list[tuple[str, dict[str, Any], str]]) -> None:
    """Run one task per (label, module args, expected message fragment) case; every one must fail with it."""
    tasks = [{"name": label, "ignore_errors": True, module: args} for label, args, _message in cases]
    result = runner.run(tasks)
    for label, _args, message in cases:
        assert result.status(label) == "failed", f"{label}: {result.task(label)}"
        assert message in result.task(label)["msg"], f"{label}: {result.task(label)['msg']}"


def bridge_lab(workdir: Path, bridge: str, address: str, taps: list[str]) -> tuple[str, AnsibleRunner]:
    """A new namespace with ``bridge`` (``address``, CIDR) and ``taps`` on it, made by the modules."""
    netns = new_netns()
    runner = AnsibleRunner(workdir)
    result = runner.run([
        {"name": "bridge", "microvm.firecracker.fc_bridge": {"netns": netns, "name": bridge, "addresses": [address]}},
        *({"name": f"tap {tap}", "microvm.firecracker.tap_vnet_hdr": {"netns": netns, "name": tap, "bridge": bridge}}
          for tap in taps),
    ])
    if result.rc != 0:
        delete_netns(netns)
        raise AssertionError(result.output)
    return netns, runner


def stop_vmms(workdir: Path) -> None:
    """SIGKILL every VMM whose process supervisor's pidfile lies under ``workdir`` (test teardown)."""
    for pidfile in workdir.rglob("firecracker.pid"):
        try:
            os.kill(int(pidfile.read_text()), signal.SIGKILL)
        except (ValueError, ProcessLookupError):
            pass


@pytest.fixture
def ansible(tmp_path: Path) -> AnsibleRunner:
    return AnsibleRunner(tmp_path)


@pytest.fixture
def process_reaper() -> Iterator[list[subprocess.Popen]]:
    """Processes appended here are stopped by PID in teardown."""
    procs: list[subprocess.Popen] = []
    try:
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def have(tool: str) -> bool:
    return shutil.which(tool) is not None


# The session's golden image build, for every test that boots or clones it.
from golden_build import golden  # noqa: E402,F401  pylint: disable=wrong-import-position,unused-import

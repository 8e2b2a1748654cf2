"""fc-standin's command line behaves like Firecracker 1.10.1's (and says it is a stand-in)."""
from __future__ import annotations

import ast
import re
import signal
import socket
import subprocess
import sys

import pytest

from standin_support import STANDIN


def run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(STANDIN), *args], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False)


def test_version_names_the_stand_in_and_the_emulated_firecracker_version():
    r = subprocess.run([str(STANDIN), "--version"], capture_output=True, text=True, timeout=30, check=False)
    assert r.returncode == 0
    first = r.stdout.splitlines()[0]
    assert first == "Firecracker v1.10.1 compatible stand-in (fc-standin 0.1.0; not Firecracker)"
    assert "stand-in" in first and "not Firecracker" in first
    # a client parsing "Firecracker vX.Y.Z" still finds the API-compatible version
    assert re.match(r"^Firecracker v(\d+\.\d+\.\d+)\b", first).group(1) == "1.10.1"
    assert r.stdout.endswith("\n\n")


def test_script_is_python39_stdlib_only():
    text = STANDIN.read_text()
    assert text.startswith("#!/usr/bin/env python3\n")
    imports = set(re.findall(r"^(?:import|from) ([a-zA-Z_]+)", text, re.M))
    assert imports <= set(sys.stdlib_module_names), imports - set(sys.stdlib_module_names)
    ast.parse(text, filename=str(STANDIN), feature_version=(3, 9))


def test_help_says_it_is_a_stand_in_and_lists_firecracker_flags():
    r = run("--help")
    assert r.returncode == 0
    assert "stand-in" in r.stdout and "not Firecracker" in r.stdout
    for flag in ("--api-sock", "--config-file", "--id", "--log-path", "--level", "--boot-timer",
                 "--no-api", "--version", "--show-level", "--show-log-origin", "--metadata",
                 "--metrics-path", "--seccomp-filter", "--no-seccomp",
                 "--http-api-max-payload-size", "--mmds-size-limit", "--module",
                 "--snapshot-version", "--describe-snapshot", "--start-time-us"):
        assert flag in r.stdout, flag


def test_unknown_flag_is_an_argument_parsing_error():
    r = run("--frobnicate")
    assert r.returncode == 153
    assert ("Arguments parsing error: Found argument 'frobnicate' which wasn't expected, or "
            "isn't valid in this context.") in r.stdout
    assert 'Error: ParseArguments(UnexpectedArgument("frobnicate"))' in r.stderr
    assert "fc-standin exiting with error. exit_code=153" in r.stdout


def test_positional_argument_is_rejected():
    r = run("stray")
    assert r.returncode == 153
    assert "Found argument 'stray' which wasn't expected" in r.stdout


def test_no_api_requires_config_file():
    r = run("--no-api")
    assert r.returncode == 153
    assert "Arguments parsing error: Argument 'config-file' required, but not found." in r.stdout
    assert 'Error: ParseArguments(MissingArgument("config-file"))' in r.stderr


def test_missing_value_duplicate_and_forbidden_arguments():
    r = run("--api-sock")
    assert r.returncode == 153 and "The argument 'api-sock' requires a value" in r.stdout
    r = run("--id", "a", "--id", "b")
    assert r.returncode == 153 and "The argument 'id' was provided more than once." in r.stdout
    r = run("--no-seccomp", "--seccomp-filter", "/x")
    assert r.returncode == 153
    assert "cannot be used together with argument" in r.stdout


def test_bad_log_level_is_a_bad_configuration():
    r = run("--level", "loud", "--api-sock", "/nonexistent/x.sock")
    assert r.returncode == 152
    assert ("Invalid value for logger level: Failed to parse string to level filter: "
            "loud.Possible values: [Error, Warning, Info, Debug]") in r.stdout


def test_log_path_must_exist(tmp_path):
    r = run("--log-path", str(tmp_path / "missing.log"), "--api-sock", str(tmp_path / "s"))
    assert r.returncode == 1
    assert ("Could not initialize logger: Failed to open target file: No such file or "
            "directory (os error 2)") in r.stdout
    assert not (tmp_path / "s").exists()


def test_metrics_path_must_exist(tmp_path):
    r = run("--metrics-path", str(tmp_path / "missing"), "--api-sock", str(tmp_path / "s"))
    assert r.returncode == 1
    assert ("Could not initialize metrics: Cannot initialize the metrics system due to bad "
            "user input: No such file or directory (os error 2)") in r.stdout


def test_invalid_instance_id_aborts_like_a_panic(tmp_path):
    r = run("--id", "bad_id", "--api-sock", str(tmp_path / "s"))
    assert r.returncode == -signal.SIGABRT
    assert "Invalid instance ID: InvalidChar('_', 3)" in r.stdout


def test_existing_api_socket_path_is_refused(tmp_path):
    path = tmp_path / "busy.sock"
    holder = socket.socket(socket.AF_UNIX)
    holder.bind(str(path))
    try:
        r = run("--api-sock", str(path))
    finally:
        holder.close()
    assert r.returncode == 1
    assert (f"RunWithApiError error: Failed to open the API socket at: {path}. Check that it "
            f"is not already used.") in r.stdout
    assert f'Error: RunWithApi(FailedToBindSocket("{path}"))' in r.stderr


def test_stale_socket_file_is_refused_too(tmp_path):
    path = tmp_path / "stale.sock"
    path.write_text("")
    r = run("--api-sock", str(path))
    assert r.returncode == 1
    assert "Failed to open the API socket at" in r.stdout


def test_snapshot_version_and_describe_snapshot(tmp_path):
    r = run("--snapshot-version")
    assert r.returncode == 0 and r.stdout.strip() == "v4.0.0"
    bogus = tmp_path / "bogus"
    bogus.write_bytes(b"\x01\x00\x00\x00\x00\x00\x00\x00rest")
    r = run("--describe-snapshot", str(bogus))
    assert r.returncode == 1
    assert "Magic value does not match arch: 1" in r.stdout


def test_unreadable_config_file_aborts(tmp_path):
    r = run("--config-file", str(tmp_path / "nope.json"), "--no-api")
    assert r.returncode == -signal.SIGABRT
    assert "Unable to open or read from the configuration file" in r.stdout


@pytest.mark.parametrize("body, message", [
    ("{", "Invalid JSON: EOF while parsing an object at line 1 column 1"),
    ('{"drives": []}', "Invalid JSON: missing field `boot-source` at line 1 column 14"),
    ('{"boot-source": {"kernel_image_path": "/k"}}',
     "Invalid JSON: missing field `drives` at line 1 column 44"),
    ('{"drives": [], "boot-source": {"kernel_image_path": "/nonexistent/vmlinux"}}',
     "Boot source error: The kernel file cannot be opened: No such file or directory (os error 2)"),
    ('{"drives": [], "boot-source": {"kernel_image_path": "/k"}, '
     '"machine-config": {"vcpu_count": 0, "mem_size_mib": 128}}',
     "VM config error: The number of vCPUs must be greater than 0, less than 32 and must be 1 "
     "or an even number if SMT is enabled."),
])
def test_bad_config_file_is_reported_and_exits(tmp_path, body, message):
    cfg = tmp_path / "vm.json"
    cfg.write_text(body)
    r = run("--config-file", str(cfg), "--no-api")
    assert r.returncode == 1
    assert ("RunWithoutApiError error: Failed to build MicroVM from Json: Configuration for VMM "
            "from one single json failed: " + message) in r.stdout, r.stdout


def test_config_file_error_with_api_leaves_the_socket_like_firecracker(tmp_path):
    cfg = tmp_path / "vm.json"
    cfg.write_text('{"drives": []}')
    sock = tmp_path / "api.sock"
    r = run("--config-file", str(cfg), "--api-sock", str(sock))
    assert r.returncode == 1
    assert "RunWithApiError error: Failed to build MicroVM from Json" in r.stdout
    # Firecracker binds the API socket before reading the config and never
    # removes it; callers must clean it up.
    assert sock.exists()


def test_sigterm_before_boot_terminates(spawn):
    p = spawn()
    p.proc.send_signal(signal.SIGTERM)
    assert p.wait(10) == -signal.SIGTERM
    assert "fc-standin: received signal 15" in p.output()


def test_sighup_exits_156(spawn):
    p = spawn()
    p.proc.send_signal(signal.SIGHUP)
    assert p.wait(10) == 156


def test_log_lines_identify_the_stand_in(spawn):
    p = spawn("--id", "vm-7")
    p.get("/")
    out = p.output()
    first = out.splitlines()[0]
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9} \[vm-7:main\] Running fc-standin "
                    r"0\.1\.0: a Firecracker v1\.10\.1 API stand-in, not Firecracker", first), first
    assert '[vm-7:fc_api] The API server received a Get request on "/".' in out


def test_show_level_and_log_file(spawn, tmp_path):
    log = tmp_path / "fc.log"
    log.write_text("")
    p = spawn("--log-path", str(log), "--level", "Warning", "--show-level", "--show-log-origin")
    p.put("/machine-config", {"vcpu_count": 0, "mem_size_mib": 128})
    text = log.read_text()
    assert re.search(r"\[anonymous-instance:fc_api:ERROR:fc-standin:\d+\] Received Error\. "
                     r"Status code: 400 Bad Request\. Message: Machine config error", text), text
    assert ":INFO" not in text   # level Warning filters info lines

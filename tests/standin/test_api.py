"""API conformance of fc-standin without booting a guest.

Expected status codes and fault messages are Firecracker 1.10.1's (from its
source: api_server/parsed_request.rs, request/*.rs, vmm/src/rpc_interface.rs
and the errors they wrap)."""
from __future__ import annotations

import json
import socket

import pytest

DESER = "An error occurred when deserializing the json body of a request: "
PRE_BOOT = "The requested operation is not supported before starting the microVM."


def raw_http(sock_path: str, data: bytes, read_until_close: bool = True) -> bytes:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(sock_path)
    s.sendall(data)
    chunks = []
    try:
        while True:
            c = s.recv(65536)
            if not c:
                break
            chunks.append(c)
            if not read_until_close:
                break
    except socket.timeout:
        pass
    s.close()
    return b"".join(chunks)


def test_instance_info_and_version(standin):
    r = standin.get("/")
    assert r.status == 200
    assert r.json == {"id": "anonymous-instance", "state": "Not started",
                      "vmm_version": "1.10.1", "app_name": "Firecracker"}
    assert list(r.json) == ["id", "state", "vmm_version", "app_name"]
    assert r.headers["content-type"] == "application/json"
    r = standin.get("/version")
    assert r.status == 200 and r.json == {"firecracker_version": "1.10.1"}
    assert "stand-in" in r.headers["server"]


def test_machine_config_defaults_put_patch(standin):
    assert standin.get("/machine-config").json == {
        "vcpu_count": 1, "mem_size_mib": 128, "smt": False, "track_dirty_pages": False,
        "huge_pages": "None"}
    r = standin.put("/machine-config", {"vcpu_count": 2, "mem_size_mib": 256})
    assert r.status == 204 and r.raw == b""
    assert "content-length" not in r.headers
    r = standin.patch("/machine-config", {"track_dirty_pages": True})
    assert r.status == 204
    mc = standin.get("/machine-config").json
    assert mc["vcpu_count"] == 2 and mc["mem_size_mib"] == 256 and mc["track_dirty_pages"] is True
    r = standin.put("/machine-config", {"vcpu_count": 2, "mem_size_mib": 256, "cpu_template": "T2"})
    assert r.status == 204 and r.headers.get("deprecation") == "true"
    assert standin.get("/machine-config").json["cpu_template"] == "T2"


@pytest.mark.parametrize("method, body, fault", [
    ("PUT", {"vcpu_count": 2, "mem_size_mib": 256, "foo": 1},
     DESER + "unknown field `foo`, expected one of `vcpu_count`, `mem_size_mib`, `smt`, "
     "`cpu_template`, `track_dirty_pages`, `huge_pages` at line 1 column 44."),
    ("PUT", {"mem_size_mib": 128}, DESER + "missing field `vcpu_count` at line 1 column 21."),
    ("PUT", {"vcpu_count": 2}, DESER + "missing field `mem_size_mib` at line 1 column 17."),
    ("PUT", {"vcpu_count": "2", "mem_size_mib": 128},
     DESER + 'invalid type: string "2", expected u8 at line 1 column 18.'),
    ("PUT", {"vcpu_count": 2.5, "mem_size_mib": 128},
     DESER + "invalid type: floating point `2.5`, expected u8 at line 1 column 18."),
    ("PUT", {"vcpu_count": 2, "mem_size_mib": 128, "huge_pages": "1G"},
     DESER + "unknown variant `1G`, expected `None` or `2M` at line 1 column 57."),
    ("PUT", {"vcpu_count": 0, "mem_size_mib": 128},
     "Machine config error: The number of vCPUs must be greater than 0, less than 32 and must "
     "be 1 or an even number if SMT is enabled."),
    ("PUT", {"vcpu_count": 3, "mem_size_mib": 128, "smt": True},
     "Machine config error: The number of vCPUs must be greater than 0, less than 32 and must "
     "be 1 or an even number if SMT is enabled."),
    ("PUT", {"vcpu_count": 1, "mem_size_mib": 0},
     "Machine config error: The memory size (MiB) is either 0, or not a multiple of the "
     "configured page size."),
    ("PATCH", {}, "Empty PATCH request."),
])
def test_machine_config_errors(standin, method, body, fault):
    r = standin.request(method, "/machine-config", body)
    assert r.status == 400
    assert r.json == {"fault_message": fault}


def test_boot_source(standin, tmp_path):
    r = standin.put("/boot-source", {"kernel_image_path": str(tmp_path / "nope")})
    assert r.status == 400
    assert r.fault == ("Boot source error: The kernel file cannot be opened: No such file or "
                       "directory (os error 2)")
    k = tmp_path / "vmlinux"
    k.write_bytes(b"x")
    r = standin.put("/boot-source", {"kernel_image_path": str(k), "initrd_path": str(tmp_path / "i")})
    assert r.fault == ("Boot source error: The initrd file cannot be opened due to invalid path "
                       "or invalid permissions. No such file or directory (os error 2)")
    r = standin.put("/boot-source", {"kernel_image_path": str(k), "boot_args": "x" * 2048})
    assert r.fault == ("Boot source error: The kernel command line is invalid: Invalid cmdline "
                       "capacity provided.")
    assert standin.put("/boot-source", {"kernel_image_path": str(k), "boot_args": "console=ttyS0"}).status == 204
    r = standin.put("/boot-source", {"kernel_image_path": "/k", "root": "x"})
    assert r.fault == (DESER + "unknown field `root`, expected one of `kernel_image_path`, "
                       "`initrd_path`, `boot_args` at line 1 column 34.")


def test_drives(standin, tmp_path):
    img = tmp_path / "root.img"
    img.write_bytes(b"\0" * 4096)
    other = tmp_path / "data.img"
    other.write_bytes(b"\0" * 4096)
    r = standin.put("/drives/rootfs", {"drive_id": "rootfs", "path_on_host": str(img),
                                       "is_root_device": True, "is_read_only": True})
    assert r.status == 204
    r = standin.put("/drives/data", {"drive_id": "data", "path_on_host": str(other),
                                     "is_root_device": True, "is_read_only": False})
    assert r.status == 400 and r.fault == "Drive config error: A root block device already exists!"
    r = standin.put("/drives/data", {"drive_id": "other", "path_on_host": str(other),
                                     "is_root_device": False})
    assert r.fault == "The id from the path does not match the id from the body!"
    r = standin.put("/drives/da-ta", {"drive_id": "da-ta", "path_on_host": str(other),
                                      "is_root_device": False})
    assert r.fault == "API Resource IDs can only contain alphanumeric characters and underscores."
    r = standin.put("/drives", {"drive_id": "x", "path_on_host": str(other), "is_root_device": False})
    assert r.fault == "The ID cannot be empty."
    r = standin.put("/drives/data", {"drive_id": "data", "path_on_host": str(tmp_path / "nope"),
                                     "is_root_device": False})
    assert r.fault == ("Drive config error: Unable to create the virtio block device: Virtio "
                       "backend error: Error manipulating the backing file: No such file or "
                       f"directory (os error 2) {tmp_path / 'nope'}")
    r = standin.put("/drives/data", {"drive_id": "data", "is_root_device": False})
    assert r.fault == ("Drive config error: Unable to create the virtio block device: Invalid "
                       "block config.")
    r = standin.put("/drives/data", {"drive_id": "data", "path_on_host": str(other),
                                     "is_root_device": False, "is_read_only": "no"})
    assert r.fault.startswith(DESER + 'invalid type: string "no", expected a boolean at line 1 column ')
    assert standin.put("/drives/data", {"drive_id": "data", "path_on_host": str(other),
                                        "is_root_device": False,
                                        "rate_limiter": {"bandwidth": {"size": 1000, "refill_time": 100}}}).status == 204
    cfg = standin.get("/vm/config").json
    assert [d["drive_id"] for d in cfg["drives"]] == ["rootfs", "data"]
    assert cfg["drives"][0] == {"drive_id": "rootfs", "partuuid": None, "is_root_device": True,
                                "cache_type": "Unsafe", "is_read_only": True,
                                "path_on_host": str(img), "rate_limiter": None,
                                "io_engine": "Sync", "socket": None}
    assert cfg["drives"][1]["rate_limiter"] == {
        "bandwidth": {"size": 1000, "one_time_burst": None, "refill_time": 100}, "ops": None}
    r = standin.patch("/drives/data", {"drive_id": "data", "path_on_host": str(other)})
    assert r.status == 400 and r.fault == PRE_BOOT


def test_network_interface_validation_before_any_tap_is_touched(standin):
    # Only requests rejected before the TAP is opened: this test runs in the
    # root network namespace and must not create interfaces there.
    r = standin.put("/network-interfaces/eth0", {"iface_id": "eth1", "host_dev_name": "tap0"})
    assert r.fault == "The id from the path [eth0] does not match the id from the body [eth1]!"
    r = standin.put("/network-interfaces/eth0", {"iface_id": "eth0", "host_dev_name": "tap0",
                                                 "guest_mac": "06:00:00:00:00:zz"})
    assert r.fault == DESER + "The provided MAC address is invalid. at line 1 column 79."
    r = standin.put("/network-interfaces/eth0", {"iface_id": "eth0"})
    assert r.fault == DESER + "missing field `host_dev_name` at line 1 column 20."
    r = standin.patch("/network-interfaces/eth0", {"iface_id": "eth0"})
    assert r.fault == PRE_BOOT


@pytest.mark.parametrize("body, fault", [
    ({"action_type": "Foo"},
     DESER + "unknown variant `Foo`, expected one of `FlushMetrics`, `InstanceStart`, "
     "`SendCtrlAltDel` at line 1 column 21."),
    ({"action_type": "InstanceStart", "force": True},
     DESER + "unknown field `force`, expected `action_type` at line 1 column 40."),
    ({}, DESER + "missing field `action_type` at line 1 column 2."),
    ({"action_type": "InstanceStart"},
     "Start microvm error: Cannot start microvm without kernel configuration."),
    ({"action_type": "SendCtrlAltDel"}, PRE_BOOT),
    ({"action_type": "FlushMetrics"}, PRE_BOOT),
])
def test_actions_before_boot(standin, body, fault):
    r = standin.put("/actions", body)
    assert r.status == 400 and r.fault == fault


@pytest.mark.parametrize("method, path, body", [
    ("PATCH", "/vm", {"state": "Paused"}),
    ("PATCH", "/vm", {"state": "Resumed"}),
    ("PUT", "/snapshot/create", {"snapshot_path": "/tmp/s", "mem_file_path": "/tmp/m"}),
    ("GET", "/balloon/statistics", None),
    ("PATCH", "/balloon", {"amount_mib": 1}),
    ("PATCH", "/balloon/statistics", {"stats_polling_interval_s": 1}),
])
def test_runtime_only_calls_before_boot(standin, method, path, body):
    r = standin.request(method, path, body)
    assert r.status == 400 and r.fault == PRE_BOOT


def test_vm_state_enum(standin):
    r = standin.patch("/vm", {"state": "Running"})
    assert r.fault == DESER + ("unknown variant `Running`, expected `Paused` or `Resumed` at "
                               "line 1 column 19.")


def test_snapshot_requests(standin, tmp_path):
    r = standin.put("/snapshot/load", {"snapshot_path": "/s"})
    assert r.fault == DESER + "missing field: either `mem_backend` or `mem_file_path` is required."
    r = standin.put("/snapshot/load", {"snapshot_path": "/s", "mem_file_path": "/m",
                                       "mem_backend": {"backend_path": "/m", "backend_type": "File"}})
    assert r.fault == DESER + ("too many fields: either `mem_backend` or `mem_file_path` "
                               "exclusively is required.")
    r = standin.put("/snapshot/load", {"snapshot_path": "/s", "mem_backend": {
        "backend_path": "/m", "backend_type": "foo"}})
    assert r.fault == DESER + ("unknown variant `foo`, expected `File` or `Uffd` at line 1 "
                               "column 83.")
    r = standin.put("/snapshot/frobnicate", {"a": 1})
    assert r.fault == "Invalid request method and/or path: PUT /snapshot/frobnicate."
    r = standin.put("/snapshot", {"a": 1})
    assert r.fault == "Missing snapshot operation type."
    # configuring a boot-specific resource forbids loading a snapshot
    assert standin.put("/machine-config", {"vcpu_count": 1, "mem_size_mib": 128}).status == 204
    r = standin.put("/snapshot/load", {"snapshot_path": str(tmp_path / "s"),
                                       "mem_backend": {"backend_path": "/m", "backend_type": "File"}})
    assert r.status == 400
    assert r.fault == ("Load snapshot error: Loading a microVM snapshot not allowed after "
                       "configuring boot-specific resources.")
    assert standin.poll() is None


def test_failed_snapshot_load_is_fatal_like_firecracker(standin, tmp_path):
    r = standin.put("/snapshot/load", {"snapshot_path": str(tmp_path / "missing"),
                                       "mem_file_path": str(tmp_path / "mem")})
    assert r.status == 400
    assert r.fault == ("Load snapshot error: Failed to restore from snapshot: Failed to get "
                       "snapshot state from file: Failed to open snapshot file: No such file or "
                       "directory (os error 2)")
    assert r.headers.get("deprecation") == "true"     # mem_file_path is deprecated
    assert standin.wait(10) == 1
    assert "Failed to build MicroVM: Loading snapshot failed.." in standin.output()


def test_mmds_store(standin):
    assert standin.get("/mmds").raw == b"{}"
    r = standin.patch("/mmds", {"a": 1})
    assert r.status == 400 and r.fault == "MMDS error: The MMDS data store is not initialized."
    assert standin.put("/mmds", {"latest": {"meta-data": {"b": 2, "a": [1, "x"]}}}).status == 204
    assert standin.patch("/mmds", {"latest": {"meta-data": {"b": None, "c": True}}}).status == 204
    r = standin.get("/mmds")
    assert r.raw == b'{"latest":{"meta-data":{"a":[1,"x"],"c":true}}}'
    r = standin.put("/mmds", raw=b'{"a": }')
    assert r.fault == DESER + "expected value at line 1 column 7."


def test_mmds_limit_is_413(spawn):
    p = spawn("--mmds-size-limit", "20")
    r = p.put("/mmds", {"key": "x" * 40})
    assert r.status == 413
    assert r.fault == "MMDS limit exceeded error: The MMDS patch request doesn't fit."


def test_mmds_config(standin):
    r = standin.put("/mmds/config", {"network_interfaces": ["eth0"]})
    assert r.fault == ("MMMDS config error: The list of network interface IDs provided contains "
                       "at least one ID that does not correspond to any existing network "
                       "interface.")
    assert r.headers.get("deprecation") == "true"  # V1 is deprecated
    r = standin.put("/mmds/config", {"network_interfaces": []})
    assert r.fault == ("MMMDS config error: The list of network interface IDs that allow "
                       "forwarding MMDS requests is empty.")
    r = standin.put("/mmds/config", {"network_interfaces": ["eth0"], "version": "V2",
                                     "ipv4_address": "10.0.0.1"})
    assert r.fault == "MMMDS config error: The MMDS IPv4 address is not link local."
    r = standin.put("/mmds/config", {"network_interfaces": ["eth0"], "ipv4_address": "1.2.3"})
    assert r.fault == DESER + "invalid IPv4 address syntax at line 1 column 56."
    r = standin.put("/mmds/nope", {"a": 1})
    assert r.fault == "Unrecognized PUT request path `nope`."


def test_logger(standin, tmp_path):
    r = standin.put("/logger", {"log_path": str(tmp_path / "missing.log")})
    assert r.status == 400
    assert r.fault == ("Logger error: Failed to open target file: No such file or directory "
                       "(os error 2)")
    r = standin.put("/logger", {"level": "chatty"})
    assert r.fault == DESER + "Invalid LevelFilter at line 1 column 19."
    log = tmp_path / "fc.log"
    log.write_text("")
    assert standin.put("/logger", {"log_path": str(log), "level": "Debug", "show_level": True}).status == 204
    standin.get("/machine-config")
    text = log.read_text()
    assert ":fc_api:INFO] The API server received a Get request on \"/machine-config\"." in text
    assert "200 OK" in text


def test_metrics(standin, tmp_path):
    r = standin.put("/metrics", {"metrics_path": str(tmp_path / "missing")})
    assert r.fault == ("Metrics error: Cannot initialize the metrics system due to bad user "
                       "input: No such file or directory (os error 2)")
    m = tmp_path / "metrics.json"
    m.write_text("")
    assert standin.put("/metrics", {"metrics_path": str(m), "unknown_is_ignored": 1}).status == 204
    r = standin.put("/metrics", {"metrics_path": str(m)})
    assert r.fault == ("Metrics error: Cannot initialize the metrics system due to bad user "
                       "input: Reinitialization of metrics not allowed.")


def test_vsock_binds_its_unix_socket(standin, tmp_path):
    uds = tmp_path / "v.sock"
    assert standin.put("/vsock", {"guest_cid": 3, "uds_path": str(uds)}).status == 204
    assert uds.exists()
    r = standin.put("/vsock", {"guest_cid": 3, "uds_path": str(tmp_path / "w.sock"), "vsock_id": "v"})
    assert r.status == 204 and r.headers.get("deprecation") == "true"
    assert not uds.exists()
    busy = tmp_path / "busy.sock"
    busy.write_text("")
    r = standin.put("/vsock", {"guest_cid": 3, "uds_path": str(busy)})
    assert r.fault == ("Vsock config error: Cannot create backend for vsock device: Error binding "
                       "to the host-side Unix socket: Address already in use (os error 98)")
    assert standin.get("/vm/config").json["vsock"] is None


def test_balloon_and_entropy(standin):
    r = standin.get("/balloon")
    assert r.fault == "Balloon config error: No balloon device found."
    r = standin.put("/balloon", {"amount_mib": 4096, "deflate_on_oom": True})
    assert r.fault == "Balloon config error: Amount of pages requested is too large."
    assert standin.put("/balloon", {"amount_mib": 16, "deflate_on_oom": True}).status == 204
    assert standin.get("/balloon").json == {"amount_mib": 16, "deflate_on_oom": True,
                                            "stats_polling_interval_s": 0}
    r = standin.put("/machine-config", {"vcpu_count": 1, "mem_size_mib": 8})
    assert r.fault == ("Machine config error: The memory size (MiB) is smaller than the "
                       "previously set balloon device target size.")
    assert standin.put("/entropy", {}).status == 204
    assert standin.get("/vm/config").json["entropy"] == {"rate_limiter": None}


def test_full_vm_config_shape(standin):
    cfg = standin.get("/vm/config").json
    assert list(cfg) == ["balloon", "drives", "boot-source", "cpu-config", "logger",
                         "machine-config", "metrics", "mmds-config", "network-interfaces",
                         "vsock", "entropy"]
    assert cfg["boot-source"] == {"kernel_image_path": "", "initrd_path": None, "boot_args": None}


@pytest.mark.parametrize("method, path, body, status, fault", [
    ("GET", "/nonexistent", None, 400, "Invalid request method and/or path: GET nonexistent."),
    ("GET", "/vm", None, 400, "Invalid request method and/or path: GET vm."),
    ("PUT", "/nonexistent", {"a": 1}, 400, "Invalid request method and/or path: PUT nonexistent."),
    ("PATCH", "/boot-source", {"a": 1}, 400, "Invalid request method and/or path: PATCH boot-source."),
    ("PUT", "/actions", None, 400, "Empty PUT request."),
    ("PATCH", "/vm", None, 400, "Empty PATCH request."),
    ("GET", "/balloon/nope", None, 400, "Unrecognized GET request path `nope`."),
    ("PATCH", "/balloon/nope", {"a": 1}, 400, "Unrecognized PATCH request path `nope`."),
])
def test_routing_errors(standin, method, path, body, status, fault):
    r = standin.request(method, path, body)
    assert (r.status, r.fault) == (status, fault)


def test_get_with_body_and_absolute_uri(standin):
    raw = raw_http(standin.api_sock, b"GET /machine-config HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
                   read_until_close=False)
    assert raw.startswith(b"HTTP/1.1 400 \r\n")
    assert raw.endswith(b'{"fault_message":"GET request cannot have a body."}')
    raw = raw_http(standin.api_sock, b"GET http://localhost/version HTTP/1.1\r\n\r\n",
                   read_until_close=False)
    assert raw.startswith(b"HTTP/1.1 200 \r\n") and raw.endswith(b'{"firecracker_version":"1.10.1"}')


def test_http_level_errors(standin):
    raw = raw_http(standin.api_sock, b"DELETE /drives/x HTTP/1.1\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 400 \r\n")
    assert raw.endswith(b'{ "error": "Invalid HTTP Method: Unsupported HTTP method.\n'
                        b'All previous unanswered requests will be dropped." }')
    raw = raw_http(standin.api_sock, b"GET / HTTP/2.0\r\n\r\n")
    assert b"Invalid HTTP Version: Unsupported HTTP version." in raw
    body = b'{"key": "' + b"x" * 60000 + b'"}'
    raw = raw_http(standin.api_sock, b"PUT /mmds HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body))
    assert (b"Request payload with size %d is larger than the limit of 51200 allowed by server."
            % len(body)) in raw


def test_keep_alive_and_pipelining(standin):
    body = b'{"vcpu_count": 2, "mem_size_mib": 64}'
    reqs = (b"GET /version HTTP/1.1\r\n\r\n"
            b"PUT /machine-config HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body) + body +
            b"GET /machine-config HTTP/1.1\r\n\r\n")
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(standin.api_sock)
    s.sendall(reqs)
    buf = b""
    while buf.count(b"HTTP/1.1 ") < 3 or not buf.endswith(b"}"):
        c = s.recv(65536)
        assert c, buf
        buf += c
    s.close()
    assert buf.count(b"HTTP/1.1 200 ") == 2 and buf.count(b"HTTP/1.1 204 ") == 1
    assert buf.count(b"Connection: keep-alive") == 3
    assert buf.endswith(b'"mem_size_mib":64,"smt":false,"track_dirty_pages":false,"huge_pages":"None"}')


def test_expect_100_continue(standin):
    body = json.dumps({"vcpu_count": 1, "mem_size_mib": 96}).encode()
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(standin.api_sock)
    s.sendall(b"PUT /machine-config HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n"
              % len(body))
    first = s.recv(4096)
    assert first.startswith(b"HTTP/1.1 100 \r\n")
    s.sendall(body)
    rest = b""
    while b"HTTP/1.1 204" not in first + rest:
        c = s.recv(4096)
        assert c
        rest += c
    s.close()
    assert standin.get("/machine-config").json["mem_size_mib"] == 96


def test_eleventh_connection_is_refused(standin):
    held = []
    try:
        for _attempt in range(10):
            s = socket.socket(socket.AF_UNIX)
            s.connect(standin.api_sock)
            held.append(s)
        # the server accepts asynchronously: make sure it saw the ten
        for s in held:
            s.sendall(b"GET /version HTTP/1.1\r\n\r\n")
            assert s.recv(4096).startswith(b"HTTP/1.1 200")
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(10)
        s.connect(standin.api_sock)
        raw = b""
        while True:
            c = s.recv(4096)
            if not c:
                break
            raw += c
        s.close()
        assert raw.startswith(b"HTTP/1.1 503")
        assert b"Too many open connections" in raw
    finally:
        for s in held:
            s.close()


def test_cpu_config_is_accepted(standin):
    assert standin.put("/cpu-config", {"cpuid_modifiers": [], "msr_modifiers": []}).status == 204
    r = standin.put("/cpu-config", {"reg_modifiers": []})
    assert r.fault.startswith(DESER + "unknown field `reg_modifiers`")
    assert standin.get("/machine-config").json["cpu_template"] == "None"


def test_metadata_flag_populates_mmds(spawn, tmp_path):
    md = tmp_path / "md.json"
    md.write_text('{"z": 1, "a": {"b": "c"}}')
    p = spawn("--metadata", str(md))
    assert p.get("/mmds").raw == b'{"a":{"b":"c"},"z":1}'


def test_state_machine_helper_tables_match_firecracker(fcs):
    """The pre/post-boot split of vmm/src/rpc_interface.rs (1.10.1)."""
    assert fcs.PREBOOT_ONLY == {
        "ConfigureBootSource", "ConfigureLogger", "ConfigureMetrics", "InsertBlockDevice",
        "InsertNetworkDevice", "LoadSnapshot", "PutCpuConfiguration", "SetBalloonDevice",
        "SetVsockDevice", "SetMmdsConfiguration", "SetEntropyDevice", "StartMicroVm",
        "UpdateVmConfiguration"}
    assert fcs.RUNTIME_ONLY == {
        "CreateSnapshot", "FlushMetrics", "Pause", "Resume", "GetBalloonStats", "UpdateBalloon",
        "UpdateBalloonStatistics", "UpdateBlockDevice", "UpdateNetworkInterface",
        "SendCtrlAltDel"}

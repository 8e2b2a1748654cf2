# -*- coding: utf-8 -*-
# Copyright: (c) 2026, microvm.firecracker contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The Firecracker API client: HTTP/1.1 over the VMM's Unix socket, standard library only."""
from __future__ import annotations

import http.client
import json
import socket
import time
from typing import Any, Optional


class FirecrackerAPIError(Exception):
    """The API answered with an error status, or could not be reached."""

    def __init__(self, message: str, status: Optional[int] = None, fault: Optional[str] = None) -> None:
        super().__init__(message)
        self.status = status
        self.fault = fault


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, socket_path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class FirecrackerAPI:
    """One VMM's API socket. Each call opens its own connection (the VMM serves one at a time)."""

    def __init__(self, socket_path: str, timeout: float = 10.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def request(self, method: str, path: str, body: Optional[Any] = None) -> Any:
        connection = _UnixHTTPConnection(self.socket_path, self.timeout)
        payload = None if body is None else json.dumps(body)
        headers = {"Accept": "application/json"}
        if payload is not None:
            headers["Content-Type"] = "application/json"
        try:
            connection.request(method, path, body=payload, headers=headers)
            response = connection.getresponse()
            raw = response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise FirecrackerAPIError(f"{method} {path}: API socket {self.socket_path}: {exc}") from None
        finally:
            connection.close()
        data: Any = None
        if raw:
            try:
                data = json.loads(raw)
            except ValueError:
                data = raw.decode("utf-8", "replace")
        if response.status >= 400:
            fault = data.get("fault_message") if isinstance(data, dict) else str(data)
            raise FirecrackerAPIError(f"{method} {path}: HTTP {response.status}: {fault}", response.status, fault)
        return data

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def put(self, path: str, body: Any) -> Any:
        return self.request("PUT", path, body)

    def patch(self, path: str, body: Any) -> Any:
        return self.request("PATCH", path, body)

    def instance_info(self) -> dict[str, Any]:
        return self.get("/")

    def vm_config(self) -> dict[str, Any]:
        return self.get("/vm/config")

    def pause(self) -> None:
        self.patch("/vm", {"state": "Paused"})

    def resume(self) -> None:
        self.patch("/vm", {"state": "Resumed"})

    def send_ctrl_alt_del(self) -> None:
        self.put("/actions", {"action_type": "SendCtrlAltDel"})

    def snapshot_create(self, snapshot_path: str, mem_file_path: str) -> None:
        self.put("/snapshot/create", {"snapshot_type": "Full", "snapshot_path": snapshot_path,
                                      "mem_file_path": mem_file_path})

    def snapshot_load(self, snapshot_path: str, mem_file_path: str, resume: bool,
                      network_overrides: Optional[list[dict[str, str]]] = None) -> None:
        body: dict[str, Any] = {"snapshot_path": snapshot_path,
                                "mem_backend": {"backend_type": "File", "backend_path": mem_file_path},
                                "resume_vm": resume}
        if network_overrides:
            body["network_overrides"] = network_overrides
        self.put("/snapshot/load", body)

    def responsive(self) -> bool:
        try:
            self.instance_info()
        except FirecrackerAPIError:
            return False
        return True


def wait_for_socket(api: FirecrackerAPI, deadline: float, alive: Any) -> None:
    """Poll until the API answers ``GET /``; ``alive()`` False (the VMM exited) stops the wait early."""
    while time.monotonic() < deadline:
        if api.responsive():
            return
        if not alive():
            raise FirecrackerAPIError(f"the VMM exited before its API socket {api.socket_path} answered")
        time.sleep(0.02)
    raise FirecrackerAPIError(f"API socket {api.socket_path} did not answer in time")

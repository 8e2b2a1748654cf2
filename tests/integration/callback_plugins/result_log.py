# -*- coding: utf-8 -*-
# Test-only callback: writes every task result as one JSON line to the file
# named by MICROVM_TEST_RESULT_LOG, so integration tests can assert on module
# return values without parsing human-oriented output.
from __future__ import annotations

DOCUMENTATION = r"""
name: result_log
type: aggregate
short_description: Write task results as JSON lines (integration tests only)
description:
  - Appends one JSON object per task result (with the seconds since the task started) to the file named by the environment variable C(MICROVM_TEST_RESULT_LOG).
"""

import json
import os
import time

from ansible.plugins.callback import CallbackBase


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "result_log"
    CALLBACK_NEEDS_ENABLED = False

    def __init__(self) -> None:
        super().__init__()
        self._path = os.environ.get("MICROVM_TEST_RESULT_LOG")
        self._task_started = time.monotonic()

    def v2_playbook_on_task_start(self, task, is_conditional) -> None:
        self._task_started = time.monotonic()

    def _write(self, result, status: str) -> None:
        if not self._path:
            return
        record = {
            "task": result._task.get_name(),
            "host": result._host.get_name(),
            "status": status,
            "seconds": time.monotonic() - self._task_started,
            "result": result._result,
        }
        with open(self._path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, default=str) + "\n")

    def v2_runner_on_ok(self, result) -> None:
        self._write(result, "ok")

    def v2_runner_on_failed(self, result, ignore_errors: bool = False) -> None:
        self._write(result, "failed")

    def v2_runner_on_skipped(self, result) -> None:
        self._write(result, "skipped")

    def v2_runner_on_unreachable(self, result) -> None:
        self._write(result, "unreachable")

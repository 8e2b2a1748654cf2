"""fc_vm's step planning from an observed state to a target state."""
from __future__ import annotations

import pytest

from ansible_collections.microvm.firecracker.plugins.module_utils._fc_vm import (
    Observed,
    plan_steps,
    supports_network_overrides,
)


@pytest.mark.parametrize("observed, target, drift, on_change, metadata, steps", [
    ("absent", "running", [], "restart", False, ["start"]),
    ("stopped", "running", [], "restart", False, ["start"]),
    ("running", "running", [], "restart", False, []),
    ("running", "running", ["x"], "restart", False, ["stop", "start"]),
    ("running", "running", ["x"], "ignore", False, []),
    ("running", "running", [], "restart", True, ["update-metadata"]),
    ("paused", "running", [], "restart", False, ["resume"]),
    ("running", "paused", [], "restart", False, ["pause"]),
    ("paused", "paused", [], "restart", False, []),
    ("absent", "paused", [], "restart", False, ["start", "pause"]),
    ("running", "hibernated", [], "restart", False, ["hibernate"]),
    ("absent", "hibernated", [], "restart", False, ["start", "hibernate"]),
    ("hibernated", "hibernated", [], "restart", False, []),
    ("hibernated", "running", [], "restart", False, ["wake"]),
    ("hibernated", "paused", [], "restart", False, ["wake"]),
    ("hibernated", "running", ["x"], "restart", False, ["discard-snapshot", "start"]),
    ("running", "stopped", [], "restart", False, ["stop"]),
    ("hibernated", "stopped", [], "restart", False, ["discard-snapshot"]),
    ("absent", "stopped", [], "restart", False, ["write"]),
    ("stopped", "stopped", [], "restart", False, []),
    ("stopped", "stopped", ["x"], "restart", False, ["write"]),
    ("not-started", "running", [], "restart", False, ["stop", "start"]),
    ("running", "absent", [], "restart", False, ["remove"]),
    ("absent", "absent", [], "restart", False, []),
])
def test_plan(observed, target, drift, on_change, metadata, steps):
    assert plan_steps(Observed(state=observed), target, drift, on_change, metadata) == steps


@pytest.mark.parametrize("version, supported", [
    ("1.10.1", False), ("1.11.0", False), ("1.12.0", True), ("v1.16.1", True), ("2.0.0", True), ("", False),
])
def test_network_overrides_only_where_the_api_has_them(version, supported):
    assert supports_network_overrides(version) is supported

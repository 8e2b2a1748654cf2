"""fc_vm's step planning from an observed state to a target state."""
from __future__ import annotations

import subprocess

import pytest

from ansible_collections.microvm.firecracker.plugins.module_utils._fc_vm import (
    Observed,
    TapRecipe,
    plan_steps,
    supports_network_overrides,
    tap_recreate_lines,
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


def test_launch_script_recreates_each_tap_as_recorded_and_waits_for_its_bridge():
    recipes = [
        TapRecipe(name="fc-web1", vnet_hdr=True, multi_queue=False, owner=4242, group=4243, mtu=1400,
                  bridge="fcbr0", link_group=77),
        TapRecipe(name="fc-web1b", vnet_hdr=True, multi_queue=True, owner=None, group=None, mtu=0,
                  bridge=None, link_group=0),
    ]
    script = "\n".join(tap_recreate_lines(recipes, None)) + "\n"
    assert "if ! ip link show dev 'fc-web1' >/dev/null 2>&1; then" in script
    assert "\twait_for_bridge 'fcbr0' 'fc-web1'\n" in script
    assert "\tip tuntap add dev 'fc-web1' mode tap vnet_hdr user 4242 group 4243\n" in script
    assert "\tip link set dev 'fc-web1' mtu 1400 group 77 master 'fcbr0' up\n" in script
    assert "\tip tuntap add dev 'fc-web1b' mode tap vnet_hdr multi_queue\n" in script
    assert "\tip link set dev 'fc-web1b' up\n" in script
    assert "wait_for_bridge 'fcbr0' 'fc-web1b'" not in script
    assert subprocess.run(["sh", "-n"], input=script, text=True, check=False).returncode == 0


def test_launch_script_recreates_taps_inside_the_vms_namespace():
    recipe = TapRecipe(name="t0", vnet_hdr=True, multi_queue=False, owner=None, group=None, mtu=1500,
                       bridge="br0", link_group=0)
    script = "\n".join(tap_recreate_lines([recipe], "/run/netns/lab"))
    ip_lines = [line for line in script.splitlines() if any(verb in line for verb in ("link show", "tuntap", "link set"))]
    assert len(ip_lines) == 4, ip_lines  # the bridge wait, the TAP check, its creation and its settings
    assert all("nsenter --net='/run/netns/lab' -- ip " in line for line in ip_lines), ip_lines


def test_no_taps_no_recreation_lines():
    assert tap_recreate_lines([], None) == []

"""The README's main job (interim quickstart): lab namespace, bridge, vnet_hdr TAPs, then teardown."""
from __future__ import annotations

import secrets
from pathlib import Path

import netcheck
from conftest import delete_netns

PLAYBOOK = Path(__file__).resolve().parents[2] / "playbooks" / "quickstart.yml"


def test_quickstart_converges_is_idempotent_and_tears_down(ansible):
    lab = f"fct-qs-{secrets.token_hex(3)}"
    lab_vars = {"quickstart_netns": lab, "quickstart_bridge_address": "198.18.60.1/24"}
    try:
        first = ansible.run_playbook(PLAYBOOK, extra_vars=lab_vars)
        assert first.rc == 0, first.output
        links = netcheck.links(lab)
        taps = [f"fclab-tap{i}" for i in range(4)]
        for tap in taps:
            assert links[tap]["master"] == "fcbr0"
            assert netcheck.tun_flags(lab, tap) == "0x5802"
        assert netcheck.addresses(lab, "fcbr0") == ["198.18.60.1/24"]
        shown = str(first.task("Show the lab")["msg"])
        assert "fclab-tap0 tun_flags=0x5802" in shown and "198.18.60.1/24" in shown

        second = ansible.run_playbook(PLAYBOOK, extra_vars=lab_vars)
        assert second.rc == 0, second.output
        assert not [r["task"] for r in second.records if r["result"].get("changed")], second.output

        down = ansible.run_playbook(PLAYBOOK, extra_vars={**lab_vars, "quickstart_state": "absent"})
        assert down.rc == 0, down.output
        assert not Path("/run/netns", lab).exists()
        again = ansible.run_playbook(PLAYBOOK, extra_vars={**lab_vars, "quickstart_state": "absent"})
        assert again.rc == 0 and not [r for r in again.records if r["result"].get("changed")], again.output
    finally:
        delete_netns(lab)

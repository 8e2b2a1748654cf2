#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: (c) 2026, microvm.firecracker contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations

DOCUMENTATION = r"""
module: dnsmasq_process
short_description: A dnsmasq daemon supervised by its pid file, for hosts without systemd
version_added: 0.1.0
description:
  - Starts, stops, restarts or reloads one dnsmasq daemon that reads its own configuration file (C(dnsmasq -C FILE)),
    found again through the pid file that configuration names (C(pid-file=)).
  - The pid in the pid file is only taken to be this daemon while that process is alive and its command line reads
    O(config), so a recycled pid is never signalled.
  - Where systemd is the init system, prefer a unit (the C(microvm.firecracker.host_network) role installs one);
    this module is its fallback for hosts and containers without systemd. Nothing restarts the daemon if it dies;
    V(started) starts it again on the next run.
author:
  - microvm.firecracker contributors (@microvm)
requirements:
  - dnsmasq (Debian/Ubuntu package dnsmasq-base)
  - Linux; root
attributes:
  check_mode:
    support: full
    description: Reports what would be started, stopped or signalled.
  diff_mode:
    support: none
    description: Nothing to compare; the module manages a process, not content.
  platform:
    platforms: [linux]
    support: full
    description: Linux only.
options:
  config:
    description:
      - The daemon's configuration file. It must set C(pid-file=) (unless O(pidfile) is given) and must not set
        C(keep-in-foreground) or C(no-daemon).
      - In check mode a missing file (a template check mode did not write) is accepted.
    type: path
    required: true
  pidfile:
    description: The pid file; default the C(pid-file=) of O(config), which must then be the same path.
    type: path
  state:
    description:
      - V(started) starts the daemon when it is not running; V(stopped) stops it (SIGTERM, SIGKILL after O(timeout))
        and removes a stale pid file; V(restarted) stops and starts it; V(reloaded) sends SIGHUP (dnsmasq re-reads
        its hosts and reservation files and keeps its leases), or starts it when it is not running.
    type: str
    choices: [started, stopped, restarted, reloaded]
    default: started
  netns:
    description: Start the daemon inside this named network namespace (C(/run/netns/NAME)). Stopping and signalling
      find it through the pid file wherever it runs.
    type: str
  binary:
    description: The dnsmasq program.
    type: str
    default: dnsmasq
  timeout:
    description: Seconds to wait for the daemon to detach and write its pid file, or to exit.
    type: float
    default: 10
"""

EXAMPLES = r"""
- name: DHCP for fcbr0 (no systemd on this host)
  microvm.firecracker.dnsmasq_process:
    config: /etc/microvm/network/fcbr0/dnsmasq.conf
    state: "{{ 'restarted' if dnsmasq_conf is changed else 'started' }}"

- name: Stop it
  microvm.firecracker.dnsmasq_process:
    config: /etc/microvm/network/fcbr0/dnsmasq.conf
    state: stopped
"""

RETURN = r"""
pid:
  description: The daemon's pid after the call (null when stopped, or when check mode predicts a start).
  returned: always
  type: int
  sample: 4242
running:
  description: Whether the daemon runs after the call (predicted in check mode).
  returned: always
  type: bool
action:
  description: What was done, V(started), V(stopped), V(restarted), V(reloaded) or V(none).
  returned: always
  type: str
"""

import os

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.microvm.firecracker.plugins.module_utils import _dnsmasq
from ansible_collections.microvm.firecracker.plugins.module_utils._netns import NetnsError, enter_netns


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(
            config=dict(type="path", required=True),
            pidfile=dict(type="path"),
            state=dict(type="str", default="started", choices=["started", "stopped", "restarted", "reloaded"]),
            netns=dict(type="str"),
            binary=dict(type="str", default="dnsmasq"),
            timeout=dict(type="float", default=10.0),
        ),
        supports_check_mode=True,
    )
    params = module.params
    config, state, timeout = params["config"], params["state"], params["timeout"]
    pid = None
    action = "none"
    try:
        exists = os.path.isfile(config)
        configured = _dnsmasq.config_value(config, "pid-file")
        pidfile = params["pidfile"] or configured
        if state != "stopped":
            if not exists and not module.check_mode:
                raise _dnsmasq.DnsmasqError(f"{config}: no such configuration file")
            if exists and not configured:
                raise _dnsmasq.DnsmasqError(f"{config}: sets no pid-file=, so the daemon could not be found again")
            if exists and pidfile != configured:
                raise _dnsmasq.DnsmasqError(f"{config}: pid-file={configured}, but pidfile is {pidfile}")
            for key in ("keep-in-foreground", "no-daemon"):
                if exists and (_dnsmasq.config_value(config, key) is not None or _has_flag(config, key)):
                    raise _dnsmasq.DnsmasqError(f"{config}: {key} keeps dnsmasq from detaching")
        if not pidfile:
            raise _dnsmasq.DnsmasqError(f"{config}: no pid file (give pidfile, or pid-file= in the configuration)")
        pid = _dnsmasq.running_pid(pidfile, config)
        if state == "stopped":
            if pid is not None:
                action = "stopped"
                if not module.check_mode:
                    _dnsmasq.stop(pid, timeout)
            if not module.check_mode and _dnsmasq.remove_file(pidfile) and action == "none":
                action = "stopped"  # a stale pid file of a daemon that died
            pid = None
        elif pid is not None and state == "started":
            action = "none"
        elif pid is not None and state == "reloaded":
            action = "reloaded"
            if not module.check_mode:
                os.kill(pid, 1)  # SIGHUP
        else:
            action = "restarted" if pid is not None else "started"
            if not module.check_mode:
                if pid is not None:
                    _dnsmasq.stop(pid, timeout)
                if params["netns"]:
                    enter_netns(params["netns"])
                pid = _dnsmasq.start(params["binary"], config, pidfile, timeout)
            else:
                pid = None
    except (_dnsmasq.DnsmasqError, NetnsError) as exc:
        module.fail_json(msg=f"dnsmasq_process: {exc}")
    except OSError as exc:
        module.fail_json(msg=f"dnsmasq_process: {config}: {exc}")
    running = state != "stopped"
    module.exit_json(changed=action != "none", pid=pid, running=running, action=action)


def _has_flag(config: str, key: str) -> bool:
    """A bare flag line (``keep-in-foreground`` without ``=``)."""
    try:
        with open(config, encoding="utf-8") as handle:
            return any(line.strip() == key for line in handle)
    except OSError:
        return False


if __name__ == "__main__":
    main()

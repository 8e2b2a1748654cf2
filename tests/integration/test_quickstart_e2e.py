"""End to end on the quickstart path: golden image, host network, two VMs with an injected HTTP service.

The lab is a network namespace with an "uplink" namespace behind it (a veth, the lab's default route), so
NAT out of the uplink is real. The VMs boot the session's golden image under the Firecracker stand-in
(QEMU TCG). Each VM's injected probe fetches the other VM's page and the uplink's HTTP server every second
and publishes what it saw through its own HTTP service, so reachability is observed from inside the
guests. Every namespace and process is removed by the fixtures, pass or fail.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import netcheck
from conftest import AnsibleRunner, delete_netns, in_netns, new_netns, sh, wait_for

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "playbooks" / "quickstart.yml"
LAUNCH = REPO / "playbooks" / "launch.yml"
TEARDOWN = REPO / "playbooks" / "teardown.yml"
UPLINK_IP, LAB_UPLINK_IP = "198.18.81.1", "198.18.81.2"
SESSION = "e2e-" + secrets.token_hex(6)
PROBE = """[Unit]
Description=e2e probe: the peer VM and the uplink, seen from this guest
After=quickstart-http.service

[Service]
EnvironmentFile=/etc/environment
ExecStart=/bin/sh -c 'while :; do \\
  if timeout 3 busybox wget -q -O /run/quickstart/peer.new http://$${PEER_IP}:8080/; \\
  then mv /run/quickstart/peer.new /run/quickstart/peer.txt; \\
  else echo unreachable > /run/quickstart/peer.txt; fi; \\
  timeout 3 busybox wget -q -O /dev/null http://%(uplink)s:9000/$$(hostname) || true; \\
  sleep 1; done'

[Install]
WantedBy=multi-user.target
""" % {"uplink": UPLINK_IP}
UPLINK_SERVER = r"""
import http.server, sys
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        print(self.path, self.client_address[0], flush=True)
        self.send_response(200); self.end_headers(); self.wfile.write(b"uplink\n")
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer((sys.argv[1], 9000), Handler).serve_forever()
"""


class Lab:
    def __init__(self, root: Path, golden, cidr: str, bridge: str, docker_like: bool = False) -> None:
        self.root = root
        self.golden = golden
        self.netns = new_netns()
        self.uplink = new_netns()
        self.cidr = cidr
        self.bridge = bridge
        self.server: subprocess.Popen | None = None
        self.log = root / "uplink.log"
        # dnsmasq drops to nobody and re-reads its reservations as that user: its files must not sit
        # under pytest's root-only temporary directory.
        self.net_dir = Path(tempfile.mkdtemp(prefix="microvm-e2e-", dir="/tmp"))
        self.net_dir.chmod(0o755)
        self.runner = AnsibleRunner(root)
        sh("ip", "link", "add", "up0", "netns", self.netns, "type", "veth", "peer", "name", "wan0", "netns", self.uplink)
        in_netns(self.uplink, "ip", "addr", "add", f"{UPLINK_IP}/30", "dev", "wan0")
        in_netns(self.uplink, "ip", "link", "set", "wan0", "up")
        in_netns(self.netns, "ip", "addr", "add", f"{LAB_UPLINK_IP}/30", "dev", "up0")
        in_netns(self.netns, "ip", "link", "set", "up0", "up")
        in_netns(self.netns, "ip", "route", "add", "default", "via", UPLINK_IP)
        if docker_like:
            for rule in (["-P", "FORWARD", "DROP"], ["-N", "DOCKER-USER"], ["-A", "FORWARD", "-j", "DOCKER-USER"]):
                in_netns(self.netns, "iptables", *rule)
        with open(self.log, "w") as log:
            self.server = subprocess.Popen(["ip", "netns", "exec", self.uplink, sys.executable, "-c", UPLINK_SERVER,
                                            UPLINK_IP], stdout=log, stderr=subprocess.STDOUT)

    def variables(self, **extra) -> dict:
        return {
            "quickstart_netns": self.netns, "quickstart_dir": str(self.root / "qs"), "quickstart_session_id": SESSION,
            "host_network_cidr": self.cidr, "host_network_bridge": self.bridge, "host_network_nat": True,
            "host_network_uplink": "up0", "host_network_install_packages": False,
            "host_network_config_dir": str(self.net_dir / "etc"), "host_network_state_dir": str(self.net_dir / "state"),
            "host_network_sysctl_dir": str(self.net_dir / "sysctl.d"),
            **self.golden.vars, "microvm_golden_dir": self.golden.vars["golden_image_output_dir"],
            **extra,
        }

    def vms(self, names: list[str], peers: dict[str, str]) -> list[dict]:
        return [{"name": name, "environment": {"SESSION_ID": SESSION, "PEER_IP": peers.get(name, "")},
                 "systemd_units": [{"name": "quickstart-http.service", "content": SERVICE},
                                   {"name": "e2e-probe.service", "content": PROBE}],
                 "wait_for": {"port": 8080, "http_path": "/", "contains": SESSION}} for name in names]

    def http(self, ip: str, path: str = "/") -> str | None:
        code = ("import sys, urllib.request\n"
                "print(urllib.request.urlopen(sys.argv[1], timeout=3).read().decode().strip())")
        proc = in_netns(self.netns, sys.executable, "-c", code, f"http://{ip}:8080{path}", check=False)
        return proc.stdout.strip() if proc.returncode == 0 else None

    def close(self) -> None:
        for pidfile in [*self.root.rglob("*.pid"), *self.net_dir.rglob("*.pid")]:
            try:
                os.kill(int(pidfile.read_text().split()[0]), signal.SIGKILL)
            except (ValueError, ProcessLookupError, IndexError):
                pass
        if self.server:
            self.server.terminate()
            self.server.wait(timeout=10)
        delete_netns(self.netns)
        delete_netns(self.uplink)
        shutil.rmtree(self.net_dir, ignore_errors=True)


SERVICE = """[Unit]
Description=Quickstart HTTP service: serves the SESSION_ID from /etc/environment
Wants=network-online.target
After=network-online.target

[Service]
EnvironmentFile=/etc/environment
ExecStartPre=/bin/sh -c 'mkdir -p /run/quickstart && echo "$$SESSION_ID" > /run/quickstart/index.html'
ExecStart=/bin/busybox httpd -f -p 8080 -h /run/quickstart
Restart=on-failure

[Install]
WantedBy=multi-user.target
"""


def allocate(lab: Lab, names: list[str], state_dir: Path) -> dict:
    """Allocate up front (the role finds the same allocations) so each guest can be told its peer's address."""
    result = lab.runner.run([{"name": "alloc", "microvm.firecracker.fc_allocation": {
        "names": names, "cidr": lab.cidr, "state_dir": str(state_dir)}}])
    assert result.rc == 0, result.output
    return result.task("alloc")["allocations"]


def vmm_pids(state_dir: Path) -> list[int]:
    pids = []
    for pidfile in state_dir.glob("vms/*/firecracker.pid"):
        try:
            pids.append(int(pidfile.read_text()))
        except ValueError:
            pass
    return pids


@pytest.fixture
def lab(tmp_path, golden):
    made = Lab(tmp_path, golden, "198.18.80.0/24", "fcbr-e2e")
    try:
        yield made
    finally:
        made.close()


def test_two_vms_reserved_addresses_nat_isolation_rerun_and_teardown(lab):
    state_dir = lab.root / "qs" / "state"
    names = ["e2e-a", "e2e-b"]
    allocations = allocate(lab, names, state_dir)
    ips = {name: allocations[name]["ip"] for name in names}
    peers = {"e2e-a": ips["e2e-b"], "e2e-b": ips["e2e-a"]}
    variables = lab.variables(quickstart_vm_names=names, microvm_vms=lab.vms(names, peers))

    first = lab.runner.run_playbook(QUICKSTART, extra_vars=variables)
    assert first.rc == 0, first.output
    assert "stand-in" in str(first.task("Say which VMM runs the VMs")["msg"])
    for name in names:
        assert lab.http(ips[name]) == SESSION, f"{name} serves its SESSION_ID on its reserved address"
    leases = (lab.net_dir / "state").rglob("*.leases")
    lease_lines = "\n".join(path.read_text() for path in leases)
    for name in names:
        assert f"{allocations[name]['mac']} {ips[name]}" in lease_lines, "the address came from the DHCP reservation"

    # Guest to guest (isolation off by default), and out through NAT: the uplink sees the lab's address.
    for name in names:
        wait_for(lambda n=name: lab.http(ips[n], "/peer.txt") == SESSION, 60, f"{name} reaching its peer")
        wait_for(lambda n=name: f"/{n} {LAB_UPLINK_IP}" in lab.log.read_text(), 60, f"{name} reaching the uplink via NAT")
    assert ips["e2e-a"] not in lab.log.read_text(), "guest addresses never leave the lab unmasqueraded"

    pids = vmm_pids(state_dir)
    assert len(pids) == 2
    again = lab.runner.run_playbook(QUICKSTART, extra_vars=variables)
    assert again.rc == 0, again.output
    assert again.changed_tasks() == [], f"re-run changed {again.changed_tasks()}"
    predicted = lab.runner.run_playbook(QUICKSTART, extra_vars=variables, check=True)
    assert predicted.rc == 0 and predicted.changed_tasks() == [], predicted.output
    assert vmm_pids(state_dir) == pids

    isolated = lab.runner.run_playbook(QUICKSTART, extra_vars={**variables, "host_network_guest_isolation": True})
    assert isolated.rc == 0, isolated.output
    for name in names:
        wait_for(lambda n=name: lab.http(ips[n], "/peer.txt") == "unreachable", 30, f"{name} isolated from its peer")
    assert lab.http(ips["e2e-a"]) == SESSION, "the host still reaches isolated guests"
    assert vmm_pids(state_dir) == pids, "changing the firewall does not restart VMs"

    # A new environment for one VM: only that VM is stopped, its disk injected again, and started.
    before = {name: int((state_dir / "vms" / name / "firecracker.pid").read_text()) for name in names}
    rotated = json.loads(json.dumps(variables["microvm_vms"]))
    rotated[1]["environment"]["SESSION_ID"] = SESSION + "-rotated"
    rotated[1]["wait_for"]["contains"] = SESSION + "-rotated"
    # launch.yml, as an operator would run it (the quickstart's own proof expects its one SESSION_ID).
    inventory_like = {"host_network_netns": lab.netns, "microvm_state_dir": str(state_dir),
                      "microvm_supervisor": "process", "microvm_target": "localhost",
                      "microvm_golden_image": lab.golden.vars["golden_image_name"],
                      "microvm_firecracker_bin": str((REPO / "standin" / "fc-standin").resolve())}
    changed = lab.runner.run_playbook(LAUNCH, extra_vars={**variables, **inventory_like, "microvm_vms": rotated})
    assert changed.rc == 0, changed.output
    for task in ("Prepare the VMs' directories and disks (clone, inject)",
                 "Start the VMs and await their readiness (console watched for panics and failed units)"):
        assert any(name.endswith(task) for name in changed.changed_tasks()), (task, changed.changed_tasks())
    prepared = {vm["name"]: vm for record in changed.records if record["task"].endswith("(clone, inject)")
                for vm in record["result"].get("vms", [])}
    assert prepared["e2e-b"]["stopped"] and prepared["e2e-b"]["injected"], prepared
    assert not prepared["e2e-a"]["changed"], prepared
    after = {name: int((state_dir / "vms" / name / "firecracker.pid").read_text()) for name in names}
    assert after["e2e-a"] == before["e2e-a"] and after["e2e-b"] != before["e2e-b"], (before, after)
    assert lab.http(ips["e2e-b"]) == SESSION + "-rotated" and lab.http(ips["e2e-a"]) == SESSION
    pids = vmm_pids(state_dir)

    # The teardown playbook reads the network and state settings from inventory variables too.
    down = lab.runner.run_playbook(TEARDOWN, extra_vars={**variables, **inventory_like, "microvm_teardown_all": True})
    assert down.rc == 0, down.output
    assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()], "no VMM process left"
    links = netcheck.link_names(lab.netns)
    assert not [link for link in links if link.startswith("fc-")], f"no TAP left: {links}"
    assert not list(state_dir.glob("vms/*")), "no VM directory left"
    assert json.loads((state_dir / "allocations.json").read_text())["allocations"] == {}
    assert not [line for path in (lab.net_dir / "state").rglob("*.leases") for line in path.read_text().splitlines()]
    hosts_files = list((lab.net_dir / "state").rglob("*hosts*"))
    reservations = [line for path in hosts_files for line in path.read_text().splitlines()
                    if line.strip() and not line.startswith("#")]
    assert hosts_files and reservations == [], f"no reservation left: {reservations}"

    gone = lab.runner.run_playbook(QUICKSTART, extra_vars={**variables, "quickstart_state": "absent"})
    assert gone.rc == 0, gone.output
    assert not Path("/run/netns", lab.netns).exists()
    assert not (lab.root / "qs").exists(), "the quickstart's state is removed"


def test_docker_like_host_still_forwards(tmp_path, golden):
    lab = Lab(tmp_path, golden, "198.18.82.0/24", "fcbr-dock", docker_like=True)
    try:
        names = ["e2e-dock"]
        # This VM takes the other addressing path (a static networkd file from the same allocation, no
        # DHCP) and gets its probe unit from a file on the controller (staged, then injected).
        probe_file = tmp_path / "e2e-probe.service"
        probe_file.write_text(PROBE)
        (vm,) = lab.vms(names, {})
        vm["addressing"] = "static"
        vm["systemd_units"][1] = {"name": "e2e-probe.service", "src": str(probe_file)}
        variables = lab.variables(quickstart_vm_names=names, microvm_vms=[vm])
        first = lab.runner.run_playbook(QUICKSTART, extra_vars=variables)
        assert first.rc == 0, first.output
        wait_for(lambda: f"/e2e-dock {LAB_UPLINK_IP}" in lab.log.read_text(), 60, "the guest reaching the uplink")
        leases = [line for path in (lab.net_dir / "state").rglob("*.leases") for line in path.read_text().splitlines()]
        assert leases == [], "a statically addressed guest never asks DHCP"
        assert "DROP" in in_netns(lab.netns, "iptables", "-S", "FORWARD").stdout, "Docker's policy is left alone"
        again = lab.runner.run_playbook(QUICKSTART, extra_vars=variables)
        assert again.rc == 0 and again.changed_tasks() == [], again.output
    finally:
        lab.close()

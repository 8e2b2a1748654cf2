"""The host_network role against real kernel objects, all inside throw-away network namespaces.

The lab: a "host" namespace (where the role works, host_network_netns) joined by a veth to an "uplink"
namespace standing in for the internet (198.18.91.1/30; the host is 198.18.91.2 with its default route
there), CIDR 198.18.90.0/24 on the bridge, and one namespace per "guest" whose veth peer sits on the
bridge under a TAP-like name (fc-g1, ...), with the MAC a VM would have. Real nftables, iptables,
dnsmasq (DHCP) and busybox udhcpc.

Every file the role writes goes to the test's temporary directory (configuration, state, sysctl and
unit directories are variables); every process the tests start (listeners, the role's dnsmasq) is
stopped by its PID, and every namespace is deleted, pass or fail.

The lifecycle tests share one module-scoped lab and run in file order: the first applies the role,
the last removes it. Each later test first makes sure the role is applied (a no-op when it is).
"""
from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import conftest
import netcheck
import pytest
import yaml
from conftest import AnsibleRunner, PlaybookResult, delete_netns, have, in_netns, new_netns, sh, wait_for

ROLE = "microvm.firecracker.host_network"
CIDR = "198.18.90.0/24"
GATEWAY = "198.18.90.1"
UPLINK_IP = "198.18.91.1"
LAB_UPLINK_IP = "198.18.91.2"
BRIDGE = "fcbr0"
TABLE = "microvm_fcbr0"
PEER_PORT = 7000  # on the uplink: answers every connection with the peer address it sees
GUEST_PORT = 8080  # on the guests
OPEN_PORT = 2222  # on the host, not in any allow-list unless a test puts it there

# Answers each connection with the peer's address, on every HOST:PORT given.
SERVER = textwrap.dedent("""\
    import selectors, socket, sys
    sel = selectors.DefaultSelector()
    for spec in sys.argv[1:]:
        host, port = spec.rsplit(":", 1)
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, int(port)))
        s.listen(16)
        sel.register(s, selectors.EVENT_READ)
    while True:
        for key, _ in sel.select():
            conn, peer = key.fileobj.accept()
            conn.sendall((peer[0] + "\\n").encode())
            conn.close()
""")

# Connects and prints "OK <what the server answered>", TIMEOUT (dropped), REFUSED or ERROR.
CLIENT = textwrap.dedent("""\
    import socket, sys
    try:
        conn = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
        conn.settimeout(float(sys.argv[3]))
        print("OK " + conn.recv(100).decode().strip())
    except socket.timeout:
        print("TIMEOUT")
    except ConnectionRefusedError:
        print("REFUSED")
    except OSError as exc:
        print("ERROR " + str(exc))
""")

# busybox udhcpc's script: prints the lease it was offered.
UDHCPC_SCRIPT = textwrap.dedent("""\
    #!/bin/sh
    if [ "$1" = bound ]; then
        echo "LEASE ip=$ip subnet=$subnet router=$router dns=$dns mtu=$mtu"
    fi
    exit 0
""")


@dataclass
class Guest:
    name: str
    mac: str
    ip: str  # the address it should get (when reserved)
    netns: str = ""

    @property
    def port(self) -> str:
        """Its veth end on the bridge, named like a VM's TAP (prefix fc-)."""
        return f"fc-{self.name}"

    def reservation(self) -> dict[str, str]:
        # Shaped like an fc_allocation entry: the role ignores the keys it does not use.
        return {"name": self.name, "mac": self.mac, "ip": self.ip, "tap": self.port, "prefix": 24}


GUESTS = [Guest("g1", "06:00:c6:12:5a:0a", "198.18.90.10"),
          Guest("g2", "06:00:c6:12:5a:0b", "198.18.90.11"),
          Guest("g3", "06:00:c6:12:5a:0c", "198.18.90.12")]


def need_tools() -> None:
    missing = [tool for tool in ("nft", "iptables", "dnsmasq", "dhcp_release", "busybox", "unshare") if not have(tool)]
    assert not missing, (f"missing {', '.join(missing)}: install nftables, iptables, dnsmasq-base, dnsmasq-utils "
                         "and busybox (Debian packages)")


class Lab:
    """The host, uplink and guest namespaces, the listeners, and the role's directories under ``root``."""

    def __init__(self, root: Path, guests: list[Guest], docker_like: bool = False) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.runner = AnsibleRunner(root)
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen] = []
        self.applied = False
        self.last_dhcp = ""
        self.guests = {g.name: Guest(g.name, g.mac, g.ip) for g in guests}
        self.reservations = [g.reservation() for g in self.guests.values() if g.name != "g3"]
        (root / "udhcpc.sh").write_text(UDHCPC_SCRIPT)
        (root / "udhcpc.sh").chmod(0o755)
        (root / "server.py").write_text(SERVER)
        try:
            self.netns = self._namespace()
            self.uplink = self._namespace()
            sh("ip", "link", "add", "up0", "netns", self.netns, "type", "veth", "peer", "name", "wan0",
               "netns", self.uplink)
            in_netns(self.uplink, "ip", "addr", "add", f"{UPLINK_IP}/30", "dev", "wan0")
            in_netns(self.uplink, "ip", "link", "set", "wan0", "up")
            # A route back, so that a connection attempt from the uplink reaches the firewall (and is dropped
            # there) instead of failing for want of a route.
            in_netns(self.uplink, "ip", "route", "add", CIDR, "via", LAB_UPLINK_IP)
            in_netns(self.netns, "ip", "addr", "add", f"{LAB_UPLINK_IP}/30", "dev", "up0")
            in_netns(self.netns, "ip", "link", "set", "up0", "up")
            in_netns(self.netns, "ip", "route", "add", "default", "via", UPLINK_IP)
            if docker_like:
                # What the Docker daemon does to a host's iptables.
                for rule in (["-P", "FORWARD", "DROP"], ["-N", "DOCKER-USER"], ["-A", "DOCKER-USER", "-j", "RETURN"],
                             ["-A", "FORWARD", "-j", "DOCKER-USER"]):
                    in_netns(self.netns, "iptables", "-w", *rule)
            for guest in self.guests.values():
                guest.netns = self._namespace()
                sh("ip", "link", "add", guest.port, "netns", self.netns, "type", "veth", "peer", "name", "eth0",
                   "netns", guest.netns)
                in_netns(guest.netns, "ip", "link", "set", "eth0", "address", guest.mac)
                in_netns(guest.netns, "ip", "link", "set", "eth0", "up")
            self.serve(self.uplink, f"{UPLINK_IP}:{PEER_PORT}")
        except BaseException:
            self.close()
            raise

    def _namespace(self) -> str:
        name = new_netns()
        self.namespaces.append(name)
        return name

    # --- the role ------------------------------------------------------------------------------------

    @property
    def dirs(self) -> dict[str, Path]:
        return {"host_network_config_dir": self.root / "etc", "host_network_state_dir": self.root / "state",
                "host_network_sysctl_dir": self.root / "sysctl.d", "host_network_systemd_dir": self.root / "systemd"}

    @property
    def instance(self) -> str:
        return f"{self.netns}-{BRIDGE}"

    @property
    def conf_dir(self) -> Path:
        return self.root / "etc" / self.instance

    @property
    def data_dir(self) -> Path:
        return self.root / "state" / self.instance

    @property
    def pidfile(self) -> Path:
        return self.data_dir / "dnsmasq.pid"

    @property
    def leasefile(self) -> Path:
        return self.data_dir / "dnsmasq.leases"

    def variables(self, reservations: bool = True, **overrides: Any) -> dict[str, Any]:
        variables: dict[str, Any] = {
            "host_network_netns": self.netns, "host_network_cidr": CIDR, "host_network_bridge": BRIDGE,
            "host_network_install_packages": False, **{k: str(v) for k, v in self.dirs.items()},
        }
        if reservations:
            variables["host_network_dhcp_reservations"] = self.reservations
        variables.update(overrides)
        return variables

    def run(self, check: bool = False, **overrides: Any) -> PlaybookResult:
        return self.runner.run_role(ROLE, "host_network", check=check, extra_vars=self.variables(**overrides))

    def entry(self, tasks_from: str, **overrides: Any) -> PlaybookResult:
        tasks = [{"name": "Run the entry point", "ansible.builtin.include_role": {"name": ROLE, "tasks_from": tasks_from}},
                 {"name": "Report", "ansible.builtin.debug": {"var": "host_network"}}]
        return self.runner.run(tasks, extra_vars=self.variables(reservations=False, **overrides))

    def apply(self, **overrides: Any) -> PlaybookResult:
        result = self.run(**overrides)
        assert result.rc == 0, result.output
        self.attach()
        self.applied = True
        return result

    def ensure_applied(self) -> None:
        if not self.applied:
            self.apply()

    def attach(self) -> None:
        """Put the guests' ports on the bridge (the bridge is the role's; a VM launcher attaches TAPs)."""
        for guest in self.guests.values():
            in_netns(self.netns, "ip", "link", "set", guest.port, "master", BRIDGE)
            in_netns(self.netns, "ip", "link", "set", guest.port, "up")

    # --- looking at the host ---------------------------------------------------------------------------

    def dnsmasq_pid(self) -> Optional[int]:
        """The role's dnsmasq, when the pid in its pid file is alive and reads our configuration."""
        try:
            pid = int(self.pidfile.read_text().split()[0])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            return None
        return pid if str(self.conf_dir / "dnsmasq.conf").encode() in cmdline else None

    def leases(self) -> list[str]:
        text = self.leasefile.read_text() if self.leasefile.exists() else ""
        return [line for line in text.splitlines() if line.strip()]

    def ruleset(self) -> str:
        return in_netns(self.netns, "nft", "list", "ruleset").stdout

    def iptables(self) -> list[str]:
        return in_netns(self.netns, "iptables", "-w", "-S").stdout.splitlines()

    def sysctl(self, key: str) -> str:
        return in_netns(self.netns, "cat", "/proc/sys/" + key.replace(".", "/")).stdout.strip()

    def files(self) -> list[str]:
        return sorted(str(p.relative_to(self.root)) for d in self.dirs.values() if d.exists() for p in d.rglob("*"))

    def state(self) -> dict[str, Any]:
        """Everything the role could change, for "nothing changed" assertions."""
        return {"links": netcheck.snapshot(self.netns), "ruleset": self.ruleset(), "iptables": self.iptables(),
                "ip_forward": self.sysctl("net.ipv4.ip_forward"), "files": self.files(), "dnsmasq": self.dnsmasq_pid()}

    # --- traffic -----------------------------------------------------------------------------------------

    def serve(self, netns: str, *specs: str) -> None:
        """Start the peer-address server in ``netns`` (stopped by PID in close) and wait until it listens."""
        proc = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, str(self.root / "server.py"), *specs],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.procs.append(proc)
        ports = {spec.rsplit(":", 1)[1] for spec in specs}

        def listening() -> bool:
            assert proc.poll() is None, f"server in {netns} exited: {proc.stderr.read().decode() if proc.stderr else ''}"
            out = in_netns(netns, "ss", "-Hltn").stdout
            return all(any(line.split()[3].endswith(":" + port) for line in out.splitlines() if line.split())
                       for port in ports)

        wait_for(listening, 10, f"listeners {specs} in {netns}")

    def connect(self, netns: str, ip: str, port: int, timeout: float = 1.5) -> str:
        return in_netns(netns, sys.executable, "-c", CLIENT, ip, str(port), str(timeout)).stdout.strip()

    def ping(self, netns: str, ip: str) -> bool:
        return in_netns(netns, "busybox", "ping", "-c", "1", "-W", "1", ip, check=False).returncode == 0

    def dhcp(self, guest: Guest, tries: int = 3) -> Optional[dict[str, str]]:
        """A DHCP exchange from the guest (busybox udhcpc); the lease offered, or None."""
        proc = in_netns(guest.netns, "busybox", "udhcpc", "-i", "eth0", "-n", "-q", "-f", "-O", "mtu",
                        "-s", str(self.root / "udhcpc.sh"), "-t", str(tries), "-T", "1", check=False)
        self.last_dhcp = f"{proc.stdout}{proc.stderr}"
        for line in proc.stdout.splitlines():
            if line.startswith("LEASE "):
                return dict(field.split("=", 1) for field in line.split()[1:])
        return None

    def configure(self, guest: Guest) -> None:
        """Give the guest the address DHCP gave it, and the gateway as its default route."""
        lease = self.dhcp(guest)
        assert lease and lease["ip"] == guest.ip, f"{guest.name}: lease {lease}"
        in_netns(guest.netns, "ip", "addr", "replace", f"{guest.ip}/24", "dev", "eth0")
        in_netns(guest.netns, "ip", "route", "replace", "default", "via", lease["router"])

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        pid = self.dnsmasq_pid()
        if pid:
            os.kill(pid, signal.SIGKILL)
        for name in self.namespaces:
            delete_netns(name)


def process_gone(pid: int) -> bool:
    """Exited (a zombie counts: the machine's PID 1 may not reap daemons reparented to it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] in ("Z", "X")


@pytest.fixture
def lab_root() -> Iterator[Path]:
    """A directory dnsmasq can read after dropping its privileges (pytest's tmp_path is under a 0700 directory)."""
    root = Path(tempfile.mkdtemp(prefix="microvm-host-network-", dir="/tmp"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    need_tools()
    root = Path(tempfile.mkdtemp(prefix="microvm-host-network-", dir="/tmp"))
    root.chmod(0o755)
    lab = Lab(root, GUESTS)
    try:
        yield lab
    finally:
        lab.close()
        shutil.rmtree(root, ignore_errors=True)


# --- the lifecycle on one lab, in order ----------------------------------------------------------------------


def test_check_mode_predicts_then_apply_is_idempotent(lab):
    before = lab.state()
    assert before["ip_forward"] == "0" and before["dnsmasq"] is None and before["files"] == []

    check = lab.run(check=True)
    assert check.rc == 0, check.output
    predicted = check.changed_tasks()
    for task in ("Create the bridge with the gateway address", "Set the sysctls now", "Write the firewall rules",
                 "Load the firewall rules when the kernel's tables differ from them",
                 "Write the DHCP server's configuration", "Run the DHCP server as a daemonized process",
                 "Write the DHCP reservations and release stale leases"):
        assert f"{ROLE} : {task}" in predicted, (task, predicted)
    assert lab.state() == before, "check mode changed the host"

    first = lab.apply()
    assert set(first.changed_tasks()) >= set(predicted) - {f"{ROLE} : Create the reservations file when missing"}, \
        (first.changed_tasks(), predicted)
    facts = first.task("Report")["host_network"]
    assert {k: facts[k] for k in ("bridge", "cidr", "prefix", "netmask", "gateway", "pool_start", "pool_end", "netns",
                                  "uplink", "tap_prefix", "nat", "dns_servers", "nft_table")} == {
        "bridge": BRIDGE, "cidr": CIDR, "prefix": 24, "netmask": "255.255.255.0", "gateway": GATEWAY,
        "pool_start": "198.18.90.2", "pool_end": "198.18.90.254", "netns": lab.netns, "uplink": "up0",
        "tap_prefix": "fc-", "nat": True, "dns_servers": [], "nft_table": TABLE}
    assert facts["dhcp"] == {"enabled": True, "supervisor": "process", "unit": "",
                             "conf": str(lab.conf_dir / "dnsmasq.conf"), "hostsfile": str(lab.data_dir / "dhcp-hosts"),
                             "leasefile": str(lab.leasefile), "pidfile": str(lab.pidfile), "release_timeout": 10.0}
    assert facts["sysctl_file"] == ""  # none in a namespace

    # What is on the host now.
    assert netcheck.addresses(lab.netns, BRIDGE) == [f"{GATEWAY}/24"]
    assert netcheck.links(lab.netns)[BRIDGE]["linkinfo"]["info_kind"] == "bridge"
    assert lab.sysctl("net.ipv4.ip_forward") == "1"
    assert lab.sysctl(f"net.ipv4.conf.{BRIDGE}.rp_filter") == "2"
    ruleset = lab.ruleset()
    assert f"table inet {TABLE}" in ruleset and f'ip saddr {CIDR} oifname "up0" masquerade' in ruleset, ruleset
    assert f"table bridge {TABLE}" not in ruleset  # no isolation by default
    assert lab.dnsmasq_pid() is not None
    hosts = (lab.data_dir / "dhcp-hosts").read_text().splitlines()
    assert [line for line in hosts if not line.startswith("#")] == [
        "06:00:c6:12:5a:0a,198.18.90.10,g1", "06:00:c6:12:5a:0b,198.18.90.11,g2"]
    conf = (lab.conf_dir / "dnsmasq.conf").read_text().splitlines()
    for line in ("interface=fcbr0", "bind-interfaces", "except-interface=lo", "port=0",
                 "dhcp-range=198.18.90.0,static,255.255.255.0,12h", "dhcp-option=option:router,198.18.90.1",
                 "dhcp-authoritative", f"dhcp-hostsfile={lab.data_dir / 'dhcp-hosts'}",
                 f"dhcp-leasefile={lab.leasefile}", f"pid-file={lab.pidfile}"):
        assert line in conf, (line, conf)
    # In a namespace nothing goes to sysctl.d and no unit is installed (systemd is not the init system here).
    assert not (lab.root / "sysctl.d").exists() and not (lab.root / "systemd").exists()

    applied = lab.state()
    second = lab.run()
    assert second.rc == 0, second.output
    assert second.changed_tasks() == [], second.output
    third = lab.run(check=True)
    assert third.rc == 0, third.output
    assert third.changed_tasks() == [], third.output
    assert lab.state() == applied


def test_guests_get_their_reserved_address_and_nothing_else(lab):
    lab.ensure_applied()
    g1, g3 = lab.guests["g1"], lab.guests["g3"]
    lease = lab.dhcp(g1)
    assert lease == {"ip": "198.18.90.10", "subnet": "255.255.255.0", "router": GATEWAY, "dns": "", "mtu": "1500"}, \
        (lease, lab.last_dhcp)
    assert any(" 06:00:c6:12:5a:0a 198.18.90.10 g1 " in line + " " for line in lab.leases()), lab.leases()
    # Not reserved: no address at all (dhcp-range static), even though the pool has room.
    assert lab.dhcp(g3, tries=2) is None
    assert not any("06:00:c6:12:5a:0c" in line for line in lab.leases())
    for name in ("g1", "g2"):
        lab.configure(lab.guests[name])


def test_nat_forwarding_and_the_firewall(lab):
    lab.ensure_applied()
    g1 = lab.guests["g1"]
    # Out to the uplink, masqueraded: the uplink sees the host's uplink address, not the guest's.
    assert wait_for(lambda: lab.ping(g1.netns, UPLINK_IP), 5, "g1 pinging the uplink")
    assert lab.connect(g1.netns, UPLINK_IP, PEER_PORT) == f"OK {LAB_UPLINK_IP}"
    # New connections from outside into the bridge are dropped (the uplink has a route to the CIDR).
    lab.serve(g1.netns, f"0.0.0.0:{GUEST_PORT}")
    assert lab.connect(lab.netns, g1.ip, GUEST_PORT) == f"OK {GATEWAY}"  # the host itself may reach guests
    assert lab.connect(lab.uplink, g1.ip, GUEST_PORT) == "TIMEOUT"
    # Host ingress: default deny with the SSH port Ansible uses (22 here) always open.
    lab.serve(lab.netns, "0.0.0.0:22", f"0.0.0.0:{OPEN_PORT}")
    assert lab.connect(lab.uplink, LAB_UPLINK_IP, 22) == f"OK {UPLINK_IP}"
    assert lab.connect(lab.uplink, LAB_UPLINK_IP, OPEN_PORT) == "TIMEOUT"
    assert lab.ping(lab.uplink, LAB_UPLINK_IP)  # ICMP is allowed
    # Guests reach the host only through their allow-list (DHCP, DNS when on, listed TCP ports), not SSH.
    assert lab.connect(g1.netns, GATEWAY, 22) == "TIMEOUT"
    assert lab.ping(g1.netns, GATEWAY)


def test_isolation_guest_to_host_ports_and_dns(lab):
    lab.ensure_applied()
    g1, g2 = lab.guests["g1"], lab.guests["g2"]
    assert wait_for(lambda: lab.ping(g1.netns, g2.ip), 5, "g1 pinging g2 without isolation")

    isolated = lab.apply(host_network_guest_isolation=True, host_network_guest_to_host_tcp_ports=[OPEN_PORT],
                         host_network_dns_servers=[UPLINK_IP])
    assert f"{ROLE} : Run the DHCP server as a daemonized process" in isolated.changed_tasks()  # restarted: new config
    assert f"table bridge {TABLE}" in lab.ruleset()
    # With br_netfilter (bridged frames also pass the inet forward hook) and without (only the bridge table).
    assert lab.sysctl("net.bridge.bridge-nf-call-iptables") == "1"
    assert not lab.ping(g1.netns, g2.ip) and not lab.ping(g2.netns, g1.ip)
    in_netns(lab.netns, "sysctl", "-q", "-w", "net.bridge.bridge-nf-call-iptables=0")
    try:
        assert not lab.ping(g1.netns, g2.ip) and not lab.ping(g2.netns, g1.ip)
    finally:
        in_netns(lab.netns, "sysctl", "-q", "-w", "net.bridge.bridge-nf-call-iptables=1")
    assert lab.ping(g1.netns, UPLINK_IP)  # still out to the uplink
    assert lab.connect(g1.netns, GATEWAY, OPEN_PORT) == f"OK {g1.ip}"  # now in the guest-to-host allow-list
    # DNS forwarding: dnsmasq answers on the gateway (port 53, bridge only), and DHCP names it as the resolver.
    assert lab.dhcp(g1)["dns"] == GATEWAY
    sockets = in_netns(lab.netns, "ss", "-Hlun").stdout
    assert f"{GATEWAY}:53" in sockets and "0.0.0.0:53" not in sockets, sockets
    assert isolated.task("Report")["host_network"]["dns_servers"] == [GATEWAY]

    lab.apply()
    assert f"table bridge {TABLE}" not in lab.ruleset()
    assert wait_for(lambda: lab.ping(g1.netns, g2.ip), 5, "g1 pinging g2 after isolation is off again")
    assert lab.connect(g1.netns, GATEWAY, OPEN_PORT) == "TIMEOUT"
    assert lab.dhcp(g1)["dns"] == ""


def test_dhcp_off_stops_and_removes_the_dhcp_server(lab):
    lab.ensure_applied()
    pid = lab.dnsmasq_pid()
    assert pid
    off = lab.run(host_network_dhcp=False)
    assert off.rc == 0, off.output
    assert off.task("Report")["host_network"]["dhcp"]["enabled"] is False
    assert lab.dnsmasq_pid() is None and process_gone(pid)
    assert sorted(p.name for p in lab.conf_dir.iterdir()) == ["apply.sh", "nftables.nft"]
    assert sorted(p.name for p in lab.data_dir.iterdir()) == []
    assert "udp dport 67 accept" not in lab.ruleset()
    assert lab.entry("verify", host_network_dhcp=False).rc == 0
    assert lab.run(host_network_dhcp=False).changed_tasks() == []

    lab.apply()
    assert lab.dnsmasq_pid() not in (None, pid)
    assert "udp dport 67 accept" in lab.ruleset()
    assert lab.dhcp(lab.guests["g1"])["ip"] == lab.guests["g1"].ip


def test_dhcp_reservations_from_another_role_reload_and_release(lab):
    lab.ensure_applied()
    g2, g3 = lab.guests["g2"], lab.guests["g3"]
    assert lab.dhcp(g2)["ip"] == g2.ip
    assert any(g2.mac in line for line in lab.leases())
    pid = lab.dnsmasq_pid()
    assert pid

    # Another role includes the entry point with its own reservations (fc_allocation entries).
    roles = lab.root / "roles" / "consumer" / "tasks"
    roles.mkdir(parents=True, exist_ok=True)
    (roles / "main.yml").write_text(yaml.safe_dump([{
        "name": "Reserve the VMs' addresses",
        "ansible.builtin.include_role": {"name": ROLE, "tasks_from": "dhcp_reservations"},
        "vars": {"host_network_dhcp_reservations": "{{ consumer_reservations }}"}}], sort_keys=False))
    play = lab.root / "consumer.yml"
    play.write_text(yaml.safe_dump([{"name": "consumer", "hosts": "localhost", "gather_facts": False, "roles": ["consumer"],
                                     "tasks": [{"name": "Report", "ansible.builtin.debug": {"var": "host_network"}}]}]))
    wanted = [lab.guests["g1"].reservation(), g3.reservation()]

    def consumer() -> PlaybookResult:
        result = lab.runner.run_playbook(play, env={"ANSIBLE_ROLES_PATH": str(lab.root / "roles")},
                                         extra_vars={**lab.variables(reservations=False), "consumer_reservations": wanted})
        assert result.rc == 0, result.output
        return result

    result = consumer()
    outcome = result.task(f"{ROLE} : Write the DHCP reservations and release stale leases")
    assert outcome["changed"] and outcome["reloaded"] and outcome["pid"] == pid, outcome
    assert outcome["released"] == [{"ip": g2.ip, "mac": g2.mac, "hostname": "g2"}], outcome
    assert result.task("Report")["host_network"]["bridge"] == BRIDGE
    lab.reservations = wanted
    # Same dnsmasq (SIGHUP, no restart), g2's lease gone from the lease file, g3 served at once.
    assert lab.dnsmasq_pid() == pid
    assert not any(g2.mac in line for line in lab.leases()), lab.leases()
    assert lab.dhcp(g3)["ip"] == g3.ip
    assert lab.dhcp(g2, tries=2) is None
    assert lab.dnsmasq_pid() == pid

    again = consumer()
    assert again.changed_tasks() == [], again.output
    # The main entry point agrees (same reservations): nothing to do.
    assert lab.run().changed_tasks() == []


def test_verify_names_what_is_broken_and_a_rerun_or_the_boot_script_repairs_it(lab):
    lab.ensure_applied()
    good = lab.entry("verify")
    assert good.rc == 0, good.output
    checks = good.task(f"{ROLE} : Check the host network")["checks"]
    assert [c["name"] for c in checks] == ["bridge", "ip_forward", "rp_filter", "nft_table", "masquerade",
                                           "forward_compat", "dhcp_server", "dhcp_hosts", "uplink"]
    assert all(c["ok"] for c in checks), checks

    in_netns(lab.netns, "sysctl", "-q", "-w", "net.ipv4.ip_forward=0")
    os.kill(lab.dnsmasq_pid(), signal.SIGKILL)
    in_netns(lab.netns, "nft", "flush", "table", "inet", TABLE)
    lab.data_dir.chmod(0o700)  # dnsmasq, once unprivileged, could no longer read its reservations
    wait_for(lambda: lab.dnsmasq_pid() is None, 5, "the killed dnsmasq to be gone")
    broken = lab.entry("verify")
    message = broken.failure()
    assert message.startswith(f"host network of bridge {BRIDGE}: 5 check(s) failed: "), message
    for name in ("ip_forward", "dhcp_server", "nft_table", "masquerade", "dhcp_hosts"):
        assert f"{name}: " in message, (name, message)
    assert "net.ipv4.ip_forward is 0" in message and "is not running" in message and "differ from" in message
    assert f"{lab.data_dir} is mode 0700" in message
    assert lab.entry("verify", host_network_verify_fail_on_error=False).rc == 0

    repaired = lab.run()
    assert repaired.rc == 0, repaired.output
    assert set(repaired.changed_tasks()) == {f"{ROLE} : Create the configuration and state directories",
                                             f"{ROLE} : Set the sysctls now",
                                             f"{ROLE} : Load the firewall rules when the kernel's tables differ from them",
                                             f"{ROLE} : Run the DHCP server as a daemonized process"}, repaired.changed_tasks()
    assert lab.entry("verify").rc == 0

    # The boot-time script (what microvm-network-<instance>.service runs) restores bridge, sysctls and rules.
    in_netns(lab.netns, "sysctl", "-q", "-w", "net.ipv4.ip_forward=0")
    in_netns(lab.netns, "nft", "delete", "table", "inet", TABLE)
    in_netns(lab.netns, "ip", "addr", "flush", "dev", BRIDGE)
    in_netns(lab.netns, "sh", str(lab.conf_dir / "apply.sh"))
    assert lab.entry("verify").rc == 0
    assert lab.run().changed_tasks() == []


def test_absent_refuses_a_bridge_in_use_then_removes_everything(lab):
    lab.ensure_applied()
    before = lab.state()
    refused = lab.run(host_network_state="absent")
    message = refused.failure()
    assert message.startswith(f"host_network absent: bridge {BRIDGE}: cannot remove: it still has ports "), message
    assert "host_network_absent_force" in message and "Nothing was removed" in message
    assert lab.state() == before

    check = lab.run(check=True, host_network_state="absent", host_network_absent_force=True)
    assert check.rc == 0 and check.changed_tasks(), check.output
    assert lab.state() == before

    removed = lab.run(host_network_state="absent", host_network_absent_force=True)
    assert removed.rc == 0, removed.output
    lab.applied = False
    assert BRIDGE not in netcheck.link_names(lab.netns)
    assert TABLE not in lab.ruleset()
    assert lab.dnsmasq_pid() is None and not lab.pidfile.exists()
    assert lab.files() == [], lab.files()
    assert removed.task("Report")["host_network"]["state"] == "absent"
    for name in ("g1", "g2", "g3"):  # the guests' ports were released, not deleted
        assert name and f"fc-{name}" in netcheck.link_names(lab.netns)

    again = lab.run(host_network_state="absent")
    assert again.rc == 0 and again.changed_tasks() == [], again.output


# --- separate labs -----------------------------------------------------------------------------------------


def test_docker_like_host_forward_drop(lab_root):
    need_tools()
    lab = Lab(lab_root, GUESTS[:1], docker_like=True)
    try:
        docker_rules = lab.iptables()
        assert "-P FORWARD DROP" in docker_rules and "-N DOCKER-USER" in docker_rules
        lab.apply()
        ours = [line for line in lab.iptables() if "microvm.firecracker host_network fcbr0" in line]
        assert ours == [
            '-A DOCKER-USER -i fcbr0 -m comment --comment "microvm.firecracker host_network fcbr0" -j ACCEPT',
            '-A DOCKER-USER -o fcbr0 -m conntrack --ctstate RELATED,ESTABLISHED '
            '-m comment --comment "microvm.firecracker host_network fcbr0" -j ACCEPT'], lab.iptables()
        g1 = lab.guests["g1"]
        lab.configure(g1)
        assert wait_for(lambda: lab.ping(g1.netns, UPLINK_IP), 5, "g1 pinging the uplink through Docker's DROP")
        assert lab.connect(g1.netns, UPLINK_IP, PEER_PORT) == f"OK {LAB_UPLINK_IP}"
        assert lab.run().changed_tasks() == []
        assert lab.entry("verify").rc == 0

        # Without our rules the traffic dies in iptables, and verify says so.
        for line in ours:
            words = shlex.split(line)  # -A CHAIN rule...
            in_netns(lab.netns, "iptables", "-w", "-D", *words[1:])
        assert not lab.ping(g1.netns, UPLINK_IP)
        assert "forward_compat: iptables drops forwarded traffic (a DOCKER-USER chain exists)" in \
            lab.entry("verify").failure()
        assert lab.run().changed_tasks() == [f"{ROLE} : Let the bridge's traffic through an iptables FORWARD drop "
                                             "(Docker, libvirt)"]
        assert wait_for(lambda: lab.ping(g1.netns, UPLINK_IP), 5, "g1 pinging the uplink again")

        lab.run(host_network_state="absent", host_network_absent_force=True)
        assert [line for line in lab.iptables() if "microvm.firecracker" in line] == []
        assert "-P FORWARD DROP" in lab.iptables() and "-A FORWARD -j DOCKER-USER" in lab.iptables()
        assert lab.files() == [] and lab.dnsmasq_pid() is None
    finally:
        lab.close()


def test_bad_input_fails_before_anything_is_created(lab_root, netns):
    need_tools()
    root = lab_root / "bad"
    runner = AnsibleRunner(lab_root)
    private = lab_root / "private"
    private.mkdir()
    private.chmod(0o700)
    base = {"host_network_netns": netns, "host_network_cidr": CIDR, "host_network_install_packages": False,
            "host_network_config_dir": str(root / "etc"), "host_network_state_dir": str(root / "state"),
            "host_network_sysctl_dir": str(root / "sysctl.d"), "host_network_systemd_dir": str(root / "systemd")}
    cases = [
        ("pool outside the CIDR", {"host_network_pool_start": "198.18.89.5"},
         f"pool_start 198.18.89.5 is not a usable host address of {CIDR}"),
        ("gateway inside the pool", {"host_network_gateway": "198.18.90.50", "host_network_pool_start": "198.18.90.10",
                                     "host_network_pool_end": "198.18.90.100"},
         "pool 198.18.90.10-198.18.90.100 contains the gateway 198.18.90.50"),
        ("malformed CIDR", {"host_network_cidr": "198.18.90.0/33"}, "cidr 198.18.90.0/33: not an IPv4 network"),
        ("NAT with no uplink", {}, "host_network_nat is true, but there is no uplink: no default route in netns"),
        ("no such namespace", {"host_network_netns": "fct-no-such-netns"}, "no such network namespace"),
        ("state dir dnsmasq cannot read", {"host_network_state_dir": str(private / "state")},
         f"host_network_state_dir {private / 'state'}: dnsmasq re-reads its reservations there as nobody"),
        ("fleet supernet without an index", {"host_network_fleet_supernet": "198.18.96.0/20"},
         'host_network_fleet_index "" is not a whole number'),
        ("fleet index outside the supernet", {"host_network_fleet_supernet": "198.18.96.0/20",
                                              "host_network_fleet_index": 16},
         "index 16 is outside the 16 /24 subnets of 198.18.96.0/20"),
        ("several at once", {"host_network_bridge": "a-bridge-name-too-long", "host_network_dns_servers": ["1.2.3"],
                             "host_network_ingress_allow_tcp": [0]},
         "is not an interface name"),
    ]
    empty_links = netcheck.snapshot(netns)
    for label, overrides, expected in cases:
        result = runner.run_role(ROLE, "host_network", extra_vars={**base, **overrides})
        message = result.failure()
        assert expected in message, (label, message)
        assert "Nothing was changed" in message or "nothing was changed" in message, (label, message)
        assert netcheck.snapshot(netns) == empty_links, label
        assert in_netns(netns, "nft", "list", "ruleset").stdout == "", label
        assert in_netns(netns, "cat", "/proc/sys/net/ipv4/ip_forward").stdout.strip() == "0", label
        assert not root.exists(), (label, sorted(str(p) for p in root.rglob("*")))
        assert list(private.iterdir()) == [], label
    # Every problem named at once.
    assert "1.2.3" in message and "port 0 is outside 1..65535" in message, message


def test_a_fleet_supernet_gives_every_entry_point_the_hosts_own_subnet(lab_root, netns):
    """The facts entry point (what launch.yml, teardown.yml and reconcile.yml read through the microvm role)
    derives the same subnet as a site.yml run would. Only an extra var outranks the derivation: refused."""
    runner = AnsibleRunner(lab_root)
    fleet = {"host_network_netns": netns, "host_network_fleet_supernet": "198.18.96.0/20",
             "host_network_fleet_index": 3, "host_network_install_packages": False}
    result = runner.run([
        {"name": "facts", "ansible.builtin.include_role": {"name": ROLE, "tasks_from": "facts"}},
        {"name": "Report", "ansible.builtin.debug": {"var": "host_network"}},
    ], extra_vars=fleet)
    assert result.rc == 0, result.output
    facts = result.task("Report")["host_network"]
    assert (facts["cidr"], facts["gateway"], facts["pool_start"], facts["pool_end"]) == (
        "198.18.99.0/24", "198.18.99.1", "198.18.99.2", "198.18.99.254"), facts
    smaller = runner.run([
        {"name": "facts", "ansible.builtin.include_role": {"name": ROLE, "tasks_from": "facts"}},
        {"name": "Report", "ansible.builtin.debug": {"var": "host_network"}},
    ], extra_vars={**fleet, "host_network_fleet_prefix": 26})
    assert smaller.rc == 0, smaller.output
    assert smaller.task("Report")["host_network"]["cidr"] == "198.18.96.192/26"
    outranked = runner.run([{"name": "facts", "ansible.builtin.include_role": {"name": ROLE, "tasks_from": "facts"}}],
                           extra_vars={**fleet, "host_network_cidr": CIDR})
    message = outranked.failure()
    assert f"host_network_cidr {CIDR} is set as an extra var (-e), which outranks this host's subnet 198.18.99.0/24" \
        in message and "Nothing was changed" in message, message


def test_host_mode_sysctls_in_their_file_and_live(lab_root, netns, monkeypatch):
    """Host mode (host_network_netns empty) configures the machine Ansible runs on; here ansible-playbook itself
    runs inside a scratch network namespace (ip netns exec), so that machine is the namespace. The sysctls go to
    the role's own file (ansible.posix.sysctl, no sysctl -p) and are set live in the namespace only; it has no
    kernel-global neighbour table (like a host that is a container), so those keys are left out. Check mode
    predicts, a re-run changes nothing, systemd-sysctl applies the file where the bridge does not exist yet (as
    at boot), a drifted value is set again, the boot script sets the values again, and absent removes the file."""
    need_tools()
    # Never set kernel-global values from a test: outside the initial network namespace the neighbour
    # thresholds do not exist, and that is what keeps the role from setting them here.
    assert in_netns(netns, "test", "-e", "/proc/sys/net/ipv4/neigh/default/gc_thresh1", check=False).returncode
    machine_forward = Path("/proc/sys/net/ipv4/ip_forward").read_text()
    in_netns(netns, "ip", "link", "add", "up0", "type", "veth", "peer", "name", "up1")  # the uplink, to nowhere
    in_netns(netns, "ip", "link", "set", "up0", "up")
    wrapper = lab_root / "bin" / "ansible-playbook"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nexec ip netns exec {netns} {conftest.VENV_BIN / "ansible-playbook"} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setattr(conftest, "VENV_BIN", wrapper.parent)
    root = lab_root / "host"
    (root / "sysctl.d").mkdir(parents=True)
    variables = {"host_network_netns": "", "host_network_cidr": CIDR, "host_network_bridge": BRIDGE,
                 "host_network_uplink": "up0", "host_network_dhcp": False, "host_network_supervisor": "process",
                 "host_network_install_packages": False, "host_network_config_dir": str(root / "etc"),
                 "host_network_state_dir": str(root / "state"), "host_network_sysctl_dir": str(root / "sysctl.d"),
                 "host_network_systemd_dir": str(root / "systemd")}
    runner = AnsibleRunner(lab_root)
    sysctl_file = root / "sysctl.d" / f"60-microvm-{BRIDGE}.conf"
    task = f"{ROLE} : Write the sysctls to their file and set them now"

    def live(key: str) -> str:
        return in_netns(netns, "cat", "/proc/sys/" + key.replace(".", "/")).stdout.strip()

    def run(check: bool = False, **overrides: Any) -> PlaybookResult:
        result = runner.run_role(ROLE, "host_network", check=check, extra_vars={**variables, **overrides})
        assert result.rc == 0, result.output
        return result

    assert task in run(check=True).changed_tasks()
    assert not sysctl_file.exists() and live("net.ipv4.ip_forward") == "0"

    first = run()
    assert task in first.changed_tasks() and first.task("Report")["host_network"]["sysctl_file"] == str(sysctl_file)
    assert sysctl_file.read_text().splitlines() == ["net.ipv4.ip_forward=1", f"net.ipv4.conf.{BRIDGE}.rp_filter=2"]
    assert sysctl_file.stat().st_mode & 0o777 == 0o644
    assert (live("net.ipv4.ip_forward"), live(f"net.ipv4.conf.{BRIDGE}.rp_filter")) == ("1", "2")
    assert run().changed_tasks() == [] and run(check=True).changed_tasks() == []

    # At boot systemd-sysctl applies the file before the bridge exists (a fresh namespace stands in for the
    # host then): it sets forwarding, logs that it cannot write the bridge's key, and does not fail.
    systemd_sysctl = Path("/lib/systemd/systemd-sysctl")
    assert systemd_sysctl.exists(), f"{systemd_sysctl} missing: install systemd (Debian package)"
    boot = new_netns()
    try:
        applied = in_netns(boot, str(systemd_sysctl), str(sysctl_file), check=False)
        assert applied.returncode == 0 and f"net/ipv4/conf/{BRIDGE}/rp_filter" in applied.stderr \
            and "No such file or directory" in applied.stderr, applied.stderr
        assert in_netns(boot, "cat", "/proc/sys/net/ipv4/ip_forward").stdout.strip() == "1"
    finally:
        delete_netns(boot)

    # A value changed behind the role's back is set again (live only: the file already holds it).
    in_netns(netns, "sysctl", "-q", "-w", f"net.ipv4.conf.{BRIDGE}.rp_filter=1")
    before = sysctl_file.stat().st_mtime_ns
    assert run().changed_tasks() == [task]
    assert live(f"net.ipv4.conf.{BRIDGE}.rp_filter") == "2" and sysctl_file.stat().st_mtime_ns == before

    # What the boot unit runs once it has created the bridge sets them too (systemd-sysctl skips the bridge's
    # key at boot: the bridge does not exist yet then).
    in_netns(netns, "sysctl", "-q", "-w", "net.ipv4.ip_forward=0", f"net.ipv4.conf.{BRIDGE}.rp_filter=0")
    in_netns(netns, "sh", str(root / "etc" / BRIDGE / "apply.sh"))
    assert (live("net.ipv4.ip_forward"), live(f"net.ipv4.conf.{BRIDGE}.rp_filter")) == ("1", "2")

    run(host_network_state="absent")
    assert list((root / "sysctl.d").iterdir()) == [] and not (root / "etc" / BRIDGE).exists()
    assert Path("/proc/sys/net/ipv4/ip_forward").read_text() == machine_forward


def test_host_mode_and_systemd_files_render_and_validate(lab_root):
    """What the lab cannot run (host mode, systemd units) is rendered from the role's own templates and
    checked by the tools that will read it: nftables file (loaded in a scratch namespace), dnsmasq --test,
    sh -n, systemd-analyze verify. (The sysctl file is written by ansible.posix.sysctl, not a template:
    test_host_mode_sysctls_in_their_file_and_live runs it.)"""
    need_tools()
    assert have("systemd-analyze"), "systemd-analyze missing: install systemd (Debian package)"
    role = Path(__file__).resolve().parents[2] / "roles" / "host_network"
    runner = AnsibleRunner(lab_root)
    outputs = {"nftables.nft": "__host_network_nft_file",
               "apply.sh": "__host_network_apply_script", "dnsmasq.conf": "__host_network_dnsmasq_conf",
               "microvm-network.service": "host_network_systemd_dir ~ '/' ~ __host_network_network_unit",
               "microvm-dnsmasq.service": "host_network_systemd_dir ~ '/' ~ __host_network_dhcp_unit"}
    for netns in ("", "fclab"):
        root = lab_root / (netns or "host")
        play = [{"name": "render", "hosts": "localhost", "gather_facts": False,
                 "vars_files": [str(role / "defaults" / "main.yml"), str(role / "vars" / "main.yml")],
                 "tasks": [
                     {"name": "Derived values", "ansible.builtin.set_fact": {
                         "__host_network_addr": "{{ host_network_cidr | microvm.firecracker.vm_network }}",
                         "__host_network_uplink": "eth0", "__host_network_systemd": True,
                         "__host_network_dns_local": True,
                         "__host_network_guest_dns": [GATEWAY]}},
                     {"name": "Directories",
                      "ansible.builtin.file": {"path": "{{ item }}", "state": "directory", "mode": "0755"},
                      "loop": ["{{ __host_network_conf_dir }}", "{{ host_network_systemd_dir }}"]},
                     {"name": "Render", "ansible.builtin.template": {
                         "src": str(role / "templates") + "/{{ item.key }}.j2", "dest": "{{ item.value }}",
                         "mode": "{{ '0755' if item.key == 'apply.sh' else '0644' }}"},
                      "loop": "{{ __outputs | dict2items }}",
                      "vars": {"__outputs": {name: "{{ " + expr + " }}" for name, expr in outputs.items()}}},
                 ]}]
        path = lab_root / f"render-{netns or 'host'}.yml"
        path.write_text(yaml.safe_dump(play, sort_keys=False))
        result = runner.run_playbook(path, extra_vars={
            "host_network_netns": netns, "host_network_cidr": CIDR, "host_network_dns_servers": [UPLINK_IP],
            "host_network_config_dir": str(root / "etc"), "host_network_state_dir": str(root / "state"),
            "host_network_sysctl_dir": str(root / "sysctl.d"), "host_network_systemd_dir": str(root / "systemd"),
            "host_network_guest_isolation": True})
        assert result.rc == 0, result.output
        instance = f"{netns}-{BRIDGE}" if netns else BRIDGE
        conf = root / "etc" / instance
        units = root / "systemd"

        loaded = sh("unshare", "--net", "--", "sh", "-c", 'nft -f "$1" && nft list ruleset', "-", str(conf / "nftables.nft"))
        assert f"table inet {TABLE}" in loaded.stdout and f"table bridge {TABLE}" in loaded.stdout, loaded.stdout
        assert 'oifname "eth0" masquerade' in loaded.stdout
        dnsmasq = sh("dnsmasq", "--test", "-C", str(conf / "dnsmasq.conf"), check=False)
        assert dnsmasq.returncode == 0, dnsmasq.stderr
        assert f"listen-address={GATEWAY}" in (conf / "dnsmasq.conf").read_text()
        assert sh("sh", "-n", str(conf / "apply.sh"), check=False).returncode == 0
        script = (conf / "apply.sh").read_text()
        assert ("gc_thresh3" in script) is (not netns)
        network_unit, dhcp_unit = units / f"microvm-network-{instance}.service", units / f"microvm-dnsmasq-{instance}.service"
        for unit, lines in ((network_unit, ["Type=oneshot", "RemainAfterExit=yes", f"ExecStart={conf / 'apply.sh'}",
                                            "After=network-online.target docker.service libvirtd.service",
                                            "PartOf=docker.service libvirtd.service",
                                            "WantedBy=multi-user.target docker.service libvirtd.service"]),
                            (dhcp_unit, ["Type=forking", f"PIDFile={root / 'state' / instance / 'dnsmasq.pid'}",
                                         f"ExecStart=/usr/sbin/dnsmasq -C {conf / 'dnsmasq.conf'}",
                                         "ExecReload=/bin/kill -HUP $MAINPID",
                                         f"Requires=microvm-network-{instance}.service"])):
            text = unit.read_text().splitlines()
            for line in lines + ([f"NetworkNamespacePath=/run/netns/{netns}"] if netns else []):
                assert line in text, (unit.name, line, text)
            assert not netns or f"NetworkNamespacePath=/run/netns/{netns}" in text
        verify = subprocess.run(["systemd-analyze", "verify", "--man=no", str(network_unit), str(dhcp_unit)],
                                capture_output=True, text=True, check=False,
                                env=dict(os.environ, SYSTEMD_LOG_LEVEL="warning"))
        # verify exits 0 on many problems it only warns about: any output is a finding.
        assert verify.returncode == 0 and not (verify.stdout + verify.stderr).strip(), verify.stdout + verify.stderr

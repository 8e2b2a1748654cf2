"""rootfs_inject against real ext4 images built with mkfs.ext4 -d, read back with debugfs and e2fsck.

Each test builds its own small image from a tree holding a guest-only user
(``agent``, uid 1234, which the host does not have), a symlinked directory and
a unit shipped under /usr/lib (reached through the merged-/usr ``/lib`` link).
"""
from __future__ import annotations

import grp
import hashlib
import json
import os
import pwd
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import sh, wait_for

from ansible_collections.microvm.firecracker.plugins.module_utils._rootfs_inject import tmp_name

PASSWD = "root:x:0:0:root:/root:/bin/bash\nagent:x:1234:1234:VM agent:/home/agent:/bin/sh\n"
GROUP = "root:x:0:\nagent:x:1234:\n"
UNIT = """[Unit]
Description=VM agent

[Service]
ExecStart=/opt/agent/run.sh

[Install]
WantedBy=multi-user.target
"""
SSH_UNIT = "[Unit]\nDescription=OpenSSH\n\n[Service]\nExecStart=/usr/sbin/sshd -D\n\n[Install]\nWantedBy=multi-user.target\n"
HOLD = "import sys;f=open(sys.argv[1],'rb');print('ready',flush=True);sys.stdin.read()"


def make_image(directory: Path, name: str = "vm.ext4") -> Path:
    tree = directory / (name + ".tree")
    etc = tree / "etc"
    (etc / "systemd" / "system").mkdir(parents=True)
    (tree / "usr" / "lib" / "systemd" / "system").mkdir(parents=True)
    (tree / "tmp").mkdir()
    (tree / "lib").symlink_to("usr/lib")
    (etc / "linked").symlink_to("/tmp")
    (etc / "passwd").write_text(PASSWD)
    (etc / "group").write_text(GROUP)
    (etc / "environment").write_text("LANG=C.UTF-8\n")
    (etc / "hostname").write_text("golden\n")
    (etc / "hosts").write_text("127.0.0.1\tlocalhost\n127.0.1.1\tgolden\n::1\tlocalhost ip6-localhost\n")
    (etc / "machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    (tree / "usr" / "lib" / "systemd" / "system" / "ssh.service").write_text(SSH_UNIT)
    image = directory / name
    sh("mkfs.ext4", "-q", "-d", str(tree), "-F", str(image), "32M")
    return image


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cat(image: Path, path: str) -> bytes:
    proc = subprocess.run(["debugfs", "-R", "cat %s" % path, str(image)], capture_output=True, check=True)
    return proc.stdout


def istat(image: Path, path: str) -> dict | None:
    """Type, mode, uid, gid and symlink target of an in-image path, straight from `debugfs stat`."""
    out = sh("debugfs", "-R", "stat %s" % path, str(image)).stdout
    head = re.search(r"Type: (\w+)\s+Mode:\s+(\d+)", out)
    if head is None:
        return None
    owner = re.search(r"User:\s+(\d+)\s+Group:\s+(\d+)", out)
    link = re.search(r'Fast link dest: "(.*)"', out)
    return {"type": head.group(1), "mode": int(head.group(2), 8), "uid": int(owner.group(1)),
            "gid": int(owner.group(2)), "target": link.group(1) if link else None}


def fsck_clean(image: Path) -> bool:
    return subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, check=False).returncode == 0


def inject(image: Path, name: str = "inject", **args) -> dict:
    return {"name": name, "microvm.firecracker.rootfs_inject": {"image": str(image), **args}}


def checksum(image: Path, name: str) -> dict:
    return {"name": name, "ansible.builtin.stat": {"path": str(image), "checksum_algorithm": "sha256"}}


def test_guest_user_is_not_on_the_host():
    with pytest.raises(KeyError):
        pwd.getpwnam("agent")
    with pytest.raises(KeyError):
        pwd.getpwuid(1234)
    with pytest.raises(KeyError):
        grp.getgrgid(1234)


def test_every_option_check_mode_rerun_and_readback(tmp_path, ansible):
    image = make_image(tmp_path)
    src = tmp_path / "run.sh"
    src.write_text("#!/bin/sh\nexec python3 -m http.server 8080\n")
    args = dict(
        hostname="vm1.example.test",
        reset_machine_id=True,
        directories=[dict(path="/opt/agent", owner="agent", group="agent", mode="0750"),
                     dict(path="/var/lib/agent", owner="1234")],
        files=[dict(path="/opt/agent/run.sh", src=str(src), owner="agent", group="agent", mode="0755"),
               dict(dest="/opt/agent/config.json", content='{"port": 8080}\n', owner="agent", mode="0640")],
        symlinks=[dict(path="/opt/agent/current", target="/opt/agent/run.sh")],
        systemd_units=[dict(name="agent.service", content=UNIT, enabled=True),
                       dict(name="ssh.service", enabled=True),
                       dict(name="apt-daily.timer", masked=True)],
        environment={"AGENT_PORT": 8080, "GREETING": "hello world"},
    )
    task = dict(inject(image, **args), diff=True)
    result = ansible.run([
        checksum(image, "sum0"),
        dict(task, name="check", check_mode=True),
        checksum(image, "sum1"),
        dict(task, name="apply"),
        dict(task, name="again"),
        dict(task, name="check again", check_mode=True),
    ])
    assert result.rc == 0, result.output
    check, apply_ = result.task("check"), result.task("apply")
    assert check["changed"] is True and apply_["changed"] is True
    assert result.task("sum0")["stat"]["checksum"] == result.task("sum1")["stat"]["checksum"], \
        "check mode must not touch the image"
    assert check["changes"] == apply_["changes"] and check["diff"] == apply_["diff"], \
        "check mode must predict the real run exactly"
    assert check["fsck"]["before"] and check["fsck"]["after"] is None
    assert apply_["fsck"]["before"] and apply_["fsck"]["after"]
    assert result.task("again")["changed"] is False and result.task("again")["changes"] == []
    assert result.task("check again")["changed"] is False

    changes = {(c["path"], c["action"]) for c in apply_["changes"]}
    wants = "/etc/systemd/system/multi-user.target.wants"
    assert {("/opt", "create"), ("/opt/agent", "create"), ("/opt/agent/run.sh", "create"),
            ("/etc/systemd/system/agent.service", "create"), (wants + "/agent.service", "create"),
            (wants + "/ssh.service", "create"), ("/etc/systemd/system/apt-daily.timer", "create"),
            ("/etc/environment", "update"), ("/etc/hostname", "update"), ("/etc/hosts", "update"),
            ("/etc/machine-id", "update")} <= changes
    diffs = {d["before_header"]: d for d in apply_["diff"]}
    assert diffs["/etc/hostname"]["before"] == "golden\n" and diffs["/etc/hostname"]["after"] == "vm1.example.test\n"
    assert diffs["/opt/agent/config.json"]["after"] == '{"port": 8080}\n'

    assert fsck_clean(image)
    assert cat(image, "/opt/agent/run.sh") == src.read_bytes()
    assert istat(image, "/opt/agent") == {"type": "directory", "mode": 0o750, "uid": 1234, "gid": 1234, "target": None}
    assert istat(image, "/opt/agent/run.sh") == {"type": "regular", "mode": 0o755, "uid": 1234, "gid": 1234, "target": None}
    assert istat(image, "/opt/agent/config.json")["mode"] == 0o640
    assert istat(image, "/opt/agent/config.json")["uid"] == 1234 and istat(image, "/opt/agent/config.json")["gid"] == 0
    assert istat(image, "/var/lib/agent")["uid"] == 1234
    assert istat(image, "/opt/agent/current")["target"] == "/opt/agent/run.sh"
    assert cat(image, "/etc/systemd/system/agent.service") == UNIT.encode()
    assert istat(image, wants + "/agent.service") == {"type": "symlink", "mode": 0o777, "uid": 0, "gid": 0,
                                                      "target": "/etc/systemd/system/agent.service"}
    assert istat(image, wants + "/ssh.service")["target"] == "/lib/systemd/system/ssh.service"
    assert istat(image, "/etc/systemd/system/apt-daily.timer")["target"] == "/dev/null"
    assert cat(image, "/etc/environment") == b"LANG=C.UTF-8\nAGENT_PORT=8080\nGREETING='hello world'\n"
    assert istat(image, "/etc/environment")["mode"] == 0o644
    assert cat(image, "/etc/hostname") == b"vm1.example.test\n"
    assert b"127.0.1.1\tvm1.example.test vm1\n" in cat(image, "/etc/hosts")
    assert b"::1\tlocalhost ip6-localhost\n" in cat(image, "/etc/hosts")
    assert cat(image, "/etc/machine-id") == b""
    listing = sh("debugfs", "-R", "ls /opt/agent", str(image)).stdout
    assert ".rootfs-inject-" not in listing


def test_updates_and_removals(tmp_path, ansible):
    image = make_image(tmp_path)
    setup = inject(image, "setup",
                   files=[dict(path="/opt/a/old.conf", content="old\n"), dict(path="/opt/a/keep", content="k\n")],
                   symlinks=[dict(path="/opt/a/link", target="old.conf")],
                   systemd_units=[dict(name="agent.service", content=UNIT, enabled=True),
                                  dict(name="apt-daily.timer", masked=True)],
                   environment={"A": "1", "B": "2"})
    moved = UNIT.replace("WantedBy=multi-user.target", "RequiredBy=graphical.target\nAlias=vm-agent.service")
    change = dict(
        files=[dict(path="/opt/a/old.conf", state="absent"), dict(path="/opt/a/keep", content="k2\n", mode="0600")],
        symlinks=[dict(path="/opt/a/link", state="absent")],
        directories=[dict(path="/opt/b", state="absent")],
        systemd_units=[dict(name="agent.service", content=moved, enabled=True),
                       dict(name="apt-daily.timer", masked=False)],
        environment={"A": None, "C": "3"},
    )
    replace_env = inject(image, "replace env", environment={"ONLY": "x"}, environment_strategy="replace")
    disable = inject(image, "disable", systemd_units=[dict(name="agent.service", enabled=False)])
    result = ansible.run([setup, inject(image, "change", **change), inject(image, "change again", **change),
                          replace_env, disable,
                          inject(image, "remove unit", systemd_units=[dict(name="agent.service", state="absent")])])
    assert result.rc == 0, result.output
    actions = {(c["path"], c["action"]) for c in result.task("change")["changes"]}
    sysd = "/etc/systemd/system"
    assert actions == {
        ("/opt/a/old.conf", "remove"), ("/opt/a/link", "remove"), ("/opt/a/keep", "update"),
        ("/etc/environment", "update"), (sysd + "/agent.service", "update"),
        (sysd + "/multi-user.target.wants/agent.service", "remove"),
        (sysd + "/graphical.target.requires", "create"),
        (sysd + "/graphical.target.requires/agent.service", "create"),
        (sysd + "/vm-agent.service", "create"), (sysd + "/apt-daily.timer", "remove"),
    }
    assert result.task("change again")["changed"] is False
    for name in ("replace env", "disable", "remove unit"):
        assert result.task(name)["changed"] is True, name
    assert fsck_clean(image)
    assert istat(image, "/opt/a/old.conf") is None and istat(image, "/opt/a/link") is None
    assert istat(image, "/opt/a/keep")["mode"] == 0o600 and cat(image, "/opt/a/keep") == b"k2\n"
    assert cat(image, "/etc/environment") == b"ONLY=x\n"
    assert istat(image, sysd + "/agent.service") is None
    assert istat(image, sysd + "/graphical.target.requires/agent.service") is None
    assert istat(image, sysd + "/vm-agent.service") is None
    assert istat(image, sysd + "/apt-daily.timer") is None


def test_secrets_never_shown(tmp_path, ansible):
    image = make_image(tmp_path)
    token1, token2 = "tok-5f0b1c7e-first-secret-value", "tok-9a2d4e6f-second-secret-value"
    password = "pw-3c8e1a-proxy-secret"
    public = "public-content-visible-in-diff"

    def task(name, token):
        return dict(inject(image, name,
                           files=[dict(path="/etc/agent/token", content=token, owner="agent", secret=True),
                                  dict(path="/etc/agent/public", content="%s %s\n" % (public, name))],
                           environment={"HTTPS_PROXY": "http://user:%s@proxy.test:3128" % password,
                                        "NO_PROXY": "localhost-%s" % token[4:12]},
                           environment_secret=True), diff=True)

    result = ansible.run([task("first", token1), task("second", token2)], verbosity=3)
    assert result.rc == 0, result.output
    everything = result.output + json.dumps(result.records)
    for secret in (token1, token2, password, "localhost-" + token1[4:12], "localhost-" + token2[4:12]):
        assert secret not in everything, "a secret value leaked into the output"
    second = result.task("second")
    diffs = {d["before_header"]: d for d in second["diff"]}
    assert diffs["/etc/agent/token"]["before"] == "<secret content>\n"
    assert diffs["/etc/agent/token"]["after"] == "<secret content changed>\n"
    assert diffs["/etc/environment"]["after"] == "<secret content changed>\n"
    assert {"path": "/etc/agent/token", "kind": "regular", "action": "update", "secret": True} in second["changes"]
    assert public in diffs["/etc/agent/public"]["after"], "non-secret files still show their content"
    assert "<secret content changed>" in result.output
    assert cat(image, "/etc/agent/token") == token2.encode()
    assert istat(image, "/etc/agent/token")["mode"] == 0o600 and istat(image, "/etc/agent/token")["uid"] == 1234
    assert istat(image, "/etc/environment")["mode"] == 0o600
    assert password.encode() in cat(image, "/etc/environment")


def test_refuses_bad_requests_without_touching_the_image(tmp_path, ansible):
    image = make_image(tmp_path)
    cases = {
        "dotdot": dict(files=[dict(path="/etc/../root/x", content="x")]),
        "slashes": dict(files=[dict(path="/etc//x", content="x")]),
        "symlinked parent": dict(files=[dict(path="/etc/linked/evil", content="x")]),
        "missing src": dict(files=[dict(path="/etc/ok", content="fine\n"),
                                   dict(path="/etc/x", src=str(tmp_path / "does-not-exist"))]),
        "unknown owner": dict(files=[dict(path="/etc/x", content="x", owner="nobody-here")]),
        "bad env key": dict(environment={"BAD-KEY": "x"}),
        "env newline": dict(environment={"K": "a\nb"}),
    }
    tasks = [checksum(image, "sum0")]
    tasks += [dict(inject(image, name, **args), ignore_errors=True) for name, args in cases.items()]
    tasks.append(checksum(image, "sum1"))
    result = ansible.run(tasks)
    assert result.rc == 0, result.output
    prefix = "rootfs_inject %s: " % image
    expected = {
        "dotdot": "/etc/../root/x: files[0] path must not contain .. components",
        "slashes": "/etc//x: files[0] path must be normalised (contains //)",
        "symlinked parent": "/etc/linked/evil: parent /etc/linked is a symlink in the image (-> /tmp); refusing",
        "missing src": "/etc/x: src %s does not exist on the managed host" % (tmp_path / "does-not-exist"),
        "unknown owner": "/etc/x: owner 'nobody-here' is not defined in the image's /etc/passwd",
        "bad env key": "/etc/environment: environment key 'BAD-KEY' is not a valid name",
        "env newline": "/etc/environment: the value of K contains a newline",
    }
    for name, message in expected.items():
        assert result.status(name) == "failed", name
        assert result.task(name)["msg"].startswith(prefix + message), result.task(name)["msg"]
    assert result.task("sum0")["stat"]["checksum"] == result.task("sum1")["stat"]["checksum"]
    assert istat(image, "/etc/ok") is None


def test_refuses_image_in_use(tmp_path, ansible, process_reaper):
    held = make_image(tmp_path, "held.ext4")
    alias = tmp_path / "jail-view.ext4"
    os.link(held, alias)  # a jailed VMM sees the image under another name
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(alias)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    process_reaper.append(holder)
    wait_for(lambda: any(os.path.realpath("/proc/%d/fd/%s" % (holder.pid, fd)) == str(alias)
                         for fd in os.listdir("/proc/%d/fd" % holder.pid)), 10, "holder to open the image")
    looped = make_image(tmp_path, "looped.ext4")
    loop = sh("losetup", "-f", "--show", str(looped)).stdout.strip()
    try:
        before = (digest(held), digest(looped))
        result = ansible.run([
            dict(inject(held, "held", hostname="vm1"), ignore_errors=True),
            dict(inject(looped, "looped", hostname="vm1"), ignore_errors=True),
            dict(inject(held, "held check", hostname="vm1"), ignore_errors=True, check_mode=True),
        ])
        assert result.rc == 0, result.output
        for name in ("held", "held check"):
            msg = result.task(name)["msg"]
            assert result.status(name) == "failed"
            assert msg.startswith("rootfs_inject %s: open by pid %d (python" % (held, holder.pid)), msg
            assert "refusing to modify an image in use" in msg
        msg = result.task("looped")["msg"]
        assert msg.startswith("rootfs_inject %s: attached to loop device %s" % (looped, loop)), msg
        assert (digest(held), digest(looped)) == before
    finally:
        sh("losetup", "-d", loop, check=False)


def test_refuses_damaged_images(tmp_path, ansible):
    links = make_image(tmp_path, "links.ext4")
    sh("debugfs", "-w", "-R", "sif /etc/hostname links_count 7", str(links))
    magic = make_image(tmp_path, "magic.ext4")
    with open(magic, "r+b") as handle:
        handle.seek(1024 + 0x38)
        handle.write(b"\0\0")
    before = (digest(links), digest(magic))
    result = ansible.run([
        dict(inject(links, "links", hostname="vm1"), ignore_errors=True),
        dict(inject(magic, "magic", hostname="vm1"), ignore_errors=True),
    ])
    assert result.rc == 0, result.output
    msg = result.task("links")["msg"]
    assert msg.startswith("rootfs_inject %s: before writing, e2fsck -fn found problems (exit 4), nothing was written: "
                          % links), msg
    assert "ref count is 7, should be 1" in msg and re.search(r"\d+/\d+ files", msg), msg
    msg = result.task("magic")["msg"]
    assert msg.startswith("rootfs_inject %s: not an ext2/3/4 filesystem (bad superblock magic), nothing was written"
                          % magic), msg
    assert (digest(links), digest(magic)) == before


def test_interrupted_write_leftovers_are_cleaned_and_redone(tmp_path, ansible):
    image = make_image(tmp_path)
    full = "setting=%s\n" % ("x" * 5000)
    partial = tmp_path / "partial"
    partial.write_text(full[:1000])
    # Run 1 was cut off after writing half of each temporary file: one destination holds a
    # truncated earlier copy, the other had already been removed before the link.
    script = "\n".join([
        "write %s %s" % (partial, tmp_name("/etc/app.conf")),
        "write %s /etc/app.conf" % partial,
        "write %s %s" % (partial, tmp_name("/etc/other.conf")),
    ]) + "\n"
    subprocess.run(["debugfs", "-w", "-f", "-", str(image)], input=script, text=True, capture_output=True, check=True)
    assert istat(image, tmp_name("/etc/app.conf"))["type"] == "regular" and fsck_clean(image)
    task = inject(image, files=[dict(path="/etc/app.conf", content=full), dict(path="/etc/other.conf", content=full)])
    result = ansible.run([task, dict(task, name="again")])
    assert result.rc == 0, result.output
    assert [(c["path"], c["action"]) for c in result.task("inject")["changes"]] == [
        (tmp_name("/etc/app.conf"), "remove_leftover"), (tmp_name("/etc/other.conf"), "remove_leftover"),
        ("/etc/app.conf", "update"), ("/etc/other.conf", "create")]
    assert result.task("again")["changed"] is False
    assert cat(image, "/etc/app.conf") == full.encode() and cat(image, "/etc/other.conf") == full.encode()
    assert istat(image, tmp_name("/etc/app.conf")) is None and istat(image, tmp_name("/etc/other.conf")) is None
    assert fsck_clean(image)

"""rootfs_inject planning on an in-memory image: validation, environment, hosts, units, diffs (no debugfs)."""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Dict, List, Optional

import pytest

from ansible_collections.microvm.firecracker.plugins.module_utils import _rootfs_inject as ri
from ansible_collections.microvm.firecracker.plugins.module_utils._ext4 import Inode

PASSWD = "root:x:0:0:root:/root:/bin/sh\nagent:x:1234:1234::/home/agent:/bin/sh\n"
GROUP = "root:x:0:\nagent:x:1234:\n"
UNIT = "[Unit]\nDescription=agent\n\n[Service]\nExecStart=/bin/true\n\n[Install]\nWantedBy=multi-user.target\n"


@dataclass
class Node:
    kind: str
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    data: bytes = b""
    target: str = ""


class FakeImage:
    """An in-memory filesystem with the ImageReader interface, and ops applied the way debugfs would."""

    def __init__(self, tmp_path, nodes: Optional[Dict[str, Node]] = None) -> None:
        self.tmp = tmp_path
        self.nodes: Dict[str, Node] = {"/": Node("directory", 0o755)}
        for path in ("/etc", "/etc/systemd", "/etc/systemd/system", "/tmp"):
            self.nodes[path] = Node("directory", 0o755)
        self.nodes["/etc/passwd"] = Node("regular", data=PASSWD.encode())
        self.nodes["/etc/group"] = Node("regular", data=GROUP.encode())
        self.nodes.update(nodes or {})
        self.counter = 0
        self.prefetches = 0

    # reader interface
    def prefetch(self, stats=(), contents=(), listings=()):
        self.prefetches += 1

    def stat(self, path):
        node = self.nodes.get(path)
        if node is None:
            return None
        size = len(node.target.encode()) if node.kind == "symlink" else len(node.data)
        target = node.target.encode() if node.kind == "symlink" else None
        return Inode(number=1, kind=node.kind, mode=node.mode, uid=node.uid, gid=node.gid, size=size, links=1,
                     target=target)

    def content_file(self, path):
        node = self.nodes.get(path)
        if node is None or node.kind != "regular":
            return None
        self.counter += 1
        host = self.tmp / ("dump-%d" % self.counter)
        host.write_bytes(node.data)
        return str(host)

    def text(self, path):
        node = self.nodes.get(path)
        return node.data.decode() if node is not None and node.kind == "regular" else None

    def symlink_target(self, path):
        node = self.nodes.get(path)
        return node.target if node is not None and node.kind == "symlink" else None

    def listing(self, path):
        prefix = path.rstrip("/") + "/"
        return [".", ".."] + [p[len(prefix):] for p in self.nodes if p.startswith(prefix) and "/" not in p[len(prefix):]]

    # applying
    def apply(self, ops: List[ri.Op]) -> None:
        for op in ops:
            if op.action in ("remove", "remove_leftover", "rmdir"):
                del self.nodes[op.path]
            elif op.action == "mkdir":
                self.nodes[op.path] = Node("directory", op.mode, op.uid, op.gid)
            elif op.action == "attributes":
                node = self.nodes[op.path]
                self.nodes[op.path] = replace(node, mode=op.mode, uid=op.uid, gid=op.gid)
            elif op.action == "write":
                self.nodes[op.path] = Node("regular", op.mode, op.uid, op.gid, op.content.read())
            elif op.action == "symlink":
                self.nodes[op.path] = Node("symlink", 0o777, target=op.target)


def request(tmp_path, **params):
    return ri.build_request(params, str(tmp_path))


def plan(image, tmp_path, **params):
    return ri.plan(request(tmp_path, **params), image)


def converge(image, tmp_path, **params):
    first = plan(image, tmp_path, **params)
    image.apply(first.ops)
    second = plan(image, tmp_path, **params)
    assert second.ops == [], second.changes
    return first


# --------------------------------------------------------------------------
# Paths


@pytest.mark.parametrize("path", ["/etc/foo", "/opt/a b/c", "/etc/systemd/system/x@y.service", "/é"])
def test_good_paths(path):
    assert ri.check_guest_path(path) == path


@pytest.mark.parametrize("path, fragment", [
    ("etc/foo", "absolute"),
    ("/etc//foo", "//"),
    ("/etc/./foo", ". component"),
    ("/etc/../foo", ".."),
    ("/..", ".."),
    ("/etc/foo/", "end with /"),
    ("/", "root directory"),
    ("/etc/fo\x00o", "NUL"),
    ("/etc/fo\no", "control character"),
    ("", "non-empty"),
    (None, "non-empty"),
    ("/" + "a" * 256, "longer than 255"),
    ("/a" * 2100, "longer than 4095"),
])
def test_bad_paths(path, fragment):
    with pytest.raises(ri.InjectError, match=fragment.replace(".", r"\.").replace("/", "/")):
        ri.check_guest_path(path)


def test_ancestors_and_tmp_name():
    assert ri.ancestors("/a/b/c") == ["/a", "/a/b"]
    assert ri.ancestors("/a") == []
    name = ri.tmp_name("/etc/systemd/system/agent.service")
    assert name.startswith("/etc/systemd/system/.rootfs-inject-") and name.endswith(".tmp")
    assert ri.tmp_name("/x").startswith("/.rootfs-inject-")
    assert ri.tmp_name("/etc/" + "x" * 255).count("/") == 2 and len(ri.tmp_name("/etc/" + "x" * 255)) < 60


@pytest.mark.parametrize("value, mode", [("0644", 0o644), ("644", 0o644), ("0o750", 0o750), ("4755", 0o4755),
                                         (0o600, 0o600), (None, None)])
def test_parse_mode(value, mode):
    assert ri.parse_mode(value, "/x") == mode


@pytest.mark.parametrize("value", ["u+rwx", "0999", "77777", True, 0o10000, 1.5])
def test_parse_mode_refuses(value):
    with pytest.raises(ri.InjectError):
        ri.parse_mode(value, "/x")


# --------------------------------------------------------------------------
# /etc/environment


def test_environment_validation():
    assert ri.check_environment({"A": "1", "_b": 2, "C": None}) == {"A": "1", "_b": "2", "C": None}
    for env, fragment in [({"1A": "x"}, "not a valid name"), ({"A-B": "x"}, "not a valid name"),
                          ({"A": "x\ny"}, "newline"), ({"A": "x\x00"}, "NUL"), ({"A": "x#y"}, "comment"),
                          ({"A": True}, "boolean"), ({"A": "it's \"x\""}, "cannot be written")]:
        with pytest.raises(ri.InjectError, match=fragment):
            ri.check_environment(env)


def test_environment_errors_never_echo_values():
    secret = "hunter2-\n-secret"
    with pytest.raises(ri.InjectError) as info:
        ri.check_environment({"TOKEN": secret})
    assert "hunter2" not in str(info.value) and "TOKEN" in str(info.value)


@pytest.mark.parametrize("value, rendered", [
    ("C.UTF-8", "C.UTF-8"),
    ("http://proxy:3128", "http://proxy:3128"),
    ("", ""),
    ("a b", "'a b'"),
    ('say "hi" $HOME', "'say \"hi\" $HOME'"),
    ("it's", '"it\'s"'),
])
def test_render_env_value(value, rendered):
    assert ri.render_env_value("K", value) == rendered
    assert ri.parse_env_line("K=" + rendered) == ("K", value)


def test_render_environment_replace():
    text = ri.render_environment({"B": "2", "A": "x y", "C": None}, "replace", "OLD=1\n")
    assert text == "B=2\nA='x y'\n"
    assert ri.render_environment({}, "replace", "OLD=1\n") == ""


def test_render_environment_merge():
    existing = "# comment\nLANG=C.UTF-8\nexport A='1'\nB=old\nB=dup\nnot a line\n"
    text = ri.render_environment({"A": "1", "B": "new", "LANG": None, "D": "d"}, "merge", existing)
    assert text == "# comment\nexport A='1'\nB=new\nnot a line\nD=d\n"
    assert ri.render_environment({"A": "1", "B": "new", "LANG": None, "D": "d"}, "merge", text) == text
    assert ri.render_environment({"A": "1"}, "merge", None) == "A=1\n"
    assert ri.parse_environment(text) == {"A": "1", "B": "new", "D": "d"}


# --------------------------------------------------------------------------
# /etc/hosts


def test_render_hosts():
    assert "127.0.1.1\tvm1\n" in ri.render_hosts(None, "vm1")
    existing = "127.0.0.1\tlocalhost\n127.0.1.1\tgolden\n127.0.1.1 other\n::1 localhost\n"
    assert ri.render_hosts(existing, "vm1.example.com") == \
        "127.0.0.1\tlocalhost\n127.0.1.1\tvm1.example.com vm1\n::1 localhost\n"
    kept = "127.0.0.1 localhost\n127.0.1.1   vm1   # mine\n"
    assert ri.render_hosts(kept, "vm1") == kept
    assert ri.render_hosts("::1 localhost\n127.0.0.1 localhost\n10.0.0.1 x\n", "vm1") == \
        "::1 localhost\n127.0.0.1 localhost\n127.0.1.1\tvm1\n10.0.0.1 x\n"


@pytest.mark.parametrize("name", ["-bad", "bad-", "a..b", "a_b", "x" * 65, ""])
def test_bad_hostnames(name):
    with pytest.raises(ri.InjectError):
        ri.check_hostname(name)


# --------------------------------------------------------------------------
# systemd [Install]


def test_install_links_wantedby_requiredby_alias():
    text = ("[Unit]\nWantedBy=ignored.target\n[Install]\nWantedBy=multi-user.target \\\n  graphical.target\n"
            "RequiredBy=x.target\n; comment\nAlias=agent-alias.service\nAlso=other.service\n")
    assert ri.install_links("agent.service", "/etc/systemd/system/agent.service", text) == [
        ("/etc/systemd/system/multi-user.target.wants/agent.service", "/etc/systemd/system/agent.service"),
        ("/etc/systemd/system/graphical.target.wants/agent.service", "/etc/systemd/system/agent.service"),
        ("/etc/systemd/system/x.target.requires/agent.service", "/etc/systemd/system/agent.service"),
        ("/etc/systemd/system/agent-alias.service", "/etc/systemd/system/agent.service"),
    ]


def test_install_empty_assignment_resets():
    text = "[Install]\nWantedBy=a.target\nWantedBy=\nWantedBy=b.target\n"
    assert [link for link, _target in ri.install_links("u.service", "/p", text)] == \
        ["/etc/systemd/system/b.target.wants/u.service"]


def test_install_template_units():
    text = "[Install]\nWantedBy=multi-user.target\nDefaultInstance=one\n"
    assert ri.install_links("getty@.service", "/lib/systemd/system/getty@.service", text) == [
        ("/etc/systemd/system/multi-user.target.wants/getty@one.service", "/lib/systemd/system/getty@.service")]
    with pytest.raises(ri.InjectError, match="DefaultInstance"):
        ri.install_links("getty@.service", "/p", "[Install]\nWantedBy=multi-user.target\n")


@pytest.mark.parametrize("text, fragment", [
    ("[Install]\nWantedBy=%i.target\n", "specifier"),
    ("[Install]\nAlias=other.socket\n", "suffix"),
    ("[Install]\nWantedBy=../../etc/passwd\n", "not a valid unit name"),
])
def test_install_refusals(text, fragment):
    with pytest.raises(ri.InjectError, match=fragment):
        ri.install_links("a.service", "/etc/systemd/system/a.service", text)


def test_no_install_section():
    assert ri.install_links("a.service", "/p", "[Service]\nExecStart=/bin/true\n") == []


@pytest.mark.parametrize("name", ["a.service", "getty@.service", "getty@tty1.service", "x-y_z.timer", "a.b.mount"])
def test_unit_names(name):
    assert ri.check_unit_name(name) == name


@pytest.mark.parametrize("name", ["a", "a.conf", "../a.service", "a/b.service", "a b.service", ""])
def test_bad_unit_names(name):
    with pytest.raises(ri.InjectError):
        ri.check_unit_name(name)


# --------------------------------------------------------------------------
# Owners


def test_id_tables():
    users = ri.parse_id_table(PASSWD)
    assert users == {"root": 0, "agent": 1234}
    assert ri.resolve_id("agent", users, "/etc/passwd", "owner", "/x") == 1234
    assert ri.resolve_id("4321", users, "/etc/passwd", "owner", "/x") == 4321
    with pytest.raises(ri.InjectError, match="'nobody' is not defined in the image's /etc/passwd"):
        ri.resolve_id("nobody", users, "/etc/passwd", "owner", "/x")
    assert ri.id_label(1234, users) == "agent (1234)" and ri.id_label(7, users) == "7"


# --------------------------------------------------------------------------
# Planning


def test_new_files_dirs_and_owner_from_image(tmp_path):
    image = FakeImage(tmp_path)
    first = converge(image, tmp_path,
                     files=[dict(path="/opt/agent/run.sh", content="#!/bin/sh\n", owner="agent", group="agent",
                                 mode="0750")],
                     directories=[dict(path="/opt/agent", owner="agent", mode="0700")])
    assert [(c["path"], c["action"]) for c in first.changes] == [
        ("/opt", "create"), ("/opt/agent", "create"), ("/opt/agent/run.sh", "create")]
    assert image.nodes["/opt"] == Node("directory", 0o755, 0, 0)
    assert image.nodes["/opt/agent"] == Node("directory", 0o700, 1234, 0)
    assert image.nodes["/opt/agent/run.sh"] == Node("regular", 0o750, 1234, 1234, b"#!/bin/sh\n")


def test_unknown_owner_is_refused(tmp_path):
    with pytest.raises(ri.InjectError, match="owner 'ghost' is not defined in the image's /etc/passwd"):
        plan(FakeImage(tmp_path), tmp_path, files=[dict(path="/x", content="", owner="ghost")])


def test_existing_attributes_kept_unless_given(tmp_path):
    image = FakeImage(tmp_path, {"/etc/app.conf": Node("regular", 0o640, 1234, 1234, b"old\n")})
    converge(image, tmp_path, files=[dict(path="/etc/app.conf", content="new\n")])
    assert image.nodes["/etc/app.conf"] == Node("regular", 0o640, 1234, 1234, b"new\n")
    result = converge(image, tmp_path, files=[dict(path="/etc/app.conf", content="new\n", mode="0600")])
    assert [(c["action"]) for c in result.changes] == ["attributes"]
    assert result.diffs[0]["before"]["mode"] == "0640" and result.diffs[0]["after"]["mode"] == "0600"


def test_symlinked_parent_is_refused(tmp_path):
    image = FakeImage(tmp_path, {"/etc/foo": Node("symlink", 0o777, target="/tmp")})
    with pytest.raises(ri.InjectError) as info:
        plan(image, tmp_path, files=[dict(path="/etc/foo/bar", content="x")])
    assert str(info.value) == "/etc/foo/bar: parent /etc/foo is a symlink in the image (-> /tmp); refusing"
    with pytest.raises(ri.InjectError, match="parent /etc/foo is a symlink"):
        plan(image, tmp_path, files=[dict(path="/etc/foo/bar", state="absent")])
    with pytest.raises(ri.InjectError, match="is a symlink in the image"):
        plan(image, tmp_path, directories=[dict(path="/etc/foo")])


def test_file_parent_is_refused(tmp_path):
    with pytest.raises(ri.InjectError, match="parent /etc/passwd is not a directory"):
        plan(FakeImage(tmp_path), tmp_path, files=[dict(path="/etc/passwd/x", content="x")])


def test_symlink_at_destination_is_replaced_not_followed(tmp_path):
    image = FakeImage(tmp_path, {"/etc/resolv.conf": Node("symlink", 0o777, target="/run/resolv.conf")})
    result = converge(image, tmp_path, files=[dict(path="/etc/resolv.conf", content="nameserver 198.18.0.1\n")])
    assert result.changes[0]["action"] == "replace" and result.ops[0].replace
    assert image.nodes["/etc/resolv.conf"].kind == "regular" and "/run/resolv.conf" not in image.nodes


def test_secret_file_diff_and_mode(tmp_path):
    image = FakeImage(tmp_path, {"/etc/token": Node("regular", 0o644, data=b"old-secret")})
    result = converge(image, tmp_path, files=[dict(path="/etc/token", content="new-secret", secret=True)])
    assert result.changes[0] == {"path": "/etc/token", "kind": "regular", "action": "update", "secret": True}
    texts = repr(result.diffs) + repr(result.changes)
    assert "secret" in texts and "old-secret" not in texts and "new-secret" not in texts
    assert result.diffs[0]["before"] == ri.SECRET_BEFORE and result.diffs[0]["after"] == ri.SECRET_AFTER
    assert image.nodes["/etc/token"].mode == 0o600


def test_non_secret_diff_shows_content(tmp_path):
    image = FakeImage(tmp_path, {"/etc/motd": Node("regular", data=b"old\n")})
    result = plan(image, tmp_path, files=[dict(path="/etc/motd", content="new\n")])
    assert result.diffs == [{"before_header": "/etc/motd", "after_header": "/etc/motd", "before": "old\n",
                             "after": "new\n"}]


def test_removed_content_is_never_shown(tmp_path):
    image = FakeImage(tmp_path, {"/etc/old-token": Node("regular", data=b"s3cret")})
    result = converge(image, tmp_path, files=[dict(path="/etc/old-token", state="absent")])
    assert result.changes == [{"path": "/etc/old-token", "kind": "regular", "action": "remove"}]
    assert "s3cret" not in repr(result.diffs)


def test_environment_secret(tmp_path):
    image = FakeImage(tmp_path, {"/etc/environment": Node("regular", data=b"LANG=C.UTF-8\n")})
    result = converge(image, tmp_path, environment={"HTTPS_PROXY": "http://u:pw@p:3128"}, environment_secret=True)
    assert image.nodes["/etc/environment"] == Node("regular", 0o600, 0, 0,
                                                   b"LANG=C.UTF-8\nHTTPS_PROXY=http://u:pw@p:3128\n")
    assert "pw@" not in repr(result.diffs) and result.changes[0]["secret"] is True


def test_environment_replace_and_merge(tmp_path):
    image = FakeImage(tmp_path, {"/etc/environment": Node("regular", data=b"LANG=C.UTF-8\nOLD=1\n")})
    converge(image, tmp_path, environment={"A": "1", "OLD": None})
    assert image.nodes["/etc/environment"].data == b"LANG=C.UTF-8\nA=1\n"
    converge(image, tmp_path, environment={"B": "2"}, environment_strategy="replace")
    assert image.nodes["/etc/environment"].data == b"B=2\n"


def test_secret_values_for_no_log():
    params = dict(files=[dict(content="tok", secret=True), dict(content="public", secret=False)],
                  environment={"A": "x", "B": 5, "C": None}, environment_secret=True)
    assert ri.secret_values(params) == {"tok", "x", "5"}
    assert ri.secret_values(dict(environment={"A": "x"}, environment_secret=False)) == set()


def test_hostname_hosts_and_machine_id(tmp_path):
    image = FakeImage(tmp_path, {"/etc/hostname": Node("regular", data=b"golden\n"),
                                 "/etc/hosts": Node("regular", data=b"127.0.0.1 localhost\n127.0.1.1 golden\n"),
                                 "/etc/machine-id": Node("regular", 0o444, data=b"0123456789abcdef\n")})
    converge(image, tmp_path, hostname="vm1", reset_machine_id=True)
    assert image.nodes["/etc/hostname"].data == b"vm1\n"
    assert image.nodes["/etc/hosts"].data == b"127.0.0.1 localhost\n127.0.1.1\tvm1\n"
    assert image.nodes["/etc/machine-id"] == Node("regular", 0o444, 0, 0, b"")
    converge(image, tmp_path, hostname="vm2", hosts_entry=False)
    assert image.nodes["/etc/hosts"].data == b"127.0.0.1 localhost\n127.0.1.1\tvm1\n"


def test_unit_enable_links(tmp_path):
    image = FakeImage(tmp_path)
    result = converge(image, tmp_path, systemd_units=[dict(name="agent.service", content=UNIT, enabled=True)])
    link = "/etc/systemd/system/multi-user.target.wants/agent.service"
    assert image.nodes[link] == Node("symlink", 0o777, target="/etc/systemd/system/agent.service")
    assert image.nodes["/etc/systemd/system/agent.service"] == Node("regular", 0o644, 0, 0, UNIT.encode())
    assert {(c["path"], c["action"]) for c in result.changes} == {
        ("/etc/systemd/system/multi-user.target.wants", "create"),
        ("/etc/systemd/system/agent.service", "create"), (link, "create")}


def test_unit_install_change_moves_links(tmp_path):
    image = FakeImage(tmp_path)
    converge(image, tmp_path, systemd_units=[dict(name="agent.service", content=UNIT, enabled=True)])
    changed = UNIT.replace("multi-user.target", "graphical.target")
    converge(image, tmp_path, systemd_units=[dict(name="agent.service", content=changed, enabled=True)])
    assert "/etc/systemd/system/multi-user.target.wants/agent.service" not in image.nodes
    assert image.nodes["/etc/systemd/system/graphical.target.wants/agent.service"].kind == "symlink"
    converge(image, tmp_path, systemd_units=[dict(name="agent.service", content=changed, enabled=False)])
    assert "/etc/systemd/system/graphical.target.wants/agent.service" not in image.nodes
    converge(image, tmp_path, systemd_units=[dict(name="agent.service", state="absent")])
    assert "/etc/systemd/system/agent.service" not in image.nodes


def test_unit_enable_from_image_and_mask(tmp_path):
    image = FakeImage(tmp_path, {
        "/lib": Node("symlink", 0o777, target="usr/lib"),
        "/lib/systemd/system/ssh.service": Node("regular", data=b"[Install]\nWantedBy=multi-user.target\n"),
    })
    converge(image, tmp_path, systemd_units=[dict(name="ssh.service", enabled=True),
                                             dict(name="apt-daily.timer", masked=True)])
    assert image.nodes["/etc/systemd/system/multi-user.target.wants/ssh.service"].target == \
        "/lib/systemd/system/ssh.service"
    assert image.nodes["/etc/systemd/system/apt-daily.timer"].target == "/dev/null"
    converge(image, tmp_path, systemd_units=[dict(name="apt-daily.timer", masked=False)])
    assert "/etc/systemd/system/apt-daily.timer" not in image.nodes
    with pytest.raises(ri.InjectError, match="not in the image"):
        plan(image, tmp_path, systemd_units=[dict(name="missing.service", enabled=True)])


def test_unit_request_validation(tmp_path):
    for unit, fragment in [(dict(name="a.service", content="x", masked=True), "masked"),
                           (dict(name="a.service", masked=True, enabled=True), "both masked and enabled"),
                           (dict(name="a.service"), "give content"),
                           (dict(name="a.service", content="[Service]\n", enabled=True), "cannot be enabled")]:
        with pytest.raises(ri.InjectError, match=fragment):
            plan(FakeImage(tmp_path), tmp_path, systemd_units=[unit])


def test_conflicts(tmp_path):
    with pytest.raises(ri.InjectError, match="managed twice"):
        plan(FakeImage(tmp_path), tmp_path, files=[dict(path="/etc/hostname", content="x\n")], hostname="vm1")
    with pytest.raises(ri.InjectError, match="both present"):
        plan(FakeImage(tmp_path), tmp_path, files=[dict(path="/x", content=""), dict(path="/x", state="absent")])
    with pytest.raises(ri.InjectError, match="parent /x is managed as a file"):
        plan(FakeImage(tmp_path), tmp_path, files=[dict(path="/x", content=""), dict(path="/x/y", content="")])


def test_leftover_temporary_name_is_removed_first(tmp_path):
    tmp = ri.tmp_name("/etc/app.conf")
    image = FakeImage(tmp_path, {tmp: Node("regular", data=b"half"), "/etc/app.conf": Node("regular", data=b"ha")})
    result = converge(image, tmp_path, files=[dict(path="/etc/app.conf", content="half of it\n")])
    assert [(c["path"], c["action"]) for c in result.changes] == [(tmp, "remove_leftover"), ("/etc/app.conf", "update")]
    assert tmp not in image.nodes


def test_directory_absent_must_be_empty(tmp_path):
    image = FakeImage(tmp_path, {"/opt": Node("directory", 0o755), "/opt/a": Node("regular")})
    with pytest.raises(ri.InjectError, match="not empty"):
        plan(image, tmp_path, directories=[dict(path="/opt", state="absent")])
    converge(image, tmp_path, directories=[dict(path="/opt", state="absent")], files=[dict(path="/opt/a", state="absent")])
    assert "/opt" not in image.nodes


def test_symlinks_option(tmp_path):
    image = FakeImage(tmp_path, {"/etc/l": Node("symlink", 0o777, target="old")})
    result = converge(image, tmp_path, symlinks=[dict(path="/etc/l", target="new"), dict(path="/opt/x/l", target="../y")])
    assert image.nodes["/etc/l"].target == "new" and image.nodes["/opt/x/l"].target == "../y"
    assert ("/etc/l", "update") in [(c["path"], c["action"]) for c in result.changes]
    with pytest.raises(ri.InjectError, match="not a symlink"):
        plan(image, tmp_path, symlinks=[dict(path="/etc/passwd", state="absent")])
    converge(image, tmp_path, symlinks=[dict(path="/etc/l", state="absent")])
    assert "/etc/l" not in image.nodes


def test_missing_src_is_reported_before_planning(tmp_path):
    with pytest.raises(ri.InjectError, match="src .*/nope does not exist on the managed host"):
        request(tmp_path, files=[dict(path="/x", src=str(tmp_path / "nope"))])
    src = tmp_path / "data"
    src.write_bytes(b"payload")
    req = request(tmp_path, files=[dict(path="/x", src=str(src))])
    assert req.files[0].content.read() == b"payload"
    assert os.path.dirname(req.files[0].content.host_path) == str(tmp_path)


def test_compile_ops_writes_through_a_temporary_name(tmp_path):
    image = FakeImage(tmp_path, {"/etc/app.conf": Node("regular", data=b"old")})
    result = plan(image, tmp_path, files=[dict(path="/etc/app.conf", content="new", owner="agent", mode="0640")])
    commands = ri.compile_ops(result.ops, str(tmp_path))
    tmp = ri.tmp_name("/etc/app.conf")
    host = commands[0].split('"')[1]
    assert open(host, "rb").read() == b"new" and (os.stat(host).st_mode & 0o777) == 0o600
    assert commands == [
        'write "%s" "%s"' % (host, tmp),
        'sif "%s" "mode" "0100640"' % tmp,
        'sif "%s" "uid" "1234"' % tmp,
        'sif "%s" "gid" "0"' % tmp,
        'rm "/etc/app.conf"',
        'ln "%s" "/etc/app.conf"' % tmp,
        'unlink "%s"' % tmp,
    ]


def test_compile_ops_directories_and_symlinks(tmp_path):
    image = FakeImage(tmp_path)
    result = plan(image, tmp_path, directories=[dict(path="/srv", mode="0750")],
                  symlinks=[dict(path="/srv/l", target="/x y")])
    commands = ri.compile_ops(result.ops, str(tmp_path))
    tmp = ri.tmp_name("/srv/l")
    assert commands == ['mkdir "/srv"', 'sif "/srv" "mode" "040750"', 'sif "/srv" "uid" "0"', 'sif "/srv" "gid" "0"',
                        'symlink "%s" "/x y"' % tmp, 'ln "%s" "/srv/l"' % tmp, 'unlink "%s"' % tmp]


def test_a_unit_to_enable_is_checked_before_any_image_is_read(tmp_path):
    """build_request refuses a unit with content that could not be enabled: no image is needed to know."""
    with pytest.raises(ri.InjectError, match="cannot be enabled"):
        ri.build_request({"systemd_units": [dict(name="a.service", content="[Service]\n", enabled=True)]}, str(tmp_path))
    request = ri.build_request({"systemd_units": [dict(name="a.service", content="[Service]\n", enabled=False)]},
                               str(tmp_path))
    assert [unit.name for unit in request.units] == ["a.service"]

from __future__ import annotations

import pytest

from ansible_collections.microvm.firecracker.plugins.module_utils._ifnames import (
    ifname_problem,
    resolve_gid,
    resolve_uid,
)


@pytest.mark.parametrize("name", ["fcbr0", "fc-vm1", "a", "tap_1.2+3", "x" * 15])
def test_valid_interface_names(name):
    assert ifname_problem(name) is None


@pytest.mark.parametrize("name, fragment", [
    ("", "empty"),
    ("x" * 16, "16 bytes long"),
    ("é" * 8, "16 bytes long"),
    ("fc vm", "may only contain"),
    ("fc/vm", "may only contain"),
    ("fc:0", "may only contain"),
    (".", "not valid"),
    ("..", "not valid"),
    (None, "empty"),
])
def test_invalid_interface_names(name, fragment):
    assert fragment in ifname_problem(name)


def test_numeric_ids_are_taken_as_is():
    assert resolve_uid(4242) == 4242
    assert resolve_uid("4242") == 4242
    assert resolve_gid(" 17 ") == 17


def test_names_resolve_and_unknown_names_fail():
    assert resolve_uid("root") == 0
    assert resolve_gid("root") == 0
    with pytest.raises(KeyError, match="unknown user 'no-such-user-x'"):
        resolve_uid("no-such-user-x")
    with pytest.raises(KeyError, match="unknown group 'no-such-group-x'"):
        resolve_gid("no-such-group-x")

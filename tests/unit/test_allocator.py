"""The address allocator's pool derivation and planning (no lock contention here; see integration)."""
from __future__ import annotations

import ipaddress

import pytest

from ansible_collections.microvm.firecracker.plugins.module_utils._allocator import (
    AllocationError,
    Allocator,
    mac_for,
    make_pool,
    tap_for,
)


def test_pool_is_derived_from_the_cidr():
    pool = make_pool("198.18.80.0/24")
    assert (str(pool.gateway), str(pool.first), str(pool.last), pool.size) == (
        "198.18.80.1", "198.18.80.2", "198.18.80.254", 253)
    custom = make_pool("198.18.80.0/24", gateway="198.18.80.254", pool_start="198.18.80.10", pool_end="198.18.80.20")
    assert (str(custom.gateway), custom.size) == ("198.18.80.254", 11)


@pytest.mark.parametrize("args, fragment", [
    (("198.18.80.0/33",), "not an IPv4 network"),
    (("198.18.80.1/24",), "not an IPv4 network"),
    (("198.18.80.0/30",), "too small"),
    (("198.18.80.0/24", None, "198.18.81.10"), "pool_start 198.18.81.10 is not a usable host address"),
    (("198.18.80.0/24", None, None, "198.18.80.255"), "pool_end 198.18.80.255 is not a usable host address"),
    (("198.18.80.0/24", "198.18.80.50", "198.18.80.10", "198.18.80.100"), "contains the gateway 198.18.80.50"),
    (("198.18.80.0/24", None, "198.18.80.100", "198.18.80.10"), "pool_start is after pool_end"),
    (("198.18.80.0/24", "banana"), "gateway banana: not an IPv4 address"),
])
def test_bad_pools(args, fragment):
    with pytest.raises(AllocationError, match=fragment):
        make_pool(*args)


def test_mac_and_tap_carry_the_whole_address():
    ip = ipaddress.IPv4Address("198.18.80.2")
    assert mac_for(ip) == "06:00:c6:12:50:02"
    assert tap_for(ip) == "fc-c6125002" and len(tap_for(ip)) <= 15


def test_allocation_is_stable_unique_and_released(tmp_path):
    allocator = Allocator(str(tmp_path), make_pool("198.18.80.0/29"))
    _before, after, changed = allocator.apply(["a", "b"], "present", check_mode=False)
    assert changed == ["a", "b"] and [after[n]["ip"] for n in "ab"] == ["198.18.80.2", "198.18.80.3"]
    _before, again, changed = allocator.apply(["b", "a"], "present", check_mode=False)
    assert changed == [] and again == after
    allocator.apply(["a"], "absent", check_mode=False)
    _before, after, changed = allocator.apply(["c"], "present", check_mode=False)
    assert after["c"]["ip"] == "198.18.80.2", "a released address is handed out again"
    assert oct((tmp_path / "allocations.json").stat().st_mode & 0o777) == "0o600"


def test_exhaustion_and_check_mode(tmp_path):
    allocator = Allocator(str(tmp_path), make_pool("198.18.80.0/29"))
    allocator.apply([f"vm{i}" for i in range(5)], "present", check_mode=False)
    with pytest.raises(AllocationError, match="exhausted \\(5 addresses, 5 allocated\\); cannot allocate vm5"):
        allocator.apply(["vm5"], "present", check_mode=False)
    state = (tmp_path / "allocations.json").read_text()
    _before, predicted, changed = allocator.apply(["vm0"], "absent", check_mode=True)
    assert changed == ["vm0"] and "vm0" not in predicted
    assert (tmp_path / "allocations.json").read_text() == state, "check mode writes nothing"


def test_bad_names_and_prefix(tmp_path):
    allocator = Allocator(str(tmp_path), make_pool("198.18.80.0/24"))
    with pytest.raises(AllocationError, match="VM names listed twice: a"):
        allocator.apply(["a", "a"], "present", check_mode=False)
    with pytest.raises(AllocationError, match="VM name 'bad name'"):
        allocator.apply(["bad name"], "present", check_mode=False)
    with pytest.raises(AllocationError, match="exceed 15 bytes"):
        Allocator(str(tmp_path), make_pool("198.18.80.0/24"), tap_prefix="microvm-")
    assert not (tmp_path / "allocations.json").exists()

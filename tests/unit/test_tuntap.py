from __future__ import annotations

from ansible_collections.microvm.firecracker.plugins.module_utils._netlink import TunInfo
from ansible_collections.microvm.firecracker.plugins.module_utils._tuntap import IFF_PERSIST, tap_flags


def test_flags_match_the_sysfs_values_the_design_names():
    assert tap_flags(vnet_hdr=True, multi_queue=False) | IFF_PERSIST == 0x5802
    assert tap_flags(vnet_hdr=False, multi_queue=False) | IFF_PERSIST == 0x1802
    assert tap_flags(vnet_hdr=True, multi_queue=True) | IFF_PERSIST == 0x5902


def test_tun_info_flags_word():
    info = TunInfo(mode="tap", pi=False, vnet_hdr=True, persist=True, multi_queue=False,
                   owner=None, group=None, num_queues=None)
    assert info.flags == 0x5802
    info.mode, info.pi, info.vnet_hdr = "tun", True, False
    assert info.flags == 0x0801

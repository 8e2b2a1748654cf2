"""debugfs/e2fsck plumbing of rootfs_inject: quoting, transcript parsing, image checks (no root, no image)."""
from __future__ import annotations

import os
import struct
import subprocess
import sys

import pytest

from ansible_collections.microvm.firecracker.plugins.module_utils import _ext4
from ansible_collections.microvm.firecracker.plugins.module_utils._ext4 import (
    Ext4Error,
    check_preamble,
    check_write_chunks,
    command,
    parse_e2fsck,
    parse_ls,
    parse_stat,
    quote,
    split_transcript,
)

BANNER = b"debugfs 1.47.0 (5-Feb-2023)\n"

STAT_REGULAR = (
    b"Inode: 17   Type: regular    Mode:  0640   Flags: 0x80000\n"
    b"Generation: 0    Version: 0x00000000:00000000\n"
    b"User:  1234   Group:     0   Project:     0   Size: 6\n"
    b"File ACL: 0\n"
    b"Links: 1   Blockcount: 2\n"
    b"Fragment:  Address: 0    Number: 0    Size: 0\n"
    b" ctime: 0x6b0b6a24:00000000 -- Sat Nov 28 23:56:20 2026\n"
    b"Size of extra inode fields: 32\n"
    b"Inode checksum: 0xac2aa01f\n"
    b"EXTENTS:\n(0):4389\n"
)


def stat_symlink(target: bytes) -> bytes:
    return (
        b"Inode: 14   Type: symlink    Mode:  0777   Flags: 0x0\n"
        b"Generation: 0    Version: 0x00000000:00000000\n"
        b"User:     0   Group:     0   Project:     0   Size: %d\n"
        b"File ACL: 0\n"
        b"Links: 1   Blockcount: 0\n"
        b"Inode checksum: 0x9dfc28e0\n"
        b'Fast link dest: "%s"\n' % (len(target), target)
    )


def transcript(*pairs: tuple[str, bytes]) -> bytes:
    out = BANNER
    for cmd, body in pairs:
        out += b"debugfs: " + cmd.encode() + b"\n" + body
    return out


def test_quote_doubles_quotes_and_keeps_spaces():
    assert quote('/etc/a b/f "q"') == '"/etc/a b/f ""q"""'
    assert command("write", "/tmp/x y", "/etc/z") == 'write "/tmp/x y" "/etc/z"'


@pytest.mark.parametrize("arg", ["a\nb", "a\rb", "a\x00b", "a\tb"])
def test_quote_refuses_control_characters(arg):
    with pytest.raises(Ext4Error, match="control character"):
        quote(arg)


def test_command_length_is_bounded():
    with pytest.raises(Ext4Error, match="too long"):
        command("symlink", "/x", '"' * 4000)


def test_split_transcript_one_chunk_per_command():
    cmds = ['stat "/etc/foo"', 'stat "/nope"', 'dump "/etc/foo" "/tmp/x"']
    out = transcript((cmds[0], STAT_REGULAR), (cmds[1], b"/nope: File not found by ext2_lookup \n"), (cmds[2], b""))
    preamble, chunks = split_transcript(out, cmds)
    assert preamble == BANNER
    assert chunks == [STAT_REGULAR, b"/nope: File not found by ext2_lookup \n", b""]


def test_split_transcript_cannot_be_fooled_by_a_symlink_target():
    cmds = ['stat "/evil"', 'stat "/etc/shadow"']
    fake = b'x"\ndebugfs: stat "/etc/shadow"\nInode: 1   Type: regular'
    real = STAT_REGULAR
    out = transcript((cmds[0], stat_symlink(fake)), (cmds[1], real))
    _preamble, chunks = split_transcript(out, cmds)
    assert chunks[1] == real
    evil = parse_stat(chunks[0], "/evil")
    assert evil.kind == "symlink" and evil.target == fake


def test_split_transcript_reports_a_run_that_stopped_early():
    cmds = ['stat "/a"', 'stat "/b"']
    with pytest.raises(Ext4Error, match="stopped before"):
        split_transcript(transcript((cmds[0], STAT_REGULAR)), cmds)
    with pytest.raises(Ext4Error, match="did not run"):
        split_transcript(b"debugfs: Bad magic number in super-block while trying to open img\n", cmds)


def test_parse_stat_regular():
    inode = parse_stat(STAT_REGULAR, "/etc/foo")
    assert (inode.number, inode.kind, inode.mode, inode.uid, inode.gid, inode.size, inode.links) == \
        (17, "regular", 0o640, 1234, 0, 6, 1)
    assert inode.target is None


def test_parse_stat_symlink_target_with_quote_and_newline():
    target = b'/a "b"\nc'
    inode = parse_stat(stat_symlink(target), "/l")
    assert inode.kind == "symlink" and inode.target == target and inode.mode == 0o777


def test_parse_stat_missing_and_errors():
    assert parse_stat(b"/x: File not found by ext2_lookup \n", "/x") is None
    assert parse_stat(b"/etc/passwd/x: Ext2 inode is not a directory \n", "/etc/passwd/x") is None
    assert parse_stat(b"/l/x: Too many symbolic links encountered. \n", "/l/x") is None
    with pytest.raises(Ext4Error, match="Attempt to read block"):
        parse_stat(b"/x: Attempt to read block from filesystem resulted in short read\n", "/x")


def test_parse_stat_other_types():
    fifo = STAT_REGULAR.replace(b"Type: regular", b"Type: FIFO")
    assert parse_stat(fifo, "/p").kind == "FIFO"


def test_parse_ls():
    chunk = b"/12/040755/0/0/.//\n/2/040755/0/0/..//\n/16/100640/0/0/new1/6/\n\n"
    assert parse_ls(chunk) == [".", "..", "new1"]
    # A name holding a newline cannot be parsed: the caller must treat the directory as not empty.
    assert parse_ls(b"/12/040755/0/0/.//\n/16/100640/0/0/a\nb/6/\n") is None


def test_check_write_chunks():
    cmds = ['write "/h" "/etc/.t"', 'sif "/etc/.t" "mode" "0100644"', 'rm "/etc/x"', 'ln "/etc/.t" "/etc/x"']
    check_write_chunks(cmds, [b"Allocated inode: 16\n", b"", b"\n", b""])
    with pytest.raises(Ext4Error, match='debugfs write "/h" "/etc/.t" failed: write: Ext2 file already exists'):
        check_write_chunks(cmds, [b"write: Ext2 file already exists \n", b"", b"\n", b""])
    with pytest.raises(Ext4Error, match="rm: File not found"):
        check_write_chunks(cmds, [b"Allocated inode: 16\n", b"", b"rm: File not found by ext2_lookup\n", b""])


def test_check_preamble_version_and_open_errors():
    assert check_preamble(BANNER) == (1, 47, 0)
    assert check_preamble(b"debugfs 1.46.5 (30-Dec-2021)\n") == (1, 46, 5)
    assert not _ext4.version_ok((1, 45, 5)) and _ext4.version_ok((1, 46, 2))
    with pytest.raises(Ext4Error, match="Bad magic number"):
        check_preamble(BANNER + b"debugfs: Bad magic number in super-block while trying to open img\n")


def test_parse_e2fsck():
    clean = (b"e2fsck 1.47.0 (5-Feb-2023)\nPass 1: Checking inodes, blocks, and sizes\n"
             b"Pass 5: Checking group summary information\nimg: 13/16384 files (0.0% non-contiguous), 9519/65536 blocks\n")
    result = parse_e2fsck(0, clean)
    assert result.ok and result.summary.startswith("img: 13/16384 files") and result.problems == ()
    broken = (b"e2fsck 1.47.0 (5-Feb-2023)\nPass 4: Checking reference counts\n"
              b"Inode 17 ref count is 1, should be 2.  Fix? no\n\n"
              b"img: ********** WARNING: Filesystem still has errors **********\n\n"
              b"img: 19/16384 files (0.0% non-contiguous), 9519/65536 blocks\n")
    result = parse_e2fsck(4, broken)
    assert not result.ok and result.problems == ("Inode 17 ref count is 1, should be 2.  Fix? no",)
    assert "ref count" in result.describe() and "19/16384 files" in result.describe()


def superblock(magic=0xEF53, state=1, incompat=0x2C2):
    block = bytearray(2048)
    struct.pack_into("<HH", block, 1024 + 0x38, magic, state)
    struct.pack_into("<I", block, 1024 + 0x60, incompat)
    return bytes(block)


@pytest.mark.parametrize("data, expected", [
    (superblock(), (True, True, False, False)),
    (superblock(magic=0), (False, True, False, False)),
    (superblock(state=0), (True, False, False, False)),
    (superblock(state=3), (True, True, True, False)),
    (superblock(incompat=0x2C6), (True, True, False, True)),
    (b"short", (False, False, False, False)),
])
def test_read_superblock(tmp_path, data, expected):
    image = tmp_path / "img"
    image.write_bytes(data)
    info = _ext4.read_superblock(str(image))
    assert (info.magic_ok, info.clean, info.has_errors, info.needs_recovery) == expected


def test_image_identity(tmp_path):
    with pytest.raises(Ext4Error, match="no such file"):
        _ext4.image_identity(str(tmp_path / "missing"))
    with pytest.raises(Ext4Error, match="not a regular file"):
        _ext4.image_identity(str(tmp_path))


def test_processes_holding_finds_a_holder_by_inode(tmp_path):
    image = tmp_path / "img"
    image.write_bytes(b"x")
    other_name = tmp_path / "hardlink"
    os.link(image, other_name)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys;f=open(sys.argv[1],'rb');print('ready',flush=True);sys.stdin.read()",
         str(other_name)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        holders, _unreadable = _ext4.processes_holding(os.stat(image))
        assert any(h.startswith("pid %d " % holder.pid) for h in holders), holders
    finally:
        holder.stdin.close()
        holder.wait(timeout=10)
    holders, _unreadable = _ext4.processes_holding(os.stat(image))
    assert not any(h.startswith("pid %d " % holder.pid) for h in holders)


def test_processes_holding_skips_own_process(tmp_path):
    image = tmp_path / "img"
    image.write_bytes(b"x")
    with open(image, "rb"):
        holders, _unreadable = _ext4.processes_holding(os.stat(image))
    assert not any(h.startswith("pid %d " % os.getpid()) for h in holders)


def test_loop_devices_of_reads_sysfs_backing_files(tmp_path):
    image = tmp_path / "img"
    image.write_bytes(b"x")
    other = tmp_path / "other"
    other.write_bytes(b"y")
    sys_block = tmp_path / "sys"
    for name, backing in (("loop0", other), ("loop1", image), ("loop2", None)):
        (sys_block / name / "loop").mkdir(parents=True) if backing else (sys_block / name).mkdir(parents=True)
        if backing:
            (sys_block / name / "loop" / "backing_file").write_text(str(backing) + "\n")
    found = _ext4.loop_devices_of(os.stat(image), sys_block=str(sys_block), dev=str(tmp_path / "nodev"))
    assert found == ["/dev/loop1 (backing file %s)" % image]


def test_decode_kernel_dev():
    # huge_encode_dev(MKDEV(254, 0)) and MKDEV(259, 300)
    assert _ext4._decode_kernel_dev(0xFE00) == (254, 0)
    value = (300 & 0xFF) | (259 << 8) | ((300 & ~0xFF) << 12)
    assert _ext4._decode_kernel_dev(value) == (259, 300)


def test_image_lock_is_exclusive(tmp_path):
    image = tmp_path / "img"
    image.write_bytes(b"x")
    with _ext4.ImageLock(str(image)):
        with pytest.raises(_ext4.ImageInUseError, match="locked"):
            with _ext4.ImageLock(str(image)):
                pass
    with _ext4.ImageLock(str(image)):
        pass

# -*- coding: utf-8 -*-
# Copyright: (c) 2026, microvm.firecracker contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Guest kernel and initrd files: what Firecracker boots, read without any kernel tooling.

- ``vmlinux_from_bzimage``: the uncompressed ELF ``vmlinux`` inside an x86
  bzImage (what Debian and Ubuntu ship as ``/boot/vmlinuz-*``), found through the
  boot protocol header (``payload_offset``/``payload_length``, protocol >= 2.08)
  rather than by scanning for magic numbers as the kernel's
  ``scripts/extract-vmlinux`` does. gzip, xz, lzma and bzip2 payloads are
  decompressed with the Python standard library; lz4 (Debian 12's choice),
  zstd and lzo with the ``lz4``, ``zstd`` and ``lzop`` command-line tools.
- ``kernel_release``: the ``Linux version <release>`` banner of a vmlinux.
- ``read_initrd``: the members of an initramfs (concatenated newc cpio
  archives, the uncompressed early ones first and then one compressed
  archive), with the content of the small files a check needs.
"""
from __future__ import annotations

import bz2
import lzma
import re
import struct
import subprocess
import zlib
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple

ELF_MAGIC = b"\x7fELF"
EM_X86_64 = 0x3E
EM_AARCH64 = 0xB7

# (name, magic) as the payload starts; order matters only for readability.
_MAGICS: Tuple[Tuple[str, bytes], ...] = (
    ("gzip", b"\x1f\x8b"),
    ("xz", b"\xfd7zXZ\x00"),
    ("zstd", b"\x28\xb5\x2f\xfd"),
    ("lz4", b"\x02\x21\x4c\x18"),  # legacy frame, as the kernel writes it (lz4 -l)
    ("bzip2", b"BZh"),
    ("lzo", b"\x89LZO"),
    ("lzma", b"\x5d\x00\x00"),
)
# The tool that decompresses each format that has no standard-library decompressor.
TOOL_FOR = {"lz4": "lz4", "zstd": "zstd", "lzo": "lzop"}

_BANNER_RE = re.compile(rb"Linux version (\S+) \(")
_MODULE_PATH_RE = re.compile(r"^(?:usr/)?lib/modules/([^/]+)/")
CPIO_MAGICS = (b"070701", b"070702")
CPIO_HEADER = 110


class KernelImageError(Exception):
    """A kernel or initrd file that cannot be read as what it should be."""


Decompressor = Callable[[str, bytes], bytes]


def detect_compression(data: bytes) -> Optional[str]:
    for name, magic in _MAGICS:
        if data.startswith(magic):
            return name
    return None


def run_tool(tool: str, data: bytes) -> bytes:
    """Decompress ``data`` with ``TOOL -dc`` (the tool's path or name)."""
    try:
        proc = subprocess.run([tool, "-dc"], input=data, stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=False)
    except OSError as exc:
        raise KernelImageError("cannot run %s: %s" % (tool, exc.strerror or exc))
    if proc.returncode != 0:
        raise KernelImageError("%s -dc failed (exit %d): %s" % (tool, proc.returncode,
                                                                proc.stderr.decode("utf-8", "replace").strip()[:300]))
    return proc.stdout


def decompress(kind: str, data: bytes, tools: Optional[Dict[str, str]] = None) -> bytes:
    """One compressed stream; trailing bytes after it (padding, an appended size) are ignored."""
    tools = tools or {}
    try:
        if kind == "gzip":
            return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data)
        if kind == "xz":
            return lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(data)
        if kind == "lzma":
            return lzma.LZMADecompressor(lzma.FORMAT_ALONE).decompress(data)
        if kind == "bzip2":
            return bz2.BZ2Decompressor().decompress(data)
    except (zlib.error, lzma.LZMAError, OSError, EOFError) as exc:
        raise KernelImageError("%s data is corrupt: %s" % (kind, exc))
    if kind in TOOL_FOR:
        return run_tool(tools.get(kind) or TOOL_FOR[kind], data)
    raise KernelImageError("unknown compression %r" % kind)


@dataclass(frozen=True)
class Vmlinux:
    data: bytes
    compression: str  # "none" when the input already was an ELF file
    machine: int


def check_elf(data: bytes) -> int:
    """An ELF64 little-endian executable; returns e_machine."""
    if len(data) < 64 or not data.startswith(ELF_MAGIC):
        raise KernelImageError("not an ELF file")
    if data[4] != 2 or data[5] != 1:
        raise KernelImageError("not a 64-bit little-endian ELF file")
    e_type, e_machine = struct.unpack_from("<HH", data, 16)
    if e_type != 2:
        raise KernelImageError("ELF file is not an executable (e_type %d)" % e_type)
    return e_machine


def vmlinux_from_bzimage(data: bytes, tools: Optional[Dict[str, str]] = None) -> Vmlinux:
    """The ELF vmlinux inside a bzImage (or ``data`` itself when it already is an ELF vmlinux)."""
    if data.startswith(ELF_MAGIC):
        return Vmlinux(data=data, compression="none", machine=check_elf(data))
    if len(data) < 0x250 or data[0x202:0x206] != b"HdrS":
        raise KernelImageError("neither an ELF vmlinux nor an x86 bzImage (no HdrS boot header)")
    (protocol,) = struct.unpack_from("<H", data, 0x206)
    if protocol < 0x208:
        raise KernelImageError("bzImage boot protocol %d.%02d is older than 2.08 (no payload fields)"
                               % (protocol >> 8, protocol & 0xFF))
    setup_sects = data[0x1F1] or 4
    payload_offset, payload_length = struct.unpack_from("<II", data, 0x248)
    start = (setup_sects + 1) * 512 + payload_offset
    payload = data[start:start + payload_length]
    if len(payload) != payload_length or payload_length < 8:
        raise KernelImageError("bzImage payload (offset %d, %d bytes) lies outside the file" % (start, payload_length))
    kind = detect_compression(payload)
    if kind is None:
        raise KernelImageError("bzImage payload has an unknown compression (starts with %s)" % payload[:6].hex())
    # The kernel build appends the uncompressed size (4 bytes, little-endian) to every payload; for gzip it
    # is the stream's own trailer, for the others it follows the stream and is cut off before decompressing.
    (expected,) = struct.unpack_from("<I", payload, len(payload) - 4)
    body = payload if kind == "gzip" else payload[:-4]
    out = decompress(kind, body, tools)
    if len(out) & 0xFFFFFFFF != expected:
        raise KernelImageError("decompressed %s payload is %d bytes, the bzImage says %d" % (kind, len(out), expected))
    try:
        machine = check_elf(out)
    except KernelImageError as exc:
        raise KernelImageError("the decompressed %s payload is %s" % (kind, exc))
    return Vmlinux(data=out, compression=kind, machine=machine)


def kernel_release(vmlinux: bytes) -> str:
    """``6.1.0-50-cloud-amd64`` from the ``Linux version ... (`` banner."""
    match = _BANNER_RE.search(vmlinux)
    if match is None:
        raise KernelImageError("no 'Linux version' banner found in the kernel")
    return match.group(1).decode("ascii", "replace")


# --------------------------------------------------------------------------
# initramfs


@dataclass
class Initrd:
    members: Set[str] = field(default_factory=set)  # paths without a leading ./ or /
    files: Dict[str, bytes] = field(default_factory=dict)  # content of the members asked for
    compression: List[str] = field(default_factory=list)  # one entry per archive: "none", "gzip", ...

    def module_releases(self) -> Set[str]:
        releases = set()
        for name in self.members:
            match = _MODULE_PATH_RE.match(name)
            if match:
                releases.add(match.group(1))
        return releases

    def module_names(self, release: str) -> Set[str]:
        """Kernel module names (``virtio_blk``) of ``release`` in the initrd (any .ko compression)."""
        names = set()
        for name in self.members:
            match = _MODULE_PATH_RE.match(name)
            if match and match.group(1) == release:
                base = name.rsplit("/", 1)[-1]
                if ".ko" in base:
                    names.add(normalise_module(base.split(".ko", 1)[0]))
        return names


def normalise_module(name: str) -> str:
    return name.replace("-", "_")


def _parse_cpio(data: bytes, pos: int, initrd: Initrd, wanted: Set[str]) -> int:
    """Parse one newc archive at ``pos``; returns the offset after its trailer (4-byte aligned)."""
    while True:
        header = data[pos:pos + CPIO_HEADER]
        if len(header) < CPIO_HEADER or header[:6] not in CPIO_MAGICS:
            raise KernelImageError("corrupt cpio archive at offset %d" % pos)
        try:
            fields = [int(header[6 + 8 * index:14 + 8 * index], 16) for index in range(13)]
        except ValueError:
            raise KernelImageError("corrupt cpio header at offset %d" % pos)
        filesize, namesize = fields[6], fields[11]
        name_start = pos + CPIO_HEADER
        name = data[name_start:name_start + namesize].rstrip(b"\x00").decode("utf-8", "surrogateescape")
        data_start = _align4(name_start + namesize)
        end = _align4(data_start + filesize)
        if end > len(data) + 3:
            raise KernelImageError("truncated cpio archive (member %r)" % name)
        if name == "TRAILER!!!":
            return end
        clean = name[2:] if name.startswith("./") else name.lstrip("/")
        if clean and clean != ".":
            initrd.members.add(clean)
            if clean in wanted:
                initrd.files[clean] = data[data_start:data_start + filesize]
        pos = end


def _align4(value: int) -> int:
    return (value + 3) & ~3


def read_initrd(data: bytes, wanted: Iterable[str] = (), tools: Optional[Dict[str, str]] = None,
                _depth: int = 0) -> Initrd:
    """Members of an initramfs image; ``wanted`` member paths also get their content."""
    initrd = Initrd()
    wanted_set = set(wanted)
    pos = 0
    while pos < len(data):
        while pos < len(data) and data[pos] == 0:
            pos += 1  # padding between archives
        if pos >= len(data):
            break
        if data[pos:pos + 6] in CPIO_MAGICS:
            pos = _parse_cpio(data, pos, initrd, wanted_set)
            initrd.compression.append("none")
            continue
        kind = detect_compression(data[pos:])
        if kind is None or _depth > 0:
            raise KernelImageError("initrd: unknown data at offset %d (starts with %s)" % (pos, data[pos:pos + 6].hex()))
        inner = read_initrd(decompress(kind, data[pos:], tools), wanted_set, tools, _depth + 1)
        initrd.members |= inner.members
        initrd.files.update(inner.files)
        initrd.compression.append(kind)
        break  # the compressed archive is the last one
    if not initrd.members:
        raise KernelImageError("initrd holds no files")
    return initrd


def missing_modules(required: Sequence[str], in_initrd: Set[str], builtin: Set[str]) -> List[str]:
    """Required module names found neither in the initrd nor built into the kernel."""
    return [name for name in required if normalise_module(name) not in in_initrd | builtin]


def parse_modules_builtin(text: str) -> Set[str]:
    """``kernel/drivers/block/virtio_blk.ko`` lines of ``modules.builtin`` -> module names."""
    names = set()
    for line in text.splitlines():
        base = line.strip().rsplit("/", 1)[-1]
        if base.endswith(".ko"):
            names.add(normalise_module(base[:-3]))
    return names

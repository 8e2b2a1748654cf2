"""A Firecracker-release-shaped archive that carries the collection's stand-ins (standin/).

    release_archive.py --standin standin/fc-standin [--jailer standin/jailer-standin] \
        --version 1.10.1 --arch x86_64 --out DIR

writes DIR/firecracker-v<version>-<arch>.tgz with the layout of an official release
(release-v<version>-<arch>/firecracker-v<version>-<arch>, .../jailer-v<version>-<arch>, SHA256SUMS), so
that the firecracker role installs it with ``firecracker_install_from: file`` exactly as it installs a
real release. ``firecracker`` is the VMM stand-in (it prints "Firecracker v1.10.1 compatible stand-in
..."); ``jailer`` is the jailer stand-in (it prints "Jailer v1.10.1 compatible stand-in ..."; --jailer
defaults to jailer-standin beside --standin). Neither is Firecracker software.

The archive is byte-for-byte reproducible (fixed owners, modes and mtimes, gzip without a timestamp), so
its sha256 only changes when the stand-in does, and rewriting an identical archive is reported as
unchanged. Prints JSON: path, sha256, changed.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import sys
import tarfile
from pathlib import Path

MTIME = 1700000000


def build(standin: Path, jailer: Path, version: str, arch: str) -> bytes:
    prefix = f"release-v{version}-{arch}"
    files = {
        f"firecracker-v{version}-{arch}": (standin.read_bytes(), 0o755),
        f"jailer-v{version}-{arch}": (jailer.read_bytes(), 0o755),
        "README": (b"Firecracker API stand-in (fc-standin) and jailer stand-in (jailer-standin) for tests and "
                   b"labs without KVM. NOT Firecracker, NOT Firecracker's jailer.\n", 0o644),
    }
    sums = "".join(f"{hashlib.sha256(data).hexdigest()}  ./{name}\n" for name, (data, _mode) in sorted(files.items()))
    files["SHA256SUMS"] = (sums.encode(), 0o644)
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, (data, mode) in sorted(files.items()):
            info = tarfile.TarInfo(f"{prefix}/{name}")
            info.size, info.mode, info.mtime = len(data), mode, MTIME
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(raw.getvalue(), mtime=0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--standin", required=True, type=Path)
    parser.add_argument("--jailer", type=Path, help="default: jailer-standin beside --standin")
    parser.add_argument("--version", default="1.10.1")
    parser.add_argument("--arch", default=os.uname().machine)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    jailer = args.jailer or args.standin.parent / "jailer-standin"
    data = build(args.standin, jailer, args.version, args.arch)
    path = args.out / f"firecracker-v{args.version}-{args.arch}.tgz"
    changed = not path.exists() or path.read_bytes() != data
    if changed:
        args.out.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    print(json.dumps({"path": str(path), "sha256": hashlib.sha256(data).hexdigest(), "changed": changed}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

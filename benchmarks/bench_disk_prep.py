"""Per-VM disk from an 8 GiB golden image: sparse clone + rootfs_inject vs dd copy + loop mount (the replaced way).

Both procedures produce the same VM disk: the golden image with a systemd unit (enabled),
/etc/environment and five files (~100 KB) written into it, flushed to disk.

- new: ``cp --sparse=always --reflink=auto`` of the golden image, one ``rootfs_inject`` module run
  (as Ansible runs it on the host: its own process, with its in-use checks and ``e2fsck -fn`` before
  and after), ``fsync`` of the clone.
- old (the replaced procedure): full ``dd`` copy, ``e2fsck -fy``, ``losetup`` + ``mount``, write the
  files, ``sync``, ``umount`` + ``losetup -d``, ``e2fsck -fy``. The loop mount exists only here, to
  measure what was replaced; it is always unmounted and detached in ``finally``.

The golden image is ``BENCH_GOLDEN_IMAGE`` (a real one, e.g. ``golden-NAME.ext4`` from the
golden_image role) or, when unset, a synthetic 8 GiB-apparent image made with ``mkfs.ext4 -d`` from a
tree with ``BENCH_GOLDEN_DATA_MB`` (default 400) MB of incompressible data. Work files go to
``BENCH_DIR`` (default: the temp directory), which should be on the filesystem VM disks would live on.
Figures: wall seconds, bytes written by each procedure's processes (``write_bytes`` accounting:
``ru_oublock`` of each child, ``/proc/self/io`` for in-process writes) and allocated bytes.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _bench_common import collection_tree

REPO = Path(__file__).resolve().parents[1]
GIB = 1024 ** 3
SIZE = 8 * GIB
DATA_MB = int(os.environ.get("BENCH_GOLDEN_DATA_MB", "400"))
UNIT = """[Unit]
Description=VM agent
After=network-online.target
Wants=network-online.target

[Service]
ExecStart=/opt/agent/agent.sh
Restart=on-failure

[Install]
WantedBy=multi-user.target
"""
ENVIRONMENT = {"AGENT_PORT": "8080", "AGENT_ROLE": "media", "LANG": "C.UTF-8"}
PASSWD = "root:x:0:0:root:/root:/bin/bash\nagent:x:1234:1234:VM agent:/home/agent:/bin/sh\n"
GROUP = "root:x:0:\nagent:x:1234:\n"


def _run(argv: list[str], **kwargs) -> tuple[float, int]:
    """Wall seconds and bytes written (ru_oublock, this child and the children it waited for)."""
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kwargs)
    stderr = proc.stderr.read()
    _pid, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.monotonic() - started
    code = os.waitstatus_to_exitcode(status)
    if code != 0 and not (argv[0] == "e2fsck" and code == 1):  # e2fsck -fy: 1 = errors corrected
        raise RuntimeError(f"{' '.join(argv[:4])} exited with {code}: {stderr.decode(errors='replace')[-500:]}")
    return elapsed, usage.ru_oublock * 512


def _own_write_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    return 0


def _allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def _synthetic_golden(work: Path) -> Path:
    tree = work / "golden-tree"
    for directory in ("etc/systemd/system/multi-user.target.wants", "usr/lib/systemd/system", "opt", "tmp",
                      "var/lib/data", "root"):
        (tree / directory).mkdir(parents=True, exist_ok=True)
    (tree / "lib").symlink_to("usr/lib")
    (tree / "etc" / "passwd").write_text(PASSWD)
    (tree / "etc" / "group").write_text(GROUP)
    (tree / "etc" / "environment").write_text("LANG=C.UTF-8\n")
    (tree / "etc" / "hostname").write_text("golden\n")
    (tree / "etc" / "machine-id").write_text("")
    chunk = os.urandom(1024 * 1024)
    for index in range(DATA_MB):
        # distinct 1 MiB files (a changing prefix keeps them from being identical)
        (tree / "var" / "lib" / "data" / f"blob{index:04d}").write_bytes(index.to_bytes(8, "little") + chunk[8:])
    image = work / "golden.ext4"
    with image.open("wb") as handle:
        handle.truncate(SIZE)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "root_owner=0:0", "-d", str(tree), str(image)], check=True)
    subprocess.run(["rm", "-rf", "--one-file-system", str(tree)], check=True)
    return image


def _payload(work: Path) -> list[tuple[str, Path]]:
    """Five agent files, ~100 KB in all (in-image path, host file)."""
    files = []
    for index in range(5):
        host = work / f"payload{index}"
        host.write_bytes(base64.b64encode(os.urandom(15000)) + b"\n")  # 20 KB of text each
        files.append((f"/opt/agent/file{index}.dat", host))
    return files


def _new_procedure(golden: Path, work: Path, files: list[tuple[str, Path]], tree: Path) -> dict[str, float]:
    clone = work / "vm-new.ext4"
    figures: dict[str, float] = {}
    started = time.monotonic()
    figures["new_clone_s"], written = _run(["cp", "--sparse=always", "--reflink=auto", str(golden), str(clone)])
    figures["new_clone_allocated_bytes"] = _allocated(clone)
    args = work / "inject-args.json"
    args.write_text(json.dumps({"ANSIBLE_MODULE_ARGS": {
        "image": str(clone),
        "systemd_units": [{"name": "agent.service", "content": UNIT, "enabled": True}],
        "environment": ENVIRONMENT,
        "files": [{"path": path, "src": str(host), "mode": "0644"} for path, host in files],
    }}))
    module = REPO / "plugins" / "modules" / "rootfs_inject.py"
    inject_s, inject_written = _run([sys.executable, str(module), str(args)], env=dict(os.environ, PYTHONPATH=str(tree)))
    figures["new_inject_s"] = inject_s
    before = _own_write_bytes()
    sync_started = time.monotonic()
    fd = os.open(clone, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    figures["new_fsync_s"] = time.monotonic() - sync_started
    figures["new_wall_s"] = time.monotonic() - started
    figures["new_bytes_written"] = written + inject_written + _own_write_bytes() - before
    figures["new_allocated_bytes"] = _allocated(clone)
    _check_injected(clone, files)
    clone.unlink()
    return figures


def _old_procedure(golden: Path, work: Path, files: list[tuple[str, Path]]) -> dict[str, float]:
    copy = work / "vm-old.ext4"
    mnt = work / "mnt"
    mnt.mkdir()
    figures: dict[str, float] = {}
    loop = None
    mounted = False
    written = 0
    started = time.monotonic()
    try:
        seconds, bytes_ = _run(["dd", f"if={golden}", f"of={copy}", "bs=4M", "status=none"])
        figures["old_dd_s"] = seconds
        written += bytes_
        written += _run(["e2fsck", "-fy", str(copy)])[1]
        loop = subprocess.run(["losetup", "--find", "--show", str(copy)], capture_output=True, text=True,
                              check=True).stdout.strip()
        subprocess.run(["mount", "-t", "ext4", loop, str(mnt)], check=True)
        mounted = True
        before = _own_write_bytes()
        units = mnt / "etc" / "systemd" / "system"
        (units / "agent.service").write_text(UNIT)
        wants = units / "multi-user.target.wants"
        wants.mkdir(exist_ok=True)
        (wants / "agent.service").symlink_to("/etc/systemd/system/agent.service")
        env_lines = [line for line in (mnt / "etc" / "environment").read_text().splitlines() if line.strip()]
        env_lines += [f"{key}={value}" for key, value in ENVIRONMENT.items() if f"{key}={value}" not in env_lines]
        (mnt / "etc" / "environment").write_text("\n".join(dict.fromkeys(env_lines)) + "\n")
        (mnt / "opt" / "agent").mkdir(parents=True, exist_ok=True)
        for path, host in files:
            (mnt / path.lstrip("/")).write_bytes(host.read_bytes())
        written += _own_write_bytes() - before
        written += _run(["sync", "--file-system", str(mnt)])[1]
        written += _run(["sync", str(copy)])[1]
        subprocess.run(["umount", str(mnt)], check=True)
        mounted = False
        subprocess.run(["losetup", "-d", loop], check=True)
        loop = None
        written += _run(["e2fsck", "-fy", str(copy)])[1]
        figures["old_wall_s"] = time.monotonic() - started
        figures["old_bytes_written"] = written
        figures["old_allocated_bytes"] = _allocated(copy)
        _check_injected(copy, files)
    finally:
        if mounted:
            subprocess.run(["umount", str(mnt)], check=False)
        if loop:
            subprocess.run(["losetup", "-d", loop], check=False)
        mnt.rmdir()
        if copy.exists():
            copy.unlink()
    return figures


def _check_injected(image: Path, files: list[tuple[str, Path]]) -> None:
    """Both procedures must produce the same content (read back with debugfs)."""
    for path, host in files[:1] + files[-1:]:
        data = subprocess.run(["debugfs", "-R", f"cat {path}", str(image)], capture_output=True, check=True).stdout
        if data != host.read_bytes():
            raise RuntimeError(f"{image.name}: {path} was not written")
    unit = subprocess.run(["debugfs", "-R", "cat /etc/systemd/system/agent.service", str(image)], capture_output=True,
                          check=True).stdout.decode()
    if unit != UNIT:
        raise RuntimeError(f"{image.name}: agent.service was not written")


def run() -> dict:
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="fcbench-disk-", dir=os.environ.get("BENCH_DIR")) as tmpdir:
        work = Path(tmpdir)
        tree = collection_tree(work)
        given = os.environ.get("BENCH_GOLDEN_IMAGE")
        started = time.monotonic()
        golden = Path(given).resolve() if given else _synthetic_golden(work)
        source = f"golden image {golden}" if given else f"synthetic (mkfs.ext4 -d, {DATA_MB} MB of data)"
        figures["golden_prepare_s"] = time.monotonic() - started
        figures["golden_apparent_bytes"] = golden.stat().st_size
        figures["golden_allocated_bytes"] = _allocated(golden)
        files = _payload(work)
        figures["payload_bytes"] = sum(host.stat().st_size for _path, host in files)
        figures.update(_old_procedure(golden, work, files))
        figures.update(_new_procedure(golden, work, files, tree))

    figures = {k: round(v, 3) if isinstance(v, float) else v for k, v in figures.items()}
    ratios = {
        "old_wall / new_wall": round(figures["old_wall_s"] / figures["new_wall_s"], 1),
        "old_bytes_written / new_bytes_written": round(figures["old_bytes_written"] / max(figures["new_bytes_written"], 1), 1),
        "new_allocated / golden_allocated": round(figures["new_allocated_bytes"] / figures["golden_allocated_bytes"], 3),
    }
    targets = {
        "new procedure >= 20x faster than the dd procedure": ratios["old_wall / new_wall"] >= 20,
        "clone allocates no more than the golden image": figures["new_allocated_bytes"] <= figures["golden_allocated_bytes"],
    }
    return {"golden": source, "figures": figures, "ratios": ratios, "targets": targets}

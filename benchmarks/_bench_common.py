"""Helpers shared by the benchmarks (not a benchmark itself: run.py only runs bench_*.py)."""
from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def collection_tree(tmp: Path) -> Path:
    """A directory for ANSIBLE_COLLECTIONS_PATH / PYTHONPATH in which microvm.firecracker is this checkout."""
    tree = tmp / "collections"
    (tree / "ansible_collections" / "microvm").mkdir(parents=True)
    (tree / "ansible_collections" / "microvm" / "firecracker").symlink_to(REPO)
    return tree

"""Shared pytest set-up: expose this checkout as ansible_collections.microvm.firecracker."""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
_TREE = Path(tempfile.mkdtemp(prefix="microvm-collections-"))
COLLECTIONS_PATH = _TREE
(_TREE / "ansible_collections" / "microvm").mkdir(parents=True)
(_TREE / "ansible_collections" / "microvm" / "firecracker").symlink_to(REPO_ROOT)
sys.path.insert(0, str(_TREE))
os.environ.setdefault("MICROVM_TEST_COLLECTIONS_PATH", str(_TREE))


def pytest_unconfigure(config) -> None:  # noqa: ARG001 - pytest hook signature
    link = _TREE / "ansible_collections" / "microvm" / "firecracker"
    if link.is_symlink():
        link.unlink()
    for path in (_TREE / "ansible_collections" / "microvm", _TREE / "ansible_collections", _TREE):
        try:
            path.rmdir()
        except OSError:
            pass

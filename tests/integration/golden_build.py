"""The session's golden image: one real build (Debian bookworm minbase + base + gstreamer profiles,
8 GiB apparent) through the golden_image role, shared by every test that needs a bootable image
(cached by input digest within the run). The image also carries busybox, whose httpd serves the
test VMs' injected services.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
from conftest import AnsibleRunner, PlaybookResult

ROLE = "microvm.firecracker.golden_image"
NAME = "ci"
BASE_EXTRA_PACKAGES = ["busybox"]


@dataclass
class Golden:
    root: Path
    runner: AnsibleRunner
    vars: dict[str, Any]
    first: PlaybookResult

    @property
    def out(self) -> Path:
        return self.root / "out"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    def link(self, kind: str) -> Path:
        return self.out / f"golden-{NAME}.{kind}"

    def artifact(self, version: str, kind: str) -> Path:
        return self.out / f"golden-{NAME}-{version}.{kind}"

    def current(self) -> str:
        return re.fullmatch(rf"golden-{NAME}-([0-9a-f]{{16}})\.ext4", os.readlink(self.link("ext4"))).group(1)

    def manifest(self, version: str) -> dict[str, Any]:
        return json.loads(self.artifact(version, "json").read_text())

    def run(self, check: bool = False, **overrides: Any) -> PlaybookResult:
        return self.runner.run_role(ROLE, "golden_image_artifacts", check=check,
                                    extra_vars={**self.vars, **overrides})


def mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve())
    points = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    return [point for point in points if point == prefix or point.startswith(prefix + "/")]


@pytest.fixture(scope="session")
def golden(tmp_path_factory) -> Iterator[Golden]:
    """One real build for the whole session: Debian bookworm minbase + base + gstreamer, 8 GiB apparent.

    Removed at the end of the session (images, cache), after checking that nothing is mounted there."""
    root = tmp_path_factory.mktemp("golden")
    runner = AnsibleRunner(root)
    variables = {
        "golden_image_name": NAME,
        "golden_image_output_dir": str(root / "out"),
        "golden_image_cache_dir": str(root / "cache"),
        "golden_image_profiles": ["base", "gstreamer"],
        "golden_image_size": "8G",
        "golden_image_extra_packages": BASE_EXTRA_PACKAGES,
    }
    golden = Golden(root, runner, variables, None)  # type: ignore[arg-type]
    try:
        golden.first = golden.run()
        assert golden.first.rc == 0, golden.first.output
        yield golden
    finally:
        assert mounts_under(root) == [], "mounts left under the golden image test tree"
        shutil.rmtree(root)

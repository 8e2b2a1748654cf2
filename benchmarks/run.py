"""Benchmark runner: runs benchmarks/bench_*.py (or the ones named), prints their figures and ratios.

Each benchmark module has ``run() -> dict`` returning {"figures": {...}, "ratios": {...},
"targets": {...}} measured against its baseline in the same process run. Results are also
written as JSON to benchmarks/results/<name>.json. Benchmarks never fail on speed: they report.

Usage (as root, from the repository root): .venv/bin/python benchmarks/run.py [tap_batch ...]
"""
from __future__ import annotations

import importlib
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str]) -> int:
    sys.path.insert(0, str(HERE))
    names = argv or sorted(path.stem[len("bench_"):] for path in HERE.glob("bench_*.py"))
    results_dir = HERE / "results"
    results_dir.mkdir(exist_ok=True)
    for name in names:
        module = importlib.import_module(f"bench_{name}")
        print(f"== {name}: {module.__doc__.strip().splitlines()[0]}")
        started = time.monotonic()
        result = module.run()
        result["benchmark_seconds"] = round(time.monotonic() - started, 2)
        for section in ("figures", "ratios", "targets"):
            for key, value in result.get(section, {}).items():
                print(f"  {section[:-1]:7} {key:45} {value}")
        (results_dir / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

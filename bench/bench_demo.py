"""Time `inv demo` end to end and each stage's share; write the figures to docs/benchmarks.md.

Runs the real demo in an isolated project (its own generated/ and runs/), as the README's first
quick-start command does. Usage: .venv/bin/python -m bench.bench_demo
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from bench._report import write_section
from tests.conftest import make_project


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        p = make_project(Path(tmp) / "proj")
        t0 = time.perf_counter()
        p.inv("demo", timeout=1200)
        wall = time.perf_counter() - t0
        timings = json.loads((p.generated / "demo" / "timings.json").read_text())
        summary = json.loads(next((p.runs / "resnet").glob("*/summary.json")).read_text())
    total = timings["total_s"]
    rows = "\n".join(
        f"| {s['name']} | {s['seconds']:.1f} | {100 * s['seconds'] / total:.0f} % |" for s in timings["stages"]
    )
    body = (
        "## `inv demo`: total wall time and each stage's share\n\n"
        f"Whole command (process start to exit, including Python start-up): **{wall:.1f} s**; "
        f"the stages below add up to {total:.1f} s. Final test accuracy on digits: "
        f"{summary['final_test_acc']:.4f} ({summary['epochs']} epochs, {summary['samples_per_s']:.0f} samples/s).\n\n"
        "| stage | seconds | share |\n|---|---:|---:|\n" + rows + "\n"
    )
    write_section("demo", body)
    print(body)


if __name__ == "__main__":
    main()

"""A fresh clone's `scripts/bootstrap`: checkov's venv installed after the project venv (how it was) against
beside it (how it is now), wall time and CPU of the whole bootstrap, on fresh clones of this checkout.

"Before" is run as the old script ran it: `scripts/bootstrap --no-checkov`, then checkov's venv the way the
old step 4 made it (`python3 -m venv .venv-checkov` + `pip install 'checkov>=3'`). "Now" is plain
`scripts/bootstrap`. Both install from the same places (this machine's pip configuration and caches); the
order alternates between rounds. CI pays this once per run, before any test.

Usage: python -m bench.bench_bootstrap [--rounds 1]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from bench import _report
from bench.bench_apply import ROOT, cpu_of

CHECKOV_THE_OLD_WAY = (
    "python3 -m venv .venv-checkov && "
    ".venv-checkov/bin/python -m pip install -q --disable-pip-version-check 'checkov>=3'"
)


def fresh_clone(base: Path) -> Path:
    dest = Path(tempfile.mkdtemp(dir=base)) / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(dest)], check=True)
    # The working tree's bootstrap, so that an uncommitted change is what is measured.
    shutil.copy2(ROOT / "scripts" / "bootstrap", dest / "scripts" / "bootstrap")
    return dest


def outside_any_venv() -> dict[str, str]:
    """This environment (pip's configuration included) without a venv's bin on PATH, as on a fresh shell."""
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    env["PATH"] = os.pathsep.join(d for d in env.get("PATH", "").split(os.pathsep) if not Path(d, "activate").exists())
    return env


def run_in(clone: Path, script: str) -> tuple[float, float]:
    """(wall s, CPU s) of a shell line run in `clone`; it must succeed."""
    t0 = time.perf_counter()
    cpu = cpu_of(["bash", "-c", f'cd "{clone}" && {script}'], outside_any_venv())
    return time.perf_counter() - t0, cpu


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="remotefit-bench-bootstrap-"))
    ways = {
        "before: checkov's venv after the project venv": "scripts/bootstrap --no-checkov && " + CHECKOV_THE_OLD_WAY,
        "now: checkov's venv beside the project venv": "scripts/bootstrap",
    }
    got: dict[str, list[tuple[float, float]]] = {w: [] for w in ways}
    try:
        for r in range(args.rounds):
            order = list(ways) if r % 2 == 0 else list(reversed(ways))
            for way in order:
                clone = fresh_clone(base)
                got[way].append(run_in(clone, ways[way]))
                if not (clone / ".venv-checkov" / "bin" / "checkov").exists():  # it only warns: not comparable
                    raise SystemExit(f"bench_bootstrap: {way}: checkov was not installed")
                print(f"round {r} {way}: {got[way][-1][0]:.1f} s wall, {got[way][-1][1]:.1f} CPU-s")
                shutil.rmtree(clone)
    finally:
        shutil.rmtree(base, ignore_errors=True)

    def med(way: str, i: int) -> float:
        return statistics.median(x[i] for x in got[way])

    before, now = ways
    lines = [
        "## A fresh clone's `scripts/bootstrap` (`bench/bench_bootstrap.py`)",
        "",
        f"Fresh clones of this checkout, the dev set (what CI installs first), medians of {args.rounds} round(s);",
        "CPU is user + system of every process. checkov's venv is a second, independent pip run, so it now",
        "runs in the background while the project venv installs.",
        "",
        "| | wall s | CPU s |",
        "|---|---:|---:|",
        *(f"| {w} | {med(w, 0):.1f} | {med(w, 1):.1f} |" for w in ways),
        f"| **now / before** | **{med(now, 0) / med(before, 0):.2f}x** | {med(now, 1) / med(before, 1):.2f}x |",
    ]
    _report.publish("bootstrap", lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

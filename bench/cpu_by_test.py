"""Where CI's CPU goes, by test file: a pytest plugin, and the summary it feeds docs/benchmarks.md.

CI on 2 cores is CPU-bound, so its wall time is its CPU divided by ~1.7; this says whose CPU it is. Each
xdist worker moves itself into a cpuacct cgroup of its own (cgroup v1, root), which every process it starts
inherits: Terraform and its provider, moto servers, sshds, booted container nodes and the jobs on them. Per
test, the cgroup's CPU before and after (module fixtures land in their first and last test).

    REMOTEFIT_CPU_PROBE_DIR=/tmp/probe PYTEST_ADDOPTS="-p bench.cpu_by_test" ./.ci/run
    python -m bench.cpu_by_test /tmp/probe      # writes the "ci-cpu" section
"""

from __future__ import annotations

import collections
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CGROUPS = Path("/sys/fs/cgroup/cpuacct/remotefit-ci")
DIR_ENV = "REMOTEFIT_CPU_PROBE_DIR"


def _worker() -> str | None:
    """This xdist worker's name when probing is asked for (the controller and plain runs probe nothing)."""
    return os.environ.get("PYTEST_XDIST_WORKER") if os.environ.get(DIR_ENV) else None


def _cpu_seconds(worker: str) -> float:
    return int((CGROUPS / worker / "cpuacct.usage").read_text()) / 1e9


def pytest_configure(config: pytest.Config) -> None:
    worker = _worker()
    if worker is None:
        return
    if not CGROUPS.parent.is_dir():
        raise pytest.UsageError(f"{DIR_ENV}: needs cgroup v1's cpuacct at {CGROUPS.parent} (and root)")
    (CGROUPS / worker).mkdir(parents=True, exist_ok=True)
    (CGROUPS / worker / "cgroup.procs").write_text(str(os.getpid()))
    Path(os.environ[DIR_ENV]).mkdir(parents=True, exist_ok=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    worker = _worker()
    if worker is None:
        yield
        return
    cpu0, t0 = _cpu_seconds(worker), time.time()
    yield
    row = {"test": item.nodeid, "cpu": round(_cpu_seconds(worker) - cpu0, 2), "wall": round(time.time() - t0, 2)}
    with (Path(os.environ[DIR_ENV]) / f"{worker}.jsonl").open("a") as f:
        nodes = os.environ.get("REMOTEFIT_SANDBOX_NODES", "auto")
        f.write(json.dumps(row | {"end": round(time.time(), 1), "nodes": nodes}) + "\n")


def by_file(rows: list[dict[str, Any]]) -> list[tuple[str, float, float, int]]:
    """(file, CPU s, wall s, tests) per test file, the most CPU first."""
    files: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0, 0])
    for r in rows:
        f = files[r["test"].split("::")[0]]
        f[0] += r["cpu"]
        f[1] += r["wall"]
        f[2] += 1
    return sorted(((k, v[0], v[1], int(v[2])) for k, v in files.items()), key=lambda x: -x[1])


def main() -> int:
    from bench import _report

    if len(sys.argv) != 2:
        print("usage: python -m bench.cpu_by_test PROBE_DIR", file=sys.stderr)
        return 2
    rows = [json.loads(line) for f in sorted(Path(sys.argv[1]).glob("*.jsonl")) for line in f.read_text().splitlines()]
    if not rows:
        print(f"no probe rows in {sys.argv[1]}: run the suite with {DIR_ENV} set (see this file's docstring)")
        return 2
    files = by_file(rows)
    total = sum(f[1] for f in files)
    modes = sorted({r.get("nodes") or "auto" for r in rows})
    heavy = [f for f in files if f[1] >= 0.02 * total]
    rest = files[len(heavy) :]
    lines = [
        "## Where CI's CPU goes (`bench/cpu_by_test.py`)",
        "",
        f"CPU seconds per test file in one whole-suite run ({len(rows)} tests, sandbox nodes: {', '.join(modes)}).",
        "Each xdist worker runs in a cpuacct cgroup of its own, so a file's figure includes everything its tests",
        "started (Terraform and the provider, moto, the sandbox nodes and the jobs on them). Total",
        f"**{total / 60:.1f} CPU-minutes**.",
        "",
        "| file | CPU s | share | tests | wall s (summed) |",
        "|---|---:|---:|---:|---:|",
        *(f"| `{name}` | {cpu:.0f} | {cpu / total:.0%} | {n} | {wall:.0f} |" for name, cpu, wall, n in heavy),
        f"| {len(rest)} other files | {sum(f[1] for f in rest):.0f} | {sum(f[1] for f in rest) / total:.0%} "
        f"| {sum(f[3] for f in rest)} | {sum(f[2] for f in rest):.0f} |",
    ]
    _report.publish("ci-cpu", lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

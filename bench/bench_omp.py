"""OpenMP's spin for jobs/resnet/train.py on CPU: GOMP_SPINCOUNT=10000 (what the sandbox gives its jobs, whose
nodes share this machine's cores: Workspace.job_env_defaults) against libgomp's default (300,000 spins before a
thread sleeps; what a real, dedicated node keeps), on an idle machine and beside two busy processes (a shared
machine: other sandbox nodes, CI's parallel tests).

    .venv/bin/python -m bench.bench_omp          # ~5 min on 2 cores; writes the "omp" section

Each figure is one `python train.py --data digits ... --epochs 2` process: its wall time and its CPU time
(all its threads), medians of interleaved rounds. (OMP_WAIT_POLICY=PASSIVE was also tried: half the CPU when
busy, but twice the wall time on an idle machine.)
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench._report import write_section

JOB = Path(__file__).resolve().parent.parent / "jobs" / "resnet"
ARGS = ["--data", "digits", "--width", "16", "--image-size", "32", "--batch-size", "64", "--epochs", "2"]
ROUNDS = 2
POLICIES = {"libgomp default": None, "GOMP_SPINCOUNT=10000": "10000"}


def one_run(spin: str | None, outputs: Path) -> tuple[float, float]:
    """(wall s, CPU s) of one training process."""
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    if spin:
        env["GOMP_SPINCOUNT"] = spin
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "train.py", *ARGS, "--outputs", str(outputs)], cwd=JOB, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"train.py failed (GOMP_SPINCOUNT={spin!r})")
    return time.perf_counter() - t0, usage.ru_utime + usage.ru_stime


def measure(busy: int) -> dict[str, tuple[float, float]]:
    """{policy: (median wall s, median CPU s)} beside `busy` processes that spin forever."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
    try:
        got: dict[str, list[tuple[float, float]]] = {name: [] for name in POLICIES}
        with tempfile.TemporaryDirectory(prefix="bench-omp-") as tmp:
            for r in range(ROUNDS):
                order = list(POLICIES.items())
                for name, spin in order if r % 2 == 0 else order[::-1]:
                    got[name].append(one_run(spin, Path(tmp) / f"{r}-{spin or 'default'}"))
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    return {n: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for n, v in got.items()}


def main() -> int:
    import torch

    rows = []
    for busy, label in ((0, "idle"), (2, "beside 2 busy processes")):
        res = measure(busy)
        (bw, bc), (sw, sc) = res["libgomp default"], res["GOMP_SPINCOUNT=10000"]
        rows.append(
            f"| {label} | {bw:.1f} s / {bc:.1f} CPU-s | {sw:.1f} s / {sc:.1f} CPU-s | {bw / sw:.2f}x | {bc / sc:.2f}x |"
        )
    body = "\n".join(
        [
            "## OpenMP spin of the resnet job on CPU (`bench/bench_omp.py`)",
            "",
            f"`python train.py {' '.join(ARGS)}` as one process, {torch.get_num_threads()} torch threads, median of "
            f"{ROUNDS} interleaved rounds: libgomp's default (300,000 spins before a waiting thread sleeps; what a "
            "real node keeps) against GOMP_SPINCOUNT=10000 (what the sandbox gives every job unless job.toml's "
            "[env] sets it: its nodes share this machine's cores).",
            "",
            "| machine | default: wall / CPU | short spin: wall / CPU | wall, default / short | CPU, default / short |",
            "|---|---:|---:|---:|---:|",
            *rows,
            "",
            f"torch {torch.__version__}. OMP_WAIT_POLICY=PASSIVE, tried first, halved the CPU beside busy processes "
            "too but doubled the wall time on an idle machine (18 s -> 38-45 s), so it is not used.",
        ]
    )
    write_section("omp", body)
    print(body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

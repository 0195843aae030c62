"""Foundation benchmarks: `inv --list` start-up against a bare `import invoke`, rendering + python-hcl2
parsing (in-process), and `terraform init -backend=false` + `terraform validate` on the rendered files.

Run from the repo root: `python -m bench.bench_foundation`. Writes the "foundation" section of
docs/benchmarks.md.
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

ROOT = Path(__file__).resolve().parent.parent
INV = str(Path(sys.executable).parent / "inv")
LIST_RUNS = 10
RENDER_RUNS = 7
LIST_TARGET = 1.5  # inv --list may take at most this many times a bare `import invoke`
RENDER_TARGET_S = 0.5
MIRROR = Path("/opt/tf-plugins")


def wall(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def startup() -> tuple[float, float]:
    """Median wall time of `inv --list` and of `python -c "import invoke"`, interleaved to share noise."""
    baseline, candidate = [], []
    wall([INV, "--list"])  # warm the page cache and __pycache__ for both
    for _ in range(LIST_RUNS):
        baseline.append(wall([sys.executable, "-c", "import invoke"]))
        candidate.append(wall([INV, "--list"]))
    return statistics.median(candidate), statistics.median(baseline)


def render_parse(out_dir: Path) -> tuple[float, float]:
    """(first call, median of the rest) for render_terraform, which renders and parses every file."""
    from remotefit.render import render_terraform

    times = []
    for _ in range(RENDER_RUNS):
        t0 = time.perf_counter()
        render_terraform(ROOT / "templates", out_dir)
        times.append(time.perf_counter() - t0)
    return times[0], statistics.median(times[1:])


def terraform_validate(workdir: Path, rc_dir: Path) -> tuple[float | None, float | None]:
    """(cold, warm) seconds for init -backend=false + validate; None when terraform is not installed."""
    import shutil

    from remotefit.render import terraformrc_text
    from remotefit.terraform import Terraform

    if not shutil.which("terraform"):
        return None, None
    env = {}
    if MIRROR.is_dir():
        rc = rc_dir / "terraformrc"
        rc.write_text(terraformrc_text(MIRROR))
        env["TF_CLI_CONFIG_FILE"] = str(rc)
    tf = Terraform("terraform", workdir, env)
    out = []
    for _ in range(2):  # a fresh .terraform, then again with the providers already installed
        t0 = time.perf_counter()
        tf.init(None)
        tf.validate()
        out.append(time.perf_counter() - t0)
    return out[0], out[1]


def terraform_gc(workdir: Path, rounds: int = 3) -> dict[str, tuple[float, float]] | None:
    """{GOGC: (median CPU seconds, peak RSS MB)} of `terraform validate` (Terraform and the AWS provider it
    starts; their CPU is this process's children's) at Go's default and at the GOGC remotefit sets.
    Needs the initialised workdir of terraform_validate."""
    import shutil

    from remotefit.terraform import PROVIDER_GOGC

    if not shutil.which("terraform"):
        return None
    cpu: dict[str, list[float]] = {"100": [], PROVIDER_GOGC: []}
    rss: dict[str, float] = {}
    for _ in range(rounds):
        for gogc in cpu:  # interleaved, so both share the machine's noise
            env = {**os.environ, "GOGC": gogc, "TF_IN_AUTOMATION": "1", "CHECKPOINT_DISABLE": "1"}
            proc = subprocess.Popen(["terraform", "validate", "-no-color"], cwd=workdir, env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
            _, status, usage = os.wait4(proc.pid, 0)  # its own usage and its reaped children's (the provider)
            proc.returncode = os.waitstatus_to_exitcode(status)
            if proc.returncode != 0:
                raise SystemExit(f"terraform validate failed in {workdir}")
            cpu[gogc].append(usage.ru_utime + usage.ru_stime)
            rss[gogc] = max(rss.get(gogc, 0.0), usage.ru_maxrss / 1024)
    return {g: (statistics.median(v), rss[g]) for g, v in cpu.items()}


def main() -> int:
    inv_list, bare = startup()
    ratio = inv_list / bare
    with tempfile.TemporaryDirectory(prefix="bench-foundation-") as tmp:
        out_dir = Path(tmp) / "terraform"
        render_first, render_median = render_parse(out_dir)
        tf_cold, tf_warm = terraform_validate(out_dir, Path(tmp))
        gc = terraform_gc(out_dir) if tf_cold is not None else None

    def verdict(ok: bool) -> str:
        return "pass" if ok else "FAIL"

    tf_row = (
        f"| `terraform init -backend=false` + `validate` | {tf_cold:.2f} s cold, {tf_warm:.2f} s warm | – | – | info |"
        if tf_cold is not None
        else "| `terraform init -backend=false` + `validate` | terraform not installed | – | – | skipped |"
    )
    body = "\n".join(
        [
            "## Foundation: start-up and rendering",
            "",
            f"`python -m bench.bench_foundation`; medians of {LIST_RUNS} interleaved runs for start-up, "
            f"{RENDER_RUNS - 1} warm runs for rendering (in-process, after a first cold call).",
            "",
            "| what | figure | baseline / ratio | target | result |",
            "|---|---|---|---|---|",
            f'| `inv --list` wall time | {inv_list * 1000:.0f} ms | `python -c "import invoke"` {bare * 1000:.0f} ms; '
            f"ratio {ratio:.2f}× | ≤ {LIST_TARGET}× | {verdict(ratio <= LIST_TARGET)} |",
            f"| render + python-hcl2 parse (`render_terraform`) | {render_median * 1000:.0f} ms "
            f"(first call {render_first * 1000:.0f} ms) | – | ≤ {RENDER_TARGET_S} s | "
            f"{verdict(render_median <= RENDER_TARGET_S)} |",
            tf_row,
        ]
    )
    if gc:
        from remotefit.terraform import PROVIDER_GOGC

        (base_cpu, base_rss), (ours_cpu, ours_rss) = gc["100"], gc[PROVIDER_GOGC]
        body += (
            f"\n\nCPU of one `terraform validate` (Terraform and the AWS provider it starts twice; median of 3, "
            f"interleaved): Go's default GOGC=100 **{base_cpu:.2f} CPU-s**, peak {base_rss:.0f} MB; remotefit's "
            f"GOGC={PROVIDER_GOGC} **{ours_cpu:.2f} CPU-s** ({ours_cpu / base_cpu:.2f}x), peak {ours_rss:.0f} MB. "
            "Plan, apply and destroy walk the provider's schema the same way in each of their walks; "
            "`bench/bench_gogc.py` measures those."
        )
    write_section("foundation", body)
    print(body)
    ok = ratio <= LIST_TARGET and render_median <= RENDER_TARGET_S
    return 0 if ok else 1


if __name__ == "__main__":
    os.chdir(ROOT)
    raise SystemExit(main())

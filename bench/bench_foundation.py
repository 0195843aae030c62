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


def main() -> int:
    inv_list, bare = startup()
    ratio = inv_list / bare
    with tempfile.TemporaryDirectory(prefix="bench-foundation-") as tmp:
        out_dir = Path(tmp) / "terraform"
        render_first, render_median = render_parse(out_dir)
        tf_cold, tf_warm = terraform_validate(out_dir, Path(tmp))

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
    write_section("foundation", body)
    print(body)
    ok = ratio <= LIST_TARGET and render_median <= RENDER_TARGET_S
    return 0 if ok else 1


if __name__ == "__main__":
    os.chdir(ROOT)
    raise SystemExit(main())

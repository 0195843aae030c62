"""CPU of the two venvs a fresh node makes before a job trains, the way remotefit made them before and now.

1. The node tools' venv (user data): `python3 -m venv` (ensurepip) + its own pip installs boto3, against
   `python3 -m venv --without-pip` + the system's pip with `--python` (what templates/user_data.sh.tftpl runs).
2. jobs/resnet's venv (runner.ensure_venv): a `--system-site-packages` venv with ensurepip + `pip install -r`
   (byte-compiling everything), against runner.ensure_venv itself (no ensurepip where the node's pip reaches the
   venv, `--no-compile`), then the job's imports once and twice: without the install's .pyc files the first
   run compiles what it imports (the second shows they were kept).

Both run on a Debian Python (the sandbox image's, bookworm: /usr/bin/python3 here) from the sandbox's local
wheelhouse (no network), rounds alternating which goes first; CPU is the children's user+system time.

Usage: python -m bench.bench_venv [--rounds 2] [--python /usr/bin/python3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
from pathlib import Path

from bench import _report
from bench.bench_apply import ROOT
from bench.bench_apply import cpu_of as cpu

REQUIREMENTS = ROOT / "jobs" / "resnet" / "requirements.txt"
IMPORTS = "import torch, numpy, sklearn.datasets, matplotlib.pyplot"


def tools_before(py: str, d: Path, env: dict[str, str], boto3: str) -> float:
    return cpu([py, "-m", "venv", str(d)], env) + cpu([f"{d}/bin/pip", "install", "-q", boto3], env)


def tools_now(py: str, d: Path, env: dict[str, str], boto3: str) -> float:
    made = cpu([py, "-m", "venv", "--without-pip", str(d)], env)
    return made + cpu([py, "-m", "pip", "--python", f"{d}/bin/python", "install", "-q", boto3], env)


def job_before(py: str, d: Path, env: dict[str, str]) -> float:
    made = cpu([py, "-m", "venv", "--system-site-packages", str(d)], env)
    return made + cpu([f"{d}/bin/python", "-m", "pip", "install", "-q", "-r", str(REQUIREMENTS)], env)


def job_now(py: str, d: Path, env: dict[str, str]) -> float:
    code = (
        f"import sys; sys.path.insert(0, {str(ROOT / 'remotefit' / 'node')!r}); import runner; "
        f"sys.exit(runner.ensure_venv({str(d)!r}, {str(REQUIREMENTS)!r}))"
    )
    return cpu([py, "-c", code], env)


def main() -> int:
    from remotefit import sandbox_image

    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--python", default="/usr/bin/python3", help="the node-like Python (Debian's, with pip)")
    args = ap.parse_args()
    boto3 = sandbox_image.WHEELHOUSE_REQUIREMENTS[0]
    sandbox_image.wheelhouse()
    house = sandbox_image.wheels_for(REQUIREMENTS)  # what jobs/resnet asks for, as the sandbox's nodes get it
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON", "VIRTUAL_ENV"))}
    env.update({"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(house), "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    tmp = Path(tempfile.mkdtemp(prefix="remotefit-bench-venv-"))
    got: dict[str, list[float]] = {k: [] for k in ("tb", "tn", "jb", "jn", "ib1", "ib2", "in1", "in2")}
    try:
        for r in range(args.rounds):
            for first in (0, 1) if r % 2 == 0 else (1, 0):
                d = tmp / f"r{r}-{first}"
                if first == 0:
                    got["tb"].append(tools_before(args.python, d / "tools", env, boto3))
                    got["jb"].append(job_before(args.python, d / "job", env))
                    key = "ib"
                else:
                    got["tn"].append(tools_now(args.python, d / "tools", env, boto3))
                    got["jn"].append(job_now(args.python, d / "job", env))
                    key = "in"
                for i in (1, 2):
                    got[f"{key}{i}"].append(cpu([f"{d}/job/bin/python", "-c", IMPORTS], env))
                shutil.rmtree(d)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    m = {k: statistics.median(v) for k, v in got.items()}
    first_job = (m["jb"] + m["ib1"], m["jn"] + m["in1"])
    lines = [
        "## A fresh node's venvs: CPU before and now (`bench/bench_venv.py`)",
        "",
        f"`python -m bench.bench_venv --rounds {args.rounds}`: {args.python} (Debian's, like the sandbox image), "
        "the sandbox's local wheelhouse, medians; CPU seconds (user + system) of every process.",
        "",
        "| what | before | now | ratio |",
        "|---|---:|---:|---:|",
        f"| node tools' venv + {boto3} (user data) | {m['tb']:.1f} | {m['tn']:.1f} | {m['tn'] / m['tb']:.2f}x |",
        f"| jobs/resnet's venv (runner.ensure_venv) | {m['jb']:.1f} | {m['jn']:.1f} | {m['jn'] / m['jb']:.2f}x |",
        f"| its imports, first run | {m['ib1']:.1f} | {m['in1']:.1f} | {m['in1'] / m['ib1']:.2f}x |",
        f"| its imports, second run | {m['ib2']:.1f} | {m['in2']:.1f} | {m['in2'] / m['ib2']:.2f}x |",
        f"| **venv + first run's imports** | {first_job[0]:.1f} | {first_job[1]:.1f} | "
        f"{first_job[1] / first_job[0]:.2f}x |",
        "",
        "Before: `python3 -m venv` with ensurepip (it byte-compiles a whole pip) and pip's default byte-compiling "
        "of everything it installs. Now: no pip of the venv's own where the system's reaches it, and "
        "`--no-compile` for a job's requirements: the first run compiles only what it imports, once.",
    ]
    _report.publish("venv", lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

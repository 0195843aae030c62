"""Our `inv apply` / `inv destroy` vs raw `terraform apply` / `terraform destroy` on the sandbox.

(a) The same generated directory, var-file and environment; the order alternates each round.
    Ours includes what raw Terraform does not: pre-flight API calls, the price line, rendering,
    `terraform init`, the sandbox sshd nodes, waiting for SSH and the destroy verification.
(b) Time from `inv apply` starting to every node answering over SSH, for 1 and 2 nodes
    (`inv apply` returns only once every node is SSH-ready).

Runs in an isolated project (own aws_env_vars, generated/, moto server); writes its section of
docs/benchmarks.md. Usage: python -m bench.bench_apply [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import _report

ROOT = Path(__file__).resolve().parent.parent
INV = str(Path(sys.executable).parent / "inv")
ENV_FILE = (
    "AWS_ACCOUNT=bench\nAWS_REGION=us-east-1\nSTAGE=bench\nTF_STATE_BUCKET=remotefit-bench-state\nTARGET=sandbox\n"
)


def project_env(base: Path) -> dict[str, str]:
    (base / "aws_env_vars").write_text(ENV_FILE)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "REMOTEFIT_", "TARGET", "STAGE", "TF_"))}
    env |= {
        "REMOTEFIT_ENV_FILE": str(base / "aws_env_vars"),
        "REMOTEFIT_GENERATED": str(base / "generated"),
        "REMOTEFIT_RUNS": str(base / "runs"),
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
    }
    return env


def timed(argv: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    res = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    took = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:3])} failed ({res.returncode}):\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}")
    return took


def cpu_of(argv: list[str], env: dict[str, str]) -> float:
    """CPU seconds (user + system) the command and its children used; like `timed`, it must succeed."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    timed(argv, env)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def cpu_total(per_step: dict[str, list[float]]) -> float:
    """The sum of each step's median CPU seconds."""
    return sum(statistics.median(v) for v in per_step.values())


def cpu_row(name: str, per_step: dict[str, list[float]], label: str = "") -> str:
    """A markdown row: `name` + `label`, each step's median CPU seconds, then their total."""
    cells = " | ".join(f"{statistics.median(v):.1f}" for v in per_step.values())
    return f"| {name}{label} | {cells} | {cpu_total(per_step):.1f} |"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="remotefit-bench-apply-"))
    env = project_env(base)
    gen = base / "generated"
    timed([INV, "backend"], env)  # also starts the project's moto server
    os.environ.update({k: v for k, v in env.items() if k.startswith("REMOTEFIT_")})
    from remotefit.workspace import Workspace

    ws = Workspace(root=ROOT, defaults={"terraform_mirror": "/opt/tf-plugins"})
    tf_env = {**env, **ws.aws_env(), "TF_CLI_CONFIG_FILE": str(gen / "terraformrc")}
    tf_env |= {"TF_IN_AUTOMATION": "1", "CHECKPOINT_DISABLE": "1"}
    tfvars = f"-var-file={gen / 'bench.tfvars'}"
    raw_apply = [
        "terraform",
        f"-chdir={gen / 'terraform'}",
        "apply",
        "-auto-approve",
        "-input=false",
        "-no-color",
        tfvars,
    ]
    raw_destroy = ["terraform", f"-chdir={gen / 'terraform'}", "destroy", "-auto-approve", "-input=false", "-no-color"]
    raw_destroy.append(tfvars)

    rows: dict[str, list[tuple[float, float]]] = {"ours": [], "raw": []}
    try:
        for r in range(args.rounds):
            # round 0 starts with ours: the first `inv apply` writes the tfvars raw Terraform reuses
            for who in ("ours", "raw") if r % 2 == 0 else ("raw", "ours"):
                if who == "ours":
                    a = timed([INV, "apply", "--yes"], env)
                    d = timed([INV, "destroy", "--yes"], env)
                else:
                    a = timed(raw_apply, tf_env)
                    d = timed(raw_destroy, tf_env)
                rows[who].append((a, d))
                print(f"round {r} {who}: apply {a:.1f} s, destroy {d:.1f} s", flush=True)
        ready: dict[int, float] = {}
        for n in (1, 2):
            ready[n] = timed([INV, "apply", "--yes", "--nodes", str(n)], env)
            timed([INV, "destroy", "--yes"], env)
            print(f"{n} node(s): SSH-ready {ready[n]:.1f} s after `inv apply` started", flush=True)
    finally:
        subprocess.run([INV, "sandbox.down"], cwd=ROOT, env=env, capture_output=True, check=False)

    def med(who: str, i: int) -> float:
        return statistics.median(x[i] for x in rows[who])

    ours_total = med("ours", 0) + med("ours", 1)
    raw_total = med("raw", 0) + med("raw", 1)
    lines = [
        "## Provisioning overhead on the sandbox (`bench/bench_apply.py`)",
        "",
        "`inv apply --yes` + `inv destroy --yes` vs raw `terraform apply -auto-approve` + `terraform destroy",
        "-auto-approve` on the same generated directory, var-file and environment (moto server on loopback,",
        f"1 × c7i.xlarge), order alternating, {len(rows['ours'])} rounds each, medians. Ours adds pre-flight,",
        "rendering, `terraform init` (only when its inputs changed), the sandbox sshd node, the SSH-readiness wait and the destroy verification.",
        "",
        "| | apply (s) | destroy (s) | apply + destroy (s) |",
        "|---|---:|---:|---:|",
        f"| `inv` tasks | {med('ours', 0):.1f} | {med('ours', 1):.1f} | {ours_total:.1f} |",
        f"| raw terraform | {med('raw', 0):.1f} | {med('raw', 1):.1f} | {raw_total:.1f} |",
        f"| ratio | {med('ours', 0) / med('raw', 0):.2f}x | {med('ours', 1) / med('raw', 1):.2f}x "
        f"| **{ours_total / raw_total:.2f}x** (target <= 1.15x) |",
        "",
        "Rounds (apply/destroy, s): " + "; ".join(f"{w} {a:.1f}/{d:.1f}" for w in ("ours", "raw") for a, d in rows[w]),
        "",
        "Time from `inv apply` starting to every node answering over SSH (sandbox; on AWS see docs/aws-timeline.md):",
        "",
        "| nodes | SSH-ready (s) |",
        "|---:|---:|",
        *(f"| {n} | {ready[n]:.1f} |" for n in (1, 2)),
    ]
    _report.publish("nodes", lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""CPU of `inv apply` + `inv plan` + `inv destroy` on the sandbox at two Go GC targets for Terraform and its
AWS provider (GOGC reaches the provider through Terraform's environment; remotefit sets terraform.PROVIDER_GOGC).

The provider's CPU is per RPC, not per start: one PrepareProviderConfig (~3.5 CPU-s here, the whole schema
walked again) in each of a command's walks (validate, plan, apply), allocation-heavy, so a higher GC target
buys CPU for memory. CPU is the children's user+system time of each command (inv, Terraform, the provider),
so it holds up on a busy machine better than wall time. Loopback sandbox nodes, the order alternating.

Usage: python -m bench.bench_gogc [--rounds 2] [--baseline 200]
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

from bench import _report
from bench.bench_apply import INV, ROOT, cpu_of, cpu_row, cpu_total, project_env, timed


def main() -> int:
    from remotefit.terraform import PROVIDER_GOGC

    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--baseline", default="200", help="the GOGC to compare remotefit's with")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="remotefit-bench-gogc-"))
    env = project_env(base) | {"REMOTEFIT_SANDBOX_NODES": "loopback"}
    steps = {"apply": [INV, "apply", "--yes"], "plan": [INV, "plan"], "destroy": [INV, "destroy", "--yes"]}
    cpu: dict[str, dict[str, list[float]]] = {g: {s: [] for s in steps} for g in (args.baseline, PROVIDER_GOGC)}
    try:
        timed([INV, "backend"], env)
        for r in range(args.rounds):
            order = (args.baseline, PROVIDER_GOGC) if r % 2 == 0 else (PROVIDER_GOGC, args.baseline)
            for gogc in order:
                for step, argv in steps.items():
                    cpu[gogc][step].append(cpu_of(argv, env | {"GOGC": gogc}))
                print(f"round {r} GOGC={gogc}: " + ", ".join(f"{s} {v[-1]:.1f}" for s, v in cpu[gogc].items()))
    finally:
        subprocess.run([INV, "sandbox.down"], cwd=ROOT, env=env, capture_output=True, check=False)

    lines = [
        "## Terraform's Go GC target (`bench/bench_gogc.py`)",
        "",
        "CPU seconds (user + system of `inv`, Terraform and the AWS provider) of one `inv apply --yes`, `inv plan`",
        f"and `inv destroy --yes` on the sandbox (loopback nodes, 1 × c7i.xlarge), medians of {args.rounds} rounds,",
        "order alternating. The provider's CPU is per RPC: each walk of a command (validate, plan, apply) calls",
        "PrepareProviderConfig, which walks the whole schema again; GC is much of it.",
        "",
        "| | apply | plan | destroy | total |",
        "|---|---:|---:|---:|---:|",
        cpu_row(f"GOGC={args.baseline}", cpu[args.baseline]),
        cpu_row(
            f"GOGC={PROVIDER_GOGC}",
            cpu[PROVIDER_GOGC],
            f", remotefit's (**{cpu_total(cpu[PROVIDER_GOGC]) / cpu_total(cpu[args.baseline]):.2f}x**)",
        ),
    ]
    _report.publish("gogc", lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

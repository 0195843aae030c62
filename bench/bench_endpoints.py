"""CPU of Terraform's apply + plan + destroy on the sandbox with and without an `endpoints` block in the AWS
provider's configuration (templates/providers.tf.j2 had one, of five services, until the sandbox's endpoint
moved to AWS_ENDPOINT_URL).

The baseline puts the old block back through a Terraform override file (`endpoints_override.tf` merges into
the rendered `provider "aws"`), so both ways run the same rendered directory, var-file, environment and moto
server; only that block differs. Raw `terraform` commands, not `inv`, so the figures are Terraform's and the
provider's alone (children's user + system time; it holds up on a busy machine better than wall time).
The order alternates each round.

Usage: python -m bench.bench_endpoints [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
from pathlib import Path

from bench import _report
from bench.bench_apply import INV, ROOT, cpu_of, cpu_row, cpu_total, project_env, timed

# What templates/providers.tf.j2 held before: every service remotefit calls, pointed at the sandbox.
OLD_BLOCK = """provider "aws" {
  endpoints {
    ec2 = var.aws_endpoint
    iam = var.aws_endpoint
    s3  = var.aws_endpoint
    ssm = var.aws_endpoint
    sts = var.aws_endpoint
  }
}
"""
WAYS = ("endpoints block", "AWS_ENDPOINT_URL only")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="remotefit-bench-endpoints-"))
    env = project_env(base) | {"REMOTEFIT_SANDBOX_NODES": "loopback"}
    gen = base / "generated"
    tfdir = gen / "terraform"
    override = tfdir / "endpoints_override.tf"
    try:
        timed([INV, "backend"], env)  # starts the project's moto server
        timed([INV, "plan"], env)  # renders, writes the tfvars and runs `terraform init`
        os.environ.update({k: v for k, v in env.items() if k.startswith("REMOTEFIT_")})
        from remotefit.workspace import Workspace

        ws = Workspace(root=ROOT, defaults={"terraform_mirror": "/opt/tf-plugins"})
        tf_env = {**env, **ws.aws_env(), "TF_CLI_CONFIG_FILE": str(gen / "terraformrc")}
        tf_env |= {"TF_IN_AUTOMATION": "1", "CHECKPOINT_DISABLE": "1", "TF_INPUT": "0"}
        tf = ["terraform", f"-chdir={tfdir}"]
        tfvars = f"-var-file={gen / 'bench.tfvars'}"
        steps = {
            "apply": [*tf, "apply", "-auto-approve", tfvars],
            "plan": [*tf, "plan", tfvars],
            "destroy": [*tf, "destroy", "-auto-approve", tfvars],
        }
        cpu: dict[str, dict[str, list[float]]] = {w: {s: [] for s in steps} for w in WAYS}
        for r in range(args.rounds):
            for way in WAYS if r % 2 == 0 else WAYS[::-1]:
                if way == WAYS[0]:
                    override.write_text(OLD_BLOCK)
                else:
                    override.unlink(missing_ok=True)
                for step, argv in steps.items():
                    cpu[way][step].append(cpu_of(argv, tf_env))
                print(f"round {r} {way}: " + ", ".join(f"{s} {v[-1]:.1f}" for s, v in cpu[way].items()))
    finally:
        override.unlink(missing_ok=True)
        subprocess.run([INV, "sandbox.down"], cwd=ROOT, env=env, capture_output=True, check=False)

    lines = [
        "## The AWS provider's `endpoints` block (`bench/bench_endpoints.py`)",
        "",
        "CPU seconds (user + system of Terraform and the AWS provider) of raw `terraform apply -auto-approve`, `plan`",
        "and `destroy -auto-approve` on the sandbox (moto, 1 × c7i.xlarge, no sandbox node started), medians of",
        f"{args.rounds} rounds, order alternating. Both ways run the same rendered directory and environment",
        "(AWS_ENDPOINT_URL = moto); the baseline adds the five-service `endpoints` block the template used to have,",
        "through an override file. The provider validates its configuration in every walk of a command (apply: 3,",
        "plan: 2, destroy: 4); an `endpoints` block, even one of nulls, adds ~2 CPU-s to each of those validations.",
        "",
        "| | apply | plan | destroy | total |",
        "|---|---:|---:|---:|---:|",
        cpu_row(WAYS[0], cpu[WAYS[0]]),
        cpu_row(
            WAYS[1], cpu[WAYS[1]], f", remotefit's now (**{cpu_total(cpu[WAYS[1]]) / cpu_total(cpu[WAYS[0]]):.2f}x**)"
        ),
    ]
    _report.publish("endpoints", lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Container sandbox nodes vs loopback nodes: the node image build, boot to SSH, and `inv apply` to SSH-ready.

(a) The image: a fresh build into an empty cache (debootstrap from Debian's mirror, cloud-init, the local
    apt repository), then the cached lookup every later apply pays. Skipped with --no-build.
(b) `inv apply --yes` (1 node) to every node SSH-ready, then `inv destroy --yes`, alternating loopback and
    container nodes in one isolated project each round; for container nodes also the boot alone (the
    supervisor started to the node's sshd answering), as apply reports it.

Needs root, systemd-nspawn and debootstrap. Writes its section of docs/benchmarks.md.
Usage: python -m bench.bench_container [--rounds 2] [--no-build]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import _report
from bench.bench_apply import INV, ROOT, project_env


def inv(argv: list[str], env: dict[str, str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    res = subprocess.run([INV, *argv], cwd=ROOT, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    took = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"inv {' '.join(argv)} failed ({res.returncode}):\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}")
    return took, res.stdout + res.stderr


def image_build() -> tuple[float, float]:
    from remotefit import sandbox_image

    with tempfile.TemporaryDirectory(prefix="remotefit-bench-image-") as cache:
        t0 = time.perf_counter()
        sandbox_image.ensure_image(Path(cache), echo=False)
        built = time.perf_counter() - t0
        t0 = time.perf_counter()
        sandbox_image.ensure_image(Path(cache), echo=False)
        cached = time.perf_counter() - t0
        subprocess.run(["rm", "-rf", cache], check=False)
    return built, cached


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-build", action="store_true", help="skip the fresh image build (a)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench_container needs root (container nodes)")
    built = cached = None
    if not args.no_build:
        built, cached = image_build()
        print(f"image: built in {built:.1f} s, cached lookup {cached * 1000:.1f} ms", flush=True)
    from remotefit import sandbox_image

    sandbox_image.ensure_image(echo=False)  # the machine's cache, for the applies
    sandbox_image.wheelhouse()
    rows: dict[str, list[tuple[float, float]]] = {"loopback": [], "container": []}
    boots: list[float] = []
    for r in range(args.rounds):
        for mode in ("loopback", "container") if r % 2 == 0 else ("container", "loopback"):
            base = Path(tempfile.mkdtemp(prefix=f"remotefit-bench-{mode}-"))
            env = project_env(base) | {"REMOTEFIT_SANDBOX_NODES": mode, "REMOTEFIT_HOME": str(base / "home")}
            try:
                inv(["backend"], env)
                a, out = inv(["apply", "--yes"], env)
                d, _ = inv(["destroy", "--yes"], env)
            finally:
                subprocess.run([INV, "sandbox.down"], cwd=ROOT, env=env, capture_output=True, check=False)
            rows[mode].append((a, d))
            m = re.search(r"booted to SSH at \S+ in ([0-9.]+) s", out)
            if mode == "container" and m:
                boots.append(float(m.group(1)))
            print(f"round {r} {mode}: apply {a:.1f} s, destroy {d:.1f} s", flush=True)

    def med(mode: str, i: int) -> float:
        return statistics.median(x[i] for x in rows[mode])

    lines = [
        "## Container sandbox nodes (`bench/bench_container.py`)",
        "",
        "A container node is the node image (Debian bookworm, systemd, cloud-init; sandbox_image.py) booted by",
        "systemd-nspawn on an overlay disk, with the instance's real user data run by cloud-init; a loopback node",
        "is an sshd on this machine. Same project layout, moto server and 1 × c7i.xlarge; medians over",
        f"{args.rounds} rounds, order alternating.",
        "",
    ]
    if built is not None:
        lines += [
            f"- Node image, fresh build into an empty cache: **{built:.0f} s** (budget ≤ 120 s); the cached",
            f"  lookup every later apply pays: {cached * 1000:.1f} ms.",
        ]
    if boots:
        lines.append(
            f"- Container boot, supervisor started to sshd answering: **{statistics.median(boots):.1f} s** median "
            f"(budget ≤ 10 s; runs: {', '.join(f'{b:.1f}' for b in boots)})."
        )
    lines += [
        "",
        "| nodes | `inv apply` to SSH-ready and user data done (s) | `inv destroy` (s) |",
        "|---|---:|---:|",
        *(f"| {mode} | {med(mode, 0):.1f} | {med(mode, 1):.1f} |" for mode in ("loopback", "container")),
        "",
        "A container node's apply also waits for its boot script (the deadline, the watchdog's timer, apt from the",
        "image's local repository, the tools' venv from the wheelhouse), which a loopback node does not run.",
        "",
        "Rounds (apply/destroy, s): "
        + "; ".join(f"{m} {a:.1f}/{d:.1f}" for m in ("loopback", "container") for a, d in rows[m]),
    ]
    _report.publish("container-nodes", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())

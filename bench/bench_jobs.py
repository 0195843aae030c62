"""`inv fit` / `inv sync` against doing the same by hand with rsync and ssh, on a sandbox node.

    .venv/bin/python -m bench.bench_jobs            # ~3-5 min; writes the "jobs" section

It brings up its own isolated sandbox project (one node, real sshd on loopback), then measures, in
interleaved rounds (medians):

1. `inv fit` of a trivial job (python train.py writing one small file) against the same work by hand:
   `rsync -az` up, `ssh node 'cd … && python train.py'`, `rsync -az` back, with the same ssh config
   (so the same ControlMaster connection). Target: at most 1.5x.
2. `inv sync` with nothing changed against a raw `rsync -az` with the same filters. Target: 1.6x.
   Both are also given in-process (`remotefit.jobs.sync` without the `inv` start-up), to separate
   the CLI's fixed start-up cost from the sync itself.
3. Bytes sent when one file (~512 KB) of a 2,000-file, 200 MB job (random content) changes, from
   rsync's own --stats. Target: within 10 % of the file's size.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench._report import write_section
from tests.conftest import INV, ROOT, make_project

TRAIN = """\
import os
os.makedirs("outputs", exist_ok=True)
with open("outputs/result.txt", "w") as f:
    f.write("ok\\n")
print("done")
"""


def timed(argv: list[str], env: dict[str, str], **kw: object) -> float:
    t = time.perf_counter()
    subprocess.run(argv, env=env, check=True, capture_output=True, stdin=subprocess.DEVNULL, **kw)  # type: ignore[call-overload]
    return time.perf_counter() - t


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def make_big_job(path: Path, files: int, total_mb: int) -> None:
    size = total_mb * 1024 * 1024 // files
    for i in range(files):
        d = path / f"part{i // 100:02d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"shard{i:04d}.bin").write_bytes(os.urandom(size))
    (path / "train.py").write_text(TRAIN)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--mb", type=int, default=200)
    ap.add_argument("--no-write", action="store_true", help="print the section, do not write docs/benchmarks.md")
    opts = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-jobs-"))
    p = make_project(tmp / "proj")
    env = {**p.env}
    try:
        p.inv("backend", timeout=300)
        p.inv("apply", "--yes", timeout=300)
        nodes = json.loads((p.generated / "nodes.json").read_text())["nodes"]
        node, workdir, py = nodes[0]["alias"], nodes[0]["workdir"], nodes[0]["python"]
        cfg = str(p.generated / "ssh_config")
        ssh_e = f"ssh -F {shlex.quote(cfg)}"
        rsync_filters = [
            "--filter=:- .gitignore",
            "--filter=:- .remotefitignore",
            *[
                f"--exclude={e}"
                for e in (
                    ".git/",
                    ".venv/",
                    "venv/",
                    ".env/",
                    "__pycache__/",
                    "*.pyc",
                    ".ipynb_checkpoints/",
                    ".remotefit/",
                    "/outputs/",
                )
            ],
        ]

        # -- 1. fit vs by hand ---------------------------------------------------------------
        job = tmp / "trivial"
        job.mkdir()
        (job / "train.py").write_text(TRAIN)
        hand_dir = f"{workdir}/byhand"
        out_home = tmp / "byhand-out"
        hand = [
            "bash",
            "-c",
            f"rsync -az -e {shlex.quote(ssh_e)} {job}/ {node}:{hand_dir}/ && "
            f"ssh -F {shlex.quote(cfg)} {node} {shlex.quote(f'cd {hand_dir} && {py} train.py')} && "
            f"rsync -az -e {shlex.quote(ssh_e)} {node}:{hand_dir}/outputs/ {out_home}/",
        ]
        fit = [INV, "fit", str(job)]
        for _ in range(2):  # warm up: connection, page cache, the node's runner copy
            timed(fit, env, cwd=ROOT)
            timed(hand, env)
        fit_t, hand_t = [], []
        for _ in range(opts.rounds):
            fit_t.append(timed(fit, env, cwd=ROOT))
            hand_t.append(timed(hand, env))

        # -- 2. sync with nothing changed vs raw rsync ----------------------------------------
        big = tmp / "big"
        make_big_job(big, opts.files, opts.mb)
        raw_dir = f"{workdir}/raw"
        raw = ["rsync", "-az", "--delete", "--safe-links", "-e", ssh_e, *rsync_filters, f"{big}/", f"{node}:{raw_dir}/"]
        sync = [INV, "sync", str(big)]
        inproc = [
            sys.executable,
            "-c",
            "import sys, time; from remotefit import jobs; from remotefit.workspace import Workspace; "
            "ws = Workspace(); job = jobs.load_job(sys.argv[1]); t = time.perf_counter(); "
            "jobs.sync(ws, job, quiet=True); print(time.perf_counter() - t)",
            str(big),
        ]
        listing = [INV, "--list"]  # python + invoke + tasks.py: the floor of any `inv` call
        timed(sync, env, cwd=ROOT)
        timed(raw, env)
        sync_t, raw_t, inproc_t, list_t = [], [], [], []
        for _ in range(opts.rounds):
            sync_t.append(timed(sync, env, cwd=ROOT))
            raw_t.append(timed(raw, env))
            list_t.append(timed(listing, env, cwd=ROOT))
            res = subprocess.run(inproc, env=env, cwd=ROOT, check=True, capture_output=True, text=True)
            inproc_t.append(float(res.stdout.strip().splitlines()[-1]))

        # -- 3. bytes sent for one changed file -----------------------------------------------
        changed = big / "part07" / "shard0700.bin"
        sent, sizes = [], []
        for _ in range(3):
            changed.write_bytes(os.urandom(512 * 1024))
            res = subprocess.run(sync, env=env, cwd=ROOT, check=True, capture_output=True, text=True)
            m = re.search(rf"{node}: (\d+) of (\d+) files transferred, (\d+) bytes sent", res.stderr)
            assert m and m.group(1) == "1", res.stderr
            sent.append(int(m.group(3)))
            sizes.append(changed.stat().st_size)

        # -- 4. what `inv fit` imports (nothing of the AWS SDK when no AWS call is needed) --------
        res = subprocess.run(
            fit, env={**env, "PYTHONPROFILEIMPORTTIME": "1"}, cwd=ROOT, check=True, capture_output=True, text=True
        )
        imported = [ln.rsplit("|", 1)[1].strip() for ln in res.stderr.splitlines() if ln.startswith("import time:")]
        aws_imports = [m for m in imported if m.split(".")[0] in ("boto3", "botocore")]
    finally:
        p.inv("destroy", "--yes", check=False, timeout=300)
        p.down()

    fit_m, hand_m = median(fit_t), median(hand_t)
    sync_m, raw_m, inproc_m, list_m = median(sync_t), median(raw_t), median(inproc_t), median(list_t)
    over = median([s / z for s, z in zip(sent, sizes, strict=True)])
    ok = lambda good: "met" if good else "**missed**"  # noqa: E731
    met = fit_m <= 1.5 * hand_m and sync_m <= 1.6 * raw_m
    why = (
        ""
        if met
        else f"""The targets are missed by a fixed cost that no change to the fit loop can remove: starting `inv`
(Python, invoke and tasks.py: {list_m:.2f} s, the floor row) and remotefit's imports (pydantic for the
settings and job.toml; ~0.2 s) are paid once per command; the sync itself is no slower than rsync (the
in-process row). `inv fit` also waits for the run's final upload to the runs bucket (the durable-runs
promise: a run counts as finished once its results are kept): for a job this short that is mostly the
uploader's own start (boto3, ~0.7 s, beside the job), which by hand does not do. On this machine every
sandbox ssh session also sources /root/.bashrc (pyenv init, ~0.17 s a session; bash reads it for sshd
commands, a stock node's returns at once for them), which weighs on both sides; giving sandbox nodes their
own HOME removed it (one session 0.17 s -> 0.01 s) but was taken back for now: the one CI run with it took
39 min instead of ~23 (cause not found; pip's config also lives in that HOME). On a real node every round
trip adds 20-100 ms to both sides.
"""
    )
    md = f"""## Jobs: `inv fit` and `inv sync` against rsync + ssh by hand

`python -m bench.bench_jobs`: one sandbox node (sshd on loopback, the same ssh config and
ControlMaster connection for both sides), {opts.rounds} interleaved rounds, medians.

| what | remotefit | by hand | ratio | target |
|---|---|---|---|---|
| trivial job: sync, run, pull | `inv fit` {fit_m:.2f} s | rsync + ssh + rsync {hand_m:.2f} s | {fit_m / hand_m:.2f}x | ≤ 1.5x ({ok(fit_m <= 1.5 * hand_m)}) |
| sync, nothing changed ({opts.files} files, {opts.mb} MB) | `inv sync` {sync_m:.2f} s | `rsync -az` {raw_m:.2f} s | {sync_m / raw_m:.2f}x | ≤ 1.6x ({ok(sync_m <= 1.6 * raw_m)}) |
| the same, in-process (`jobs.sync`, no CLI start-up) | {inproc_m:.2f} s | {raw_m:.2f} s | {inproc_m / raw_m:.2f}x | |
| floor: `inv --list` (Python + invoke + tasks.py) + `rsync -az` | {list_m + raw_m:.2f} s | {raw_m:.2f} s | {(list_m + raw_m) / raw_m:.2f}x | |
| bytes sent, one 512 KB file changed | {median(sent) / 1024:.0f} KB | file {sizes[0] / 1024:.0f} KB | {over:.3f}x | ≤ 1.10x ({ok(over <= 1.1)}) |

`inv fit` makes three round trips per node (sync, or with nothing changed on either side since
the last sync a single digest check instead of rsync's file lists; `runner.py start --request -` in one
ssh, the start request and the node files on its stdin; one pull rsync for outputs and log), the same count as by
hand. `inv fit` imports {"no" if not aws_imports else ", ".join(aws_imports)} boto3/botocore modules
(`python -X importtime`).

{why}"""
    print(md)
    if not opts.no_write:
        write_section("jobs", md)


if __name__ == "__main__":
    main()

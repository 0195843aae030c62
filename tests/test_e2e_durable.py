"""Durable runs (issue 9), end to end on the sandbox: a run's results live in the runs bucket while it runs
and after its nodes are gone, and a pull from there is the same as a pull from the node."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from tests.conftest import Project
from tests.test_e2e_faults import make_job, run_id_of

pytestmark = pytest.mark.e2e

BUCKET = "remotefit-test-state-runs"  # conftest's state bucket + "-runs"

# Writes a few outputs (binary, nested), waits for the gate, writes the last one, exits with CODE.
DURABLE = """\
import os, random, sys, time
random.seed(7)
os.makedirs("outputs/ckpt", exist_ok=True)
with open("outputs/ckpt/model.bin", "wb") as f:
    f.write(bytes(random.getrandbits(8) for _ in range(300_000)))
print("checkpoint written", flush=True)
while not os.path.exists(os.environ["GATE"]):
    time.sleep(0.05)
with open("outputs/summary.json", "w") as f:
    f.write('{"acc": 0.5}')
print("done \\xff", flush=True)
sys.exit(int(os.environ["CODE"]))
"""


@pytest.fixture(scope="module")
def cluster(module_project: Project):
    p = module_project
    out = p.inv("backend", timeout=300).stdout
    assert f"runs bucket {BUCKET}" in out and "`inv destroy` never touches it" in out, out
    p.inv("apply", "--yes", timeout=300)
    yield p
    p.inv("destroy", "--yes", check=False, timeout=300)


def bucket_keys(p: Project, prefix: str) -> dict[str, bytes]:
    s3 = p.workspace().client("s3")
    objs = s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
    return {o["Key"][len(prefix) :]: s3.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read() for o in objs}


def wait_keys(p: Project, prefix: str, want: set[str], timeout: float = 60) -> dict[str, bytes]:
    deadline = time.monotonic() + timeout
    while True:
        got = bucket_keys(p, prefix)
        if want <= set(got):
            return got
        assert time.monotonic() < deadline, f"never in the runs bucket: {want - set(got)} (have {sorted(got)})"
        time.sleep(0.5)


def folder(d: Path) -> dict[str, bytes]:
    return {f.relative_to(d).as_posix(): f.read_bytes() for f in sorted(d.rglob("*")) if f.is_file()}


def test_a_missing_runs_bucket_is_one_warning_not_a_stuck_run(cluster: Project, tmp_path: Path):
    s3 = cluster.workspace().client("s3")
    s3.delete_bucket(Bucket=BUCKET)  # (empty so far) as with a stage made before the runs bucket existed
    job = make_job(tmp_path, "nobucket", {"train.py": "print('trained')"})
    started = time.monotonic()
    res = cluster.inv("fit", str(job), timeout=120)
    assert time.monotonic() - started < 60, "the final upload must not retry a missing bucket for minutes"
    assert "trained" in res.stdout
    warning = [x for x in res.stderr.splitlines() if x.startswith("warning:")]
    assert len(warning) == 1 and "NoSuchBucket" in warning[0] and "inv backend" in warning[0], res.stderr
    assert "created bucket" in cluster.inv("backend", timeout=120).stdout  # repaired by the advice


def test_results_kept_while_running_and_pulled_alike_after_destroy(cluster: Project, tmp_path: Path):
    gate = tmp_path / "gate"
    job = make_job(
        tmp_path, "durable", {"train.py": DURABLE, "job.toml": f'sync_every = 1\n[env]\nGATE = "{gate}"\nCODE = "3"\n'}
    )
    run_id = run_id_of(cluster.inv("fit", str(job), "--detach", timeout=120).stderr)
    prefix = f"test/durable/{run_id}/"
    # While it runs: the checkpoint and the log so far are in the bucket already, and so is its record.
    mid = wait_keys(cluster, prefix, {"outputs/ckpt/model.bin", "logs/node-0.log", "record.json"})
    assert b"checkpoint written" in mid["logs/node-0.log"] and "status/node-0.json" not in mid
    assert json.loads(mid["record.json"])["run_id"] == run_id
    gate.touch()
    assert cluster.inv("logs", "--run", run_id, "--follow", check=False, timeout=120).returncode == 3
    # Finished: its final status came last, after every result.
    end = bucket_keys(cluster, prefix)
    assert json.loads(end["status/node-0.json"])["exit_code"] == 3 and "outputs/summary.json" in end
    # Pulled from the node, then (with the node destroyed) from the runs bucket: the same folder.
    from_node = cluster.inv("pull", "--run", run_id, timeout=120)
    assert from_node.returncode == 0
    first = cluster.runs / "durable" / run_id
    aside = tmp_path / "from-node"
    first.rename(aside)
    res = cluster.inv("destroy", "--yes", timeout=300)
    assert "verified: nothing tagged" in res.stdout, res.stdout + res.stderr
    listed = cluster.inv("runs", timeout=120).stdout
    assert run_id in listed and "in S3" in listed, listed
    cluster.inv("pull", "--run", run_id, timeout=120)
    assert folder(first) == folder(aside)  # outputs, log and run.json, byte for byte
    assert json.loads((first / "run.json").read_text())["exit_code"] == 3
    assert (first / "log").read_bytes().endswith("done \xff\n".encode())
    shutil.rmtree(first)
    logs = cluster.inv("logs", "--run", run_id, check=False, timeout=120)
    assert logs.returncode == 3 and "checkpoint written" in logs.stdout and "from the runs bucket" in logs.stderr


def test_sync_every_must_be_a_positive_number(cluster: Project, tmp_path: Path):
    for bad in ("0", "-5", '"60"', "true"):
        job = make_job(
            tmp_path / bad.strip('"'), "badsync", {"train.py": "print(1)", "job.toml": f"sync_every = {bad}\n"}
        )
        res = cluster.inv("fit", str(job), check=False, timeout=120)
        lines = res.stderr.strip().splitlines()
        assert res.returncode != 0 and len(lines) == 1 and "sync_every must be a positive number" in lines[0], (
            res.stderr
        )
        assert "Traceback" not in res.stderr


# Trains until SIGTERM, then writes its checkpoint and exits 143, as a job that checkpoints should.
CHECKPOINTS_ON_TERM = """\
import os, signal, sys, time
def on_term(*_):
    os.makedirs("outputs", exist_ok=True)
    with open("outputs/last.ckpt", "wb") as f:
        f.write(b"step 41" * 10_000)
    print("checkpointed on SIGTERM", flush=True)
    sys.exit(143)
signal.signal(signal.SIGTERM, on_term)
print("training", flush=True)
while True:
    time.sleep(0.1)
"""


def test_the_deadline_ends_a_training_run_after_its_checkpoint_is_in_the_bucket(cluster: Project, tmp_path: Path):
    """--max-hours is hard, but no result is lost to it: the watchdog SIGTERMs the run, waits for its final
    upload, and only then terminates the node."""
    import os
    import subprocess
    import sys

    cluster.inv("apply", "--yes", timeout=300)  # the test before destroyed the stage
    job = make_job(tmp_path, "deadline", {"train.py": CHECKPOINTS_ON_TERM})
    run_id = run_id_of(cluster.inv("fit", str(job), "--detach", timeout=120).stderr)
    prefix = f"test/deadline/{run_id}/"
    wait_keys(cluster, prefix, {"logs/node-0.log", "record.json"})
    (node,) = cluster.workspace().sandbox.nodes()
    cfg_file = cluster.sandbox / "nodes" / node.instance_id / "watchdog.json"
    cfg = json.loads(cfg_file.read_text())
    assert cfg["deadline_epoch"], cfg  # apply's --max-hours reached the node
    # One tick with the clock past the deadline (the node's real /proc: the run is live).
    argv = [sys.executable, str(Path(__file__).parents[1] / "remotefit" / "node" / "watchdog.py")]
    argv += ["--config", str(cfg_file), "--state", str(tmp_path / "state.json"), "--imds-timeout", "0.2"]
    env = {**os.environ, "REMOTEFIT_FAKE_NOW": str(cfg["deadline_epoch"] + 1)}
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300, check=True).stdout
    assert "action=shutdown decision=deadline" in out, out
    assert f"run {run_id} ended and its final upload is done" in out, out
    assert out.index("final upload is done") < out.index("shutdown command ran"), out
    status = cluster.inv("status", timeout=120).stdout
    assert " terminated " in next(x for x in status.splitlines() if x.startswith("rf-test-0")), status
    # The node is gone; its checkpoint and the run's end are not.
    cluster.inv("pull", "--run", run_id, timeout=120)
    run = cluster.runs / "deadline" / run_id
    assert (run / "last.ckpt").read_bytes() == b"step 41" * 10_000  # outputs land in the run folder
    assert json.loads((run / "run.json").read_text())["exit_code"] == 143
    assert "checkpointed on SIGTERM" in (run / "log").read_text()

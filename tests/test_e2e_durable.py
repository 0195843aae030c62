"""Durable runs (issue 9), end to end on the sandbox: a run's results live in the runs bucket while it runs
and after its nodes are gone, and a pull from there is the same as a pull from the node."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from tests.conftest import Project, booted, node_record, on_node, touch_on_node, watchdog_config, watchdog_tick
from tests.test_e2e_faults import make_job, one_error_line, run_id_of, workdir

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
    touch_on_node(cluster, gate)
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
    cluster.inv("apply", "--yes", timeout=300)  # the test before destroyed the stage
    job = make_job(tmp_path, "deadline", {"train.py": CHECKPOINTS_ON_TERM})
    run_id = run_id_of(cluster.inv("fit", str(job), "--detach", timeout=120).stderr)
    prefix = f"test/deadline/{run_id}/"
    wait_keys(cluster, prefix, {"logs/node-0.log", "record.json"})
    cfg = watchdog_config(cluster)
    assert cfg["deadline_epoch"], cfg  # apply's --max-hours reached the node
    # One tick of the node's own watchdog with its clock past the deadline (the node's real /proc: the run is
    # live).
    was_booted, iid = booted(cluster), node_record(cluster)["instance_id"]
    tick = watchdog_tick(cluster, cfg["deadline_epoch"] + 1)
    out = tick.stdout
    assert "action=shutdown decision=deadline" in out, out + tick.stderr
    done = f"run {run_id} ended and its final upload is done"
    if "shutdown command ran" in out:
        assert done in out and out.index(done) < out.index("shutdown command ran"), out
        assert tick.returncode == 0 or was_booted, tick.stderr
    else:  # a booted node's shutdown may end the ssh session before the tick's last lines left it ...
        assert was_booted and tick.returncode == 255, out + tick.stderr
    wait_terminated(cluster)
    if was_booted:  # ... but not before they reached its journal, which its console shows after it is gone
        console = (cluster.sandbox / "nodes" / iid / "console.log").read_text(errors="replace")
        off = max(console.rfind(w) for w in ("Power-Off", "Powering off", "Halting", "System is powering down"))
        assert -1 < console.rfind(done) < off, console[-3000:]
    # The node is gone; its checkpoint and the run's end are not.
    cluster.inv("pull", "--run", run_id, timeout=120)
    run = cluster.runs / "deadline" / run_id
    assert (run / "last.ckpt").read_bytes() == b"step 41" * 10_000  # outputs land in the run folder
    assert json.loads((run / "run.json").read_text())["exit_code"] == 143
    assert "checkpointed on SIGTERM" in (run / "log").read_text()


def wait_terminated(p: Project, timeout: float = 120) -> None:
    """Until `inv status` says rf-test-0 is terminated (a booted node takes a few seconds to power off)."""
    deadline = time.monotonic() + timeout
    while True:
        status = p.inv("status", timeout=120).stdout
        if " terminated " in next(x for x in status.splitlines() if x.startswith("rf-test-0")):
            return
        assert time.monotonic() < deadline, status
        time.sleep(2)


# Counts steps into its outputs, resuming from the count there; on SIGTERM it saves the count and exits 143.
# Only a first attempt takes its time (PAUSE per step): a resumed one runs to the end at once.
COUNTS = """\
import os, signal, sys, time
path = os.path.join(os.environ["REMOTEFIT_OUTPUTS"], "step.txt")
step = int(open(path).read()) if os.path.exists(path) else 0
resumed_at = step
print(f"starting at step {step}", flush=True)
def save():
    with open(path + ".new", "w") as f:
        f.write(str(step))
    os.replace(path + ".new", path)
def on_term(*_):
    save()
    print(f"checkpointed at step {step}", flush=True)
    sys.exit(143)
signal.signal(signal.SIGTERM, on_term)
while step < int(os.environ.get("STEPS", "40")):
    step += 1
    save()
    time.sleep(float(os.environ.get("PAUSE", "0")) if resumed_at == 0 else 0)
print(f"done at step {step}", flush=True)
"""


def test_resume_restores_the_outputs_from_the_bucket_and_records_both_attempts(cluster: Project, tmp_path: Path):
    cluster.inv("apply", "--yes", timeout=300)  # (again, after a test that ended the node)
    job = make_job(tmp_path, "counts", {"train.py": COUNTS, "job.toml": 'sync_every = 1\n[env]\nPAUSE = "0.25"\n'})
    # Bad inputs first: one line each, nothing started.
    one_error_line(cluster.inv("fit", str(job), "--resume", "latest", check=False), "holds no run of job counts")
    one_error_line(cluster.inv("fit", str(job), "--resume", "../x", check=False), "'../x' is not a run id")
    one_error_line(cluster.inv("fit", str(job), "--resume", "counts-1-ab", check=False), "has no run counts-1-ab")
    s3 = cluster.workspace().client("s3")
    other = "other-20261201-000000-abcd"  # another job's run, as its node would have kept it
    s3.put_object(Bucket=BUCKET, Key=f"test/other/{other}/record.json", Body=json.dumps({"run_id": other}).encode())
    one_error_line(cluster.inv("fit", str(job), "--resume", other, check=False), "is a run of job other, not counts")
    one_error_line(cluster.inv("fit", str(job), "--local", "--resume", "latest", check=False), "--local")

    first = run_id_of(cluster.inv("fit", str(job), "--detach", timeout=120).stderr)
    wait_keys(cluster, f"test/counts/{first}/", {"outputs/step.txt"})
    one_error_line(
        cluster.inv("fit", str(job), "--resume", first, check=False, timeout=120),
        f"--resume {first}: that run is still running on rf-test-0",
    )
    cluster.inv("cancel", "--run", first, timeout=300)
    kept = bucket_keys(cluster, f"test/counts/{first}/")
    saved = int(kept["outputs/step.txt"])
    assert 0 < saved < 40 and json.loads(kept["status/node-0.json"])["exit_code"] == 143
    # As on a new node: nothing of the first attempt is left on this one.
    cluster.ssh("rf-test-0", f"rm -rf {workdir(cluster)}/outputs/{first}")

    res = cluster.inv("fit", str(job), "--resume", "latest", timeout=300)
    assert f"resuming run {first} as attempt 2" in res.stderr, res.stderr
    assert f"starting at step {saved}\n" in res.stdout and "done at step 40" in res.stdout, res.stdout
    second = run_id_of(res.stderr)
    run = cluster.runs / "counts" / second
    assert (run / "step.txt").read_text() == "40"
    info = json.loads((run / "run.json").read_text())
    assert info["resumed_from"] == first and info["exit_code"] == 0
    attempts = info["attempts"]
    assert [a["run_id"] for a in attempts] == [first, second]
    assert attempts[0]["exit_code"] == 143 and attempts[0]["nodes"] == ["rf-test-0"]
    assert attempts[0]["start"] and attempts[0]["end"] and attempts[1]["start"]
    assert info["total_estimated_cost_usd"] == round(sum(a["estimated_cost_usd"] for a in attempts), 4)
    # The resumed run's own results, also the restored checkpoint, are kept under its own id.
    assert bucket_keys(cluster, f"test/counts/{second}/")["outputs/step.txt"] == b"40"


# Trains (ticks) while S3 is away, writes one output before and one after the gate.
TICKS = """\
import os, time
os.makedirs("outputs", exist_ok=True)
with open("outputs/before.bin", "wb") as f:
    f.write(os.urandom(100_000))
print("before written", flush=True)
ticks = 0
while not os.path.exists(os.environ["GATE"]):
    ticks += 1
    print(f"tick {ticks}", flush=True)  # the log changes: each pass has something to send
    time.sleep(0.5)
with open("outputs/after.bin", "wb") as f:
    f.write(os.urandom(100_000))
print(f"ticked {ticks} times; after written", flush=True)
"""


def test_the_runs_bucket_unreachable_for_a_while_mid_run(cluster: Project, tmp_path: Path):
    """S3 goes away mid-run (the sandbox's moto server killed): the job trains on, the uploader retries, and
    once S3 is back (the same address, as AWS's endpoints never move) the run's state in the bucket is whole."""
    import os
    import signal

    cluster.inv("apply", "--yes", timeout=400)
    gate = tmp_path / "gate"
    job = make_job(tmp_path, "s3away", {"train.py": TICKS, "job.toml": f'sync_every = 1\n[env]\nGATE = "{gate}"\n'})
    run_id = run_id_of(cluster.inv("fit", str(job), "--detach", timeout=120).stderr)
    prefix = f"test/s3away/{run_id}/"
    wait_keys(cluster, prefix, {"outputs/before.bin", "logs/node-0.log"})
    moto = json.loads((cluster.sandbox / "moto.json").read_text())
    os.kill(moto["pid"], signal.SIGKILL)
    upload_log = on_node(cluster, Path(workdir(cluster)) / "runs" / run_id / "upload.log")
    deadline = time.monotonic() + 120  # boto3's own retries (5 attempts, backoff) come first
    while "will retry" not in upload_log.read_text():  # the passes fail while S3 is gone...
        assert time.monotonic() < deadline, upload_log.read_text()
        time.sleep(0.5)
    assert on_node(cluster, Path(workdir(cluster)) / "active.json").exists()  # ...and the job trains on
    touch_on_node(cluster, gate)  # it ends while S3 is still away: the final pass retries
    time.sleep(3)
    cluster.inv("sandbox.up", timeout=300)
    assert cluster.inv("logs", "--run", run_id, "--follow", timeout=300).returncode == 0
    kept = bucket_keys(cluster, prefix)
    assert {"outputs/before.bin", "outputs/after.bin", "status/node-0.json"} <= set(kept), sorted(kept)
    node_run = on_node(cluster, Path(workdir(cluster)) / "runs" / run_id)
    assert (
        kept["outputs/after.bin"]
        == on_node(cluster, Path(workdir(cluster)) / "outputs" / run_id / "after.bin").read_bytes()
    )
    assert kept["logs/node-0.log"] == (node_run / "log").read_bytes()  # the whole log, ticks and all
    assert json.loads((node_run / "upload.json").read_text())["complete"] is True


def resnet_copy(tmp_path: Path) -> Path:
    """jobs/resnet as a user's copy, uploading every second (so a test sees its checkpoints soon)."""
    from tests.conftest import ROOT

    job = tmp_path / "resnet"
    shutil.copytree(ROOT / "jobs" / "resnet", job, ignore=shutil.ignore_patterns("data", "outputs", "__pycache__"))
    # One thread (the [env] table is the file's last): two resnet tests (or one and the demo) training at
    # once on a 2-core machine then share the cores instead of thrashing (4 spinning threads ran 10x slower).
    (job / "job.toml").write_text("sync_every = 1\n" + (job / "job.toml").read_text() + 'OMP_NUM_THREADS = "1"\n')
    return job


def test_a_detached_resnet_run_outlives_its_idle_node(cluster: Project, tmp_path: Path):
    """Start it, close the laptop: the run finishes, the node idle-terminates itself, and `inv pull` brings
    the model, curves, summary, metrics, log and run.json from the runs bucket, the same bytes the node had."""

    cluster.inv("apply", "--yes", timeout=400)
    job = resnet_copy(tmp_path)
    args = ["--data", "digits", "--width", "8", "--image-size", "16", "--batch-size", "64", "--epochs", "2"]
    run_id = run_id_of(cluster.inv("fit", str(job), "--detach", "--", *args, timeout=300).stderr)
    assert cluster.inv("logs", "--run", run_id, "--follow", timeout=600).returncode == 0
    # What the node holds, read before it ends (a booted node's disk goes with it, as an EBS root volume does).
    base = Path(workdir(cluster))
    names = ("checkpoint.pt", "curves.png", "summary.json", "metrics.jsonl")
    had = {name: on_node(cluster, base / "outputs" / run_id / name).read_bytes() for name in names}
    had["log"] = on_node(cluster, base / "runs" / run_id / "log").read_bytes()
    # One tick as the idle timeout passes: the node's own watchdog, its idle clock started at its start.
    cfg = watchdog_config(cluster)
    started = cfg.get("started_epoch") or time.time()  # (a booted node's watchdog counts from its boot)
    was_booted = booted(cluster)
    tick = watchdog_tick(cluster, started + cfg["idle_minutes"] * 60 + 1, idle_since=started)
    assert "action=shutdown decision=idle" in tick.stdout, tick.stdout + tick.stderr
    assert tick.returncode == 0 or was_booted, tick.stderr  # (a booted node's shutdown may end the session)
    wait_terminated(cluster)
    cluster.inv("pull", "--run", run_id, timeout=300)
    pulled = cluster.runs / "resnet" / run_id
    for name in names:
        assert (pulled / name).read_bytes() == had[name], name
    assert (pulled / "log").read_bytes() == had["log"]
    info = json.loads((pulled / "run.json").read_text())
    assert info["exit_code"] == 0 and info["final"] is True


def test_destroy_names_what_it_takes_and_stops_an_active_run_after_its_final_upload(cluster: Project, tmp_path: Path):
    """`inv destroy` with a run still active names it and asks; with --yes it stops the run and waits for its
    final upload. A finished run nobody pulled is named as safe in the runs bucket."""
    cluster.inv("apply", "--yes", timeout=300)  # (again, after a test that ended the node)
    quick = make_job(tmp_path, "quick", {"train.py": "print('quick done')"})
    done = run_id_of(cluster.inv("fit", str(quick), "--detach", timeout=120).stderr)
    assert cluster.inv("logs", "--run", done, "--follow", timeout=120).returncode == 0  # finished, not pulled
    job = make_job(tmp_path, "active", {"train.py": CHECKPOINTS_ON_TERM})
    active = run_id_of(cluster.inv("fit", str(job), "--detach", timeout=120).stderr)
    wait_keys(cluster, f"test/active/{active}/", {"logs/node-0.log", "record.json"})

    asked = cluster.inv("destroy", check=False, timeout=120)  # no terminal to answer on: nothing happens
    assert asked.returncode == 2 and "pass --yes" in asked.stderr, asked.stderr
    assert f"run {active} is still running on rf-test-0: destroy stops it first" in asked.stdout, asked.stdout
    assert f"run {done} is not pulled; its results are safe in the runs bucket {BUCKET}" in asked.stdout
    assert cluster.workspace().sandbox.nodes(), "a destroy that was not confirmed must leave the node"

    res = cluster.inv("destroy", "--yes", timeout=400)
    out = res.stdout
    assert f"rf-test-0: stopped run {active} (exit code 143); it is kept in the runs bucket" in out, out
    assert out.index("kept in the runs bucket") < out.index("destroyed "), out
    assert "verified: nothing tagged" in out
    cluster.inv("pull", "--run", active, timeout=120)
    run = cluster.runs / "active" / active
    assert (run / "last.ckpt").read_bytes() == b"step 41" * 10_000
    assert json.loads((run / "run.json").read_text())["exit_code"] == 143
    cluster.inv("pull", "--run", done, timeout=120)
    assert "quick done" in (cluster.runs / "quick" / done / "log").read_text()

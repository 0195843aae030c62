"""Spot interruptions end to end on the sandbox (issue 9): the notice on the node's IMDS, the job's
checkpoint kept, the instance reclaimed, and the run resumed on a new node, by hand and by `inv fit` itself.
A module of its own (its own sandbox and node), so it runs beside tests/test_e2e_durable.py."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from tests.conftest import Project
from tests.test_e2e_durable import COUNTS, bucket_keys, resnet_copy, wait_keys
from tests.test_e2e_faults import make_job, run_id_of

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def cluster(module_project: Project):
    """The module's project; module_project's `sandbox.down` stops its node and moto afterwards (no destroy:
    a throwaway project's teardown need not pay Terraform's four walks)."""
    p = module_project
    p.inv("backend", timeout=300)
    return p


def fit_interrupted(
    cluster: Project, job: Path, extra: list[str], prefix: str, key_suffix: str, notice_in: int, timeout: float
) -> tuple[str, str]:
    """An attached `inv fit --max-recoveries 1` whose spot node is interrupted once a new key ending in
    `key_suffix` (its first checkpoint) is in the bucket under `prefix`; fit's (stdout, stderr), after exit 0."""
    import subprocess

    from tests.conftest import INV

    known = set(bucket_keys(cluster, prefix))
    fit = subprocess.Popen(
        [INV, "fit", str(job), "--max-recoveries", "1", *extra],
        cwd=cluster.cwd, env=cluster.env, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not any(k.endswith(key_suffix) and k not in known for k in bucket_keys(cluster, prefix)):
            assert time.monotonic() < deadline and fit.poll() is None, "the first attempt never checkpointed"
            time.sleep(0.5)
        cluster.inv("sandbox.interrupt", "--in", str(notice_in), timeout=60)
        out, err = fit.communicate(timeout=timeout)
    finally:
        fit.kill()
    assert fit.returncode == 0, out + err
    return out, err


def test_a_spot_interruption_keeps_the_checkpoint_and_resume_finishes_on_a_new_node(cluster: Project, tmp_path: Path):
    """`inv sandbox.interrupt` delivers what AWS does: a notice on the node's IMDS (the job gets SIGTERM and
    checkpoints; its final upload lands), then the instance and its disk are gone. The README's recovery by
    hand (apply the same spec, fit --resume latest) continues from the saved step on a new node."""
    cluster.inv("apply", "--spot", "--yes", timeout=400)
    (node,) = cluster.workspace().sandbox.nodes()
    assert node.imds_port  # the node's metadata service
    if node.mode == "container":  # its spot poller: the boot script's own service on a booted node
        active = cluster.ssh("rf-test-0", "systemctl is-active remotefit-spot.service")
        assert active.stdout.strip() == "active", active.stdout + active.stderr
    else:
        assert node.spot_pid
    toml = 'sync_every = 1\n[env]\nPAUSE = "0.25"\nSTEPS = "2000"\n'
    job = make_job(tmp_path, "spotty", {"train.py": COUNTS, "job.toml": toml})
    first = run_id_of(cluster.inv("fit", str(job), "--detach", timeout=120).stderr)
    prefix = f"test/spotty/{first}/"
    wait_keys(cluster, prefix, {"outputs/step.txt"})
    notice = time.monotonic()
    res = cluster.inv("sandbox.interrupt", "--in", "30", timeout=60)
    assert "rf-test-0: spot interruption notice posted" in res.stdout, res.stdout
    kept = wait_keys(cluster, prefix, {"status/node-0.json"}, timeout=60)  # the checkpoint, then the end
    took = time.monotonic() - notice
    assert json.loads(kept["status/node-0.json"])["exit_code"] == 143
    saved = int(kept["outputs/step.txt"])
    assert 0 < saved < 2000 and b"checkpointed at step" in kept["logs/node-0.log"]
    print(f"spot notice -> checkpoint and final status in the bucket: {took:.1f} s")
    deadline = time.monotonic() + 90
    while True:  # reclaimed at the notice's time: terminated, its disk gone
        row = next(x for x in cluster.inv("status", timeout=120).stdout.splitlines() if x.startswith("rf-test-0"))
        if " terminated " in row:
            break
        assert time.monotonic() < deadline, row
        time.sleep(2)
    if node.mode == "container":  # its root disk goes with the instance (deleted just after it is terminated)
        disk = cluster.sandbox / "nodes" / node.instance_id / "disk"
        gone_by = time.monotonic() + 30
        while disk.exists():
            assert time.monotonic() < gone_by, f"{disk} outlived its terminated instance by 30 s"
            time.sleep(0.5)
    else:
        assert not Path(node.workdir).exists()

    cluster.inv("apply", "--spot", "--yes", timeout=400)
    (again,) = cluster.workspace().sandbox.nodes()
    assert again.instance_id != node.instance_id
    res = cluster.inv("fit", str(job), "--resume", "latest", timeout=300)
    assert f"resuming run {first} as attempt 2" in res.stderr, res.stderr
    assert f"starting at step {saved}\n" in res.stdout and "done at step 2000" in res.stdout, res.stdout
    info = json.loads((cluster.runs / "spotty" / run_id_of(res.stderr) / "run.json").read_text())
    assert [(a["market"], a["exit_code"]) for a in info["attempts"]] == [("spot", 143), ("spot", 0)]


def test_an_attached_fit_recovers_from_a_spot_interruption_and_finishes(cluster: Project, tmp_path: Path):
    """`inv fit` following a spot run: the notice ends the attempt (checkpoint kept), fit re-applies the same
    spec and resumes the run on the new node, which finishes; run.json shows both attempts."""
    cluster.inv("apply", "--spot", "--yes", timeout=400)
    (node,) = cluster.workspace().sandbox.nodes()
    toml = 'sync_every = 1\n[env]\nPAUSE = "0.25"\nSTEPS = "2000"\n'
    job = make_job(tmp_path, "recovers", {"train.py": COUNTS, "job.toml": toml})
    out, err = fit_interrupted(cluster, job, [], "test/recovers/", "/outputs/step.txt", notice_in=60, timeout=600)
    first = run_id_of(err)
    assert "spot interruption on rf-test-0" in err and f"recovering run {first}" in err, err
    assert "recovery: 1 node(s) ready" in err and f"resuming run {first} as attempt 2" in err, err
    saved = int(bucket_keys(cluster, f"test/recovers/{first}/")["outputs/step.txt"])
    assert 0 < saved < 2000 and f"starting at step {saved}\n" in out and "done at step 2000" in out, out
    (again,) = cluster.workspace().sandbox.nodes()
    assert again.instance_id != node.instance_id
    second = re.search(r"run (\S+) finished with exit code 0", err).group(1)
    info = json.loads((cluster.runs / "recovers" / second / "run.json").read_text())
    assert info["resumed_from"] == first and [a["exit_code"] for a in info["attempts"]] == [143, 0]


RESNET_ARGS = ["--data", "digits", "--width", "8", "--image-size", "16", "--batch-size", "64"]
RESNET_ARGS += ["--epochs", "30", "--deterministic", "--seed", "3"]


def test_resnet_interrupted_on_spot_recovers_to_the_same_weights_as_an_uninterrupted_run(
    cluster: Project, tmp_path: Path
):
    """The issue's own test: jobs/resnet on a spot node, interrupted mid-training; the attached `inv fit`
    recovers on a new node and finishes with weights bit-identical to an uninterrupted deterministic run."""
    job = resnet_copy(tmp_path)
    cluster.inv("apply", "--spot", "--yes", timeout=400)
    whole = cluster.inv("fit", str(job), "--", *RESNET_ARGS, timeout=600)
    reference = json.loads((cluster.runs / "resnet" / run_id_of(whole.stderr) / "summary.json").read_text())
    out, err = fit_interrupted(
        cluster, job, ["--", *RESNET_ARGS], "test/resnet/", "/outputs/checkpoint.pt", notice_in=30, timeout=900
    )
    assert "spot interruption on rf-test-0" in err and "resuming from" in out, out + err
    second = re.search(r"run (\S+) finished with exit code 0", err).group(1)
    run = cluster.runs / "resnet" / second
    recovered = json.loads((run / "summary.json").read_text())
    assert recovered["steps"] == reference["steps"]
    assert recovered["weights_sha256"] == reference["weights_sha256"]  # bit-identical
    info = json.loads((run / "run.json").read_text())
    assert [a["exit_code"] for a in info["attempts"]] == [143, 0], info["attempts"]

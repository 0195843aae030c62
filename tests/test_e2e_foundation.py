"""End to end on ONE sandbox: sandbox up/down, the state bucket, `inv plan` against the S3 backend, a real
state lock held by a real Terraform, and stale sandbox records. The tests run in file order and share
the module's project (one moto server), so each builds on the one before it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import boto3
import hcl2
import pytest
from botocore.config import Config

from remotefit.sandbox import descendants
from tests.test_e2e_nodes import tf_env

pytestmark = pytest.mark.e2e

BUCKET = "remotefit-test-state"
STATE_KEY = "remotefit/test/terraform.tfstate"


def server(p) -> dict:
    return json.loads((p.sandbox / "moto.json").read_text())


def endpoint(p) -> str:
    return f"http://127.0.0.1:{server(p)['port']}"


def s3(p):
    return boto3.client(
        "s3",
        endpoint_url=endpoint(p),
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}),
    )


def bucket_keys(p) -> list[str]:
    return [o["Key"] for o in s3(p).list_objects_v2(Bucket=BUCKET).get("Contents", [])]


def alive(pid: int) -> bool:
    """Running and not a zombie (a killed child of init may linger as one until it is reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def plain(values: dict) -> dict:
    """python-hcl2 >= 8 keeps string quotes; strip them for comparisons."""
    out = {}
    for k, v in values.items():
        if isinstance(v, str) and v.startswith('"'):
            v = json.loads(v)
        elif isinstance(v, dict):
            v = plain(v)
        out[json.loads(k) if k.startswith('"') else k] = v
    return out


def test_sandbox_up_twice_is_harmless(module_project):
    p = module_project
    first = p.inv("sandbox.up", timeout=120)
    pid = server(p)["pid"]
    second = p.inv("sandbox.up", timeout=120)
    assert first.stdout.strip() == second.stdout.strip() == endpoint(p)
    assert server(p)["pid"] == pid and alive(pid)
    assert "moto server up" not in second.stderr  # nothing new was started
    status = p.inv("sandbox.status").stdout
    assert f"moto server: {endpoint(p)} (pid {pid})" in status


def test_backend_creates_the_bucket_and_is_idempotent(module_project):
    p = module_project
    first = p.inv("backend", timeout=120).stdout
    assert f"created bucket {BUCKET}" in first
    again = p.inv("backend", timeout=120).stdout.splitlines()
    assert again[0] == f"bucket {BUCKET} in us-east-1 exists"
    assert "ok: ownership, public-access-block, versioning, encryption, lifecycle, tags" in again
    assert not [ln for ln in again if ln.startswith(("configured:", "created", "error"))], again

    cfg = plain(hcl2.loads((p.generated / "backend.hcl").read_text()))
    assert cfg["bucket"] == BUCKET and cfg["key"] == STATE_KEY and cfg["region"] == "us-east-1"
    assert cfg["use_lockfile"] is True and cfg["encrypt"] is True
    assert plain(cfg["endpoints"]) == {"s3": endpoint(p), "sts": endpoint(p)}
    assert s3(p).get_bucket_versioning(Bucket=BUCKET)["Status"] == "Enabled"


def test_plan_runs_against_the_s3_backend(module_project):
    p = module_project
    res = p.inv("plan", timeout=300)
    assert "Plan:" in res.stdout + res.stderr
    backend = json.loads((p.generated / "terraform" / ".terraform" / "terraform.tfstate").read_text())["backend"]
    assert backend["type"] == "s3"
    assert backend["config"]["bucket"] == BUCKET and backend["config"]["key"] == STATE_KEY
    assert backend["config"]["use_lockfile"] is True
    assert backend["config"]["endpoints"]["s3"] == endpoint(p)
    assert (p.generated / "testacct.tfvars").exists()
    # Terraform reattached to the sandbox's AWS provider (sandbox_provider.py), which outlives the command
    # and serves the next one: the same process, listed by sandbox.status (and stopped by sandbox.down, below).
    rec = json.loads((p.sandbox / "provider.json").read_text())
    assert alive(rec["pid"]) and f'"Pid":{rec["pid"]}' in rec["reattach"]
    again = p.inv("plan", timeout=300)
    assert "Plan:" in again.stdout + again.stderr
    assert json.loads((p.sandbox / "provider.json").read_text())["pid"] == rec["pid"]
    assert f"AWS provider: pid {rec['pid']}, reattached by each Terraform command" in p.inv("sandbox.status").stdout


def test_sandbox_provider_refuses_an_account_the_stage_was_not_written_for(module_project):
    """The sandbox's provider block has no endpoints (AWS_ENDPOINT_URL carries moto's); so that a hand-run
    with other credentials cannot act on another account, it accepts only the owner's account. Here the
    owner is said to be in another account than moto's caller: the provider refuses once STS names the caller."""
    p = module_project
    gen = p.generated
    (provider,) = hcl2.loads((gen / "terraform" / "providers.tf").read_text())["provider"]
    aws = plain(provider)["aws"]
    assert "endpoints" not in aws and "allowed_account_ids" in aws
    argv = ["terraform", f"-chdir={gen / 'terraform'}", "plan", "-input=false", "-no-color"]
    argv += [f"-var-file={gen / 'testacct.tfvars'}", "-var", "owner=arn:aws:iam::999999999999:user/someone"]
    res = subprocess.run(argv, capture_output=True, text=True, env=tf_env(p, p.workspace()), timeout=180)
    assert res.returncode != 0 and "AWS account ID not allowed: 123456789012" in res.stderr, res.stdout + res.stderr


def test_state_lock_is_held_in_the_bucket_and_reported(module_project):
    """A real `terraform apply` waiting at its approval prompt holds the S3 lock object; `inv plan` meanwhile
    fails with one line naming that lock; answering 'no' releases it."""
    p = module_project
    gen = p.generated
    env = {
        **p.env,
        "AWS_ENDPOINT_URL": endpoint(p),
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "TF_INPUT": "1",
        "CHECKPOINT_DISABLE": "1",
    }
    if (gen / "terraformrc").exists():
        env["TF_CLI_CONFIG_FILE"] = str(gen / "terraformrc")
    apply = subprocess.Popen(
        ["terraform", f"-chdir={gen / 'terraform'}", "apply", "-no-color", f"-var-file={gen / 'testacct.tfvars'}"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        text=True,
    )
    try:
        lock_key = f"{STATE_KEY}.tflock"
        deadline = time.monotonic() + 90
        while lock_key not in bucket_keys(p):
            assert apply.poll() is None, f"terraform apply ended early: {apply.stdout.read()}"
            assert time.monotonic() < deadline, "the lock object never appeared"
            time.sleep(0.2)
        lock = json.loads(s3(p).get_object(Bucket=BUCKET, Key=lock_key)["Body"].read())
        assert lock["Operation"] == "OperationTypeApply"

        res = p.inv("plan", check=False, timeout=300)
        assert res.returncode != 0 and "Traceback" not in res.stderr
        errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1, res.stderr
        assert "the state is locked" in errors[0] and f"lock {lock['ID']}" in errors[0], errors[0]
        assert f"force-unlock {lock['ID']}" in errors[0]
        assert apply.poll() is None, "the apply must still hold the lock"

        out, _ = apply.communicate("no\n", timeout=120)
        assert apply.returncode != 0 and "Apply cancelled" in out, out
        assert lock_key not in bucket_keys(p), "the lock was not released"
    finally:
        if apply.poll() is None:
            apply.kill()
            apply.wait()


def test_a_dead_server_is_reported_read_only_and_replaced_with_its_state(module_project):
    p = module_project
    old = server(p)
    os.kill(old["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while alive(old["pid"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    res = p.inv("sandbox.status")
    assert "moto server: not running" in res.stdout
    assert (p.sandbox / "moto.json").exists()  # a read-only task removes nothing

    up = p.inv("sandbox.up", timeout=300)
    new = server(p)
    assert new["pid"] != old["pid"] and alive(new["pid"])
    assert up.stdout.strip() == endpoint(p)
    assert "restored the previous server's state" in up.stderr
    assert BUCKET in [b["Name"] for b in s3(p).list_buckets()["Buckets"]]  # the state bucket survived


def test_sandbox_down_leaves_no_process(module_project, tmp_path, monkeypatch):
    """Everything the sandbox ran is gone after `sandbox.down`: the moto server, and a node's sshd, its
    watchdog, metadata service and spot poller, an open ssh connection and the client's ControlMaster that kept it open (ControlPersist,
    as the generated ssh_config has)."""
    p = module_project
    sandbox = p.sandbox
    key = tmp_path / "key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    # A node as apply would have it reached (an sshd on loopback and its watchdog), minus Terraform:
    # this module never applies (a booted container needs its instance in moto: test_e2e_container).
    monkeypatch.setenv("REMOTEFIT_SANDBOX_NODES", "loopback")
    node = p.workspace().sandbox.start_node("i-0f0undat10n00000", key.with_suffix(".pub").read_text(), endpoint(p))
    ssh = ["ssh", "-i", str(key), "-p", str(node.port), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no"]
    ssh += ["-o", f"UserKnownHostsFile={tmp_path / 'known_hosts'}", "-o", f"ControlPath={tmp_path / 'cm'}"]
    target = f"{node.user}@127.0.0.1"
    opened = subprocess.run(
        [*ssh, "-o", "ControlMaster=yes", "-o", "ControlPersist=10m", target, "echo connected"],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert opened.stdout == "connected\n", opened.stderr
    check = subprocess.run([*ssh, "-O", "check", target], capture_output=True, text=True, timeout=30)
    master = int(check.stderr.split("pid=")[1].split(")")[0])
    sessions = [pid for pid in descendants(node.pid) if alive(pid)]
    started = {"moto server": server(p)["pid"], "sshd": node.pid, "watchdog": node.watchdog_pid, "master": master}
    started |= {"metadata service": node.imds_pid, "spot poller": node.spot_pid}
    started |= {f"ssh session {pid}": pid for pid in sessions}
    started["AWS provider"] = json.loads((sandbox / "provider.json").read_text())["pid"]  # since the plans above
    assert sessions and all(alive(pid) for pid in started.values()), started

    res = p.inv("sandbox.down", timeout=120)
    assert f"stopped moto server (pid {started['moto server']}" in res.stdout
    assert f"stopped AWS provider (pid {started['AWS provider']})" in res.stdout
    assert f"stopped sshd node i-0f0undat10n00000 (port {node.port})" in res.stdout
    deadline = time.monotonic() + 10  # the master leaves once it sees its connection closed
    while [pid for pid in started.values() if alive(pid)] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [name for name, pid in started.items() if alive(pid)]
    assert not (sandbox / "moto.json").exists() and not list(sandbox.glob("nodes/*/node.json"))
    assert not (sandbox / "provider.json").exists()
    assert p.inv("sandbox.down", timeout=60).stdout.strip() == "the sandbox was not running"

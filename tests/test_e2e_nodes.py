"""End-to-end node life cycle on the sandbox, through the real `inv` tasks and the real terraform binary:
apply, SSH, hardening read back through boto3, secrets, drift, scaling, destroy (also after the nodes
terminated out of band), the state lock, the node watchdog's self-termination, bad inputs, and checkov
over every rendered variant.

Each class shares one isolated project (one moto server), so the whole module applies four times.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from remotefit.sandbox import pid_alive
from tests.conftest import NODE_ID_CMD, ROOT, Project, loopback_nodes, make_project, requires

pytestmark = pytest.mark.e2e

STATE_KEY = "remotefit/test/terraform.tfstate"
BUCKET = "remotefit-test-state"
WATCHDOG = ROOT / "remotefit" / "node" / "watchdog.py"


# -- helpers ----------------------------------------------------------------------------
def ssh(p: Project, alias: str, command: str) -> subprocess.CompletedProcess[str]:
    return p.ssh(alias, command)


def error_line(res: subprocess.CompletedProcess[str]) -> str:
    """A failed task: non-zero exit, no traceback, exactly one `error:` line; return it."""
    assert res.returncode != 0, res.stdout + res.stderr
    out = res.stdout + res.stderr
    assert "Traceback" not in out, out
    errors = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, out
    return errors[0]


def stage_instances(ws: Any) -> list[dict[str, Any]]:
    res = ws.client("ec2").describe_instances(Filters=[{"Name": "tag:stage", "Values": ["test"]}])
    return [i for r in res["Reservations"] for i in r["Instances"]]


def live(instances: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [i for i in instances if i["State"]["Name"] not in ("terminated", "shutting-down")]


def tf_env(p: Project, ws: Any) -> dict[str, str]:
    return {
        **p.env,
        **ws.aws_env(),
        "TF_CLI_CONFIG_FILE": str(p.generated / "terraformrc"),
        "TF_IN_AUTOMATION": "1",
        "CHECKPOINT_DISABLE": "1",
    }


def changed_attributes(change: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    before, after = change.get("before") or {}, change.get("after") or {}
    unknown = change.get("after_unknown") or {}
    keys = {k for k in set(before) | set(after) if before.get(k) != after.get(k)} | {k for k, v in unknown.items() if v}
    return {k: (before.get(k), after.get(k)) for k in sorted(keys)}


def _project(factory: pytest.TempPathFactory, name: str):
    p = make_project(factory.mktemp(name))
    yield p
    p.down()


@pytest.fixture(scope="class")
def proj(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """One isolated project (own moto server and sshd nodes) per test class, stopped afterwards."""
    for p in _project(tmp_path_factory, request.cls.__name__.lower()):
        if request.cls.__name__ == "TestLockAndSelfTermination":
            loopback_nodes(p)  # its idle test drives the loopback node's watchdog (test_e2e_container: booted)
        yield p


@pytest.fixture(scope="class")
def applied(proj: Project) -> subprocess.CompletedProcess[str]:
    proj.inv("backend")
    return proj.inv("apply", "--yes")


# -- one node, hardening, secrets, drift, two nodes, destroy ----------------------------
class TestLifecycle:
    def test_apply_gives_an_ssh_ready_node(self, proj: Project, applied) -> None:
        assert "rf-test-0" in applied.stdout and "running" in applied.stdout
        assert f"ssh -F {proj.generated / 'ssh_config'} rf-test-0" in applied.stdout
        res = ssh(proj, "rf-test-0", "true")
        assert res.returncode == 0, res.stderr
        status = proj.inv("status").stdout.splitlines()
        row = next(ln for ln in status if ln.startswith("rf-test-0"))
        assert " running " in row and " c7i.xlarge " in row

    def test_instance_is_hardened(self, proj: Project, applied) -> None:
        ws = proj.workspace()
        ec2 = ws.client("ec2")
        (inst,) = live(stage_instances(ws))
        assert inst["State"]["Name"] == "running"
        assert inst["MetadataOptions"]["HttpTokens"] == "required"
        assert inst["MetadataOptions"]["HttpEndpoint"] == "enabled"
        attr = ec2.describe_instance_attribute(
            InstanceId=inst["InstanceId"], Attribute="instanceInitiatedShutdownBehavior"
        )
        assert attr["InstanceInitiatedShutdownBehavior"]["Value"] == "terminate"
        vol_ids = [m["Ebs"]["VolumeId"] for m in inst["BlockDeviceMappings"]]
        vols = ec2.describe_volumes(VolumeIds=vol_ids)["Volumes"]
        assert vols and all(v["Encrypted"] for v in vols)
        assert {v["Size"] for v in vols} == {50} and {v["VolumeType"] for v in vols} == {"gp3"}
        tags = {t["Key"]: t["Value"] for t in inst["Tags"]}
        assert tags["project"] == "remotefit" and tags["stage"] == "test" and tags["managed-by"] == "remotefit"
        groups = {g["GroupId"] for ni in inst["NetworkInterfaces"] for g in ni["Groups"]}
        assert len(groups) == 1
        rules = ec2.describe_security_group_rules(Filters=[{"Name": "group-id", "Values": list(groups)}])
        ingress = [r for r in rules["SecurityGroupRules"] if not r["IsEgress"]]
        assert ingress, "the SSH rule is missing"
        for r in ingress:
            assert r.get("CidrIpv4") != "0.0.0.0/0" and r.get("CidrIpv6") != "::/0", r
        ssh_rule = next(r for r in ingress if r.get("FromPort") == 22)
        # Where our ssh comes from as the node sees it: loopback, or the bridge's gateway for container nodes.
        from remotefit.sandbox import Sandbox

        assert ssh_rule["CidrIpv4"] == Sandbox(proj.sandbox).caller_cidr() and ssh_rule["ToPort"] == 22

    def test_only_the_public_key_leaves_the_machine(self, proj: Project, applied) -> None:
        key = proj.kept / "keys" / "test_ed25519"
        assert key.stat().st_mode & 0o777 == 0o600
        private = key.read_text()
        assert "PRIVATE KEY" in private
        secret_body = "".join(ln for ln in private.splitlines() if not ln.startswith("-----"))
        public = key.with_suffix(".pub").read_text().strip()
        tfvars = (proj.generated / "testacct.tfvars").read_text()
        assert public in tfvars
        ws = proj.workspace()
        state = ws.client("s3").get_object(Bucket=BUCKET, Key=STATE_KEY)["Body"].read().decode()
        assert public.split()[1] in state  # the aws_key_pair holds the public half
        for text in (tfvars, state):
            assert "PRIVATE KEY" not in text
            assert secret_body[20:80] not in text.replace("\\n", "")

    def test_plan_after_apply_shows_no_drift(self, proj: Project, applied) -> None:
        ws = proj.workspace()
        tfdir, plan = proj.generated / "terraform", proj.generated / "drift.tfplan"
        argv = ["terraform", f"-chdir={tfdir}", "plan", "-detailed-exitcode", "-input=false", "-no-color"]
        argv += ["-lock-timeout=0s", f"-var-file={proj.generated / 'testacct.tfvars'}", f"-out={plan}"]
        res = subprocess.run(argv, env=tf_env(proj, ws), capture_output=True, text=True, timeout=180)
        if res.returncode == 0:
            return
        assert res.returncode == 2, res.stdout + res.stderr
        shown = subprocess.run(
            ["terraform", f"-chdir={tfdir}", "show", "-json", str(plan)],
            env=tf_env(proj, ws),
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        drift = {
            rc["address"]: changed_attributes(rc["change"])
            for rc in json.loads(shown.stdout).get("resource_changes", [])
            if rc["change"]["actions"] not in (["no-op"], ["read"])
        }
        pytest.fail(f"a plan right after apply must show no changes; it shows: {drift}\n{res.stdout[-3000:]}")

    def test_scale_to_two_nodes(self, proj: Project, applied) -> None:
        ws = proj.workspace()
        (first,) = live(stage_instances(ws))
        res = proj.inv("apply", "--nodes", "2", "--yes")
        assert "rf-test-1" in res.stdout
        assert "0 destroyed" in res.stderr, "scaling up must not replace the running node\n" + res.stderr[-5000:]
        insts = live(stage_instances(ws))
        assert first["InstanceId"] in {i["InstanceId"] for i in insts}
        assert len(insts) == 2 and {i["State"]["Name"] for i in insts} == {"running"}
        ids = {i["InstanceId"] for i in insts}
        sandbox_nodes = ws.sandbox.nodes()
        assert {n.instance_id for n in sandbox_nodes} == ids and all(n.alive() for n in sandbox_nodes)
        reached = set()
        for alias in ("rf-test-0", "rf-test-1"):
            r = ssh(proj, alias, NODE_ID_CMD)
            assert r.returncode == 0, r.stderr
            reached.add(r.stdout.strip())
        assert reached == ids, "each alias must reach its own node"
        (sg,) = {g["GroupId"] for i in insts for ni in i["NetworkInterfaces"] for g in ni["Groups"]}
        rules = ws.client("ec2").describe_security_group_rules(Filters=[{"Name": "group-id", "Values": [sg]}])
        self_ref = [
            r
            for r in rules["SecurityGroupRules"]
            if not r["IsEgress"] and r.get("ReferencedGroupInfo", {}).get("GroupId") == sg
        ]
        assert len(self_ref) == 1 and self_ref[0]["IpProtocol"] == "-1"

    def test_destroy_also_after_a_node_terminated_out_of_band(self, proj: Project, applied) -> None:
        ws = proj.workspace()
        sandbox_nodes = ws.sandbox.nodes()
        assert len(sandbox_nodes) == 2
        inventory = json.loads((proj.generated / "nodes.json").read_text())["nodes"]
        gone = next(n["instance_id"] for n in inventory if n["alias"] == "rf-test-1")
        ec2 = ws.client("ec2")
        ec2.terminate_instances(InstanceIds=[gone])  # out of band: Terraform does not know
        res = proj.inv("destroy", "--yes")
        assert "destroyed" in res.stdout
        assert "verified: nothing tagged stage=test is left in us-east-1" in res.stdout
        assert stage_instances(ws) and not live(stage_instances(ws))
        for n in sandbox_nodes:
            assert not pid_alive(n.pid, "sshd"), f"sshd of {n.instance_id} still runs"
        assert ws.sandbox.nodes() == []
        assert not (proj.generated / "ssh_config").exists()

    def test_destroy_twice_says_nothing_was_there(self, proj: Project, applied) -> None:
        res = proj.inv("destroy", "--yes")
        assert "nothing to destroy: stage test has no resources in its state" in res.stdout
        assert "verified: nothing tagged stage=test is left" in res.stdout


# -- the state lock, the watchdog's self-termination, destroy afterwards ---------------
class TestLockAndSelfTermination:
    def test_apply_fails_naming_a_held_lock_and_changes_nothing(self, proj: Project) -> None:
        """Another run holds the S3 state lock (its lock object, as Terraform writes it, put there by this
        test, not a concurrent apply that might finish first): apply fails in one line naming that lock,
        leaves it in place, and keeps the tfvars and the node of the last good apply."""
        proj.inv("backend")
        proj.inv("apply", "--yes", "--idle-minutes", "1")  # the node the next test lets go idle
        tfvars = proj.generated / "testacct.tfvars"
        applied = tfvars.read_text()
        assert re.search(r"^idle_minutes\s*=\s*1$", applied, re.M), applied
        ws = proj.workspace()
        (before,) = live(stage_instances(ws))
        s3 = ws.client("s3")
        lock_key = f"{STATE_KEY}.tflock"
        # statemgr.LockInfo, the JSON Terraform's S3 backend stores in <key>.tflock (use_lockfile).
        lock = {
            "ID": str(uuid.uuid4()),
            "Operation": "OperationTypeApply",
            "Info": "",
            "Who": "colleague@elsewhere",
            "Version": "1.11.0",
            "Created": "2026-01-02T03:04:05.000000006Z",
            "Path": f"{BUCKET}/{STATE_KEY}",
        }
        s3.put_object(Bucket=BUCKET, Key=lock_key, Body=json.dumps(lock).encode(), IfNoneMatch="*")
        try:
            second = proj.inv("apply", "--yes", "--idle-minutes", "5", check=False)
            held = json.loads(s3.get_object(Bucket=BUCKET, Key=lock_key)["Body"].read())
        finally:
            s3.delete_object(Bucket=BUCKET, Key=lock_key)
        line = error_line(second)
        held_by = "held by colleague@elsewhere since 2026-01-02 03:04:05.000000006 +0000 UTC"  # as Terraform prints it
        assert f"the state is locked by another run (lock {lock['ID']}, {held_by})" in line, line
        assert f"force-unlock {lock['ID']}" in line, line
        assert held == lock  # neither broken nor released by the refused apply
        assert tfvars.read_text() == applied  # not the refused run's idle_minutes = 5
        (after,) = live(stage_instances(ws))
        assert after["InstanceId"] == before["InstanceId"]

    def test_idle_node_terminates_itself(self, proj: Project, tmp_path: Path) -> None:
        ws = proj.workspace()
        (node,) = ws.sandbox.nodes()
        assert node.alive() and node.watchdog_pid and pid_alive(node.watchdog_pid, "watchdog")
        cfg_file = proj.sandbox / "nodes" / node.instance_id / "watchdog.json"
        cfg = json.loads(cfg_file.read_text())
        assert cfg["idle_minutes"] == 1  # --idle-minutes reached the node's watchdog
        # The sandbox watchdog shares the host's /proc, so any ssh session on this machine (ours has a
        # ControlMaster for 10 min) counts as busy: tick against an empty /proc and a fresh state file,
        # with the clock 59 s and then 61 s after the node started.
        fake_proc = tmp_path / "proc"
        fake_proc.mkdir()

        def tick(after_s: float, *extra: str) -> subprocess.CompletedProcess[str]:
            argv = [sys.executable, str(WATCHDOG), "--config", str(cfg_file), "--proc", str(fake_proc)]
            argv += ["--state", str(tmp_path / "state.json"), "--imds-timeout", "0.2", *extra]
            env = {**os.environ, "REMOTEFIT_FAKE_NOW": str(cfg["started_epoch"] + after_s)}
            return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, check=True)

        kept = tick(59, "--dry-run").stdout
        assert "action=keep decision=waiting reason=idle for 1.0min of 1min" in kept, kept
        res = tick(61)
        assert "action=shutdown decision=idle reason=idle for 1.0min >= 1min" in res.stdout, res.stdout
        assert "shutdown command ran" in res.stdout, res.stdout
        (inst,) = stage_instances(ws)
        assert inst["State"]["Name"] == "terminated"
        assert not pid_alive(node.pid, "sshd")
        deadline = time.monotonic() + 10
        while pid_alive(node.watchdog_pid, "watchdog") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not pid_alive(node.watchdog_pid, "watchdog")
        assert ws.sandbox.nodes() == []
        row = next(ln for ln in proj.inv("status").stdout.splitlines() if ln.startswith("rf-test-0"))
        assert " terminated " in row

    def test_destroy_after_the_node_terminated_itself(self, proj: Project) -> None:
        res = proj.inv("destroy", "--yes")
        assert "destroyed" in res.stdout
        assert "verified: nothing tagged stage=test is left in us-east-1" in res.stdout
        assert not live(stage_instances(proj.workspace()))


# -- bad inputs through the tasks: one line, non-zero, no traceback ---------------------
class TestBadInputs:
    def test_apply_before_backend(self, proj: Project) -> None:
        line = error_line(proj.inv("apply", "--yes", check=False))
        assert "run `inv backend` first" in line

    def test_unknown_instance_type_suggests_a_close_one(self, proj: Project) -> None:
        line = error_line(proj.inv("apply", "--instance-type", "c7z.huge", "--yes", check=False))
        assert "'c7z.huge' is not an EC2 instance type in us-east-1" in line
        # preflight.suggest_type (difflib, cutoff 0.6) finds nothing "close" to c7z.huge, so the line names
        # the default CPU type instead of a "did you mean"; either way the user gets a type to use.
        assert re.search(r"did you mean c7i\.|e\.g\. c7i\.xlarge", line), line

    @pytest.mark.parametrize(
        ("args", "expected"),
        [
            (["--nodes", "0"], "--nodes 0 must be between 1 and"),
            (["--nodes", "99"], "--nodes 99 must be between 1 and"),
            (["--max-hours", "0"], "--max-hours 0 must be more than 0"),
            (["--max-hours=-1"], "--max-hours -1 must be more than 0"),
            (["--max-hours", "1000"], "at most 72"),
            (["--idle-minutes", "0"], "--idle-minutes 0 must be at least 1"),
            (["--cpu", "--instance-type", "g5.xlarge"], "is a GPU type but --cpu was given"),
            (["--gpu", "--instance-type", "c7i.xlarge"], "has no GPU but --gpu was given"),
            (["--allow-cidr", "nonsense"], "is not a CIDR block"),
            (["--allow-cidr", "0.0.0.0/0"], "would open SSH to the whole internet"),
        ],
    )
    def test_bad_flags(self, proj: Project, args: list[str], expected: str) -> None:
        line = error_line(proj.inv("apply", *args, "--yes", check=False))
        assert expected in line, line


# -- checkov over every rendered variant -----------------------------------------------
def checkov_binary() -> str | None:
    local = ROOT / ".venv-checkov" / "bin" / "checkov"
    return str(local) if local.exists() else shutil.which("checkov")


BASE_VARS: dict[str, Any] = {
    "name": "testacct",
    "region": "us-east-1",
    "environment": "test",
    "aws_endpoint": None,  # real AWS: checkov sees what AWS would get
    "owner": "arn:aws:iam::123456789012:user/alice",
    "runs_bucket": "remotefit-test-state-runs",
    "node_count": 1,
    "instance_type": "c7i.xlarge",
    "market": "on-demand",
    "ami_id": "ami-0123456789abcdef0",
    "availability_zone": "us-east-1a",
    "allow_cidr": "203.0.113.7/32",
    "public_key": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBv2gKlq3nE9Rz0lCkKcYcJ5v8g0bS5Yb3Yq2Cj6f4aX remotefit-test",
    "disk_gb": 50,
    "max_hours": 8,
    "idle_minutes": 30,
    "ssh_user": "ubuntu",
    "cluster_placement": False,
    "allow_world_ssh": False,
    "request_public_ip": False,
    "data_buckets": [],
}
VARIANTS: dict[str, dict[str, Any]] = {
    "cpu": {},
    "data-buckets": {"data_buckets": ["my-datasets", "team.shared-data"]},  # the node role's read policy
    "gpu": {"instance_type": "g5.xlarge", "disk_gb": 150},
    "spot": {"instance_type": "g5.xlarge", "disk_gb": 150, "market": "spot"},
    "multi-node": {
        "instance_type": "g5.xlarge",
        "disk_gb": 150,
        "market": "spot",
        "node_count": 2,
        "cluster_placement": True,
    },
}


@requires("checkov")
def test_checkov_passes_every_variant(tmp_path: Path) -> None:
    import hcl2

    from remotefit.render import render_terraform, write_hcl_file

    tfdir = tmp_path / "terraform"
    render_terraform(ROOT / "templates", tfdir)
    text = "\n".join(f.read_text() for f in sorted(tfdir.glob("*.tf")))
    variables = hcl2.loads((tfdir / "variables.tf").read_text())["variable"]
    declared = {name.strip('"') for block in variables for name in block}
    assert set(BASE_VARS) == declared, "the variants must set every variable the templates declare"
    # every skip is inline in a template, names one check and gives a reason
    skips = re.findall(r"#\s*checkov:skip.*", text)
    assert skips, "expected the documented inline skips"
    for line in skips:
        assert re.fullmatch(r"#checkov:skip=CKV2?_[A-Z]+_\d+:[A-Z].{10,}", line.strip()), line
    env = {**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false", "LOG_LEVEL": "ERROR"}
    for variant, overrides in VARIANTS.items():
        var_file = write_hcl_file(tmp_path / f"{variant}.tfvars", BASE_VARS | overrides, f"checkov variant {variant}")
        res = subprocess.run(
            [checkov_binary(), "-d", str(tfdir), "--framework", "terraform", "--skip-download", "-o", "json"]
            + ["--var-file", str(var_file)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        report = json.loads(res.stdout)
        report = report[0] if isinstance(report, list) else report
        summary, results = report["summary"], report["results"]
        failed = [f"{c['check_id']} {c['resource']}" for c in results["failed_checks"]]
        assert summary["failed"] == 0 and not failed, f"{variant}: {failed}"
        assert summary["parsing_errors"] == 0, variant
        assert res.returncode == 0, res.stderr[-2000:]
        for c in results["skipped_checks"]:
            assert (c["check_result"].get("suppress_comment") or "").strip(), (
                f"{variant}: {c['check_id']} has no reason"
            )
        scanned = {c["resource"] for c in results["passed_checks"] + results["skipped_checks"]}
        nodes = overrides.get("node_count", 1)
        assert {f"aws_instance.node[{i}]" for i in range(nodes)} <= scanned, (variant, scanned)
        assert (f"aws_instance.node[{nodes}]" in scanned) is False
        # (checkov does not evaluate `cond ? 1 : 0` counts, so the cluster rule is scanned in every variant)
        assert "aws_vpc_security_group_ingress_rule.cluster[0]" in scanned, variant

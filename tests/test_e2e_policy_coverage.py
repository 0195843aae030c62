"""Every AWS call a real life cycle makes is allowed by docs/iam-policy.json, and re-applies are no-ops.

One sandbox project runs, through the real tasks and the real Terraform + AWS provider, with Terraform's
debug log (TF_LOG=debug) and remotefit's own call log (REMOTEFIT_AWS_CALL_LOG) switched on:
backend → apply (1 CPU node) → plan → apply --nodes 2 → plan → the same apply again → status, stop,
start, gc → apply --spot --nodes 2 (replaces the nodes) → plan of a spot type change → destroy.
Then every request in both logs becomes the IAM authorizations AWS would check (tests/iam_policy_check.py:
the call's action on each resource it names, CreateTags inside create requests with ec2:CreateAction,
TagRole/TagInstanceProfile, PassRole), and each must be allowed: a new provider call that the policy
does not allow fails here, by name.

The GPU variant is not applied here (sandbox nodes have no nvidia-smi, which apply's readiness check
runs); its calls differ from the CPU ones only in values (type, AMI, disk), and `inv plan --gpu` runs the
GPU profile's pre-flight and AMI lookup. Calls only real AWS sees (SSM public parameters, placement
groups, the spot service-linked role, KMS for customer-managed EBS keys) are in tests/test_iam_policy.py.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest

from tests.conftest import Project, make_project
from tests.iam_policy_check import (
    authorizations,
    boto3_requests,
    denied,
    load_policy,
    terraform_requests,
)

pytestmark = pytest.mark.e2e

BUCKET = "remotefit-test-state"


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory):
    p = make_project(tmp_path_factory.mktemp("policy"))
    logs = p.dir / "logs"
    logs.mkdir()
    p.env |= {
        "TF_LOG": "debug",
        "TF_LOG_PATH": str(logs / "terraform.log"),
        "REMOTEFIT_AWS_CALL_LOG": str(logs / "boto3.log"),
    }
    yield p
    p.down()


def tf_env(p: Project) -> dict[str, str]:
    ws = p.workspace()
    return {**p.env, **ws.aws_env(), "TF_CLI_CONFIG_FILE": str(p.generated / "terraformrc"), "TF_IN_AUTOMATION": "1"}


def plan_json(p: Project, *extra: str) -> tuple[int, dict[str, Any]]:
    """`terraform plan -detailed-exitcode` with the stage's tfvars (plus `extra`); its exit code and JSON."""
    tfdir, out = p.generated / "terraform", p.generated / "check.tfplan"
    argv = ["terraform", f"-chdir={tfdir}", "plan", "-detailed-exitcode", "-input=false", "-no-color"]
    argv += ["-lock-timeout=0s", f"-var-file={p.generated / 'testacct.tfvars'}", f"-out={out}", *extra]
    env = tf_env(p)
    res = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode in (0, 2), res.stdout[-3000:] + res.stderr[-3000:]
    shown = subprocess.run(
        ["terraform", f"-chdir={tfdir}", "show", "-json", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return res.returncode, json.loads(shown.stdout)


def changes(plan: dict[str, Any]) -> dict[str, list[str]]:
    return {
        rc["address"]: rc["change"]["actions"]
        for rc in plan.get("resource_changes", [])
        if rc["change"]["actions"] not in (["no-op"], ["read"])
    }


def instance_ids(p: Project) -> set[str]:
    return {n["instance_id"] for n in json.loads((p.generated / "nodes.json").read_text())["nodes"]}


# -- the life cycle ----------------------------------------------------------------------
def test_first_apply_then_plan_shows_no_changes(traced: Project) -> None:
    traced.inv("backend")
    traced.inv("apply", "--yes")
    code, plan = plan_json(traced)
    assert code == 0, f"a plan right after apply must show no changes: {changes(plan)}"


def test_the_node_role_reaches_only_its_stage_of_the_runs_bucket(traced: Project) -> None:
    """The role Terraform made (read back from the sandbox's IAM), evaluated as AWS would."""
    from tests.iam_policy_check import Call, allowed

    iam = traced.workspace().client("iam")
    (role,) = [r["RoleName"] for r in iam.list_roles()["Roles"] if r["RoleName"].startswith("remotefit-test-")]
    names = iam.list_role_policies(RoleName=role)["PolicyNames"]
    assert names == ["runs-bucket"], names
    policy = iam.get_role_policy(RoleName=role, PolicyName="runs-bucket")["PolicyDocument"]
    policy = json.loads(policy) if isinstance(policy, str) else policy
    runs = f"arn:aws:s3:::{BUCKET}-runs"
    for action in ("s3:PutObject", "s3:GetObject", "s3:AbortMultipartUpload"):
        assert allowed(policy, Call(action, f"{runs}/test/resnet/run-1/outputs/model.pt"))
        assert not allowed(policy, Call(action, f"{runs}/other/resnet/run-1/log")), "another stage's prefix"
        assert not allowed(policy, Call(action, f"arn:aws:s3:::{BUCKET}/remotefit/test.tfstate")), "the state"
    assert not allowed(policy, Call("s3:DeleteObject", f"{runs}/test/resnet/run-1/log")), "never deletes a result"
    assert allowed(policy, Call("s3:ListBucket", runs, {"s3:prefix": "test/resnet/"}))
    assert not allowed(policy, Call("s3:ListBucket", runs, {"s3:prefix": "other/"}))
    assert not allowed(policy, Call("s3:ListBucket", runs))  # the whole bucket: no


def test_two_nodes_then_plan_shows_no_changes_and_reapply_is_a_no_op(traced: Project) -> None:
    first = instance_ids(traced)
    res = traced.inv("apply", "--yes", "--nodes", "2")
    assert first < instance_ids(traced), "scaling up keeps the running node"
    assert "disrupts" not in res.stderr, res.stderr
    code, plan = plan_json(traced)
    assert code == 0, f"a plan right after a 2-node apply must show no changes: {changes(plan)}"
    ids = instance_ids(traced)
    again = traced.inv("apply", "--yes", "--nodes", "2")
    assert "apply: no changes to the running nodes" in again.stderr, again.stderr[-3000:]
    assert instance_ids(traced) == ids
    # every resource we created carries managed-by=remotefit (the policy's ResourceTag conditions rely on it)
    ec2 = traced.workspace().client("ec2")
    stage = [{"Name": "tag:stage", "Values": ["test"]}]
    sgs = ec2.describe_security_groups(Filters=stage)["SecurityGroups"]
    rules = ec2.describe_security_group_rules(Filters=[{"Name": "group-id", "Values": [sgs[0]["GroupId"]]}])
    tagged: list[list[dict[str, str]]] = [r.get("Tags", []) for r in rules["SecurityGroupRules"]]
    tagged += [
        i.get("Tags", [])
        for r in ec2.describe_instances(InstanceIds=sorted(ids))["Reservations"]
        for i in r["Instances"]
    ]
    tagged += [
        v.get("Tags", [])
        for v in ec2.describe_volumes(Filters=[{"Name": "attachment.instance-id", "Values": sorted(ids)}])["Volumes"]
    ]
    tagged += [s.get("Tags", []) for s in sgs] + [
        k.get("Tags", []) for k in ec2.describe_key_pairs(Filters=stage)["KeyPairs"]
    ]
    assert len(tagged) >= 3 + 2 + 2 + 1 + 1
    for tags in tagged:
        assert {"Key": "managed-by", "Value": "remotefit"} in tags, tags


def test_status_stop_start_gc_and_a_gpu_plan(traced: Project) -> None:
    traced.inv("status")
    traced.inv("stop")
    traced.inv("start")
    traced.inv("gc")
    traced.inv("plan", "--gpu")


def test_spot_replaces_with_a_warning_and_a_spot_type_change_replaces_never_resizes(traced: Project) -> None:
    before = instance_ids(traced)
    res = traced.inv("apply", "--yes", "--spot", "--nodes", "2")
    assert "warning: this apply disrupts running nodes: aws_instance.node[0] is replaced (market" in res.stderr
    assert not before & instance_ids(traced)
    # A one-time spot node cannot be stopped: a new type must replace it (terraform_data trigger), while
    # an on-demand node's type changes in place. Plan only: the decision is Terraform's, no apply needed.
    _, plan = plan_json(traced, "-var=instance_type=c6i.xlarge")
    nodes = [rc for rc in plan["resource_changes"] if rc["type"] == "aws_instance"]
    assert len(nodes) == 2
    for rc in nodes:
        assert "delete" in rc["change"]["actions"] and rc.get("action_reason") == "replace_by_triggers", rc


def test_destroy(traced: Project) -> None:
    out = traced.inv("destroy", "--yes").stdout
    assert "verified: nothing tagged stage=test is left" in out


def test_an_account_without_a_default_vpc_gets_one_line(traced: Project) -> None:
    ec2 = traced.workspace().client("ec2")
    (vpc,) = ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"]
    for sn in ec2.describe_subnets(Filters=[{"Name": "vpc-id", "Values": [vpc["VpcId"]]}])["Subnets"]:
        ec2.delete_subnet(SubnetId=sn["SubnetId"])
    for igw in ec2.describe_internet_gateways()["InternetGateways"]:
        ec2.detach_internet_gateway(InternetGatewayId=igw["InternetGatewayId"], VpcId=vpc["VpcId"])
        ec2.delete_internet_gateway(InternetGatewayId=igw["InternetGatewayId"])
    ec2.delete_vpc(VpcId=vpc["VpcId"])
    saved = traced.generated / "node_vars.json"
    before = saved.read_text() if saved.exists() else None
    res = traced.inv("apply", "--yes", check=False)
    out = res.stdout + res.stderr
    errors = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert res.returncode != 0 and "Traceback" not in out and len(errors) == 1, out
    assert "no default VPC in us-east-1" in errors[0] and "aws ec2 create-default-vpc --region us-east-1" in errors[0]
    assert (saved.read_text() if saved.exists() else None) == before, "nothing was applied"
    live = [
        i
        for r in ec2.describe_instances(Filters=[{"Name": "tag:stage", "Values": ["test"]}])["Reservations"]
        for i in r["Instances"]
        if i["State"]["Name"] != "terminated"
    ]
    assert not live


# -- the policy check over everything above -----------------------------------------------
def test_every_call_is_allowed_by_the_iam_policy(traced: Project) -> None:
    logs = traced.dir / "logs"
    tf_text = (logs / "terraform.log").read_text(errors="replace")
    observed = list(terraform_requests(tf_text)) + list(boto3_requests((logs / "boto3.log").read_text()))
    called = {(o.who, o.operation) for o in observed}
    # the log really holds the life cycle: creates, tag-on-create, updates, spot, stop/start, deletes
    for who, op in [
        ("terraform", "RunInstances"),
        ("terraform", "CreateSecurityGroup"),
        ("terraform", "AuthorizeSecurityGroupIngress"),
        ("terraform", "CreateRole"),
        ("terraform", "TerminateInstances"),
        ("terraform", "DeleteSecurityGroup"),
        ("terraform", "DeleteRole"),
        ("terraform", "GetCallerIdentity"),
        ("terraform", "PutObject"),
        ("boto3", "StopInstances"),
        ("boto3", "StartInstances"),
        ("boto3", "CreateBucket"),
        ("boto3", "DescribeSpotPriceHistory"),
    ]:
        assert (who, op) in called, f"{who} never called {op}: the trace is incomplete"
    spot = [o for o in observed if o.operation == "RunInstances" and o.params.get("InstanceMarketOptions.MarketType")]
    assert spot, "no spot launch in the trace"
    policy = json.loads(
        json.dumps(load_policy()).replace("YOUR-TF-STATE-BUCKET", BUCKET).replace("YOUR-RUNS-BUCKET", f"{BUCKET}-runs")
    )
    refused = denied(policy, authorizations(observed, "us-east-1"))
    assert not refused, "docs/iam-policy.json does not allow:\n" + "\n".join(refused)


def test_the_trace_holds_no_secret(traced: Project) -> None:
    """The call log names resources only; the private key never appears in either log."""
    key = (traced.kept / "keys" / "test_ed25519").read_text()
    body = "".join(ln for ln in key.splitlines() if not ln.startswith("-----"))
    for f in (traced.dir / "logs").iterdir():
        assert body[20:80] not in f.read_text(errors="replace"), f
    for line in (traced.dir / "logs" / "boto3.log").read_text().splitlines():
        assert set(json.loads(line)["params"]) <= {
            "Bucket",
            "Key",
            "Resources",
            "Tags",
            "TagSpecifications",
            "InstanceIds",
            "Name",
            "RoleName",
        }

"""Unit tests for issue 11's re-apply and first-run defects: the owner tag never drifts, re-applies keep
running nodes where they are and say what would replace them, accounts without default VPC/subnets get
one line, STAGE fits the IAM name prefix, and costs count the disk, the public IPv4 address and the spot
price of the AZ a node runs in."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import boto3
import pytest
from moto import mock_aws

from remotefit import cost, nodes, preflight, stack
from remotefit.config import Defaults, Paths, Settings
from remotefit.errors import UserError
from remotefit.nodes import provision, terraform_dir
from remotefit.preflight import Candidate
from remotefit.workspace import Workspace
from tests.test_nodes_unit import CAPACITY, apply_failure, one_line_error

REGION = "us-east-1"


# -- owner tag: pinned, never the role session -------------------------------------------
def test_stable_identity_strips_the_role_session() -> None:
    arn = "arn:aws:sts::123456789012:assumed-role/Admin/alice@example.com-1712345"
    assert nodes.stable_identity(arn) == "arn:aws:iam::123456789012:role/Admin"
    assert nodes.stable_identity("arn:aws-cn:sts::1:assumed-role/R/s") == "arn:aws-cn:iam::1:role/R"
    assert nodes.stable_identity("arn:aws:iam::1:user/bob") == "arn:aws:iam::1:user/bob"


def _ws_for_owner(tmp_path: Path, arn: str) -> SimpleNamespace:
    return SimpleNamespace(
        paths=Paths(root=tmp_path, generated=tmp_path / "generated", runs=tmp_path / "runs"),
        stage="test",
        caller_identity=lambda: {"Arn": arn},
    )


def test_owner_is_pinned_by_the_state_then_the_last_apply(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ws = _ws_for_owner(tmp_path, "arn:aws:sts::1:assumed-role/Admin/session-2")
    state: dict[str, Any] = {}
    monkeypatch.setattr(terraform_dir, "read_state", lambda ws: (state, None))
    assert terraform_dir._owner(ws) == "arn:aws:iam::1:role/Admin"  # first apply: the role, not the session
    (tmp_path / "generated").mkdir()
    (tmp_path / "generated" / "node_vars.json").write_text(json.dumps({"owner": "arn:aws:iam::1:user/alice"}))
    assert terraform_dir._owner(ws) == "arn:aws:iam::1:user/alice"  # what the last apply used
    # a teammate's fresh clone has no node_vars, but the state says who launched the stage
    state["resources"] = [
        {"mode": "data", "instances": [{"attributes": {"tags_all": {"owner": "nope"}}}]},
        {"mode": "managed", "instances": [{"attributes": {"tags_all": {"owner": "arn:aws:iam::1:user/carol"}}}]},
    ]
    assert terraform_dir._owner(ws) == "arn:aws:iam::1:user/carol"


def test_unreadable_state_falls_back_to_the_saved_owner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(ws: Any) -> dict[str, Any]:
        raise UserError("cannot read the state")

    monkeypatch.setattr(terraform_dir, "read_state", boom)
    assert terraform_dir._owner(_ws_for_owner(tmp_path, "arn:aws:iam::1:user/bob")) == "arn:aws:iam::1:user/bob"


# -- candidates: the running nodes' own place first ---------------------------------------
def test_prefer_current_puts_the_running_placement_first() -> None:
    cands = preflight.launch_candidates(
        "g5.xlarge", "spot", {"g5.xlarge": ["a", "b"], "g6.xlarge": ["a", "b"]}, ["g6.xlarge"], True
    )
    current = Candidate("g6.xlarge", "spot", "b")
    got = preflight.prefer_current(cands, current)
    assert got[0] == current
    # then the original order (asked type before fallbacks, spot before on-demand), the nodes' AZ first
    assert got[1:] == [
        Candidate("g5.xlarge", "spot", "b"),
        Candidate("g5.xlarge", "spot", "a"),
        Candidate("g6.xlarge", "spot", "a"),
        Candidate("g5.xlarge", "on-demand", "b"),
        Candidate("g5.xlarge", "on-demand", "a"),
        Candidate("g6.xlarge", "on-demand", "b"),
        Candidate("g6.xlarge", "on-demand", "a"),
    ]
    assert preflight.prefer_current(cands, None) == cands


def test_default_subnets_filter_the_azs() -> None:
    azs = {"c7i.xlarge": ["us-east-1a", "us-east-1b"], "c6i.xlarge": ["us-east-1c"]}
    got = preflight.azs_with_default_subnet(azs, {"us-east-1b": True}, "c7i.xlarge", REGION)
    assert got == {"c7i.xlarge": ["us-east-1b"]}  # the fallback with no default subnet is dropped
    with pytest.raises(UserError) as exc:
        preflight.azs_with_default_subnet(azs, {"us-east-1c": True}, "c7i.xlarge", REGION)
    msg = one_line_error(exc)
    assert "aws ec2 create-default-subnet --availability-zone us-east-1a --region us-east-1" in msg


# -- what a plan does to running nodes -----------------------------------------------------
def _rc(addr: str, actions: list[str], **extra: Any) -> dict[str, Any]:
    return {"address": addr, "type": "aws_instance", "mode": "managed", "change": {"actions": actions, **extra}}


def test_disruptions_name_every_replacing_attribute() -> None:
    plan = {
        "resource_changes": [
            _rc("aws_instance.node[0]", ["delete", "create"], replace_paths=[["availability_zone"], ["subnet_id"]]),
            _rc("aws_instance.node[1]", ["create", "delete"], replace_paths=[["user_data_base64"], ["ami"]]),
            {**_rc("aws_instance.node[2]", ["delete", "create"]), "action_reason": "replace_by_triggers"},
            _rc("aws_instance.node[3]", ["delete"]),
            _rc(
                "aws_instance.node[4]",
                ["update"],
                before={"instance_type": "c7i.xlarge"},
                after={"instance_type": "c7i.2xlarge"},
            ),
            _rc(
                "aws_instance.node[5]",
                ["update"],
                before={"instance_type": "a", "tags": {}},
                after={"instance_type": "a"},
            ),
            _rc("aws_instance.node[6]", ["no-op"]),
            {
                "address": "aws_security_group.node",
                "type": "aws_security_group",
                "mode": "managed",
                "change": {"actions": ["delete", "create"]},
            },
        ]
    }
    assert nodes.disruptions(plan) == [
        "aws_instance.node[0] is replaced (availability zone, availability zone (subnet))",
        "aws_instance.node[1] is replaced (AMI, boot script (deadline, idle timeout or a new remotefit version))",
        "aws_instance.node[2] is replaced (instance type of a spot node)",
        "aws_instance.node[3] is destroyed",
        "aws_instance.node[4] is stopped, resized c7i.xlarge -> c7i.2xlarge and started",
    ]
    assert nodes.disruptions({"resource_changes": []}) == []


class PlanningTf:
    """A Terraform whose saved plan replaces node 0; records what ran."""

    def __init__(self, tmp: Path, plan: dict[str, Any], code: int = 2, capacity: bool = False) -> None:
        self.workdir, self.plan_json, self.code, self.capacity = tmp, plan, code, capacity
        self.ran: list[str] = []

    def plan(self, tfvars: Path, detailed: bool = False, quiet: bool = False, out: Path | None = None) -> int:
        self.ran.append("plan")
        assert out is not None
        out.write_text("plan")
        return self.code

    def show_json(self, planfile: Path) -> dict[str, Any]:
        return self.plan_json

    def apply_plan(self, planfile: Path) -> str:
        self.ran.append("apply_plan")
        if self.capacity:
            raise apply_failure(CAPACITY.format(t="g5.xlarge", az="us-east-1a"))
        return "ok"

    def apply(self, tfvars: Path) -> str:
        self.ran.append("apply")
        return "ok"

    def destroy(self, tfvars: Path, quiet: bool = False) -> str:
        self.ran.append("destroy")
        return "ok"


@pytest.fixture
def running(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """A stage with one node running g5.xlarge on-demand in us-east-1b (after a capacity fallback)."""
    gen = tmp_path / "generated"
    gen.mkdir()
    saved = {"instance_type": "g5.xlarge", "market": "on-demand", "availability_zone": "us-east-1b", "node_count": 1}
    (gen / "node_vars.json").write_text(json.dumps(saved))
    node = {k: "x" for k in nodes.Node.__dataclass_fields__} | {"index": 0, "port": 22}
    (gen / "nodes.json").write_text(json.dumps({"stage": "test", "nodes": [node]}))
    written: list[dict[str, Any]] = []
    holder: dict[str, Any] = {}
    monkeypatch.setattr(provision, "preflight_checks", lambda ws, spec: {"g5.xlarge": ["us-east-1a", "us-east-1b"]})
    monkeypatch.setattr(provision, "cost_lines", lambda ws, spec: [])
    monkeypatch.setattr(
        provision,
        "node_variables",
        lambda ws, spec, az, itype, market, refresh=False: {
            "instance_type": itype,
            "market": market,
            "availability_zone": az,
            "node_count": spec.nodes,
        },
    )
    monkeypatch.setattr(stack, "write_tfvars", lambda ws, values: written.append(dict(values)) or Path("x"))
    monkeypatch.setattr(stack, "init_once", lambda ws, tf: None)
    monkeypatch.setattr(stack, "terraform", lambda ws: holder["tf"])
    monkeypatch.setattr(provision, "_record_nodes", lambda ws, tf: ["node"])
    monkeypatch.setattr(provision, "wait_ready", lambda ws, n, gpu=False: 0.0)
    monkeypatch.setattr(provision, "ensure_key", lambda *a: None)
    ws = SimpleNamespace(
        paths=Paths(root=tmp_path, generated=gen, runs=tmp_path / "runs"),
        stage="test",
        defaults=Defaults(allow_on_demand_fallback=True),
        settings=SimpleNamespace(AWS_REGION=REGION, AWS_ACCOUNT="testacct"),
        endpoint=None,
    )
    return SimpleNamespace(ws=ws, written=written, holder=holder, tmp=tmp_path, saved=saved)


def test_reapply_keeps_the_running_nodes_where_they_are(running: SimpleNamespace) -> None:
    tf = running.holder["tf"] = PlanningTf(running.tmp, {}, code=0)
    asked: list[str] = []
    spec = nodes.NodeSpec("gpu", "g5.xlarge", "on-demand", 1, 150, 8.0, 30)
    assert nodes.apply(running.ws, spec, confirm=asked.append) == ["node"]
    assert running.written[0]["availability_zone"] == "us-east-1b", "the nodes' AZ first, not the first AZ"
    assert tf.ran == ["plan"] and not asked, "a no-change plan applies nothing and asks nothing"


def test_reapply_that_replaces_nodes_asks_first_and_cancel_changes_nothing(running: SimpleNamespace) -> None:
    plan = {"resource_changes": [_rc("aws_instance.node[0]", ["delete", "create"], replace_paths=[["ami"]])]}
    tf = running.holder["tf"] = PlanningTf(running.tmp, plan)
    asked: list[str] = []

    def refuse(question: str) -> None:
        asked.append(question)
        raise KeyboardInterrupt

    spec = nodes.NodeSpec("gpu", "g5.xlarge", "on-demand", 1, 150, 8.0, 30)
    with pytest.raises(KeyboardInterrupt):
        nodes.apply(running.ws, spec, confirm=refuse)
    assert asked and "aws_instance.node[0] is replaced (AMI)" in asked[0] and "killed" in asked[0]
    assert tf.ran == ["plan"], "nothing applied after a refusal"
    assert running.written[-1]["availability_zone"] == "us-east-1b"  # tfvars rewritten from the saved values
    assert not list(running.tmp.glob("*.tfplan")), "the saved plan is removed"
    # with --yes (confirm=None) the same plan is applied as planned
    assert nodes.apply(running.ws, spec, confirm=None) == ["node"]
    assert tf.ran == ["plan", "plan", "apply_plan"]


def test_no_capacity_to_scale_up_never_moves_or_destroys_running_nodes(running: SimpleNamespace) -> None:
    tf = running.holder["tf"] = PlanningTf(running.tmp, {}, capacity=True)
    spec = nodes.NodeSpec("gpu", "g5.xlarge", "on-demand", 2, 150, 8.0, 30)
    with pytest.raises(UserError) as exc:
        nodes.apply(running.ws, spec)
    msg = one_line_error(exc)
    assert "the running nodes are unchanged" in msg
    assert tf.ran == ["plan", "apply_plan"], "one try where the nodes are; no other AZ, no destroy"
    assert json.loads((running.tmp / "generated" / "node_vars.json").read_text()) == running.saved


# -- accounts without a default VPC ------------------------------------------------------
@pytest.fixture
def aws_ws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    for k, v in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": REGION,
    }.items():
        monkeypatch.setenv(k, v)
    for k in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "STAGE", "TARGET"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("REMOTEFIT_GENERATED", str(tmp_path / "generated"))
    settings = Settings(AWS_ACCOUNT="a", AWS_REGION=REGION, STAGE="test", TF_STATE_BUCKET="remotefit-t", TARGET="aws")
    with mock_aws():
        yield Workspace(root=tmp_path, defaults={}, settings=settings)


def _delete_default_vpc() -> None:
    ec2 = boto3.client("ec2", region_name=REGION)
    (vpc,) = ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"]
    for sn in ec2.describe_subnets(Filters=[{"Name": "vpc-id", "Values": [vpc["VpcId"]]}])["Subnets"]:
        ec2.delete_subnet(SubnetId=sn["SubnetId"])
    for igw in ec2.describe_internet_gateways()["InternetGateways"]:
        ec2.detach_internet_gateway(InternetGatewayId=igw["InternetGatewayId"], VpcId=vpc["VpcId"])
        ec2.delete_internet_gateway(InternetGatewayId=igw["InternetGatewayId"])
    ec2.delete_vpc(VpcId=vpc["VpcId"])


def test_default_subnets_per_az(aws_ws: Workspace) -> None:
    subnets = aws_ws.default_subnets()
    assert len(subnets) >= 3 and all(az.startswith(REGION) for az in subnets)
    ec2 = boto3.client("ec2", region_name=REGION)
    gone = sorted(subnets)[0]
    (sn,) = ec2.describe_subnets(Filters=[{"Name": "availability-zone", "Values": [gone]}])["Subnets"]
    ec2.delete_subnet(SubnetId=sn["SubnetId"])
    fresh = Workspace(root=aws_ws.paths.root, defaults={}, settings=aws_ws.settings)
    assert gone not in fresh.default_subnets() and len(fresh.default_subnets()) == len(subnets) - 1


def test_no_default_vpc_is_one_line_naming_the_fix(aws_ws: Workspace) -> None:
    _delete_default_vpc()
    with pytest.raises(UserError) as exc:
        aws_ws.default_subnets()
    msg = one_line_error(exc)
    assert "no default VPC in us-east-1" in msg and "aws ec2 create-default-vpc --region us-east-1" in msg


# -- STAGE fits the IAM name prefix -------------------------------------------------------
def test_stage_length_follows_the_name_prefix_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from remotefit.config import STAGE_MAX, load_settings

    assert len("remotefit-" + "x" * STAGE_MAX + "-") == 38 and STAGE_MAX == 27
    for k in ("STAGE", "AWS_ACCOUNT", "AWS_REGION", "TF_STATE_BUCKET", "TARGET", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    env = tmp_path / "aws_env_vars"
    monkeypatch.setenv("REMOTEFIT_ENV_FILE", str(env))
    base = "AWS_ACCOUNT=a\nAWS_REGION=us-east-1\nTF_STATE_BUCKET=remotefit-t\nSTAGE={}\n"
    env.write_text(base.format("a" * 27))
    assert load_settings(tmp_path).STAGE == "a" * 27
    env.write_text(base.format("a" * 28))
    with pytest.raises(UserError) as exc:
        load_settings(tmp_path)
    msg = one_line_error(exc)
    assert "aws_env_vars:4: STAGE=" in msg and "at most 27" in msg and "38 characters" in msg
    # the template's own validation says the same
    text = (Path(__file__).resolve().parent.parent / "templates" / "variables.tf.j2").read_text()
    assert '"^[a-z0-9]([a-z0-9-]{0,25}[a-z0-9])?$"' in text


# -- costs: disk, public IPv4, the spot price where the node runs --------------------------
class SpotHistory:
    def describe_spot_price_history(self, **kw: Any) -> dict[str, Any]:
        t = datetime(2026, 1, 1, tzinfo=UTC)
        rows = [("us-east-1a", "0.30"), ("us-east-1b", "0.50")]
        return {
            "SpotPriceHistory": [
                {"AvailabilityZone": az, "Timestamp": t, "SpotPrice": p, "InstanceType": "g5.xlarge"} for az, p in rows
            ]
        }


def test_spot_price_of_the_nodes_own_az() -> None:
    cheapest = cost.hourly_price("g5.xlarge", "spot", REGION, ec2=SpotHistory())
    assert cheapest.usd_per_hour == 0.30
    own = cost.hourly_price("g5.xlarge", "spot", REGION, ec2=SpotHistory(), az="us-east-1b")
    assert own.usd_per_hour == 0.50 and "us-east-1b" in own.source


def test_estimate_counts_the_disk_and_the_public_address() -> None:
    bare = cost.estimate("c7i.xlarge", "on-demand", 2, 8, REGION)
    full = cost.estimate("c7i.xlarge", "on-demand", 2, 8, REGION, disk_gb=50, public_ip=True)
    extra = 0.08 * 50 / 730 + 0.005
    assert full.per_node_usd_per_hour == pytest.approx(bare.per_node_usd_per_hour + extra)
    assert full.deadline_cap_usd == pytest.approx(bare.deadline_cap_usd + extra * 2 * 8)
    line = full.lines()[0]
    assert "of which 50 GB gp3 disk and public IPv4 address $0.010/h per node" in line, line


def test_status_prices_spot_nodes_at_the_spot_price_of_their_az(tmp_path: Path) -> None:
    node = nodes.Node(**({k: "x" for k in nodes.Node.__dataclass_fields__} | {"index": 0, "port": 22}))
    node = replace(node, instance_type="g5.xlarge", market="spot", availability_zone="us-east-1a")
    ws = SimpleNamespace(settings=SimpleNamespace(AWS_REGION=REGION), client=lambda name: SpotHistory())
    rate = nodes.node_rate(ws, node, 150, az="us-east-1b")  # type: ignore[arg-type]
    assert rate == pytest.approx(0.50 + cost.extras_per_hour(150))
    od = replace(node, market="on-demand")
    assert nodes.node_rate(ws, od, 150) == pytest.approx(1.006 + cost.extras_per_hour(150))  # type: ignore[arg-type]

"""Unit tests for remotefit/nodes/: every bad flag is one line before any API call, quotas stop a run
before Terraform, and capacity errors walk every AZ / fallback type / market and leave nothing behind."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from remotefit import nodes, stack, terraform
from remotefit.config import Defaults, Paths, Settings
from remotefit.errors import UserError
from remotefit.nodes import provision
from remotefit.terraform import TerraformError
from remotefit.workspace import Workspace

SETTINGS_KEYS = ("AWS_ACCOUNT", "AWS_REGION", "STAGE", "TF_STATE_BUCKET", "AWS_PROFILE", "TARGET")


@pytest.fixture
def ws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Workspace:
    for k in SETTINGS_KEYS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("REMOTEFIT_GENERATED", str(tmp_path / "generated"))
    settings = Settings(
        AWS_ACCOUNT="testacct", AWS_REGION="us-east-1", STAGE="test", TF_STATE_BUCKET="remotefit-test-state"
    )
    return Workspace(root=tmp_path, defaults={}, settings=settings)


def one_line_error(exc: pytest.ExceptionInfo[UserError]) -> str:
    msg = exc.value.message
    assert "\n" not in msg, msg
    assert "Traceback" not in msg
    assert exc.value.code != 0
    return msg


# -- resolve_spec: bad flags ------------------------------------------------------------
BAD_FLAGS = [
    ({"nodes": 0}, "--nodes 0 must be between 1 and 8"),
    ({"nodes": 9}, "--nodes 9 must be between 1 and 8"),
    ({"nodes": -1}, "--nodes -1"),
    ({"gpu": True, "cpu": True}, "--gpu and --cpu both given"),
    ({"cpu": True, "instance_type": "g5.xlarge"}, "is a GPU type but --cpu was given"),
    ({"gpu": True, "instance_type": "c7i.xlarge"}, "has no GPU but --gpu was given"),
    ({"max_hours": 0}, "--max-hours 0 must be more than 0"),
    ({"max_hours": -1}, "--max-hours -1 must be more than 0"),
    ({"max_hours": 1000}, "--max-hours 1000 must be more than 0 and at most 72"),
    # invoke hands flags whose default is None over as strings
    ({"max_hours": "0"}, "--max-hours 0 must be more than 0"),
    ({"max_hours": "-1"}, "--max-hours -1 must be more than 0"),
    ({"max_hours": "1000"}, "at most 72"),
    ({"max_hours": "soon"}, "--max-hours 'soon' is not a number"),
    ({"max_hours": "nan"}, "--max-hours 'nan' must be a number"),
    ({"idle_minutes": 0}, "--idle-minutes 0 must be at least 1"),
    ({"idle_minutes": "0"}, "--idle-minutes 0 must be at least 1"),
    ({"idle_minutes": "1.5"}, "--idle-minutes '1.5' must be a whole number"),
    ({"disk_gb": 4}, "--disk-gb 4 must be between 8 and 16384"),
    ({"allow_cidr": "nonsense"}, "--allow-cidr 'nonsense' is not a CIDR block"),
    ({"allow_cidr": "0.0.0.0/0"}, "would open SSH to the whole internet"),
    ({"allow_cidr": "::/0"}, "would open SSH to the whole internet"),
]


@pytest.mark.parametrize(("flags", "expected"), BAD_FLAGS, ids=[repr(f) for f, _ in BAD_FLAGS])
def test_bad_flags_are_one_line(ws: Workspace, flags: dict[str, object], expected: str) -> None:
    with pytest.raises(UserError) as exc:
        nodes.resolve_spec(ws, **flags)  # type: ignore[arg-type]
    assert expected in one_line_error(exc)


def test_world_cidr_needs_consent(ws: Workspace) -> None:
    spec = nodes.resolve_spec(ws, allow_cidr="0.0.0.0/0", i_know=True)
    assert spec.allow_cidr == "0.0.0.0/0"
    assert spec.i_know


def test_string_flags_from_invoke_become_numbers(ws: Workspace) -> None:
    spec = nodes.resolve_spec(ws, nodes="2", max_hours="1.5", idle_minutes="5", disk_gb="60")  # type: ignore[arg-type]
    assert (spec.nodes, spec.max_hours, spec.idle_minutes, spec.disk_gb) == (2, 1.5, 5, 60)
    assert isinstance(spec.idle_minutes, int) and isinstance(spec.disk_gb, int)


def test_defaults_and_profiles(ws: Workspace) -> None:
    cpu = nodes.resolve_spec(ws)
    assert (cpu.profile, cpu.instance_type, cpu.market, cpu.nodes, cpu.disk_gb) == (
        "cpu",
        "c7i.xlarge",
        "on-demand",
        1,
        50,
    )
    gpu = nodes.resolve_spec(ws, gpu=True, spot=True)
    assert (gpu.profile, gpu.instance_type, gpu.market, gpu.disk_gb) == ("gpu", "g5.xlarge", "spot", 150)
    inferred = nodes.resolve_spec(ws, instance_type="g6.xlarge")
    assert inferred.profile == "gpu"


# -- quota: stop before Terraform -------------------------------------------------------
class FakeEC2:
    meta = SimpleNamespace(region_name="us-east-1")

    def describe_instance_types(self, InstanceTypes):  # noqa: N803 - boto3's names
        return {"InstanceTypes": [{"InstanceType": t, "VCpuInfo": {"DefaultVCpus": 4}} for t in InstanceTypes]}

    def describe_instance_type_offerings(self, **kwargs):
        return {"InstanceTypeOfferings": [{"Location": "us-east-1a"}, {"Location": "us-east-1b"}]}


class ZeroQuota:
    def get_service_quota(self, ServiceCode, QuotaCode):  # noqa: N803
        return {"Quota": {"Value": 0.0}}


def fake_cloud_ws(tmp_path: Path) -> SimpleNamespace:
    clients = {"ec2": FakeEC2(), "service-quotas": ZeroQuota()}
    return SimpleNamespace(
        paths=Paths(root=tmp_path, generated=tmp_path / "generated", runs=tmp_path / "runs"),
        stage="test",
        defaults=Defaults(allow_on_demand_fallback=True),
        settings=SimpleNamespace(AWS_REGION="us-east-1", AWS_ACCOUNT="testacct"),
        client=lambda name, region=None: clients[name],
        caller_identity=lambda: {"Account": "123456789012", "Arn": "arn:aws:iam::123456789012:user/t", "UserId": "x"},
        default_subnets=lambda: {"us-east-1a": True, "us-east-1b": True},
        endpoint=None,  # real AWS: no sandbox machines to prepare
    )


@pytest.mark.parametrize(
    ("profile", "itype", "code"), [("cpu", "c7i.xlarge", "L-1216C47A"), ("gpu", "g5.xlarge", "L-DB2E81BA")]
)
def test_zero_quota_stops_before_terraform(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, profile, itype, code):
    def no_terraform(*a, **k):
        raise AssertionError("terraform must not run when the quota is too small")

    monkeypatch.setattr(stack, "terraform", no_terraform)
    monkeypatch.setattr(stack, "init_once", no_terraform)
    spec = nodes.NodeSpec(profile, itype, "on-demand", 2, 50, 8.0, 30)
    with pytest.raises(UserError) as exc:
        nodes.apply(fake_cloud_ws(tmp_path), spec)  # type: ignore[arg-type]
    msg = one_line_error(exc)
    assert code in msg and "is 0 vCPUs" in msg and f"2 × {itype} needs 8" in msg
    assert "request-service-quota-increase" in msg
    assert not (tmp_path / "generated" / "node_vars.json").exists()


# -- capacity: every AZ, every fallback, then on-demand; nothing left behind -----------
CAPACITY = (
    "terraform apply failed: creating EC2 Instance: operation error EC2: RunInstances, api error "
    "InsufficientInstanceCapacity: We currently do not have sufficient {t} capacity in the Availability Zone you requested ({az})."
)
LOCKED = """Error: Error acquiring the state lock

Error message: operation error S3: PutObject, https response error StatusCode: 412, api error
PreconditionFailed: At least one of the pre-conditions you specified did not hold
Lock Info:
  ID:        1d60c6a0-fd2f-49d9-f0ce-e7198c760d83
  Who:       colleague@elsewhere
  Created:   2026-01-02 03:04:05.000000006 +0000 UTC
"""


def apply_failure(message: str) -> TerraformError:
    """What Terraform.apply raises for `message` ("terraform apply failed: <what terraform said>"): the
    error terraform.failure makes of terraform's `Error: ...` line, so it has the kind apply branches on."""
    said = message.removeprefix("terraform apply failed: ")
    err = terraform.failure("terraform apply failed", f"Error: {said}\n")
    assert err.message == message
    return err


class FakeTf:
    """Stands in for remotefit.terraform.Terraform: apply fails with capacity errors for the listed options."""

    def __init__(
        self,
        log: list[dict[str, object]],
        no_capacity: set[tuple[str, str, str]] | None = None,
        error=None,
        output=None,
    ):
        self.log = log
        self.no_capacity = no_capacity
        self.error = error
        self.output = output  # terraform's own output of a failed apply
        self.applied: list[tuple[str, str, str]] = []
        self.destroyed = 0

    def apply(self, tfvars: Path, quiet: bool = False) -> str:
        v = self.log[-1]
        key = (str(v["instance_type"]), str(v["market"]), str(v["availability_zone"]))
        self.applied.append(key)
        if self.output:
            raise terraform.failure("terraform apply failed", self.output, code=1)
        if self.error:
            raise apply_failure(self.error)
        if self.no_capacity is None or key in self.no_capacity:
            raise apply_failure(CAPACITY.format(t=key[0], az=key[2]))
        return "Apply complete!"

    def destroy(self, tfvars: Path, quiet: bool = False) -> str:
        self.destroyed += 1
        return "Destroy complete!"


AZS = {"g5.xlarge": ["us-east-1a", "us-east-1b"], "g6.xlarge": ["us-east-1b"], "g4dn.xlarge": ["us-east-1c"]}


@pytest.fixture
def patched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """nodes.apply with pre-flight, pricing, AMI and Terraform replaced by recorders."""
    written: list[dict[str, object]] = []
    holder: dict[str, FakeTf] = {}
    monkeypatch.setattr(provision, "preflight_checks", lambda ws, spec: dict(AZS))
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
    ws = SimpleNamespace(
        paths=Paths(root=tmp_path, generated=tmp_path / "generated", runs=tmp_path / "runs"),
        stage="test",
        defaults=Defaults(allow_on_demand_fallback=True),
        settings=SimpleNamespace(AWS_REGION="us-east-1", AWS_ACCOUNT="testacct"),
        endpoint=None,
    )
    return SimpleNamespace(ws=ws, written=written, holder=holder, tmp=tmp_path)


def test_capacity_everywhere_tries_every_option_then_destroys(patched) -> None:
    tf = patched.holder["tf"] = FakeTf(patched.written)
    spec = nodes.NodeSpec("gpu", "g5.xlarge", "spot", 1, 150, 8.0, 30)
    with pytest.raises(UserError) as exc:
        nodes.apply(patched.ws, spec)
    msg = one_line_error(exc)
    expected = [
        (t, m, az) for m in ("spot", "on-demand") for t in ("g5.xlarge", "g6.xlarge", "g4dn.xlarge") for az in AZS[t]
    ]
    assert tf.applied == expected  # every AZ of every type, spot first, then on-demand
    for t, m, az in expected:
        assert f"{t}/{m}/{az}: " in msg
    assert msg.startswith("no capacity anywhere: ")
    assert tf.destroyed == 1, "whatever the failed applies created must be destroyed"
    assert not (patched.tmp / "generated" / "node_vars.json").exists()


def test_capacity_falls_back_to_the_next_az(patched) -> None:
    tf = patched.holder["tf"] = FakeTf(patched.written, no_capacity={("g5.xlarge", "on-demand", "us-east-1a")})
    spec = nodes.NodeSpec("gpu", "g5.xlarge", "on-demand", 1, 150, 8.0, 30)
    assert nodes.apply(patched.ws, spec) == ["node"]
    assert tf.applied == [("g5.xlarge", "on-demand", "us-east-1a"), ("g5.xlarge", "on-demand", "us-east-1b")]
    assert tf.destroyed == 0
    saved = json.loads((patched.tmp / "generated" / "node_vars.json").read_text())
    assert saved["availability_zone"] == "us-east-1b"


@pytest.mark.parametrize(
    "error",
    [
        "terraform apply failed: api error VcpuLimitExceeded: You have requested more vCPU capacity than your current vCPU limit",
        "terraform apply failed: api error UnauthorizedOperation: You are not authorized to perform this operation",
    ],
)
def test_quota_and_other_errors_do_not_walk_the_fallbacks(patched, error: str) -> None:
    tf = patched.holder["tf"] = FakeTf(patched.written, error=error)
    spec = nodes.NodeSpec("gpu", "g5.xlarge", "spot", 1, 150, 8.0, 30)
    with pytest.raises(UserError) as exc:
        nodes.apply(patched.ws, spec)
    msg = one_line_error(exc)
    assert msg.startswith(error) and "inv destroy" in msg  # resources may exist: say how to remove them
    assert len(tf.applied) == 1


def test_a_held_lock_fails_as_terraform_said_and_keeps_the_last_good_tfvars(patched) -> None:
    gen = patched.tmp / "generated"
    gen.mkdir(parents=True, exist_ok=True)
    good = {"instance_type": "g5.xlarge", "market": "spot", "availability_zone": "us-east-1b", "node_count": 1}
    (gen / "node_vars.json").write_text(json.dumps(good))
    tf = patched.holder["tf"] = FakeTf(patched.written, output=LOCKED)
    with pytest.raises(TerraformError) as exc:
        nodes.apply(patched.ws, nodes.NodeSpec("gpu", "g5.xlarge", "spot", 1, 150, 8.0, 30))
    msg = one_line_error(exc)
    assert exc.value.kind == "locked" and exc.value.code == 1
    assert msg.startswith("terraform apply failed: the state is locked by another run (lock 1d60c6a0-")
    assert "held by colleague@elsewhere" in msg and "some resources may have been created" not in msg
    assert len(tf.applied) == 1 and tf.destroyed == 0, "another run holds the lock: no fallback, no destroy"
    assert patched.written[-1] == good, "the tfvars of the last good apply are written back"
    assert json.loads((gen / "node_vars.json").read_text()) == good


def test_spot_falls_back_to_on_demand_only_when_allowed(patched) -> None:
    patched.ws.defaults = Defaults()  # the shipped default: no on-demand fallback
    tf = patched.holder["tf"] = FakeTf(patched.written, no_capacity=None)
    with pytest.raises(UserError):
        nodes.apply(patched.ws, nodes.NodeSpec("gpu", "g5.xlarge", "spot", 1, 150, 8.0, 30))
    assert {m for _, m, _ in tf.applied} == {"spot"}


def test_an_explicit_instance_type_is_never_swapped(patched) -> None:
    tf = patched.holder["tf"] = FakeTf(patched.written, no_capacity=None)
    spec = nodes.NodeSpec("gpu", "g5.xlarge", "on-demand", 1, 150, 8.0, 30, explicit_type=True)
    with pytest.raises(UserError):
        nodes.apply(patched.ws, spec)
    assert {t for t, _, _ in tf.applied} == {"g5.xlarge"}


@pytest.mark.parametrize(
    ("itype", "ok"), [("g5.xlarge", True), ("c7i.xlarge", True), ("t3.large", False), ("c7i-flex.large", False)]
)
def test_cluster_placement_only_for_types_that_support_it(itype: str, ok: bool) -> None:
    assert nodes.cluster_capable(itype) is ok

"""Tests for remotefit/preflight.py against moto (us-east-1) and, where moto can't, botocore's Stubber."""

from __future__ import annotations

import boto3
import pytest
from botocore.config import Config
from botocore.stub import Stubber
from moto import mock_aws

from remotefit import preflight, terraform
from remotefit.errors import UserError
from remotefit.preflight import Candidate

REGION = "us-east-1"


@pytest.fixture
def aws_env(monkeypatch):
    for k, v in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": REGION,
    }.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_PROFILE", raising=False)


@pytest.fixture
def ec2(aws_env):
    with mock_aws():
        yield boto3.client("ec2", region_name=REGION)


def _stubbed_sq():
    return boto3.client("service-quotas", region_name=REGION, aws_access_key_id="x", aws_secret_access_key="x")


def _quota(code, value):
    return {"Quota": {"ServiceCode": "ec2", "QuotaCode": code, "QuotaName": "n", "Value": value}}


# --- instance type and AZs -------------------------------------------------------------------


@pytest.mark.parametrize("t", ["c7i.xlarge", "g5.xlarge", "t3.medium", "p4d.24xlarge"])
def test_known_type_passes(ec2, t):
    assert preflight.check_instance_type(ec2, t) is None


def test_unknown_type_names_flag_and_suggests(ec2):
    with pytest.raises(UserError) as ei:
        preflight.check_instance_type(ec2, "g5.xlarg", flag="--fallback-types")
    msg = str(ei.value)
    assert "\n" not in msg and ei.value.code == 2
    assert msg.startswith("--fallback-types 'g5.xlarg' is not an EC2 instance type in us-east-1")
    assert "did you mean g5.xlarge?" in msg


def test_unknown_type_without_close_match(ec2):
    with pytest.raises(UserError, match=r"--instance-type 'banana' .*pick one from remotefit/prices.json"):
        preflight.check_instance_type(ec2, "banana")


def test_other_ec2_errors_are_not_blamed_on_the_user():
    client = boto3.client("ec2", region_name=REGION, aws_access_key_id="x", aws_secret_access_key="x")
    with Stubber(client) as stub:
        stub.add_client_error("describe_instance_types", "UnauthorizedOperation", "denied")
        with pytest.raises(Exception, match="UnauthorizedOperation") as ei:
            preflight.check_instance_type(client, "g5.xlarge")
    assert not isinstance(ei.value, UserError)


@pytest.mark.parametrize("t", ["c7i.xlarge", "g5.xlarge"])
def test_azs_offering(ec2, t):
    azs = preflight.azs_offering(ec2, t)
    # moto's us-east-1 offerings data: both are in a, b, c, d, f.
    assert azs == sorted(azs) and len(azs) >= 3
    assert all(az.startswith("us-east-1") for az in azs)


def test_azs_offering_none(ec2):
    # p3.2xlarge is absent from moto's offering data (AWS is retiring P3).
    with pytest.raises(UserError, match=r"^--instance-type p3.2xlarge is not offered in any availability zone"):
        preflight.azs_offering(ec2, "p3.2xlarge")


def test_azs_offering_follows_pages():
    client = boto3.client("ec2", region_name=REGION, aws_access_key_id="x", aws_secret_access_key="x")
    with Stubber(client) as stub:
        page = {"LocationType": "availability-zone", "InstanceType": "g5.xlarge"}
        stub.add_response(
            "describe_instance_type_offerings",
            {"InstanceTypeOfferings": [{**page, "Location": "us-east-1c"}], "NextToken": "t1"},
        )
        stub.add_response(
            "describe_instance_type_offerings",
            {"InstanceTypeOfferings": [{**page, "Location": "us-east-1a"}]},
        )
        assert preflight.azs_offering(client, "g5.xlarge") == ["us-east-1a", "us-east-1c"]


# --- quota codes -----------------------------------------------------------------------------

STD_SPOT = "All Standard (A, C, D, H, I, M, R, T, Z) Spot Instance Requests"


@pytest.mark.parametrize(
    ("t", "market", "code", "name"),
    [
        ("g5.xlarge", "on-demand", "L-DB2E81BA", "Running On-Demand G and VT instances"),
        ("g4dn.12xlarge", "spot", "L-3819A6DF", "All G and VT Spot Instance Requests"),
        ("g6e.xlarge", "on-demand", "L-DB2E81BA", "Running On-Demand G and VT instances"),
        ("vt1.3xlarge", "on-demand", "L-DB2E81BA", "Running On-Demand G and VT instances"),
        ("p4d.24xlarge", "on-demand", "L-417A185B", "Running On-Demand P instances"),
        ("p5.48xlarge", "spot", "L-7212CCBC", "All P Spot Instance Requests"),
        ("c7i.xlarge", "on-demand", "L-1216C47A",
         "Running On-Demand Standard (A, C, D, H, I, M, R, T, Z) instances"),
        ("c7g.large", "on-demand", "L-1216C47A",
         "Running On-Demand Standard (A, C, D, H, I, M, R, T, Z) instances"),
        ("t3.medium", "spot", "L-34B43A08", STD_SPOT),
        ("m6i.xlarge", "spot", "L-34B43A08", STD_SPOT),
        ("im4gn.large", "on-demand", "L-1216C47A",
         "Running On-Demand Standard (A, C, D, H, I, M, R, T, Z) instances"),
    ],
)  # fmt: skip
def test_quota_code(t, market, code, name):
    assert preflight.quota_code(t, market) == (code, name)


@pytest.mark.parametrize("t", ["inf2.xlarge", "trn1.32xlarge", "x2idn.16xlarge", "f1.2xlarge", "u-6tb1.metal"])
def test_quota_code_unmapped_classes(t):
    with pytest.raises(ValueError, match="no known EC2 quota class"):
        preflight.quota_code(t, "on-demand")


# --- check_quota -----------------------------------------------------------------------------


def test_zero_quota_is_one_line_error():
    sq = _stubbed_sq()
    with Stubber(sq) as stub:
        stub.add_response("get_service_quota", _quota("L-DB2E81BA", 0.0),
                          {"ServiceCode": "ec2", "QuotaCode": "L-DB2E81BA"})  # fmt: skip
        with pytest.raises(UserError) as ei:
            preflight.check_quota(sq, "g5.xlarge", "on-demand", 8, REGION, nodes=2)
    msg = str(ei.value)
    assert "\n" not in msg
    assert msg.startswith(
        "the quota 'Running On-Demand G and VT instances' (L-DB2E81BA) in us-east-1 is 0 vCPUs "
        "but 2 × g5.xlarge needs 8: request an increase in the Service Quotas console "
        "(https://console.aws.amazon.com/servicequotas/home/services/ec2/quotas/L-DB2E81BA) or run "
        "`aws service-quotas request-service-quota-increase --service-code ec2 --quota-code L-DB2E81BA "
        "--desired-value 8"
    )


def test_enough_quota_returns_result():
    sq = _stubbed_sq()
    with Stubber(sq) as stub:
        stub.add_response("get_service_quota", _quota("L-34B43A08", 640.0))
        r = preflight.check_quota(sq, "c7i.xlarge", "spot", 8, REGION, nodes=2)
    assert r == preflight.QuotaResult("L-34B43A08", preflight.quota_code("c7i.xlarge", "spot")[1],
                                      REGION, 640.0, 8, is_default=False)  # fmt: skip
    assert r.ok


def test_falls_back_to_aws_default_quota():
    sq = _stubbed_sq()
    with Stubber(sq) as stub:
        stub.add_client_error("get_service_quota", "NoSuchResourceException", "no applied value")
        stub.add_response("get_aws_default_service_quota", _quota("L-417A185B", 0.0))
        with pytest.raises(UserError, match=r"'Running On-Demand P instances' \(L-417A185B\) .* is 0 vCPUs"):
            preflight.check_quota(sq, "p4d.24xlarge", "on-demand", 96, REGION)


def test_default_quota_result_is_marked():
    sq = _stubbed_sq()
    with Stubber(sq) as stub:
        stub.add_client_error("get_service_quota", "NoSuchResourceException", "no applied value")
        stub.add_response("get_aws_default_service_quota", _quota("L-1216C47A", 5.0))
        r = preflight.check_quota(sq, "t3.medium", "on-demand", 2, REGION)
    assert r is not None and r.is_default and r.value_vcpus == 5.0


@pytest.mark.parametrize("code", ["AccessDeniedException", "ServiceException", "TooManyRequestsException"])
def test_quota_service_errors_give_none(code):
    sq = _stubbed_sq()
    with Stubber(sq) as stub:
        stub.add_client_error("get_service_quota", code, "nope")
        stub.add_client_error("get_aws_default_service_quota", code, "nope")
        assert preflight.check_quota(sq, "g5.xlarge", "on-demand", 4, REGION) is None


def test_quota_with_moto_gives_none(aws_env):
    # moto 5's Service Quotas only knows ServiceCode "vpc": GetServiceQuota for ec2 answers
    # NoSuchResourceException and GetAWSDefaultServiceQuota raises NotImplementedError in-process.
    with mock_aws():
        sq = boto3.client("service-quotas", region_name=REGION)
        assert preflight.check_quota(sq, "g5.xlarge", "on-demand", 4, REGION) is None


def test_unreachable_quota_service_gives_none():
    sq = boto3.client(
        "service-quotas",
        region_name=REGION,
        endpoint_url="http://127.0.0.1:9",  # discard port: connection refused
        aws_access_key_id="x",
        aws_secret_access_key="x",
        config=Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=1),
    )
    assert preflight.check_quota(sq, "g5.xlarge", "on-demand", 4, REGION) is None


def test_unmapped_class_gives_none():
    # Not even a call: the stubber has no responses queued and would fail if one were made.
    sq = _stubbed_sq()
    with Stubber(sq):
        assert preflight.check_quota(sq, "inf2.xlarge", "on-demand", 4, REGION) is None


def test_vcpus_of(ec2):
    assert preflight.vcpus_of(None, "g5.12xlarge") == 48
    assert preflight.vcpus_of(ec2, "c7i.24xlarge") == 96  # not in the table: asks EC2
    with pytest.raises(ValueError):
        preflight.vcpus_of(None, "c7i.24xlarge")


# --- launch errors and candidates ------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "kind"),
    [
        ("api error InsufficientInstanceCapacity: We currently do not have sufficient g5.xlarge capacity",
         "capacity"),
        ("InsufficientCapacity: no capacity", "capacity"),
        ("UnfulfillableCapacity: Unable to fulfill capacity due to your request configuration", "capacity"),
        ("MaxSpotInstanceCountExceeded: Max spot instance count exceeded", "capacity"),
        ("Error: creating EC2 Instance: Unsupported: Your requested instance type (g5.xlarge) is not "
         "supported in your requested Availability Zone (us-east-1e)", "capacity"),
        ("SpotMaxPriceTooLow: Your Spot request price of 0.1 is lower than the minimum", "capacity"),
        ("InsufficientHostCapacity", "capacity"),
        ("operation error EC2: RunInstances, https response error StatusCode: 400, api error "
         "VcpuLimitExceeded: You have requested more vCPU capacity than your current vCPU limit", "quota"),
        ("InstanceLimitExceeded: Your quota allows for 0 more running instance(s)", "quota"),
        ("UnsupportedOperation: The instance configuration for this AWS Marketplace product is not supported",
         "other"),
        ("UnauthorizedOperation: You are not authorized to perform this operation", "other"),
        ("InvalidAMIID.NotFound", "other"),
        ("", "other"),
    ],
)  # fmt: skip
def test_launch_error_kind(message, kind):
    assert terraform.launch_error_kind(message) == kind


AZS = {
    "g5.xlarge": ["us-east-1a", "us-east-1b"],
    "g6.xlarge": ["us-east-1c"],
    "g4dn.xlarge": ["us-east-1a", "us-east-1d"],
}


def test_launch_candidates_spot_with_on_demand_fallback():
    got = preflight.launch_candidates("g5.xlarge", "spot", AZS, ["g6.xlarge", "g4dn.xlarge"], True)
    expected = [
        ("g5.xlarge", "spot", "us-east-1a"),
        ("g5.xlarge", "spot", "us-east-1b"),
        ("g6.xlarge", "spot", "us-east-1c"),
        ("g4dn.xlarge", "spot", "us-east-1a"),
        ("g4dn.xlarge", "spot", "us-east-1d"),
        ("g5.xlarge", "on-demand", "us-east-1a"),
        ("g5.xlarge", "on-demand", "us-east-1b"),
        ("g6.xlarge", "on-demand", "us-east-1c"),
        ("g4dn.xlarge", "on-demand", "us-east-1a"),
        ("g4dn.xlarge", "on-demand", "us-east-1d"),
    ]
    assert got == [Candidate(*e) for e in expected]


def test_launch_candidates_no_on_demand_fallback_and_dedup():
    got = preflight.launch_candidates("g5.xlarge", "spot", AZS, ["g5.xlarge", "g6.xlarge", "g6.xlarge"], False)
    assert [(c.instance_type, c.az) for c in got] == [
        ("g5.xlarge", "us-east-1a"), ("g5.xlarge", "us-east-1b"), ("g6.xlarge", "us-east-1c"),
    ]  # fmt: skip
    assert {c.market for c in got} == {"spot"}


def test_launch_candidates_on_demand_ignores_fallback_flag_and_skips_unoffered():
    got = preflight.launch_candidates("g5.xlarge", "on-demand", AZS, ["p5.48xlarge"], True)
    assert got == [Candidate("g5.xlarge", "on-demand", az) for az in AZS["g5.xlarge"]]
    assert preflight.launch_candidates("g5.xlarge", "spot", {}, [], True) == []


def test_launch_candidates_with_moto_offerings(ec2):
    azs = {t: preflight.azs_offering(ec2, t) for t in ("g5.xlarge", "g6.xlarge")}
    got = preflight.launch_candidates("g5.xlarge", "spot", azs, ["g6.xlarge"], True)
    assert len(got) == 2 * (len(azs["g5.xlarge"]) + len(azs["g6.xlarge"]))
    assert got[0] == Candidate("g5.xlarge", "spot", azs["g5.xlarge"][0])


def test_aws_error_code_of_a_dropped_connection_is_empty() -> None:
    from botocore.exceptions import ClientError, ConnectionClosedError

    from remotefit.errors import aws_error_code

    assert aws_error_code(ConnectionClosedError(endpoint_url="http://127.0.0.1:9")) == ""  # response is None
    assert aws_error_code(ValueError("no response at all")) == ""
    assert aws_error_code(ClientError({"Error": {"Code": "NoSuchBucket"}}, "HeadBucket")) == "NoSuchBucket"

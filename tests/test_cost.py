"""Tests for remotefit/cost.py: the price table, spot prices (moto and Stubber), estimates, running costs."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta

import boto3
import pytest
from botocore.stub import Stubber
from moto import mock_aws

from remotefit import cost

REGION = "us-east-1"
NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def aws_env(monkeypatch):
    # Fake credentials so nothing can reach a real account.
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


# --- the table -------------------------------------------------------------------------------


def test_table_has_provenance():
    t = cost.price_table()
    datetime.strptime(t["as_of"], "%Y-%m-%d")
    assert "aws.amazon.com/ec2/pricing/on-demand" in t["source"]
    assert "list price" in t["note"] and "change" in t["note"]
    assert t["region"] == "us-east-1"
    assert t["ebs_gp3_usd_per_gb_month"] == 0.08


REQUIRED = [
    "c7i.large", "c7i.xlarge", "c7i.2xlarge", "c7i.4xlarge", "c6i.xlarge", "m7i.xlarge", "m6i.xlarge",
    "t3.medium", "t3.large", "g4dn.xlarge", "g4dn.2xlarge", "g4dn.12xlarge", "g5.xlarge", "g5.2xlarge",
    "g5.4xlarge", "g5.12xlarge", "g5.48xlarge", "g6.xlarge", "g6.2xlarge", "g6.12xlarge", "g6e.xlarge",
    "p3.2xlarge", "p4d.24xlarge", "p5.48xlarge",
]  # fmt: skip


def test_table_covers_the_types_users_pick():
    assert set(REQUIRED) <= set(cost.known_types())


@pytest.mark.parametrize("t", sorted(cost.price_table()["instance_types"]))
def test_every_entry_is_sane(t):
    info = cost.instance_info(t)
    assert info.known
    assert 0 < info.on_demand_usd_per_hour < 200
    assert info.vcpus > 0 and info.gpus >= 0
    if cost.is_gpu_type(t):
        assert info.gpus > 0 and info.gpu_model
    else:
        assert info.gpus == 0
    # Within a family, a bigger size costs more per hour than a smaller one.
    same_family = [cost.instance_info(o) for o in cost.known_types() if cost.family_of(o) == info.family]
    for other in same_family:
        if other.vcpus > info.vcpus:
            assert other.on_demand_usd_per_hour > info.on_demand_usd_per_hour, (t, other.instance_type)


def test_table_agrees_with_ec2_instance_type_data(ec2):
    # moto ships AWS's DescribeInstanceTypes data: a cross-check on hand-typed vCPU/GPU counts.
    # p3.2xlarge is absent from moto 5.2's data (AWS is retiring P3); the table flags it in a note.
    types = [t for t in cost.known_types() if t != "p3.2xlarge"]
    assert "note" in cost.price_table()["instance_types"]["p3.2xlarge"]
    rows = ec2.describe_instance_types(InstanceTypes=types)["InstanceTypes"]
    assert {r["InstanceType"] for r in rows} == set(types)
    for r in rows:
        info = cost.instance_info(r["InstanceType"])
        assert info.vcpus == r["VCpuInfo"]["DefaultVCpus"], r["InstanceType"]
        gpus = sum(g["Count"] for g in r.get("GpuInfo", {}).get("Gpus", []))
        assert info.gpus == gpus, r["InstanceType"]


# --- classification --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("t", "gpu", "accel", "family"),
    [
        ("g5.xlarge", True, True, "g5"),
        ("g4dn.12xlarge", True, True, "g4dn"),
        ("G6E.XLARGE", True, True, "g6e"),
        ("p4d.24xlarge", True, True, "p4d"),
        ("p5.48xlarge", True, True, "p5"),
        ("inf2.xlarge", False, True, "inf2"),
        ("trn1.32xlarge", False, True, "trn1"),
        ("dl1.24xlarge", False, True, "dl1"),
        ("c7g.large", False, False, "c7g"),  # Graviton: the trailing g is not a GPU
        ("m7i.xlarge", False, False, "m7i"),
        ("t3.medium", False, False, "t3"),
    ],
)
def test_gpu_and_accelerator_classification(t, gpu, accel, family):
    assert cost.is_gpu_type(t) is gpu
    assert cost.is_accelerator_type(t) is accel
    assert cost.family_of(t) == family
    assert cost.instance_info(t).is_gpu is gpu


def test_unknown_type_info():
    info = cost.instance_info("x9z.huge")
    assert not info.known
    assert (info.vcpus, info.gpus, info.on_demand_usd_per_hour) == (None, None, None)
    assert info.family == "x9z" and info.is_gpu is False


# --- hourly_price ----------------------------------------------------------------------------


def test_on_demand_price_and_label():
    p = cost.hourly_price("g5.xlarge", "on-demand", REGION)
    assert p.usd_per_hour == 1.006
    assert p.source == f"us-east-1 list price as of {cost.price_table()['as_of']}"
    assert not p.estimated


def test_other_region_is_labelled():
    p = cost.hourly_price("c7i.xlarge", "on-demand", "eu-west-1")
    assert p.usd_per_hour == 0.1785
    assert "us-east-1 list price" in p.source and "eu-west-1 may differ" in p.source


def test_unknown_type_price():
    assert cost.hourly_price("x9z.huge", "on-demand", REGION) == cost.Price(None, "unknown")
    assert cost.hourly_price("x9z.huge", "spot", REGION) == cost.Price(None, "unknown")


def test_bad_market():
    with pytest.raises(ValueError, match="market"):
        cost.hourly_price("g5.xlarge", "reserved", REGION)


def test_spot_from_moto(ec2):
    # moto answers DescribeSpotPriceHistory with a flat "0.00001" per AZ offering the type
    # (timestamp 2006, ProductDescription "Linux/UNIX (Amazon VPC)"): the plumbing is what's tested.
    p = cost.hourly_price("g5.xlarge", "spot", REGION, ec2=ec2, now=NOW)
    assert p.usd_per_hour == pytest.approx(0.00001)
    assert p.source == "current spot price in us-east-1, lowest of 5 AZs"
    assert not p.estimated
    line = cost.estimate("g5.xlarge", "spot", 1, 1, REGION, ec2=ec2, now=NOW).lines()[0]
    assert "<$0.001/h" in line and "<$0.01" in line


def _spot_row(az, price, ts):
    return {
        "AvailabilityZone": az,
        "InstanceType": "g5.xlarge",
        "ProductDescription": "Linux/UNIX",
        "SpotPrice": price,
        "Timestamp": ts,
    }


def test_spot_takes_newest_per_az_then_cheapest_az():
    client = boto3.client("ec2", region_name=REGION, aws_access_key_id="x", aws_secret_access_key="x")
    with Stubber(client) as stub:
        stub.add_response(
            "describe_spot_price_history",
            {
                "SpotPriceHistory": [
                    _spot_row("us-east-1a", "0.4100", NOW - timedelta(hours=1)),
                    _spot_row("us-east-1a", "0.2000", NOW - timedelta(hours=5)),  # stale: ignored
                    _spot_row("us-east-1b", "0.3900", NOW - timedelta(hours=2)),
                    _spot_row("us-east-1c", "0.4500", NOW - timedelta(minutes=5)),
                ]
            },
            {
                "InstanceTypes": ["g5.xlarge"],
                "ProductDescriptions": ["Linux/UNIX"],
                "MaxResults": 100,
                "StartTime": NOW,
            },
        )
        p = cost.hourly_price("g5.xlarge", "spot", REGION, ec2=client, now=NOW)
    assert p.usd_per_hour == pytest.approx(0.39)
    assert p.source == "current spot price in us-east-1, lowest of 3 AZs"


@pytest.mark.parametrize("failure", ["error", "empty"])
def test_spot_falls_back_to_on_demand_ceiling(failure):
    client = boto3.client("ec2", region_name=REGION, aws_access_key_id="x", aws_secret_access_key="x")
    with Stubber(client) as stub:
        if failure == "error":
            stub.add_client_error("describe_spot_price_history", "UnauthorizedOperation", "no")
        else:
            stub.add_response("describe_spot_price_history", {"SpotPriceHistory": []})
        p = cost.hourly_price("g5.xlarge", "spot", REGION, ec2=client, now=NOW)
    assert p.usd_per_hour == 1.006 and p.estimated
    assert p.source.startswith("spot price unavailable: on-demand price shown as its ceiling")
    assert "us-east-1 list price" in p.source


def test_spot_without_client_falls_back():
    p = cost.hourly_price("c7i.xlarge", "spot", "eu-west-1")
    assert p.estimated and p.usd_per_hour == 0.1785
    assert "spot price unavailable" in p.source and "eu-west-1 may differ" in p.source


# --- estimate --------------------------------------------------------------------------------


def test_estimate_arithmetic_and_line():
    e = cost.estimate("g5.xlarge", "on-demand", nodes=2, max_hours=8, region=REGION)
    assert e.per_node_usd_per_hour == 1.006
    assert e.total_usd_per_hour == pytest.approx(2.012)
    assert e.deadline_cap_usd == pytest.approx(16.096)
    as_of = cost.price_table()["as_of"]
    assert e.lines() == [
        "g5.xlarge on-demand: $1.006/h per node × 2 nodes = $2.012/h; "
        f"the 8 h hard deadline caps this run at $16.10 (us-east-1 list price as of {as_of})"
    ]


def test_estimate_single_node_fractional_hours():
    e = cost.estimate("c7i.xlarge", "on-demand", nodes=1, max_hours=2.5, region=REGION)
    assert e.deadline_cap_usd == pytest.approx(0.44625)
    line = e.lines()[0]
    assert line.startswith("c7i.xlarge on-demand: $0.178/h (1 node); the 2.5 h hard deadline caps this run at $0.45")


def test_estimate_flags_stale_p_prices():
    lines = cost.estimate("p5.48xlarge", "on-demand", 1, 1, REGION).lines()
    assert len(lines) == 2 and lines[1].startswith("note: p5.48xlarge") and "2025" in lines[1]


def test_estimate_unknown_price():
    e = cost.estimate("x9z.huge", "spot", nodes=3, max_hours=4, region=REGION)
    assert e.total_usd_per_hour is None and e.deadline_cap_usd is None
    (line,) = e.lines()
    assert line.startswith("x9z.huge spot: price unknown") and "all 3 nodes" in line


@pytest.mark.parametrize(("nodes", "hours"), [(0, 1), (1, 0), (1, -2)])
def test_estimate_rejects_nonsense(nodes, hours):
    with pytest.raises(ValueError):
        cost.estimate("g5.xlarge", "on-demand", nodes, hours, REGION)


@pytest.mark.parametrize(
    ("x", "decimals", "text"),
    [
        (16.096, 2, "$16.10"),
        (1234.5, 2, "$1,234.50"),
        (1.006, 3, "$1.006"),
        (0.0, 2, "$0.00"),
        (0.001, 2, "<$0.01"),
        (0.00001, 3, "<$0.001"),
        (-2.5, 2, "-$2.50"),
    ],
)
def test_format_usd(x, decimals, text):
    assert cost.format_usd(x, decimals) == text


# --- running and stopped costs ---------------------------------------------------------------


def test_cost_so_far():
    launched = NOW - timedelta(minutes=90)
    assert cost.cost_so_far(1.006, launched, NOW, nodes=2) == pytest.approx(1.006 * 2 * 1.5)
    # 60-second minimum per launch.
    assert cost.cost_so_far(3.6, NOW - timedelta(seconds=5), NOW) == pytest.approx(0.06)
    # Launch in the future (clock skew): nothing yet.
    assert cost.cost_so_far(3.6, NOW + timedelta(minutes=1), NOW) == 0.0
    # Naive datetimes are UTC.
    assert cost.cost_so_far(2.0, launched.replace(tzinfo=None), NOW) == pytest.approx(3.0)


def test_cost_so_far_defaults_to_now():
    launched = datetime.now(UTC) - timedelta(hours=1)
    assert cost.cost_so_far(1.0, launched) == pytest.approx(1.0, abs=1e-3)


def test_stopped_cost_note():
    note = cost.stopped_cost_note(100, nodes=2)
    # 2 × 100 GB × $0.08 = $16/month; / 730 h = $0.0219/h
    assert "2 × 100 GB gp3" in note and "$16.00/month" in note and "$0.022/h" in note
    assert "\n" not in note
    assert "1 ×" not in cost.stopped_cost_note(50)


def test_import_does_not_load_boto():
    code = (
        "import sys, remotefit.cost, remotefit.preflight; "
        "bad = [m for m in ('boto3', 'botocore') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)

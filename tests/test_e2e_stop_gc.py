"""stop/start keep the node and its disk; gc finds remotefit instances that no state knows about."""

from __future__ import annotations

import subprocess

import pytest

pytestmark = pytest.mark.e2e


def _state(ws, iid: str) -> str:
    res = ws.client("ec2").describe_instances(InstanceIds=[iid])
    return res["Reservations"][0]["Instances"][0]["State"]["Name"]


def test_stop_start_then_gc(module_project) -> None:
    p = module_project
    p.inv("backend")
    p.inv("apply", "--yes", "--max-hours", "1")
    ws = p.workspace()
    iid = ws.client("ec2").describe_instances(
        Filters=[{"Name": "tag:stage", "Values": ["test"]}, {"Name": "instance-state-name", "Values": ["running"]}]
    )["Reservations"][0]["Instances"][0]["InstanceId"]

    res = p.inv("stop")
    assert "stopped 1 node(s)" in res.stdout
    assert "/month" in res.stdout or "per month" in res.stdout  # what the disk still costs
    assert _state(ws, iid) == "stopped"
    cfg = str(p.generated / "ssh_config")
    assert subprocess.run(["ssh", "-F", cfg, "rf-test-0", "true"], capture_output=True, timeout=30).returncode != 0

    p.inv("start")
    assert _state(ws, iid) == "running"
    assert subprocess.run(["ssh", "-F", cfg, "rf-test-0", "true"], capture_output=True, timeout=30).returncode == 0

    # An instance tagged by remotefit that no state knows about is an orphan.
    ec2 = ws.client("ec2")
    ami = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    orphan = ec2.run_instances(
        ImageId=ami,
        MinCount=1,
        MaxCount=1,
        InstanceType="t3.medium",
        TagSpecifications=[
            {
                "ResourceType": "instance",
                "Tags": [{"Key": "project", "Value": "remotefit"}, {"Key": "stage", "Value": "lost"}],
            }
        ],
    )["Instances"][0]["InstanceId"]
    assert orphan not in p.inv("gc").stdout  # too young: an apply may still be writing its state
    listed = p.inv("gc", "--min-age-minutes", "0").stdout
    assert orphan in listed and iid not in listed
    assert "inv gc --yes" in listed
    assert _state(ws, orphan) == "running"
    p.inv("gc", "--yes", "--min-age-minutes", "0")
    assert _state(ws, orphan) == "terminated"
    assert _state(ws, iid) == "running"  # the known node is left alone

    out = p.inv("destroy", "--yes").stdout
    assert "verified: nothing tagged stage=test is left" in out

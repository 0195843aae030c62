"""remotefit/results.py: runs read back from the runs bucket as a pull from the node would lay them out."""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import pytest
from moto import mock_aws

from remotefit.errors import UserError
from remotefit.results import RunsBucket, log_key, run_prefix, status_key

BUCKET = "state-runs"


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        yield client


def put(s3, key: str, body: bytes) -> None:
    s3.put_object(Bucket=BUCKET, Key=key, Body=body)


def test_a_kept_run_downloads_like_a_pull_from_the_nodes(s3, tmp_path: Path):
    rb = RunsBucket(s3, BUCKET, "dev")
    rb.put_record({"job": "resnet", "run_id": "r1", "nodes": [{}, {}]})
    p = run_prefix("dev", "resnet", "r1")
    put(s3, f"{p}/outputs/model.pt", b"\x00weights")
    put(s3, f"{p}/outputs/sub/curves.png", b"png")
    put(s3, f"{p}/outputs/../../escape", b"no")  # a hostile key never lands outside the folder
    put(s3, f"{p}/{log_key(0)}", b"node 0 \xff\n")
    put(s3, f"{p}/{log_key(1)}", b"node 1\n")
    put(s3, f"{p}/{status_key(0)}", json.dumps({"exit_code": 0, "state": "finished"}).encode())
    (kept,) = rb.runs()
    assert (kept.job, kept.run_id, kept.node_count, kept.state) == ("resnet", "r1", 2, "partial")
    put(s3, f"{p}/{status_key(1)}", json.dumps({"exit_code": 3, "state": "finished"}).encode())
    assert rb.find("r1").state == "finished" and rb.find("nope") is None
    dest = tmp_path / "runs" / "resnet" / "r1"
    dest.mkdir(parents=True)
    statuses = rb.download("resnet", "r1", dest, 2)
    assert [s["exit_code"] for s in statuses] == [0, 3]
    files = {f.relative_to(dest).as_posix(): f.read_bytes() for f in dest.rglob("*") if f.is_file()}
    assert files == {
        "model.pt": b"\x00weights",
        "sub/curves.png": b"png",
        "log": b"node 0 \xff\n",
        "logs/node-0.log": b"node 0 \xff\n",
        "logs/node-1.log": b"node 1\n",
    }
    assert not (tmp_path / "runs" / "escape").exists() and not (tmp_path / "escape").exists()
    assert rb.log("resnet", "r1", 1) == b"node 1\n" and rb.log("resnet", "r1", 5) is None


def test_missing_bucket_and_denied_access_are_one_line_each(s3):
    with pytest.raises(UserError, match=r"runs bucket nope does not exist: run `inv backend`"):
        RunsBucket(s3, "nope", "dev").runs()

    class Denied:
        def get_paginator(self, _name):
            from botocore.exceptions import ClientError

            raise ClientError({"Error": {"Code": "AccessDenied", "Message": "no"}}, "ListObjectsV2")

    with pytest.raises(UserError, match=r"access denied: s3:ListBucket on the runs bucket b; allow it"):
        RunsBucket(Denied(), "b", "dev").runs()

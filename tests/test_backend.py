"""Tests for remotefit/backend.py: the hardened, idempotent Terraform state bucket (moto in-process)."""

from __future__ import annotations

import json

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError
from moto import mock_aws

from remotefit.backend import (
    LIFECYCLE_RULE_ID,
    SETTINGS,
    TLS_SID,
    BucketReport,
    ensure_state_bucket,
    verify_state_bucket,
)
from remotefit.errors import UserError

BUCKET = "remotefit-tfstate-test"
TAGS = {"project": "remotefit", "managed-by": "remotefit"}


@pytest.fixture(autouse=True)
def _fake_creds(monkeypatch):
    for k in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "testing")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")


@pytest.fixture
def aws():
    with mock_aws():
        yield


def client(region: str = "us-east-1"):
    return boto3.client("s3", region_name=region, config=Config(s3={"addressing_style": "path"}))


def assert_hardened(s3, bucket: str = BUCKET) -> None:
    """Read every setting back through boto3 and check it is as ensure_state_bucket leaves it."""
    own = s3.get_bucket_ownership_controls(Bucket=bucket)["OwnershipControls"]["Rules"]
    assert own == [{"ObjectOwnership": "BucketOwnerEnforced"}]

    pab = s3.get_public_access_block(Bucket=bucket)["PublicAccessBlockConfiguration"]
    assert pab == {
        "BlockPublicAcls": True,
        "IgnorePublicAcls": True,
        "BlockPublicPolicy": True,
        "RestrictPublicBuckets": True,
    }

    assert s3.get_bucket_versioning(Bucket=bucket)["Status"] == "Enabled"

    enc = s3.get_bucket_encryption(Bucket=bucket)["ServerSideEncryptionConfiguration"]["Rules"]
    assert enc[0]["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] in ("AES256", "aws:kms")

    rules = s3.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]
    ours = [r for r in rules if r["ID"] == LIFECYCLE_RULE_ID]
    assert len(ours) == 1
    assert ours[0]["Status"] == "Enabled"
    assert ours[0]["NoncurrentVersionExpiration"]["NoncurrentDays"] == 90
    assert ours[0]["AbortIncompleteMultipartUpload"]["DaysAfterInitiation"] == 7

    tags = {t["Key"]: t["Value"] for t in s3.get_bucket_tagging(Bucket=bucket)["TagSet"]}
    assert TAGS.items() <= tags.items()

    policy = json.loads(s3.get_bucket_policy(Bucket=bucket)["Policy"])
    stmt = [s for s in policy["Statement"] if s.get("Sid") == TLS_SID]
    assert len(stmt) == 1
    stmt = stmt[0]
    assert stmt["Effect"] == "Deny"
    assert stmt["Principal"] == "*"
    assert stmt["Action"] == "s3:*"
    assert sorted(stmt["Resource"]) == [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"]
    assert stmt["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}

    assert verify_state_bucket(s3, bucket) == {
        "exists": True,
        "ownership": True,
        "public-access-block": True,
        "versioning": True,
        "encryption": True,
        "lifecycle": True,
        "tls-policy": True,
    }


# --------------------------------------------------------------------------------------------- create


def test_create_us_east_1(aws):
    s3 = client("us-east-1")
    report = ensure_state_bucket(s3, BUCKET, "us-east-1", TAGS)
    assert report.created
    assert report.bucket == BUCKET and report.region == "us-east-1"
    assert s3.get_bucket_location(Bucket=BUCKET)["LocationConstraint"] is None
    assert_hardened(s3)
    assert report.lines()[0] == f"created bucket {BUCKET} in us-east-1"
    # ownership is set by CreateBucket itself; everything else is configured afterwards
    assert report.already_ok == ["ownership"]
    assert [r.split(" ")[0] for r in report.repaired] == [s for s in SETTINGS if s != "ownership"]
    assert report.repaired[-1].startswith("tls-policy")  # applied last


def test_create_other_region_sets_location_constraint(aws):
    s3 = client("eu-west-1")
    report = ensure_state_bucket(s3, BUCKET, "eu-west-1", TAGS)
    assert report.created and report.region == "eu-west-1"
    assert s3.get_bucket_location(Bucket=BUCKET)["LocationConstraint"] == "eu-west-1"
    assert s3.head_bucket(Bucket=BUCKET)["BucketRegion"] == "eu-west-1"
    assert_hardened(s3)


def test_create_request_shapes():
    """us-east-1 sends no CreateBucketConfiguration; other regions send LocationConstraint."""
    from botocore.stub import Stubber

    for region, expected in (
        ("us-east-1", {"Bucket": BUCKET, "ObjectOwnership": "BucketOwnerEnforced"}),
        (
            "eu-west-1",
            {
                "Bucket": BUCKET,
                "ObjectOwnership": "BucketOwnerEnforced",
                "CreateBucketConfiguration": {"LocationConstraint": "eu-west-1"},
            },
        ),
    ):
        s3 = client(region)
        with Stubber(s3) as stub:
            stub.add_client_error("head_bucket", "404", http_status_code=404)
            stub.add_response("create_bucket", {}, expected)
            stub.add_client_error("head_bucket", "403", http_status_code=403)  # stop after create
            with pytest.raises(UserError):
                ensure_state_bucket(s3, BUCKET, region, TAGS)
            stub.assert_no_pending_responses()


# --------------------------------------------------------------------------------------------- idempotency


def test_second_run_changes_nothing(aws):
    s3 = client()
    ensure_state_bucket(s3, BUCKET, "us-east-1", TAGS)
    policy_before = s3.get_bucket_policy(Bucket=BUCKET)["Policy"]
    rules_before = s3.get_bucket_lifecycle_configuration(Bucket=BUCKET)["Rules"]

    again = ensure_state_bucket(s3, BUCKET, "us-east-1", TAGS)
    assert again == BucketReport(BUCKET, "us-east-1", created=False, repaired=[], already_ok=list(SETTINGS))
    assert not again.changed
    assert again.lines() == [f"bucket {BUCKET} in us-east-1 exists", "ok: " + ", ".join(SETTINGS)]
    assert s3.get_bucket_policy(Bucket=BUCKET)["Policy"] == policy_before
    assert s3.get_bucket_lifecycle_configuration(Bucket=BUCKET)["Rules"] == rules_before


def test_already_owned_on_create_is_success(aws, monkeypatch):
    """A create that answers BucketAlreadyOwnedByYou (a race) goes on to harden the bucket.

    (In us-east-1 S3 answers a repeated CreateBucket with 200, so use another region.)
    """
    s3 = client("eu-west-1")
    s3.create_bucket(Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    real_head = s3.head_bucket
    calls = []

    def head_once_missing(**kw):
        calls.append(kw)
        if len(calls) == 1:
            raise ClientError({"Error": {"Code": "404", "Message": "Not Found"}}, "HeadBucket")
        return real_head(**kw)

    monkeypatch.setattr(s3, "head_bucket", head_once_missing)
    report = ensure_state_bucket(s3, BUCKET, "eu-west-1", TAGS)
    assert not report.created and len(calls) == 2
    assert_hardened(s3)


# --------------------------------------------------------------------------------------------- repair


def test_repairs_drift_on_existing_bucket(aws):
    s3 = client()
    s3.create_bucket(Bucket=BUCKET)
    ensure_state_bucket(s3, BUCKET, "us-east-1", TAGS)
    s3.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Suspended"})
    s3.delete_public_access_block(Bucket=BUCKET)
    s3.delete_bucket_encryption(Bucket=BUCKET)
    assert verify_state_bucket(s3, BUCKET)["versioning"] is False

    report = ensure_state_bucket(s3, BUCKET, "us-east-1", TAGS)
    assert not report.created
    assert report.repaired == [
        "public-access-block (was not set)",
        "versioning (was Suspended)",
        "encryption (was not set)",
    ]
    assert "repaired: versioning (was Suspended)" in report.lines()
    assert set(report.already_ok) == {"ownership", "lifecycle", "tags", "tls-policy"}
    assert_hardened(s3)


def test_hardens_bare_bucket_made_by_hand(aws):
    s3 = client()
    s3.create_bucket(Bucket=BUCKET, ObjectOwnership="ObjectWriter")
    s3.put_public_access_block(
        Bucket=BUCKET,
        PublicAccessBlockConfiguration={
            "BlockPublicAcls": True,
            "IgnorePublicAcls": False,
            "BlockPublicPolicy": True,
            "RestrictPublicBuckets": False,
        },
    )
    report = ensure_state_bucket(s3, BUCKET, "us-east-1", TAGS)
    assert not report.created
    assert report.already_ok == []
    assert "ownership (was ObjectWriter)" in report.repaired
    assert "public-access-block (was off: IgnorePublicAcls,RestrictPublicBuckets)" in report.repaired
    assert "versioning (was never enabled)" in report.repaired
    assert_hardened(s3)


def test_kms_encryption_is_accepted(aws):
    s3 = client()
    s3.create_bucket(Bucket=BUCKET)
    s3.put_bucket_encryption(
        Bucket=BUCKET,
        ServerSideEncryptionConfiguration={
            "Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "aws:kms"}}]
        },
    )
    report = ensure_state_bucket(s3, BUCKET, "us-east-1", TAGS)
    assert "encryption" in report.already_ok
    enc = s3.get_bucket_encryption(Bucket=BUCKET)["ServerSideEncryptionConfiguration"]["Rules"]
    assert enc[0]["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "aws:kms"


def test_wrong_lifecycle_rule_is_replaced(aws):
    s3 = client()
    s3.create_bucket(Bucket=BUCKET)
    s3.put_bucket_lifecycle_configuration(
        Bucket=BUCKET,
        LifecycleConfiguration={
            "Rules": [
                {
                    "ID": LIFECYCLE_RULE_ID,
                    "Status": "Disabled",
                    "Filter": {},
                    "NoncurrentVersionExpiration": {"NoncurrentDays": 5},
                }
            ]
        },
    )
    report = ensure_state_bucket(s3, BUCKET, "us-east-1", TAGS)
    assert f"lifecycle (was {LIFECYCLE_RULE_ID} rule differs)" in report.repaired
    assert_hardened(s3)


# --------------------------------------------------------------------------------------------- merging


def test_merge_keeps_user_lifecycle_tags_and_policy(aws):
    s3 = client()
    s3.create_bucket(Bucket=BUCKET)
    user_rule = {
        "ID": "user-logs",
        "Status": "Enabled",
        "Filter": {"Prefix": "logs/"},
        "Expiration": {"Days": 3},
    }
    s3.put_bucket_lifecycle_configuration(Bucket=BUCKET, LifecycleConfiguration={"Rules": [user_rule]})
    s3.put_bucket_tagging(Bucket=BUCKET, Tagging={"TagSet": [{"Key": "team", "Value": "ml"}]})
    user_stmt = {
        "Sid": "UserReadOnly",
        "Effect": "Allow",
        "Principal": {"AWS": "arn:aws:iam::123456789012:root"},
        "Action": "s3:GetObject",
        "Resource": f"arn:aws:s3:::{BUCKET}/*",
    }
    s3.put_bucket_policy(Bucket=BUCKET, Policy=json.dumps({"Version": "2012-10-17", "Statement": [user_stmt]}))

    report = ensure_state_bucket(s3, BUCKET, "us-east-1", TAGS)
    assert "tags (was missing managed-by,project)" in report.repaired
    assert_hardened(s3)

    rules = s3.get_bucket_lifecycle_configuration(Bucket=BUCKET)["Rules"]
    assert {r["ID"] for r in rules} == {"user-logs", LIFECYCLE_RULE_ID}
    kept = next(r for r in rules if r["ID"] == "user-logs")
    assert kept["Expiration"] == {"Days": 3} and kept["Filter"] == {"Prefix": "logs/"}

    tags = {t["Key"]: t["Value"] for t in s3.get_bucket_tagging(Bucket=BUCKET)["TagSet"]}
    assert tags == {"team": "ml", **TAGS}

    stmts = json.loads(s3.get_bucket_policy(Bucket=BUCKET)["Policy"])["Statement"]
    assert [s["Sid"] for s in stmts] == ["UserReadOnly", TLS_SID]
    assert stmts[0] == user_stmt

    assert ensure_state_bucket(s3, BUCKET, "us-east-1", TAGS).repaired == []


def test_equivalent_tls_statement_under_other_sid_is_ok(aws):
    s3 = client()
    s3.create_bucket(Bucket=BUCKET)
    stmt = {
        "Sid": "TLSOnly",
        "Effect": "Deny",
        "Principal": {"AWS": "*"},
        "Action": ["s3:*"],
        "Resource": [f"arn:aws:s3:::{BUCKET}/*", f"arn:aws:s3:::{BUCKET}"],
        "Condition": {"Bool": {"aws:SecureTransport": False}},
    }
    s3.put_bucket_policy(Bucket=BUCKET, Policy=json.dumps({"Version": "2012-10-17", "Statement": [stmt]}))
    report = ensure_state_bucket(s3, BUCKET, "us-east-1", TAGS)
    assert "tls-policy" in report.already_ok
    assert len(json.loads(s3.get_bucket_policy(Bucket=BUCKET)["Policy"])["Statement"]) == 1


# --------------------------------------------------------------------------------------------- TLS policy


def test_moto_denies_all_object_requests_under_tls_policy(aws):
    """Canary for the sandbox: moto 5 ignores the `Bool aws:SecureTransport` condition, so the
    DenyInsecureTransport statement refuses every object request (https included). If this
    starts failing, moto has learned the condition and the sandbox may keep the policy."""
    s3 = client()
    ensure_state_bucket(s3, BUCKET, "us-east-1", TAGS)
    with pytest.raises(ClientError) as exc:
        s3.put_object(Bucket=BUCKET, Key="state/terraform.tfstate", Body=b"{}")
    assert exc.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


def test_require_tls_false_skips_policy_for_sandbox(aws):
    s3 = client()
    report = ensure_state_bucket(s3, BUCKET, "us-east-1", TAGS, require_tls=False)
    assert "tls-policy" not in report.already_ok + [r.split(" ")[0] for r in report.repaired]
    assert report.skipped and report.lines()[-1].startswith("skipped: tls-policy")
    with pytest.raises(ClientError):
        s3.get_bucket_policy(Bucket=BUCKET)
    s3.put_object(Bucket=BUCKET, Key="state/terraform.tfstate", Body=b"{}")  # Terraform can write
    assert verify_state_bucket(s3, BUCKET) == {
        "exists": True,
        "ownership": True,
        "public-access-block": True,
        "versioning": True,
        "encryption": True,
        "lifecycle": True,
        "tls-policy": False,
    }
    again = ensure_state_bucket(s3, BUCKET, "us-east-1", TAGS, require_tls=False)
    assert again.repaired == [] and not again.changed


# --------------------------------------------------------------------------------------------- errors


def _one_line(err: UserError) -> str:
    msg = str(err)
    assert "\n" not in msg and msg.strip() == msg and msg
    return msg


def test_bucket_owned_by_another_account(aws, monkeypatch):
    s3 = client()

    def forbidden(**kw):
        raise ClientError(
            {"Error": {"Code": "403", "Message": "Forbidden"}, "ResponseMetadata": {"HTTPStatusCode": 403}},
            "HeadBucket",
        )

    monkeypatch.setattr(s3, "head_bucket", forbidden)
    with pytest.raises(UserError) as exc:
        ensure_state_bucket(s3, BUCKET, "us-east-1", TAGS)
    msg = _one_line(exc.value)
    assert "another AWS account" in msg and "TF_STATE_BUCKET" in msg and "aws_env_vars" in msg
    assert BUCKET in msg


def test_bucket_already_exists_on_create(aws, monkeypatch):
    from botocore.stub import Stubber

    s3 = client()
    with Stubber(s3) as stub:
        stub.add_client_error("head_bucket", "404", http_status_code=404)
        stub.add_client_error("create_bucket", "BucketAlreadyExists", http_status_code=409)
        with pytest.raises(UserError) as exc:
            ensure_state_bucket(s3, BUCKET, "us-east-1", TAGS)
    assert "another AWS account" in _one_line(exc.value)


def test_wrong_region(aws):
    client("eu-west-1").create_bucket(Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    with pytest.raises(UserError) as exc:
        ensure_state_bucket(client("us-east-1"), BUCKET, "us-east-1", TAGS)
    msg = _one_line(exc.value)
    assert "eu-west-1" in msg and "us-east-1" in msg and BUCKET in msg


def test_no_credentials(monkeypatch):
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    s3 = boto3.session.Session().client("s3", region_name="us-east-1")
    with pytest.raises(UserError) as exc:
        ensure_state_bucket(s3, BUCKET, "us-east-1", TAGS)
    msg = _one_line(exc.value)
    assert msg == "no AWS credentials found: set AWS_PROFILE in aws_env_vars or run `aws configure`"


def test_access_denied_names_operation_and_permission(aws):
    from botocore.stub import Stubber

    s3 = client()
    with Stubber(s3) as stub:
        stub.add_response("head_bucket", {"BucketRegion": "us-east-1"}, {"Bucket": BUCKET})
        stub.add_client_error("get_bucket_ownership_controls", "AccessDenied", "Access Denied", 403)
        with pytest.raises(UserError) as exc:
            ensure_state_bucket(s3, BUCKET, "us-east-1", TAGS)
    msg = _one_line(exc.value)
    assert "get_bucket_ownership_controls" in msg and "s3:GetBucketOwnershipControls" in msg


def test_unreachable_endpoint():
    s3 = boto3.client(
        "s3",
        region_name="us-east-1",
        endpoint_url="http://127.0.0.1:9",
        config=Config(connect_timeout=1, retries={"max_attempts": 1}),
    )
    with pytest.raises(UserError) as exc:
        ensure_state_bucket(s3, BUCKET, "us-east-1", TAGS)
    assert "cannot reach http://127.0.0.1:9" in _one_line(exc.value)


def test_verify_missing_bucket(aws):
    result = verify_state_bucket(client(), BUCKET)
    assert result["exists"] is False and not any(result.values())


# -- the runs bucket: hardened like the state bucket, but not versioned ------------------------
RUNS = "remotefit-tfstate-test-runs"


def test_runs_bucket_is_hardened_unversioned_and_repaired(aws):
    from remotefit.backend import ensure_runs_bucket

    s3 = client()
    report = ensure_runs_bucket(s3, RUNS, "us-east-1", TAGS)
    assert report.created and not any(r.startswith("versioning") for r in report.repaired)
    assert s3.get_bucket_versioning(Bucket=RUNS).get("Status") is None  # checkpoints are rewritten often
    (rule,) = [r for r in s3.get_bucket_lifecycle_configuration(Bucket=RUNS)["Rules"] if r["ID"] == LIFECYCLE_RULE_ID]
    assert (
        rule["AbortIncompleteMultipartUpload"]["DaysAfterInitiation"] == 7 and "NoncurrentVersionExpiration" not in rule
    )
    checks = verify_state_bucket(s3, RUNS, versioned=False)
    assert checks == dict.fromkeys(checks, True) and "versioning" not in checks
    # drift is repaired and reported, the rest left alone
    s3.delete_public_access_block(Bucket=RUNS)
    again = ensure_runs_bucket(s3, RUNS, "us-east-1", TAGS)
    assert not again.created and [r.split(" ")[0] for r in again.repaired] == ["public-access-block"]
    assert ensure_runs_bucket(s3, RUNS, "us-east-1", TAGS).repaired == []


def test_the_runs_bucket_setting(monkeypatch):
    from remotefit.config import Settings

    base = {"AWS_ACCOUNT": "a", "AWS_REGION": "us-east-1", "STAGE": "dev", "TF_STATE_BUCKET": "my-state"}
    assert Settings(**base).runs_bucket == "my-state-runs"
    assert Settings(**base, RUNS_BUCKET="results-here").runs_bucket == "results-here"
    long = Settings(**{**base, "TF_STATE_BUCKET": "a" * 61 + "-b"}).runs_bucket
    assert len(long) <= 63 and long.endswith("-runs")
    for bad, why in (("Bad_Name", "not a valid S3 bucket name"), ("my-state", "must not be TF_STATE_BUCKET")):
        with pytest.raises(Exception, match=why):
            Settings(**base, RUNS_BUCKET=bad)

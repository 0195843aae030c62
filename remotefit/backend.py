"""The Terraform state bucket: create it once, harden it, and repair drift on every run.

`ensure_state_bucket` is idempotent. It creates the bucket when missing, then reads every
hardening setting back and changes only what is missing or wrong, reporting what it did:

* object ownership ``BucketOwnerEnforced`` (ACLs off),
* all four public-access-block flags on,
* versioning ``Enabled`` (state history survives a bad apply),
* default encryption (SSE-S3 ``AES256``; an existing ``aws:kms`` setup is kept),
* a lifecycle rule ``remotefit-state-hygiene`` (noncurrent versions expire after 90 days,
  incomplete multipart uploads are aborted after 7) merged with the user's own rules,
* tags merged with the user's own tags,
* and last a ``DenyInsecureTransport`` policy statement merged into any existing policy.
  It goes last because once it is in place every non-TLS request is refused.
  ``require_tls=False`` skips it for the local moto sandbox, where moto ignores the
  condition and would refuse every object request (see `ensure_state_bucket`).

boto3/botocore are imported lazily: the caller passes a ready S3 client, and every AWS error
surfaces as a one-line `UserError`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from remotefit.errors import UserError

# A botocore client for "s3"; botocore builds its classes at runtime, so there is no static type.
S3Client = Any

LIFECYCLE_RULE_ID = "remotefit-state-hygiene"
NONCURRENT_DAYS = 90
ABORT_MULTIPART_DAYS = 7
TLS_SID = "DenyInsecureTransport"
DEFAULT_SSE = "AES256"
ACCEPTED_SSE = ("AES256", "aws:kms", "aws:kms:dsse")
OWNERSHIP = "BucketOwnerEnforced"
PAB_FLAGS = ("BlockPublicAcls", "IgnorePublicAcls", "BlockPublicPolicy", "RestrictPublicBuckets")

# Setting names, in the order they are applied (the TLS policy must stay last).
SETTINGS = ("ownership", "public-access-block", "versioning", "encryption", "lifecycle", "tags", "tls-policy")

_HOW_CREDS = "set AWS_PROFILE in aws_env_vars or run `aws configure`"
_HOW_BUCKET = "choose another TF_STATE_BUCKET in aws_env_vars"

# The IAM permission each S3 API call needs, named in access-denied messages.
_PERMISSION = {
    "head_bucket": "s3:ListBucket",
    "create_bucket": "s3:CreateBucket",
    "get_bucket_location": "s3:GetBucketLocation",
    "get_bucket_ownership_controls": "s3:GetBucketOwnershipControls",
    "put_bucket_ownership_controls": "s3:PutBucketOwnershipControls",
    "get_public_access_block": "s3:GetBucketPublicAccessBlock",
    "put_public_access_block": "s3:PutBucketPublicAccessBlock",
    "get_bucket_versioning": "s3:GetBucketVersioning",
    "put_bucket_versioning": "s3:PutBucketVersioning",
    "get_bucket_encryption": "s3:GetEncryptionConfiguration",
    "put_bucket_encryption": "s3:PutEncryptionConfiguration",
    "get_bucket_lifecycle_configuration": "s3:GetLifecycleConfiguration",
    "put_bucket_lifecycle_configuration": "s3:PutLifecycleConfiguration",
    "get_bucket_tagging": "s3:GetBucketTagging",
    "put_bucket_tagging": "s3:PutBucketTagging",
    "get_bucket_policy": "s3:GetBucketPolicy",
    "put_bucket_policy": "s3:PutBucketPolicy",
}

# Error codes meaning "this setting is not configured" for each read.
_NOT_SET = {
    "get_bucket_ownership_controls": ("OwnershipControlsNotFoundError",),
    "get_public_access_block": ("NoSuchPublicAccessBlockConfiguration",),
    "get_bucket_encryption": ("ServerSideEncryptionConfigurationNotFoundError",),
    "get_bucket_lifecycle_configuration": ("NoSuchLifecycleConfiguration",),
    "get_bucket_tagging": ("NoSuchTagSet",),
    "get_bucket_policy": ("NoSuchBucketPolicy",),
}

_ACCESS_DENIED = {"AccessDenied", "AllAccessDisabled", "403", "Forbidden"}
_BAD_CREDS = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "InvalidClientTokenId",
}


@dataclass
class BucketReport:
    """What `ensure_state_bucket` found and did.

    `repaired` holds ``"<setting> (was <old state>)"`` entries for every setting it changed
    (on a freshly created bucket these are the settings it configured); `already_ok` holds the
    names of settings that needed nothing; `skipped` the settings left alone on request
    (``tls-policy`` with ``require_tls=False``).
    """

    bucket: str
    region: str
    created: bool
    repaired: list[str] = field(default_factory=list)
    already_ok: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        """True when this run created the bucket or changed any setting."""
        return self.created or bool(self.repaired)

    def lines(self) -> list[str]:
        """Human-readable summary, one fact per line."""
        if self.created:
            out = [f"created bucket {self.bucket} in {self.region}"]
            out += [f"configured: {r}" for r in self.repaired]
        else:
            out = [f"bucket {self.bucket} in {self.region} exists"]
            out += [f"repaired: {r}" for r in self.repaired]
        if self.already_ok:
            out.append("ok: " + ", ".join(self.already_ok))
        out += [f"skipped: {s}" for s in self.skipped]
        return out


# ---------------------------------------------------------------------------------------------
# error mapping


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _error_code(exc: Any) -> str:
    return str(exc.response.get("Error", {}).get("Code", "")) if hasattr(exc, "response") else ""


def _http_status(exc: Any) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def _to_user_error(exc: Exception, op: str, bucket: str) -> UserError:
    """Translate a botocore exception from S3 operation `op` into a one-line UserError."""
    from botocore.exceptions import (
        ClientError,
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
        NoRegionError,
        PartialCredentialsError,
    )

    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return UserError(f"no AWS credentials found: {_HOW_CREDS}")
    if isinstance(exc, NoRegionError):
        return UserError("no AWS region configured for the S3 client: set AWS_REGION in aws_env_vars")
    if isinstance(exc, EndpointConnectionError | ConnectTimeoutError):
        url = getattr(exc, "kwargs", {}).get("endpoint_url", "the S3 endpoint")
        return UserError(
            f"cannot reach {url} ({op} on bucket {bucket}): check your network, "
            "or AWS_ENDPOINT_URL in aws_env_vars if you use a local endpoint"
        )
    if isinstance(exc, ClientError):
        code = _error_code(exc)
        if code in _ACCESS_DENIED or (not code and _http_status(exc) == 403):
            perm = _PERMISSION.get(op, "the matching s3: permission")
            return UserError(
                f"access denied for {op} on bucket {bucket}: your IAM identity needs {perm} on "
                f"arn:aws:s3:::{bucket}; grant it or use another AWS_PROFILE in aws_env_vars"
            )
        if code in _BAD_CREDS:
            return UserError(
                f"AWS rejected the credentials ({code}) during {op} on bucket {bucket}: "
                f"refresh them (e.g. `aws sso login`) or {_HOW_CREDS}"
            )
        message = _one_line(exc.response.get("Error", {}).get("Message", "") or str(exc))
        return UserError(
            f"S3 {op} on bucket {bucket} failed ({code or _http_status(exc)}: {message}); fix the cause above and rerun"
        )
    return UserError(f"S3 {op} on bucket {bucket} failed: {_one_line(str(exc))}; fix the cause and rerun")


@contextmanager
def _mapped(op: str, bucket: str) -> Iterator[None]:
    """Turn botocore errors raised inside the block into one-line UserErrors."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except (ClientError, BotoCoreError) as exc:
        raise _to_user_error(exc, op, bucket) from exc


def _call(s3: S3Client, op: str, bucket: str, **kwargs: Any) -> dict[str, Any]:
    with _mapped(op, bucket):
        return getattr(s3, op)(Bucket=bucket, **kwargs)


def _read(s3: S3Client, op: str, bucket: str) -> dict[str, Any] | None:
    """Call a get_* operation; None when S3 says the setting is not configured."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return getattr(s3, op)(Bucket=bucket)
    except ClientError as exc:
        if _error_code(exc) in _NOT_SET.get(op, ()):
            return None
        raise _to_user_error(exc, op, bucket) from exc
    except BotoCoreError as exc:
        raise _to_user_error(exc, op, bucket) from exc


# ---------------------------------------------------------------------------------------------
# bucket existence and region


def _normalize_location(constraint: str | None) -> str:
    if not constraint:
        return "us-east-1"
    if constraint == "EU":
        return "eu-west-1"
    return constraint


def _taken(bucket: str) -> UserError:
    return UserError(
        f"S3 bucket name {bucket} is taken by another AWS account (or these credentials lack "
        f"s3:ListBucket on it): {_HOW_BUCKET}"
    )


def _wrong_region(bucket: str, actual: str, wanted: str) -> UserError:
    return UserError(
        f"bucket {bucket} exists in region {actual}, not {wanted} as configured: set AWS_REGION to "
        f"{actual} or {_HOW_BUCKET}"
    )


def _head(s3: S3Client, bucket: str) -> str | None:
    """The bucket's region, or None when it does not exist. Raises UserError when it isn't ours."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        resp = s3.head_bucket(Bucket=bucket)
    except ClientError as exc:
        code = _error_code(exc)
        status = _http_status(exc)
        if code in ("404", "NoSuchBucket") or status == 404:
            return None
        if code in ("403", "AccessDenied", "Forbidden") or status == 403:
            raise _taken(bucket) from exc
        if code in ("301", "PermanentRedirect") or status == 301:
            region = (
                exc.response.get("ResponseMetadata", {})
                .get("HTTPHeaders", {})
                .get("x-amz-bucket-region", "another region")
            )
            raise UserError(
                f"bucket {bucket} exists in region {region}, not the S3 client's region: set AWS_REGION "
                f"to {region} or {_HOW_BUCKET}"
            ) from exc
        raise _to_user_error(exc, "head_bucket", bucket) from exc
    except BotoCoreError as exc:
        raise _to_user_error(exc, "head_bucket", bucket) from exc
    region = resp.get("BucketRegion") or resp.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get(
        "x-amz-bucket-region"
    )
    if not region:
        loc = _call(s3, "get_bucket_location", bucket)
        region = _normalize_location(loc.get("LocationConstraint"))
    return str(region)


def _create(s3: S3Client, bucket: str, region: str) -> bool:
    """Create the bucket; False when it turned out to exist already (and is ours)."""
    from botocore.exceptions import BotoCoreError, ClientError

    kwargs: dict[str, Any] = {"Bucket": bucket, "ObjectOwnership": OWNERSHIP}
    if region != "us-east-1":
        kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
    try:
        s3.create_bucket(**kwargs)
    except ClientError as exc:
        code = _error_code(exc)
        if code == "BucketAlreadyOwnedByYou":
            return False
        if code == "BucketAlreadyExists":
            raise _taken(bucket) from exc
        if code in ("IllegalLocationConstraintException", "InvalidLocationConstraint"):
            client_region = getattr(getattr(s3, "meta", None), "region_name", "?")
            raise UserError(
                f"cannot create bucket {bucket} in {region} with an S3 client for region {client_region}: "
                "build the client for the same region as AWS_REGION in aws_env_vars"
            ) from exc
        raise _to_user_error(exc, "create_bucket", bucket) from exc
    except BotoCoreError as exc:
        raise _to_user_error(exc, "create_bucket", bucket) from exc
    with _mapped("head_bucket", bucket):
        s3.get_waiter("bucket_exists").wait(Bucket=bucket, WaiterConfig={"Delay": 1, "MaxAttempts": 30})
    return True


# ---------------------------------------------------------------------------------------------
# settings: each has a reader that returns (ok, description of the current state, raw state)
# and a fixer that takes the raw state and writes the wanted configuration.


def _partition(region: str) -> str:
    if region.startswith("cn-"):
        return "aws-cn"
    if region.startswith("us-gov-"):
        return "aws-us-gov"
    return "aws"


def _check_ownership(s3: S3Client, bucket: str) -> tuple[bool, str, Any]:
    resp = _read(s3, "get_bucket_ownership_controls", bucket)
    rules = (resp or {}).get("OwnershipControls", {}).get("Rules", [])
    current = ",".join(r.get("ObjectOwnership", "?") for r in rules) or "not set"
    return current == OWNERSHIP, current, None


def _fix_ownership(s3: S3Client, bucket: str, _state: Any, _ctx: _Ctx) -> None:
    _call(
        s3,
        "put_bucket_ownership_controls",
        bucket,
        OwnershipControls={"Rules": [{"ObjectOwnership": OWNERSHIP}]},
    )


def _check_pab(s3: S3Client, bucket: str) -> tuple[bool, str, Any]:
    resp = _read(s3, "get_public_access_block", bucket)
    if resp is None:
        return False, "not set", None
    conf = resp.get("PublicAccessBlockConfiguration", {})
    off = [f for f in PAB_FLAGS if not conf.get(f)]
    return not off, ("off: " + ",".join(off)) if off else "all on", None


def _fix_pab(s3: S3Client, bucket: str, _state: Any, _ctx: _Ctx) -> None:
    _call(s3, "put_public_access_block", bucket, PublicAccessBlockConfiguration=dict.fromkeys(PAB_FLAGS, True))


def _check_versioning(s3: S3Client, bucket: str) -> tuple[bool, str, Any]:
    status = _call(s3, "get_bucket_versioning", bucket).get("Status") or "never enabled"
    return status == "Enabled", status, None


def _fix_versioning(s3: S3Client, bucket: str, _state: Any, _ctx: _Ctx) -> None:
    _call(s3, "put_bucket_versioning", bucket, VersioningConfiguration={"Status": "Enabled"})


def _check_encryption(s3: S3Client, bucket: str) -> tuple[bool, str, Any]:
    resp = _read(s3, "get_bucket_encryption", bucket)
    rules = (resp or {}).get("ServerSideEncryptionConfiguration", {}).get("Rules", [])
    algos = [r.get("ApplyServerSideEncryptionByDefault", {}).get("SSEAlgorithm") for r in rules]
    algos = [a for a in algos if a]
    if not algos:
        return False, "not set", None
    return any(a in ACCEPTED_SSE for a in algos), ",".join(algos), None


def _fix_encryption(s3: S3Client, bucket: str, _state: Any, _ctx: _Ctx) -> None:
    _call(
        s3,
        "put_bucket_encryption",
        bucket,
        ServerSideEncryptionConfiguration={
            "Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": DEFAULT_SSE}}]
        },
    )


def _our_lifecycle_rule(versioned: bool = True) -> dict[str, Any]:
    rule: dict[str, Any] = {"ID": LIFECYCLE_RULE_ID, "Status": "Enabled", "Filter": {}}
    if versioned:  # old state versions go after a while; an unversioned runs bucket has none
        rule["NoncurrentVersionExpiration"] = {"NoncurrentDays": NONCURRENT_DAYS}
    rule["AbortIncompleteMultipartUpload"] = {"DaysAfterInitiation": ABORT_MULTIPART_DAYS}
    return rule


def _lifecycle_rule_ok(rule: dict[str, Any], versioned: bool = True) -> bool:
    filt = rule.get("Filter")
    whole_bucket = not rule.get("Prefix") and (filt is None or filt in ({}, {"Prefix": ""}))
    noncurrent = rule.get("NoncurrentVersionExpiration", {}).get("NoncurrentDays")
    return (
        rule.get("Status") == "Enabled"
        and whole_bucket
        and noncurrent == (NONCURRENT_DAYS if versioned else None)
        and rule.get("AbortIncompleteMultipartUpload", {}).get("DaysAfterInitiation") == ABORT_MULTIPART_DAYS
    )


def _check_lifecycle(s3: S3Client, bucket: str, versioned: bool = True) -> tuple[bool, str, Any]:
    resp = _read(s3, "get_bucket_lifecycle_configuration", bucket)
    rules = (resp or {}).get("Rules", [])
    ours = [r for r in rules if r.get("ID") == LIFECYCLE_RULE_ID]
    if not ours:
        desc = f"no {LIFECYCLE_RULE_ID} rule" + (f", {len(rules)} other rule(s) kept" if rules else "")
        return False, desc, resp
    if all(_lifecycle_rule_ok(r, versioned) for r in ours) and len(ours) == 1:
        return True, "ok", resp
    return False, f"{LIFECYCLE_RULE_ID} rule differs", resp


def _clean_rule(rule: dict[str, Any]) -> dict[str, Any]:
    rule = dict(rule)
    if "Filter" in rule and "Prefix" in rule:  # S3 rejects both; Filter is the current form
        rule.pop("Prefix")
    return rule


def _fix_lifecycle(s3: S3Client, bucket: str, state: Any, ctx: _Ctx) -> None:
    resp = state or {}
    rules = [_clean_rule(r) for r in resp.get("Rules", []) if r.get("ID") != LIFECYCLE_RULE_ID]
    rules.append(_our_lifecycle_rule(ctx.versioned))
    kwargs: dict[str, Any] = {"LifecycleConfiguration": {"Rules": rules}}
    if resp.get("TransitionDefaultMinimumObjectSize"):
        kwargs["TransitionDefaultMinimumObjectSize"] = resp["TransitionDefaultMinimumObjectSize"]
    _call(s3, "put_bucket_lifecycle_configuration", bucket, **kwargs)


def _tls_statement(bucket: str, region: str) -> dict[str, Any]:
    arn = f"arn:{_partition(region)}:s3:::{bucket}"
    return {
        "Sid": TLS_SID,
        "Effect": "Deny",
        "Principal": "*",
        "Action": "s3:*",
        "Resource": [arn, f"{arn}/*"],
        "Condition": {"Bool": {"aws:SecureTransport": "false"}},
    }


def _as_set(value: Any) -> frozenset[str]:
    if isinstance(value, str):
        return frozenset([value])
    return frozenset(str(v) for v in value or ())


def _is_tls_statement(stmt: dict[str, Any], bucket: str) -> bool:
    """Whether `stmt` denies all S3 actions over plain HTTP on the bucket and its objects."""
    principal = stmt.get("Principal")
    if principal != "*" and not (isinstance(principal, dict) and _as_set(principal.get("AWS")) == {"*"}):
        return False
    cond = stmt.get("Condition", {}).get("Bool", {}).get("aws:SecureTransport")
    resources = _as_set(stmt.get("Resource"))
    needed = any(r.endswith(f":s3:::{bucket}") for r in resources) and any(
        r.endswith(f":s3:::{bucket}/*") for r in resources
    )
    return (
        stmt.get("Effect") == "Deny"
        and _as_set(stmt.get("Action")) in ({"s3:*"}, {"*"})
        and str(cond).lower() == "false"
        and needed
        and "NotResource" not in stmt
        and "NotAction" not in stmt
        and set(stmt.get("Condition", {})) == {"Bool"}
    )


def _check_policy(s3: S3Client, bucket: str) -> tuple[bool, str, Any]:
    resp = _read(s3, "get_bucket_policy", bucket)
    if resp is None:
        return False, "no bucket policy", None
    try:
        policy = json.loads(resp.get("Policy") or "{}")
    except ValueError:
        return False, "unparseable bucket policy", None
    stmts = policy.get("Statement", [])
    if isinstance(stmts, dict):
        stmts = [stmts]
        policy["Statement"] = stmts
    if any(isinstance(s, dict) and _is_tls_statement(s, bucket) for s in stmts):
        return True, "ok", policy
    has_sid = any(isinstance(s, dict) and s.get("Sid") == TLS_SID for s in stmts)
    return False, (f"{TLS_SID} statement differs" if has_sid else f"no {TLS_SID} statement"), policy


def _fix_policy(s3: S3Client, bucket: str, state: Any, ctx: _Ctx) -> None:
    if state is None:
        policy: dict[str, Any] = {"Version": "2012-10-17", "Statement": []}
    else:
        policy = state
        policy.setdefault("Version", "2012-10-17")
    policy["Statement"] = [
        s for s in policy.get("Statement", []) if not (isinstance(s, dict) and s.get("Sid") == TLS_SID)
    ] + [_tls_statement(bucket, ctx.region)]
    _call(s3, "put_bucket_policy", bucket, Policy=json.dumps(policy))


@dataclass
class _Ctx:
    region: str
    tags: dict[str, str]
    versioned: bool = True


def _check_tags(s3: S3Client, bucket: str, wanted: dict[str, str]) -> tuple[bool, str, Any]:
    resp = _read(s3, "get_bucket_tagging", bucket)
    current = {t["Key"]: t["Value"] for t in (resp or {}).get("TagSet", [])}
    missing = sorted(k for k in wanted if k not in current)
    differ = sorted(k for k in wanted if k in current and current[k] != wanted[k])
    parts = []
    if missing:
        parts.append("missing " + ",".join(missing))
    if differ:
        parts.append("different " + ",".join(differ))
    return not parts, "; ".join(parts) or "ok", current


def _fix_tags(s3: S3Client, bucket: str, state: Any, ctx: _Ctx) -> None:
    merged = {**(state or {}), **ctx.tags}
    _call(
        s3,
        "put_bucket_tagging",
        bucket,
        Tagging={"TagSet": [{"Key": k, "Value": v} for k, v in merged.items()]},
    )


_Checker = Callable[[S3Client, str], tuple[bool, str, Any]]
_Fixer = Callable[[S3Client, str, Any, _Ctx], None]

_HARDENING: tuple[tuple[str, _Checker, _Fixer], ...] = (
    ("ownership", _check_ownership, _fix_ownership),
    ("public-access-block", _check_pab, _fix_pab),
    ("versioning", _check_versioning, _fix_versioning),
    ("encryption", _check_encryption, _fix_encryption),
    ("lifecycle", _check_lifecycle, _fix_lifecycle),
    # tags are slotted in here by ensure_state_bucket (they depend on the wanted tags)
    ("tls-policy", _check_policy, _fix_policy),
)


# ---------------------------------------------------------------------------------------------
# public API


def ensure_state_bucket(
    s3: S3Client, bucket: str, region: str, tags: dict[str, str], *, require_tls: bool = True
) -> BucketReport:
    """Create (if needed) and harden the Terraform state bucket; repair only what has drifted (`ensure_bucket`)."""
    return ensure_bucket(s3, bucket, region, tags, require_tls=require_tls, versioned=True)


def ensure_runs_bucket(
    s3: S3Client, bucket: str, region: str, tags: dict[str, str], *, require_tls: bool = True
) -> BucketReport:
    """The runs bucket: hardened like the state bucket, but not versioned — a checkpoint uploaded every
    minute would otherwise keep every old copy (and bill for it) for 90 days."""
    return ensure_bucket(s3, bucket, region, tags, require_tls=require_tls, versioned=False)


def ensure_bucket(
    s3: S3Client, bucket: str, region: str, tags: dict[str, str], *, require_tls: bool = True, versioned: bool = True
) -> BucketReport:
    """Create (if needed) and harden a bucket of ours; repair only what has drifted.

    `s3` is a boto3 S3 client built by the caller (it may point at a moto server).
    `require_tls=False` leaves the bucket policy alone (reported in `skipped`): use it only for
    the local moto sandbox. moto (5.x) does not evaluate the ``Bool aws:SecureTransport``
    condition, so with the policy in place it refuses every object read/write, TLS or not,
    and Terraform's S3 backend could no longer read or write its state there. Raises
    `UserError` when the name belongs to another account, the bucket lives in another region,
    or any AWS call fails (credentials, permissions, connectivity).
    """
    actual = _head(s3, bucket)
    created = False
    if actual is None:
        created = _create(s3, bucket, region)
        if not created:  # lost a race with ourselves: it exists, find out where
            actual = _head(s3, bucket)
    if actual is not None and actual != region:
        raise _wrong_region(bucket, actual, region)

    report = BucketReport(bucket=bucket, region=region, created=created)
    ctx = _Ctx(region=region, tags=dict(tags), versioned=versioned)
    steps: list[tuple[str, _Checker, _Fixer]] = [
        (name, (lambda c, b: _check_lifecycle(c, b, versioned)) if name == "lifecycle" else check, fix)
        for name, check, fix in _HARDENING
        if versioned or name != "versioning"
    ]
    steps.insert(
        len(steps) - 1,
        ("tags", lambda c, b: _check_tags(c, b, ctx.tags), _fix_tags),
    )
    if not require_tls:
        steps = [step for step in steps if step[0] != "tls-policy"]
        report.skipped.append(
            "tls-policy (the sandbox's moto would refuse every object request under it, https included)"
        )
    for name, check, fix in steps:
        ok, current, state = check(s3, bucket)
        if ok:
            report.already_ok.append(name)
        else:
            fix(s3, bucket, state, ctx)
            report.repaired.append(f"{name} (was {current})")
    return report


def verify_state_bucket(s3: S3Client, bucket: str, *, versioned: bool = True) -> dict[str, bool]:
    """Read every hardening setting back: setting name -> whether it is as `ensure` leaves it.

    Keys: ``exists`` plus ownership, public-access-block, versioning (versioned buckets only),
    encryption, lifecycle and tls-policy (tags are not checked: they depend on the caller's wanted
    tags). A missing bucket gives all False.
    """
    names = [name for name, _, _ in _HARDENING if versioned or name != "versioning"]
    if _head(s3, bucket) is None:
        return {"exists": False, **dict.fromkeys(names, False)}
    result = {"exists": True}
    for name, check, _ in _HARDENING:
        if name in names:
            result[name] = (_check_lifecycle(s3, bucket, versioned) if name == "lifecycle" else check(s3, bucket))[0]
    return result

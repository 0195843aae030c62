"""Check AWS calls against docs/iam-policy.json: a small IAM evaluator and parsers for what was called.

Used by tests/test_iam_policy.py (unit tests, parliament) and tests/test_e2e_policy_coverage.py (every
call of a real apply → plan → destroy on the sandbox). The evaluator handles what our policy uses: Allow
and Deny, wildcards in Action and Resource, and the condition operators StringEquals, StringLike, Bool,
ArnLike, Null and their IfExists forms. Anything else fails loudly rather than passing silently.

Each observed API call becomes one or more `Call`s (the IAM actions AWS authorizes for it): the call's own
action on each resource it touches, plus ec2:CreateTags for tags sent inside a create request (checked
with ec2:CreateAction and the request tags, the tag-on-create rule), iam:TagRole / iam:TagInstanceProfile
for tags on IAM creates, and iam:PassRole for the instance profile handed to RunInstances.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

ROOT = Path(__file__).resolve().parent.parent
POLICY_FILE = ROOT / "docs" / "iam-policy.json"
ACCOUNT = "123456789012"
# What every resource remotefit creates carries (default_tags); mutating calls are checked against it.
OUR_TAGS = {"managed-by": "remotefit", "project": "remotefit"}

# API operation -> IAM action where the names differ (S3's REST operations, mostly).
ACTION_NAMES = {
    "s3:ListObjectsV2": "s3:ListBucket",
    "s3:ListObjects": "s3:ListBucket",
    "s3:HeadBucket": "s3:ListBucket",
    "s3:HeadObject": "s3:GetObject",
    "s3:ListObjectVersions": "s3:ListBucketVersions",
    "s3:DeleteObjects": "s3:DeleteObject",
    "s3:GetBucketEncryption": "s3:GetEncryptionConfiguration",
    "s3:PutBucketEncryption": "s3:PutEncryptionConfiguration",
    "s3:GetBucketLifecycleConfiguration": "s3:GetLifecycleConfiguration",
    "s3:PutBucketLifecycleConfiguration": "s3:PutLifecycleConfiguration",
    "s3:GetPublicAccessBlock": "s3:GetBucketPublicAccessBlock",
    "s3:PutPublicAccessBlock": "s3:PutBucketPublicAccessBlock",
    "s3:DeleteBucketPolicy": "s3:DeleteBucketPolicy",
}
# Service names as Terraform's log (rpc.service) and botocore (signing name) spell them -> IAM prefix.
SERVICE_PREFIX = {
    "ec2": "ec2",
    "iam": "iam",
    "s3": "s3",
    "sts": "sts",
    "ssm": "ssm",
    "servicequotas": "servicequotas",
    "service quotas": "servicequotas",
    "kms": "kms",
}
# EC2 id prefix -> IAM resource type.
EC2_ID_TYPES = {
    "i": "instance",
    "sg": "security-group",
    "sgr": "security-group-rule",
    "vol": "volume",
    "eni": "network-interface",
    "key": "key-pair",
    "sir": "spot-instances-request",
    "pg": "placement-group",
    "subnet": "subnet",
    "vpc": "vpc",
    "ami": "image",
}


@dataclass(frozen=True)
class Call:
    """One IAM authorization: `action` on `resource` with the condition keys AWS would put in its context."""

    action: str
    resource: str
    context: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    origin: str = field(default="", compare=False)

    def describe(self) -> str:
        keys = ", ".join(f"{k}={v}" for k, v in sorted(self.context.items()) if not k.startswith("aws:RequestTag/"))
        tags = sorted(k.split("/", 1)[1] for k in self.context if k.startswith("aws:RequestTag/"))
        extra = (f" [{keys}]" if keys else "") + (f" [request tags: {', '.join(tags)}]" if tags else "")
        return f"{self.action} on {self.resource}{extra} (from {self.origin})"


def load_policy(path: Path = POLICY_FILE) -> dict[str, Any]:
    return json.loads(path.read_text())


def _as_list(v: Any) -> list[Any]:
    return v if isinstance(v, list) else [v]


def _glob(pattern: str, value: str, case: bool = True) -> bool:
    # IAM wildcards: * any run, ? one character; fnmatch's [..] classes never occur in our policy.
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, value, 0 if case else re.IGNORECASE) is not None


def _condition_holds(op: str, key: str, wanted: Any, context: dict[str, Any]) -> bool:
    base, if_exists = (op[: -len("IfExists")], True) if op.endswith("IfExists") else (op, False)
    if base == "Null":
        present = key in context
        return all((str(w).lower() == "true") != present for w in _as_list(wanted))
    if key not in context:
        return if_exists
    have = [str(v) for v in _as_list(context[key])]
    wants = [str(w) for w in _as_list(wanted)]
    if base == "StringEquals":
        return any(h == w for h in have for w in wants)
    if base in ("StringLike", "ArnLike"):
        return any(_glob(w, h) for h in have for w in wants)
    if base == "Bool":
        return any(h.lower() == w.lower() for h in have for w in wants)
    raise AssertionError(f"the policy checker does not know the condition operator {op}; teach it")


def _statement_matches(stmt: dict[str, Any], call: Call) -> bool:
    if "NotAction" in stmt or "NotResource" in stmt:
        raise AssertionError("the policy checker does not handle NotAction/NotResource; teach it")
    if not any(_glob(a, call.action, case=False) for a in _as_list(stmt["Action"])):
        return False
    if not any(_glob(r, call.resource) for r in _as_list(stmt["Resource"])):
        return False
    for op, pairs in stmt.get("Condition", {}).items():
        for key, wanted in pairs.items():
            if not _condition_holds(op, key, wanted, call.context):
                return False
    return True


def allowed(policy: dict[str, Any], call: Call) -> bool:
    """IAM's answer for one action on one resource: an Allow matches and no Deny does."""
    stmts = _as_list(policy["Statement"])
    if any(s["Effect"] == "Deny" and _statement_matches(s, call) for s in stmts):
        return False
    return any(s["Effect"] == "Allow" and _statement_matches(s, call) for s in stmts)


def denied(policy: dict[str, Any], calls: Iterable[Call]) -> list[str]:
    """Every call the policy does not allow, described (empty: all allowed), each once."""
    out: list[str] = []
    for c in calls:
        if not allowed(policy, c) and c.describe() not in out:
            out.append(c.describe())
    return out


# -- from an observed API call to the IAM authorizations it needs ------------------------
def iam_action(service: str, operation: str) -> str:
    prefix = SERVICE_PREFIX.get(service.strip().lower(), service.strip().lower())
    name = f"{prefix}:{operation}"
    return ACTION_NAMES.get(name, name)


def _ec2_arn(region: str, rtype: str, rid: str = "*") -> str:
    return f"arn:aws:ec2:{region}:{ACCOUNT}:{rtype}/{rid}"


def _ec2_id_arn(region: str, rid: str) -> str:
    prefix = rid.split("-", 1)[0]
    return _ec2_arn(region, EC2_ID_TYPES.get(prefix, prefix), rid)


def _tag_specs(params: dict[str, str]) -> dict[str, dict[str, str]]:
    """{resource type: tags} from a query-protocol create request's TagSpecification.N.* parameters."""
    specs: dict[str, dict[str, str]] = {}
    for k, v in params.items():
        m = re.fullmatch(r"TagSpecification\.(\d+)\.ResourceType", k)
        if m:
            n = m[1]
            tags = {}
            for j in range(1, 100):
                key = params.get(f"TagSpecification.{n}.Tag.{j}.Key")
                if key is None:
                    break
                tags[key] = params.get(f"TagSpecification.{n}.Tag.{j}.Value", "")
            specs[v] = tags
    return specs


def _request_tags(tags: dict[str, str]) -> dict[str, Any]:
    ctx: dict[str, Any] = {f"aws:RequestTag/{k}": v for k, v in tags.items()}
    if tags:
        ctx["aws:TagKeys"] = sorted(tags)
    return ctx


def _resource_tags(tags: dict[str, str]) -> dict[str, Any]:
    return {f"aws:ResourceTag/{k}": v for k, v in tags.items()}


# EC2 create calls and the resource type they create (for the resource the call itself is checked on).
_EC2_CREATES = {
    "CreateSecurityGroup": "security-group",
    "ImportKeyPair": "key-pair",
    "CreatePlacementGroup": "placement-group",
}
_RUN_INSTANCES_TYPES = ("instance", "volume", "network-interface", "security-group", "subnet", "image", "key-pair")


def calls_for(service: str, operation: str, params: dict[str, Any], region: str, origin: str) -> list[Call]:
    """The IAM authorizations one API call needs. `params` are query-protocol parameters (flattened
    `Key.N.Sub` names, as Terraform's log shows them) or boto3 parameters (nested)."""
    action = iam_action(service, operation)
    prefix = action.split(":", 1)[0]
    ours = _resource_tags(OUR_TAGS)
    calls: list[Call] = []

    def add(act: str, resource: str, context: dict[str, Any] | None = None) -> None:
        calls.append(Call(act, resource, context or {}, origin))

    if prefix == "ec2":
        specs = _tag_specs(params) if any(k.startswith("TagSpecification.") for k in params) else {}
        for spec in params.get("TagSpecifications", []) or []:  # boto3 form
            specs[spec["ResourceType"]] = {t["Key"]: t["Value"] for t in spec.get("Tags", [])}
        group = params.get("GroupId")
        if operation == "RunInstances":
            for rtype in _RUN_INSTANCES_TYPES:
                add(action, _ec2_arn(region, rtype), ours if rtype == "security-group" else {})
            if params.get("InstanceMarketOptions.MarketType") == "spot":
                add(action, _ec2_arn(region, "spot-instances-request"))
            profile = params.get("IamInstanceProfile.Name")
            if profile:
                # The role inside the profile is passed to EC2; remotefit names both remotefit-<stage>-….
                add(
                    "iam:PassRole",
                    f"arn:aws:iam::{ACCOUNT}:role/{profile}",
                    {"iam:PassedToService": "ec2.amazonaws.com"},
                )
        elif operation in _EC2_CREATES:
            add(
                action, _ec2_arn(region, _EC2_CREATES[operation]), _request_tags(specs.get(_EC2_CREATES[operation], {}))
            )
        elif operation in ("AuthorizeSecurityGroupIngress", "AuthorizeSecurityGroupEgress"):
            add(action, _ec2_arn(region, "security-group", group or "*"), ours)
            if "security-group-rule" in specs:  # the new rule is a resource of this request when it is tagged
                add(action, _ec2_arn(region, "security-group-rule"), _request_tags(specs["security-group-rule"]))
        elif operation == "CreateTags":
            ids = [v for k, v in params.items() if re.fullmatch(r"ResourceId\.\d+", k)] or list(
                params.get("Resources", [])
            )
            tags = {
                params[k]: params.get(k[: -len("Key")] + "Value", "")
                for k in params
                if re.fullmatch(r"Tag\.\d+\.Key", k)
            }
            tags |= {t["Key"]: t.get("Value", "") for t in params.get("Tags", [])}
            for rid in ids:
                # An existing resource: ours are tagged at creation; a rule may have been created untagged.
                existing = {} if rid.startswith("sgr-") else OUR_TAGS
                add(action, _ec2_id_arn(region, rid), _request_tags(tags) | _resource_tags(existing))
        elif operation.startswith(("Describe", "Get")):
            add(action, "*")
        else:
            ids = sorted(
                {
                    v
                    for k, v in params.items()
                    if re.fullmatch(
                        r"(InstanceId|GroupId|SecurityGroupRuleId|KeyName|SpotInstanceRequestId)(\.\d+)?", k
                    )
                }
                | set(params.get("InstanceIds", []))
            )
            if "KeyName" in params and operation.endswith("KeyPair"):
                ids = [i for i in ids if i != params["KeyName"]] + ["key-pair"]
            if operation.endswith("PlacementGroup") and "GroupName" in params:
                add(action, _ec2_arn(region, "placement-group", params["GroupName"]), ours)
            elif not ids:  # nothing of ours named: the call stands or falls on the action alone
                add(action, "*")
            for rid in ids:
                arn = _ec2_arn(region, "key-pair", params["KeyName"]) if rid == "key-pair" else _ec2_id_arn(region, rid)
                add(action, arn, ours)
            # A rule change touches the rule too (ModifySecurityGroupRules lists it as a required resource).
            for k, v in params.items():
                if re.fullmatch(r"SecurityGroupRule\.\d+\.SecurityGroupRuleId", k):
                    add(action, _ec2_arn(region, "security-group-rule", v), ours)
        for rtype, tags in specs.items():  # tags sent inside a create request: the tag-on-create rule
            add("ec2:CreateTags", _ec2_arn(region, rtype), {"ec2:CreateAction": operation} | _request_tags(tags))
    elif prefix == "iam":
        tags = {
            params[k]: params.get(k[: -len("Key")] + "Value", "")
            for k in params
            if re.fullmatch(r"Tags\.member\.\d+\.Key", k)
        }
        tags |= {t["Key"]: t.get("Value", "") for t in params.get("Tags", []) if isinstance(t, dict)}
        if operation == "CreateServiceLinkedRole":
            add(action, "*", {"iam:AWSServiceName": params.get("AWSServiceName", "")})
        else:
            name = params.get("RoleName")
            profile = params.get("InstanceProfileName")
            arns = [f"arn:aws:iam::{ACCOUNT}:role/{name}"] if name else []
            arns += [f"arn:aws:iam::{ACCOUNT}:instance-profile/{profile}"] if profile else []
            # which managed policy is attached: the policy allows AmazonSSMManagedInstanceCore only
            context = {"iam:PolicyARN": params["PolicyArn"]} if params.get("PolicyArn") else {}
            for arn in arns or ["*"]:
                add(action, arn, context)
            if tags and operation == "CreateRole":
                add("iam:TagRole", arns[0], _request_tags(tags))
            if tags and operation == "CreateInstanceProfile":
                add("iam:TagInstanceProfile", arns[-1], _request_tags(tags))
    elif prefix == "s3":
        bucket, key = params.get("Bucket"), params.get("Key")
        arn = f"arn:aws:s3:::{bucket}/{key}" if bucket and key else f"arn:aws:s3:::{bucket}" if bucket else "*"
        if action == "s3:GetObject" and params.get("VersionId"):
            action = "s3:GetObjectVersion"
        add(action, arn)
    elif prefix == "ssm":
        name = str(params.get("Name", "*")).lstrip("/")
        add(action, f"arn:aws:ssm:{region}::parameter/{name}")
    else:
        add(action, "*")
    return calls


# -- what Terraform called: its debug log (TF_LOG=debug) ---------------------------------
_ENTRY = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", re.M)
_FIELD = re.compile(r'(?:^|\s)([\w.]+)=("(?:[^"\\]|\\.)*"|\S*)')


def _field(entry: str, name: str) -> str | None:
    for m in _FIELD.finditer(entry):
        if m[1] == name:
            v = m[2]
            return json.loads(v) if v.startswith('"') else v
    return None


def _body(entry: str) -> str:
    m = re.search(r'http\.request\.body="((?:[^"\\]|\\.)*)"', entry)
    if m:
        return json.loads(f'"{m[1]}"')
    m = re.search(r"http\.request\.body=\s*\n((?:\s*\|.*\n?)+)", entry)
    if m:
        return "".join(ln.split("|", 1)[1].strip() for ln in m[1].splitlines() if "[truncated" not in ln)
    return ""


@dataclass(frozen=True)
class Observed:
    """One AWS API request: who sent it, to which service and operation, with which parameters."""

    who: str  # "terraform" or "boto3"
    service: str
    operation: str
    params: dict[str, Any]


def terraform_requests(log_text: str) -> Iterator[Observed]:
    """Every request in a Terraform debug log (the provider and the S3 backend both log them)."""
    starts = [m.start() for m in _ENTRY.finditer(log_text)] + [len(log_text)]
    for a, b in zip(starts, starts[1:], strict=False):
        entry = log_text[a:b]
        if "HTTP Request Sent" not in entry:
            continue
        service, op = _field(entry, "rpc.service"), _field(entry, "rpc.method")
        if not service or not op:
            raise AssertionError(f"a request without rpc.service/rpc.method in the Terraform log: {entry[:300]}")
        params: dict[str, Any] = {}
        body = _body(entry)
        if body and "=" in body and not body.lstrip().startswith("{"):
            params = {k: v[0] for k, v in parse_qs(body, keep_blank_values=True).items()}
        url = _field(entry, "http.url") or ""
        if service.lower() == "s3":
            path = unquote(urlparse(url).path).lstrip("/")
            bucket, _, key = path.partition("/")
            params |= {"Bucket": bucket} if bucket else {}
            params |= {"Key": key} if key else {}
            if "versionId=" in urlparse(url).query:
                params["VersionId"] = "?"
        yield Observed("terraform", service, op, params)


def boto3_requests(log_text: str) -> Iterator[Observed]:
    """Every call remotefit made through `Workspace.client` (REMOTEFIT_AWS_CALL_LOG lines)."""
    for line in log_text.splitlines():
        if line.strip():
            d = json.loads(line)
            yield Observed("boto3", d["service"], d["operation"], d.get("params", {}))


def authorizations(observed: Iterable[Observed], region: str) -> list[Call]:
    """Every IAM authorization the observed requests need."""
    out: list[Call] = []
    for o in observed:
        out += calls_for(o.service, o.operation, o.params, region, f"{o.who} {o.service}:{o.operation}")
    return out

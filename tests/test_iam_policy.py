"""docs/iam-policy.json: parliament finds no errors, and the policy allows exactly what remotefit needs.

The end-to-end coverage (every call of a real apply → plan → destroy) is tests/test_e2e_policy_coverage.py;
here, the evaluator itself and the calls the sandbox can never make (they exist only on real AWS).
"""

from __future__ import annotations

import json
import warnings
from typing import Any

import pytest

from tests.iam_policy_check import (
    ACCOUNT,
    Call,
    allowed,
    authorizations,
    calls_for,
    denied,
    load_policy,
    terraform_requests,
)

REGION = "us-east-1"
OURS = {"aws:ResourceTag/managed-by": "remotefit", "aws:ResourceTag/project": "remotefit"}
TAGS = {"aws:RequestTag/managed-by": "remotefit", "aws:RequestTag/owner": "arn:aws:iam::1:user/a"}


@pytest.fixture(scope="module")
def policy() -> dict[str, Any]:
    return load_policy()


def ec2(rtype: str, rid: str = "x") -> str:
    return f"arn:aws:ec2:{REGION}:{ACCOUNT}:{rtype}/{rid}"


# -- parliament ------------------------------------------------------------------------
# Findings in these parliament groups are errors: malformed statements, unknown actions, resource types
# that don't match the action, condition keys the action doesn't support.
ERROR_GROUPS = {"MALFORMED", "INVALID", "ERROR", "BAD_PATTERN"}
# (issue, Sid) parliament reports that are not defects, each with the reason.
ACCEPTED = {
    # parliament wants every *required* resource type of an action in each statement. This statement
    # covers the new rule (tagged at creation) only; the group half of the same call is allowed, on our
    # tagged groups, by ChangeOnlyOurResources. AWS documents this two-statement shape for rule tagging.
    ("RESOURCE_MISMATCH", "NewRulesTaggedAsOurs"),
}


def test_parliament_finds_no_errors() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # parliament imports pkg_resources, which warns
        import parliament
        from parliament import analyze_policy_string

    text = (load_policy.__defaults__[0]).read_text()  # type: ignore[index]
    result = analyze_policy_string(text)
    sids = [s.get("Sid") for s in json.loads(text)["Statement"]]
    errors = []
    for f in result.findings:
        group = parliament.config.get(f.issue, {}).get("group", "")
        if group not in ERROR_GROUPS:
            continue
        line = (f.location or {}).get("line")
        # map the finding's line to its statement's Sid
        sid = None
        if isinstance(line, int):
            starts = [i + 1 for i, ln in enumerate(text.splitlines()) if '"Sid"' in ln]
            before = [k for k, s in enumerate(starts) if s <= line + 1]
            sid = sids[before[-1]] if before else None
        if (f.issue, sid) not in ACCEPTED:
            errors.append(f"{f.issue} in {sid}: {f.detail}")
    assert not errors, errors


# -- the evaluator: what it allows and refuses ------------------------------------------
def test_evaluator_basics(policy: dict[str, Any]) -> None:
    assert allowed(policy, Call("ec2:DescribeInstances", "*"))
    assert allowed(policy, Call("EC2:describeinstances", "*")), "actions match case-insensitively"
    assert not allowed(policy, Call("ec2:CreateVpc", "*"))
    assert not allowed(policy, Call("ec2:TerminateInstances", ec2("instance", "i-1"))), "a foreign instance"
    assert allowed(policy, Call("ec2:TerminateInstances", ec2("instance", "i-1"), OURS))
    with pytest.raises(AssertionError, match="condition operator"):
        allowed(
            {
                "Statement": [
                    {"Effect": "Allow", "Action": "*", "Resource": "*", "Condition": {"NumericLessThan": {"k": 1}}}
                ]
            },
            Call("a:b", "*", {"k": 0}),
        )


def test_security_group_rules_are_tagged_while_created(policy: dict[str, Any]) -> None:
    """Provider 5.x sends the rule's tags inside AuthorizeSecurityGroupIngress (TagSpecification
    security-group-rule): CreateTags is authorized with ec2:CreateAction=AuthorizeSecurityGroupIngress."""
    for op in ("AuthorizeSecurityGroupIngress", "AuthorizeSecurityGroupEgress"):
        tag = Call("ec2:CreateTags", ec2("security-group-rule", "*"), {"ec2:CreateAction": op} | TAGS)
        assert allowed(policy, tag), op
        assert allowed(policy, Call(f"ec2:{op}", ec2("security-group-rule", "*"), TAGS))
        assert allowed(policy, Call(f"ec2:{op}", ec2("security-group", "sg-1"), OURS))
        assert not allowed(policy, Call(f"ec2:{op}", ec2("security-group", "sg-1"))), "a foreign group"


def test_rules_tagged_after_creation_need_our_request_tag(policy: dict[str, Any]) -> None:
    """Providers that tag rules in a separate CreateTags call (no ec2:CreateAction) are allowed on rules
    when the request carries managed-by=remotefit; never on other resource types, never without it."""
    assert allowed(policy, Call("ec2:CreateTags", ec2("security-group-rule", "sgr-1"), TAGS))
    owner_only = {"aws:RequestTag/owner": "arn:aws:iam::1:role/x"}
    assert not allowed(policy, Call("ec2:CreateTags", ec2("security-group-rule", "sgr-1"), owner_only))
    assert not allowed(policy, Call("ec2:CreateTags", ec2("instance", "i-1"), TAGS | OURS)), "no retagging"


def test_rule_updates_and_spot_cancel_and_customer_keys(policy: dict[str, Any]) -> None:
    for res in (ec2("security-group", "sg-1"), ec2("security-group-rule", "sgr-1")):
        assert allowed(policy, Call("ec2:ModifySecurityGroupRules", res, OURS))
        assert not allowed(policy, Call("ec2:ModifySecurityGroupRules", res))
    assert allowed(policy, Call("ec2:CancelSpotInstanceRequests", ec2("spot-instances-request", "sir-1")))
    key = f"arn:aws:kms:{REGION}:{ACCOUNT}:key/k"
    via = {"kms:ViaService": f"ec2.{REGION}.amazonaws.com"}
    for action in ("kms:GenerateDataKeyWithoutPlaintext", "kms:Decrypt", "kms:DescribeKey"):
        assert allowed(policy, Call(action, key, via))
        assert not allowed(policy, Call(action, key)), f"{action} only through EC2"
        assert not allowed(policy, Call(action, key, {"kms:ViaService": f"s3.{REGION}.amazonaws.com"}))
    assert allowed(policy, Call("kms:CreateGrant", key, via | {"kms:GrantIsForAWSResource": "true"}))
    assert not allowed(policy, Call("kms:CreateGrant", key, via))
    assert not allowed(policy, Call("kms:Encrypt", key, via))


def test_the_node_role_goes_to_ec2_only(policy: dict[str, Any]) -> None:
    role = f"arn:aws:iam::{ACCOUNT}:role/remotefit-dev-2025"
    assert allowed(policy, Call("iam:PassRole", role, {"iam:PassedToService": "ec2.amazonaws.com"}))
    assert not allowed(policy, Call("iam:PassRole", role, {"iam:PassedToService": "lambda.amazonaws.com"}))
    assert not allowed(
        policy, Call("iam:PassRole", f"arn:aws:iam::{ACCOUNT}:role/admin", {"iam:PassedToService": "ec2.amazonaws.com"})
    )
    # its one inline policy (the stage's prefix of the runs bucket), on our roles only
    assert allowed(policy, Call("iam:PutRolePolicy", role))
    assert not allowed(policy, Call("iam:PutRolePolicy", f"arn:aws:iam::{ACCOUNT}:role/admin"))
    # the one managed policy it gets is SSM's: attaching anything else (AdministratorAccess) is denied
    ssm = {"iam:PolicyARN": "arn:aws:iam::aws:policy/AmazonSSMManagedInstanceCore"}
    admin = {"iam:PolicyARN": "arn:aws:iam::aws:policy/AdministratorAccess"}
    for action in ("iam:AttachRolePolicy", "iam:DetachRolePolicy"):
        assert allowed(policy, Call(action, role, ssm))
        assert not allowed(policy, Call(action, role, admin)) and not allowed(policy, Call(action, role))


# Calls only real AWS sees (the sandbox has no SSM public parameters, Service Quotas, placement groups,
# spot service-linked role or KMS): checked here, as remotefit and the provider make them.
AWS_ONLY = [
    (
        "ssm",
        "GetParameter",
        {"Name": "/aws/service/canonical/ubuntu/server/24.04/stable/current/amd64/hvm/ebs-gp3/ami-id"},
    ),
    (
        "ssm",
        "GetParameter",
        {"Name": "/aws/service/deeplearning/ami/x86_64/oss-nvidia-driver-gpu-pytorch-2.9-ubuntu-24.04/latest/ami-id"},
    ),
    ("servicequotas", "GetServiceQuota", {}),
    ("servicequotas", "GetAWSDefaultServiceQuota", {}),
    ("iam", "CreateServiceLinkedRole", {"AWSServiceName": "spot.amazonaws.com"}),
    (
        "EC2",
        "CreatePlacementGroup",
        {
            "GroupName": "remotefit-dev-cluster",
            "TagSpecification.1.ResourceType": "placement-group",
            "TagSpecification.1.Tag.1.Key": "managed-by",
            "TagSpecification.1.Tag.1.Value": "remotefit",
        },
    ),
    ("EC2", "DescribePlacementGroups", {}),
    ("EC2", "DeletePlacementGroup", {"GroupName": "remotefit-dev-cluster"}),
]


def test_calls_made_only_on_real_aws_are_allowed(policy: dict[str, Any]) -> None:
    calls = [c for svc, op, params in AWS_ONLY for c in calls_for(svc, op, params, REGION, f"aws-only {op}")]
    assert not denied(policy, calls)
    other = calls_for("iam", "CreateServiceLinkedRole", {"AWSServiceName": "ec2scheduled.amazonaws.com"}, REGION, "x")
    assert denied(policy, other)


# -- the log parser: a real provider request, and a call the policy does not allow -------
TF_LOG = """\
2026-12-01T06:20:16.101Z [DEBUG] provider.terraform-provider-aws_v5.100.0_x5: HTTP Request Sent: http.url=http://127.0.0.1:1/ rpc.method=AuthorizeSecurityGroupIngress rpc.service=EC2 http.method=POST
  http.request.body=
  | Action=AuthorizeSecurityGroupIngress&GroupId=sg-0abc&IpPermissions.1.FromPort=22&IpPermissions.1.IpProtocol=tcp&IpPermissions.1.IpRanges.1.CidrIp=203.0.113.7%2F32&IpPermissions.1.ToPort=22&TagSpecification.1.ResourceType=security-group-rule&TagSpecification.1.Tag.1.Key=managed-by&TagSpecification.1.Tag.1.Value=remotefit&TagSpecification.1.Tag.2.Key=owner&TagSpecification.1.Tag.2.Value=arn%3Aaws%3Aiam%3A%3A1%3Auser%2Fa&Version=2016-11-15
   tf_rpc=ApplyResourceChange aws.region=us-east-1
2026-12-01T06:20:16.200Z [DEBUG] backend-s3: HTTP Request Sent: aws.region=us-east-1 rpc.method=HeadObject rpc.service=S3 http.method=HEAD http.url=http://127.0.0.1:1/remotefit-test-state/remotefit/test/terraform.tfstate http.request.body=""
2026-12-01T06:20:17.000Z [DEBUG] provider.terraform-provider-aws_v5.100.0_x5: HTTP Request Sent: rpc.service=EC2 rpc.method=CreateVpc http.url=http://127.0.0.1:1/ http.request.body="Action=CreateVpc&CidrBlock=10.0.0.0%2F16&Version=2016-11-15"
"""


def test_terraform_log_requests_become_authorizations(policy: dict[str, Any]) -> None:
    obs = list(terraform_requests(TF_LOG))
    assert [(o.service, o.operation) for o in obs] == [
        ("EC2", "AuthorizeSecurityGroupIngress"),
        ("S3", "HeadObject"),
        ("EC2", "CreateVpc"),
    ]
    assert obs[0].params["TagSpecification.1.ResourceType"] == "security-group-rule"
    assert obs[1].params == {"Bucket": "remotefit-test-state", "Key": "remotefit/test/terraform.tfstate"}
    calls = authorizations(obs, REGION)
    tag = next(c for c in calls if c.action == "ec2:CreateTags")
    assert tag.context["ec2:CreateAction"] == "AuthorizeSecurityGroupIngress"
    assert tag.resource.endswith(":security-group-rule/*")
    bucket_policy = json.loads(
        json.dumps(policy)
        .replace("YOUR-TF-STATE-BUCKET", "remotefit-test-state")
        .replace("YOUR-RUNS-BUCKET", "remotefit-test-state-runs")
    )
    # the new call is refused and named; everything else is allowed
    assert denied(bucket_policy, calls) == ["ec2:CreateVpc on * (from terraform EC2:CreateVpc)"]

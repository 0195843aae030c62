"""The sandbox's moto fixes (remotefit/sandbox_moto.py): each restores what AWS answers, checked against
moto with and without the fix. Run in a child process so the patched classes never leak into other tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = """
import json, sys
import boto3
from moto import mock_aws
sys.path.insert(0, {root!r})
if {fixed}:
    from remotefit.sandbox_moto import apply_fixes
    apply_fixes()
out = {{}}
with mock_aws():
    ec2 = boto3.client("ec2", region_name="us-east-1")
    sg = ec2.create_security_group(GroupName="g", Description="d")["GroupId"]
    other = ec2.create_security_group(GroupName="h", Description="d")["GroupId"]
    subnet = ec2.describe_subnets()["Subnets"][0]["SubnetId"]
    image = ec2.describe_images()["Images"][0]["ImageId"]
    iid = ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1, SubnetId=subnet, SecurityGroupIds=[sg])["Instances"][0]["InstanceId"]
    # what the AWS provider sends right after every launch
    ec2.modify_instance_attribute(InstanceId=iid, InstanceInitiatedShutdownBehavior={{"Value": "terminate"}})
    inst = ec2.describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"][0]
    out["groups"] = [g["GroupId"] == sg for g in inst["SecurityGroups"]]
    out["shutdown"] = ec2.describe_instance_attribute(InstanceId=iid, Attribute="instanceInitiatedShutdownBehavior")["InstanceInitiatedShutdownBehavior"]["Value"]
    ec2.modify_instance_attribute(InstanceId=iid, Groups=[other])  # a real group change still works
    inst = ec2.describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"][0]
    out["changed"] = [g["GroupId"] == other for g in inst["SecurityGroups"]]
    ec2.authorize_security_group_ingress(GroupId=sg, IpPermissions=[{{"IpProtocol": "-1", "UserIdGroupPairs": [{{"GroupId": sg, "Description": "between nodes"}}]}}])
    rules = ec2.describe_security_group_rules(Filters=[{{"Name": "group-id", "Values": [sg]}}])["SecurityGroupRules"]
    out["rule"] = [r.get("Description") for r in rules if r.get("ReferencedGroupInfo")]
print(json.dumps(out))
"""


def run(fixed: bool) -> dict[str, object]:
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    env.pop("AWS_PROFILE", None)
    res = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(root=str(ROOT), fixed=fixed)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=True,
    )
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_moto_fixes_restore_what_aws_answers() -> None:
    fixed = run(True)
    assert fixed == {"groups": [True], "shutdown": "terminate", "changed": [True], "rule": ["between nodes"]}
    # Without the fixes moto differs from AWS: if these gaps close upstream, the fixes can go.
    bare = run(False)
    assert bare["groups"] == [] and bare["shutdown"] == "stop" and bare["rule"] == [None], bare


def test_a_held_server_answers_503_until_the_replay_says_ready() -> None:
    """RestoreGate: while held, a node's client gets 503 + Retry-After (every SDK retries it); the replay's
    requests (RESTORE_HEADER) and moto's control calls pass; READY_PATH opens the gate for everyone."""
    from remotefit.sandbox_moto import READY_PATH, RestoreGate

    def app(environ: dict, start_response) -> list[bytes]:  # noqa: ANN001 - WSGI
        start_response("200 OK", [])
        return [b"moto"]

    def call(gate: RestoreGate, path: str = "/", **headers: str) -> tuple[str, bytes]:
        seen: list[str] = []
        body = b"".join(gate({"PATH_INFO": path, **headers}, lambda status, _h: seen.append(status)))
        return seen[0], body

    held = RestoreGate(app, hold=True)
    assert call(held)[0].startswith("503")
    assert call(held, HTTP_X_REMOTEFIT_SANDBOX="restore") == ("200 OK", b"moto")
    assert call(held, "/moto-api/reset") == ("200 OK", b"moto")
    assert call(held, READY_PATH) == ("200 OK", b"ready")
    assert call(held) == ("200 OK", b"moto")
    assert call(RestoreGate(app, hold=False)) == ("200 OK", b"moto")

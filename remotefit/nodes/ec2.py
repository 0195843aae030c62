"""EC2's own view of the nodes: DescribeInstances for the instance ids we know, asked by the inventory
rebuild, apply, status, start and spot recovery alike."""

from __future__ import annotations

from typing import Any

from remotefit.errors import UserError
from remotefit.workspace import Workspace


def describe_instances(ws: Workspace, ids: list[str]) -> list[dict[str, Any]]:
    """DescribeInstances for our ids; an id that is gone is skipped, any other error is one line
    (a node must never show as "gone" just because the credentials expired)."""
    if not ids:
        return []
    from botocore.exceptions import BotoCoreError, ClientError

    def gone(exc: ClientError) -> bool:
        return exc.response.get("Error", {}).get("Code", "").startswith("InvalidInstanceID")

    ec2 = ws.client("ec2")
    try:
        try:
            res = ec2.describe_instances(InstanceIds=ids)
        except ClientError as exc:
            if not gone(exc):
                raise
            # One id already gone makes the batch call fail; ask one by one.
            out = []
            for i in ids:
                try:
                    out += [x for r in ec2.describe_instances(InstanceIds=[i])["Reservations"] for x in r["Instances"]]
                except ClientError as one:
                    if not gone(one):
                        raise
            return out
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "?")
        raise UserError(f"cannot describe the nodes ({code}): check your credentials (`inv check`)") from None
    except BotoCoreError as exc:
        raise UserError(f"cannot describe the nodes: {exc}; check your credentials (`inv check`)") from None
    return [i for r in res["Reservations"] for i in r["Instances"]]

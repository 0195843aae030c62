"""The running nodes: `inv status` (rows, lines and the table), why a node does not answer, picking one,
stop/start, an interactive ssh, garbage collection of orphans (`gc`), and spot interruptions on demand
on the sandbox (`interrupt`)."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime

from remotefit import cost
from remotefit.errors import UserError
from remotefit.inventory import inventory, require_nodes
from remotefit.keys import public_key
from remotefit.nodes.ec2 import describe_instances
from remotefit.nodes.provision import node_rate
from remotefit.nodes.ready import wait_ready
from remotefit.nodes.terraform_dir import (
    inventory_is_stale,
    load_node_vars,
    rebuild_inventory,
    state_if_any,
    state_resource_count,
    write_inventory,
)
from remotefit.proc import run
from remotefit.ssh import Node, ssh_argv, ssh_close_argv
from remotefit.table import table
from remotefit.workspace import Workspace


# -- status -----------------------------------------------------------------------------
def unreachable_hint(n: Node, state: str | None) -> str:
    """One line for a node that did not answer ssh: which node, its EC2 state, and the fix."""
    who = f"{n.alias} ({n.instance_id})"
    if state in ("stopped", "stopping"):
        return f"{who} is {state}: run `inv start`"
    if state in ("terminated", "shutting-down"):
        return (
            f"{who} is {state} (its deadline, the idle watchdog or a spot interruption?): run `inv apply` for a new one"
        )
    if state is None:
        return f"{who} no longer exists in EC2: run `inv apply` for a new one"
    if state == "pending":
        return f"{who} is still starting: wait a minute and retry (`inv status`)"
    return (
        f"{who} is {state} but does not answer ssh at {n.host}:{n.port}: check `inv status`, your network, "
        "and that your IP is the one allowed in (`inv apply --allow-cidr`)"
    )


def explain_unreachable(ws: Workspace, n: Node) -> str:
    """unreachable_hint with the node's state asked from EC2 (or why it could not be asked)."""
    try:
        described = describe_instances(ws, [n.instance_id])
    except UserError as exc:
        return f"{n.alias} ({n.instance_id}) does not answer ssh, and EC2 could not be asked: {exc}"
    state = described[0].get("State", {}).get("Name") if described else None
    return unreachable_hint(n, state)


def status_rows(ws: Workspace, now: datetime | None = None) -> list[dict[str, str]]:
    """One row per node of the stage (the inventory, rebuilt when the state is newer): its EC2 state,
    addresses, uptime, cost so far and time to the deadline."""
    now = now or datetime.now(UTC)
    nodes = inventory(ws)
    got = state_if_any(ws)
    if got and inventory_is_stale(ws, got[1]):
        nodes = rebuild_inventory(ws, got[0]) or nodes
    saved = load_node_vars(ws) or {}
    described = {i["InstanceId"]: i for i in describe_instances(ws, [n.instance_id for n in nodes])}
    rows = []
    for n in nodes:
        d = described.get(n.instance_id, {})
        state = d.get("State", {}).get("Name", "gone")
        launched = d.get("LaunchTime") or datetime.fromisoformat(n.launch_time)
        hours = (now - launched).total_seconds() / 3600
        az = d.get("Placement", {}).get("AvailabilityZone")
        price = node_rate(ws, n, float(saved.get("disk_gb", 0)), az) if state == "running" else None
        so_far = cost.cost_so_far(price, launched, now, 1) if price is not None else None
        left = float(saved.get("max_hours", 0)) - hours
        rows.append(
            {
                "node": n.alias,
                "id": n.instance_id,
                "state": state,
                "type": n.instance_type,
                "market": n.market,
                "address": f"{n.host}:{n.port}",
                "private": n.private_ip,
                "uptime": f"{hours * 60:.0f} min" if hours < 2 else f"{hours:.1f} h",
                "cost so far": cost.format_usd(so_far) if so_far is not None else "-",
                "deadline in": f"{max(left, 0):.1f} h" if state == "running" else "-",
            }
        )
    return rows


def status_lines(ws: Workspace) -> list[str]:
    """`inv status`: the nodes' table, or what the state still holds when no node is there."""
    rows = status_rows(ws)
    if rows:
        return status_table(rows)
    got = state_if_any(ws)
    held = state_resource_count(ws, got) if got else 0
    if held:
        return [
            f"no nodes for stage {ws.stage}, but its state holds {held} resource(s) (an interrupted apply?): "
            "`inv destroy` removes them, `inv apply` completes them"
        ]
    return [f"no nodes for stage {ws.stage} (run `inv apply`)"]


def status_table(rows: list[dict[str, str]]) -> list[str]:
    """`status_rows` as a table (no lines for no rows)."""
    if not rows:
        return []
    cols = list(rows[0])
    return table([[r[c] for c in cols] for r in rows], cols)


# -- ssh / stop / start -----------------------------------------------------------------
def pick_node(ws: Workspace, index: int) -> Node:
    nodes = require_nodes(ws)
    if not 0 <= index < len(nodes):
        raise UserError(f"--node {index} does not exist: stage {ws.stage} has nodes 0..{len(nodes) - 1}")
    return nodes[index]


def stop(ws: Workspace) -> list[str]:
    nodes = require_nodes(ws)
    if any(n.market == "spot" for n in nodes):
        raise UserError("spot nodes cannot be stopped (one-time spot requests only terminate): use `inv destroy`")
    ws.client("ec2").stop_instances(InstanceIds=[n.instance_id for n in nodes])
    for n in nodes:
        run(ssh_close_argv(ws.paths.ssh_config, n.alias), capture=True, check=False)
    ws.forget_unreached(set(), keep_disks=True)
    saved = load_node_vars(ws) or {}
    return [
        f"stopped {len(nodes)} node(s); compute billing stops",
        cost.stopped_cost_note(float(saved.get("disk_gb", 50)), len(nodes)),
        "note: the hard deadline still counts from the first boot; a node started after it, or left idle "
        "after `inv start`, terminates itself and its disk goes with it",
    ]


def start(ws: Workspace) -> list[Node]:
    nodes = require_nodes(ws)
    ec2 = ws.client("ec2")
    ec2.start_instances(InstanceIds=[n.instance_id for n in nodes])
    ec2.get_waiter("instance_running").wait(
        InstanceIds=[n.instance_id for n in nodes], WaiterConfig={"Delay": 2, "MaxAttempts": 150}
    )
    described = {i["InstanceId"]: i for i in describe_instances(ws, [n.instance_id for n in nodes])}
    pub = public_key(ws.paths.generated, ws.stage)
    saved = load_node_vars(ws) or {}
    fresh = []
    for n in nodes:
        ip = described.get(n.instance_id, {}).get("PublicIpAddress", "")  # a started node gets a new address
        reach = ws.reach_node(n.instance_id, ip, n.user, pub, saved)
        fresh.append(replace(n, host=reach.host, port=reach.port))
    write_inventory(ws, fresh)
    wait_ready(ws, fresh)
    return fresh


def ssh_interactive(ws: Workspace, index: int) -> int:
    n = pick_node(ws, index)
    from remotefit.proc import interactive

    return interactive(ssh_argv(ws.paths.ssh_config, n.alias, tty=True))


# -- gc ---------------------------------------------------------------------------------
def known_instance_ids(ws: Workspace) -> set[str]:
    """Instance ids that some remotefit state file in the bucket knows about (every stage)."""
    s3 = ws.client("s3")
    ids: set[str] = set()
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=ws.settings.TF_STATE_BUCKET, Prefix="remotefit/")
    for page in pages:
        for obj in page.get("Contents", []):
            if not obj["Key"].endswith(".tfstate"):
                continue
            state = json.loads(s3.get_object(Bucket=ws.settings.TF_STATE_BUCKET, Key=obj["Key"])["Body"].read())
            for res in state.get("resources", []):
                if res.get("type") == "aws_instance":
                    ids |= {inst["attributes"]["id"] for inst in res.get("instances", [])}
    return ids


def gc(ws: Workspace, yes: bool = False, min_age_minutes: float = 10.0) -> list[str]:
    """List (and with yes, terminate) remotefit-tagged instances that no state knows about.

    Instances younger than `min_age_minutes` are left alone: a concurrent apply may not have
    written them into its state yet."""
    known = known_instance_ids(ws)
    now = datetime.now(UTC)
    regions = [r["RegionName"] for r in ws.client("ec2").describe_regions()["Regions"]]
    lines = []
    for region in regions:
        ec2 = ws.client("ec2", region=region)
        orphans = [
            i
            for r in ec2.describe_instances(Filters=[{"Name": "tag:project", "Values": ["remotefit"]}])["Reservations"]
            for i in r["Instances"]
            if i["State"]["Name"] not in ("terminated", "shutting-down")
            and i["InstanceId"] not in known
            and (now - i["LaunchTime"]).total_seconds() >= min_age_minutes * 60
        ]
        for i in orphans:
            tags = {t["Key"]: t["Value"] for t in i.get("Tags", [])}
            lines.append(
                f"{region}: orphan {i['InstanceId']} ({i['InstanceType']}, stage {tags.get('stage', '?')}, launched {i['LaunchTime']:%Y-%m-%d %H:%M})"
            )
        if orphans and yes:
            ec2.terminate_instances(InstanceIds=[i["InstanceId"] for i in orphans])
            lines.append(f"{region}: terminated {len(orphans)} orphan(s)")
    if not lines:
        lines.append("no orphans: every remotefit-tagged instance belongs to a known state")
    elif not yes:
        lines.append("run `inv gc --yes` to terminate them")
    return lines


# -- sandbox: spot interruptions on demand ----------------------------------------------------
def interrupt(ws: Workspace, index: int, seconds: float) -> list[str]:
    """`inv sandbox.interrupt`: a spot interruption of one sandbox node, as AWS delivers it: the notice on
    the node's metadata service now, the instance (and its disk) gone `seconds` later."""
    if not ws.settings.is_sandbox:
        raise UserError(
            "`inv sandbox.interrupt` works on the sandbox only; on AWS the interruptions come from AWS "
            "(to rehearse one, AWS FIS's aws:ec2:send-spot-instance-interruptions action)"
        )
    if seconds < 0:
        raise UserError(f"--in {seconds:g}: give the seconds from the notice to the end, 0 or more (AWS: 120)")
    nodes = require_nodes(ws)
    if not 0 <= index < len(nodes):
        raise UserError(f"--node {index}: stage {ws.stage} has nodes 0..{len(nodes) - 1}")
    n = nodes[index]
    if n.market != "spot":
        raise UserError(
            f"{n.alias} is an on-demand node: only spot nodes get interruption notices (`inv apply --spot`)"
        )
    when = ws.sandbox.interrupt(n.instance_id, seconds, str(ws.endpoint), ws.settings.AWS_REGION)
    return [
        f"{n.alias}: spot interruption notice posted (terminate at {when}); the running job gets SIGTERM within "
        f"5 s, and the instance and its disk are gone in {seconds:g} s"
    ]

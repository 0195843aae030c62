"""What the nodes' Terraform runs read and leave behind, beside the stack in generated/terraform:

- the node variables (`node_variables`: the tfvars beyond the seed's name/region/environment), the last
  applied ones (generated/node_vars.json, so every later run sees the same values) and the AMI pins
  (generated/ami_pins.json, so "latest" moving never replaces a node);
- the stage's Terraform state, read from the bucket without a terraform process (`read_state`), and what
  it holds (`state_instances`);
- the local records rebuilt from it: generated/nodes.json and generated/ssh_config (`write_inventory`,
  `rebuild_inventory`).
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from remotefit import preflight, stack
from remotefit.errors import UserError
from remotefit.inventory import inventory, inventory_file
from remotefit.keys import ensure_key, public_key
from remotefit.nodes.ec2 import describe_instances
from remotefit.nodes.spec import NodeSpec, resolve_spec
from remotefit.proc import atomic_write, echo
from remotefit.ssh import Node, alias, ssh_config_text
from remotefit.workspace import Workspace


# -- node variables: computed, saved, pinned ------------------------------------------------
def node_vars_file(ws: Workspace) -> Path:
    return ws.paths.generated / "node_vars.json"


def load_node_vars(ws: Workspace) -> dict[str, Any] | None:
    try:
        return json.loads(node_vars_file(ws).read_text())
    except (OSError, ValueError):
        return None


def save_node_vars(ws: Workspace, values: dict[str, Any]) -> None:
    """Keep the node variables of an apply: what every later plan and destroy runs with."""
    atomic_write(node_vars_file(ws), json.dumps(values, indent=2))


def _pinned_ami(ws: Workspace, profile: str, refresh: bool) -> dict[str, str]:
    """Resolve the AMI once per region and profile and keep it, so "latest" moving never replaces a node."""
    pins_file = ws.paths.generated / "ami_pins.json"
    try:
        pins = json.loads(pins_file.read_text())
    except (OSError, ValueError):
        pins = {}
    key = f"{ws.settings.AWS_REGION}/{profile}/{ws.endpoint or 'aws'}"
    resolver = ws.ami_resolver()
    expected = resolver.source(profile)
    if refresh or key not in pins or (expected and pins[key].get("source") != expected):
        if key in pins and not refresh:
            echo(f"apply: the {profile} image setting changed ({pins[key].get('source')} -> {expected}); resolving it")
        ami = resolver.resolve(profile)
        pins[key] = {"id": ami.id, "ssh_user": ami.ssh_user, "python": ami.python, "source": ami.source}
        atomic_write(pins_file, json.dumps(pins, indent=2))
    return pins[key]


def pinned_ami_python(ws: Workspace, saved: dict[str, Any]) -> str:
    """The Python of the pinned AMI that the saved node variables use ("python3" when unknown)."""
    try:
        pins = json.loads((ws.paths.generated / "ami_pins.json").read_text())
    except (OSError, ValueError):
        return "python3"
    for pin in pins.values():
        if pin["id"] == saved.get("ami_id"):
            return str(pin["python"])
    return "python3"


def node_variables(
    ws: Workspace, spec: NodeSpec, az: str, instance_type: str, market: str, refresh_ami: bool = False
) -> dict[str, Any]:
    """The tfvars for the nodes (everything beyond the seed's name/region/environment)."""
    ami = _pinned_ami(ws, spec.profile, refresh_ami)
    return {
        "owner": _owner(ws),
        # A default subnet that gives no public address on launch needs one asked for at launch.
        "request_public_ip": not ws.default_subnets().get(az, True),
        "node_count": spec.nodes,
        "instance_type": instance_type,
        "market": market,
        "ami_id": ami["id"],
        "availability_zone": az,
        "allow_cidr": ws.caller_cidr(spec.allow_cidr, spec.i_know),
        "allow_world_ssh": spec.i_know,
        "public_key": public_key(ws.paths.generated, ws.stage),
        "disk_gb": spec.disk_gb,
        "max_hours": spec.max_hours,
        "idle_minutes": spec.idle_minutes,
        "ssh_user": ami["ssh_user"],
        # moto does not implement placement groups; real AWS gets one for several nodes of a type that
        # supports cluster placement (burstable T and *-flex types do not).
        "data_buckets": list(spec.data_buckets),
        "cluster_placement": spec.nodes > 1 and ws.supports("placement_groups") and cluster_capable(instance_type),
    }


def cluster_capable(instance_type: str) -> bool:
    family = instance_type.split(".", 1)[0]
    return not family.startswith("t") and not instance_type.endswith("-flex") and "flex" not in family


def _owner(ws: Workspace) -> str:
    """The owner tag, pinned once per stage: what the state's resources already carry, else what the last
    apply used, else the caller without its role-session name. An apply by a teammate or from a new role
    session then never retags every resource (which the IAM policy would refuse anyway)."""
    pinned = _state_owner(ws) or (load_node_vars(ws) or {}).get("owner")
    return str(pinned) if pinned else stable_identity(ws.caller_identity()["Arn"])


def stable_identity(arn: str) -> str:
    """`arn:aws:sts::1:assumed-role/Role/session` -> `arn:aws:iam::1:role/Role`: the session part changes at
    every login, the role does not. Any other ARN is kept as it is."""
    m = re.fullmatch(r"arn:([\w-]+):sts::(\d+):assumed-role/([^/]+)/[^/]+", arn)
    return f"arn:{m[1]}:iam::{m[2]}:role/{m[3]}" if m else arn


def _state_owner(ws: Workspace) -> str | None:
    """The owner tag recorded on this stage's resources in the state, if any."""
    try:
        state = (read_state(ws) or ({}, None))[0]
    except UserError:
        return None
    for res in state.get("resources", []):
        for inst in res.get("instances", []) if res.get("mode") == "managed" else []:
            owner = ((inst.get("attributes") or {}).get("tags_all") or {}).get("owner")
            if owner:
                return str(owner)
    return None


def current_placement(ws: Workspace) -> preflight.Candidate | None:
    """(type, market, AZ) of the nodes this stage runs now, or None when none run."""
    saved = load_node_vars(ws)
    if not saved or not inventory(ws):
        return None
    try:
        return preflight.Candidate(saved["instance_type"], saved["market"], saved["availability_zone"])
    except KeyError:
        return None


def default_az(ws: Workspace, instance_type: str) -> str:
    """The AZ a plan or `inv tfvars` shows: the running nodes' own, else the first with a default subnet."""
    offered = preflight.azs_offering(ws.client("ec2"), instance_type)
    zones = preflight.azs_with_default_subnet(
        {instance_type: offered}, ws.default_subnets(), instance_type, ws.settings.AWS_REGION
    )[instance_type]
    current = current_placement(ws)
    return current.az if current and current.az in zones else zones[0]


def planned_node_variables(ws: Workspace, spec: NodeSpec | None = None) -> dict[str, Any]:
    """The node variables `inv tfvars` and `inv plan` write (through `stack.write_tfvars`): those of `spec`
    in its default AZ; without a spec, those of the last applied nodes, else the defaults'."""
    if spec is None:
        saved = load_node_vars(ws)
        if saved:
            return saved | {"public_key": public_key(ws.paths.generated, ws.stage)}
        spec = resolve_spec(ws)
    return node_variables(ws, spec, default_az(ws, spec.instance_type), spec.instance_type, spec.market)


def refresh_tfvars(ws: Workspace) -> Path | None:
    """Rewrite tfvars from the saved node variables (the sandbox endpoint may have moved)."""
    saved = load_node_vars(ws)
    return stack.write_tfvars(ws, saved) if saved else None


# -- the state ----------------------------------------------------------------------------
def read_state(ws: Workspace) -> tuple[dict[str, Any], datetime] | None:
    """The stage's Terraform state and when it was last written, read from the bucket (no terraform
    process); None when the stage has no state yet. The state is the truth about what exists."""
    from botocore.exceptions import BotoCoreError, ClientError

    key = stack.state_key(ws.stage)
    try:
        obj = ws.client("s3").get_object(Bucket=ws.settings.TF_STATE_BUCKET, Key=key)
        body = obj["Body"].read()
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound", "NoSuchBucket"):
            return None
        raise UserError(
            f"cannot read the state of stage {ws.stage} from {ws.settings.TF_STATE_BUCKET}: {exc}"
        ) from None
    except BotoCoreError as exc:
        raise UserError(f"cannot read the state of stage {ws.stage}: {exc}; check `inv check`") from None
    try:
        state = json.loads(body or b"{}")
    except ValueError:
        raise UserError(
            f"the state s3://{ws.settings.TF_STATE_BUCKET}/{key} is not JSON; "
            "restore an earlier version (the bucket is versioned)"
        ) from None
    return state, obj["LastModified"]


def state_if_any(ws: Workspace) -> tuple[dict[str, Any], datetime] | None:
    """read_state, except on a sandbox that never ran (no server, nothing recorded): there is no
    state to read, and starting a server just to find that out would leave one running."""
    if ws.settings.is_sandbox and ws.sandbox.server() is None and not ws.sandbox.recording.exists():
        return None
    return read_state(ws)


def state_resource_count(ws: Workspace, got: tuple[dict[str, Any], datetime] | None = None) -> int:
    """Managed resource instances in the stage's state (read now unless given)."""
    state = (got or read_state(ws) or ({}, None))[0]
    return sum(len(r.get("instances", [])) for r in state.get("resources", []) if r.get("mode") == "managed")


def _state_resource(state: dict[str, Any], rtype: str, name: str = "node") -> list[dict[str, Any]]:
    """(attributes + index) of every instance of one managed resource in a state."""
    out = []
    for r in state.get("resources", []):
        if r.get("mode") == "managed" and r.get("type") == rtype and r.get("name") == name:
            for inst in r.get("instances", []):
                out.append({**inst.get("attributes", {}), "_index": inst.get("index_key", 0)})
    return sorted(out, key=lambda a: a["_index"] if isinstance(a["_index"], int) else 0)


def state_instances(state: dict[str, Any]) -> list[dict[str, Any]]:
    """The nodes a state holds (even one an interrupted apply wrote before its outputs)."""
    return [
        {
            "index": a["_index"] if isinstance(a["_index"], int) else i,
            "id": a.get("id", ""),
            "public_ip": a.get("public_ip") or "",
            "private_ip": a.get("private_ip") or "",
            "instance_type": a.get("instance_type", ""),
            "availability_zone": a.get("availability_zone", ""),
            "ami": a.get("ami", ""),
            "market": "spot" if a.get("instance_market_options") else "on-demand",
        }
        for i, a in enumerate(_state_resource(state, "aws_instance"))
        if a.get("id")
    ]


def destroy_variables(ws: Workspace, state: dict[str, Any]) -> dict[str, Any]:
    """Node variables for `terraform destroy` when node_vars.json is lost: what the state says the
    nodes are, defaults for the rest (destroy removes what the state holds, whatever the values)."""
    spec = resolve_spec(ws)
    insts = state_instances(state)
    first = insts[0] if insts else {}
    keys = _state_resource(state, "aws_key_pair")
    ssh_user = (state.get("outputs", {}).get("ssh_user") or {}).get("value") or "ubuntu"
    ami = first.get("ami") or ""
    return {
        "owner": _owner(ws),
        "node_count": max(len(insts), 1),
        "instance_type": first.get("instance_type") or spec.instance_type,
        "market": first.get("market") or spec.market,
        "ami_id": ami if ami.startswith("ami-") else "ami-00000000",
        "availability_zone": first.get("availability_zone") or default_az(ws, spec.instance_type),
        "allow_cidr": "127.0.0.1/32",  # any valid value: the rule is destroyed, not changed
        "allow_world_ssh": False,
        "public_key": (keys[0].get("public_key") if keys else None) or public_key(ws.paths.generated, ws.stage),
        "disk_gb": spec.disk_gb,
        "max_hours": spec.max_hours,
        "idle_minutes": spec.idle_minutes,
        "ssh_user": ssh_user,
        "cluster_placement": bool(_state_resource(state, "aws_placement_group", "cluster")),
    }


# -- local records: nodes.json and ssh_config ------------------------------------------------
def write_inventory(ws: Workspace, nodes: list[Node]) -> None:
    atomic_write(inventory_file(ws), json.dumps({"stage": ws.stage, "nodes": [n.to_dict() for n in nodes]}, indent=2))
    key = ensure_key(ws.paths.generated, ws.stage)
    atomic_write(ws.paths.ssh_config, ssh_config_text(nodes, key, ws.paths.generated / "known_hosts"), mode=0o600)


def rebuild_inventory(ws: Workspace, state: dict[str, Any] | None = None) -> list[Node]:
    """Rebuild nodes.json and ssh_config from the state (local files lost, emptied or older than the
    state, e.g. after an interrupted apply). Nodes that are not running keep their EC2 address."""
    if state is None:
        got = state_if_any(ws)
        state = got[0] if got else {}
    insts = state_instances(state)
    if not insts:
        return []
    described = {i["InstanceId"]: i for i in describe_instances(ws, [i["id"] for i in insts])}
    ssh_user = (state.get("outputs", {}).get("ssh_user") or {}).get("value") or "ubuntu"
    saved = load_node_vars(ws) or {}
    python = pinned_ami_python(ws, saved)
    nodes = []
    for inst in insts:
        d = described.get(inst["id"])
        if d is None:
            continue  # terminated and gone: nothing to reach
        running = d.get("State", {}).get("Name") == "running"
        ip = d.get("PublicIpAddress") or inst["public_ip"]
        if running:
            reach = ws.reach_node(inst["id"], ip, ssh_user, public_key(ws.paths.generated, ws.stage), saved)
            host, port, user, workdir = reach.host, reach.port, reach.user, reach.workdir
            private, py = reach.private_host or inst["private_ip"], reach.python or python
        else:
            host, port, user, workdir = ip, 22, ssh_user, f"/home/{ssh_user}/remotefit"
            private, py = inst["private_ip"], python
        launch = d.get("LaunchTime")
        nodes.append(
            Node(
                index=inst["index"],
                alias=alias(ws.stage, inst["index"]),
                instance_id=inst["id"],
                host=host,
                port=port,
                user=user,
                private_ip=private,
                workdir=workdir,
                python=py,
                instance_type=inst["instance_type"],
                market=inst["market"],
                availability_zone=inst["availability_zone"],
                launch_time=launch.isoformat() if launch else datetime.now(UTC).isoformat(),
            )
        )
    if nodes:
        write_inventory(ws, nodes)
    return nodes


def inventory_is_stale(ws: Workspace, state_written: datetime) -> bool:
    """nodes.json missing, empty, another stage's, or older than the state."""
    f = inventory_file(ws)
    if not inventory(ws):
        return True
    return datetime.fromtimestamp(f.stat().st_mtime, UTC) < state_written

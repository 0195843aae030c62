"""Training nodes: the spec from flags, pre-flight, apply with capacity fallback, SSH readiness,
status, stop/start, destroy with verification, and garbage collection of orphans.

The inventory of live nodes is generated/nodes.json (written after every apply); the last applied
node variables are kept in generated/node_vars.json so every later Terraform run (plan, destroy)
sees the same values.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from remotefit import cost, preflight, steps
from remotefit.data import valid_bucket
from remotefit.errors import UserError
from remotefit.inventory import inventory, require_nodes
from remotefit.inventory import inventory_file as _inventory_file
from remotefit.keys import ensure_key, public_key
from remotefit.proc import atomic_write, echo, run
from remotefit.ssh import Node, alias, ssh_argv, ssh_close_argv, ssh_config_text
from remotefit.workspace import Workspace, check_cidr


@dataclass(frozen=True)
class NodeSpec:
    """What the user asked for, validated before any API call."""

    profile: str  # "cpu" or "gpu"
    instance_type: str
    market: str  # "on-demand" or "spot"
    nodes: int
    disk_gb: int
    max_hours: float
    idle_minutes: int
    allow_cidr: str | None = None
    i_know: bool = False
    explicit_type: bool = False  # --instance-type given: never swap it for a fallback type
    data_buckets: tuple[str, ...] = ()  # S3 buckets the node role may read (job.toml [data])


def resolve_spec(
    ws: Workspace,
    *,
    gpu: bool = False,
    cpu: bool = False,
    instance_type: str | None = None,
    spot: bool = False,
    nodes: int = 1,
    disk_gb: int | None = None,
    max_hours: float | None = None,
    idle_minutes: int | None = None,
    allow_cidr: str | None = None,
    i_know: bool = False,
    data_bucket: Sequence[str] | None = None,
) -> NodeSpec:
    """Turn flags into a NodeSpec; every bad input is one line naming the flag and the fix."""
    d = ws.defaults
    # invoke passes flags whose default is None as strings: `--max-hours 2` arrives as "2".
    nodes = int(_number("--nodes", nodes, whole=True))
    max_hours = None if max_hours is None else _number("--max-hours", max_hours)
    idle_minutes = None if idle_minutes is None else int(_number("--idle-minutes", idle_minutes, whole=True))
    disk_gb = None if disk_gb is None else int(_number("--disk-gb", disk_gb, whole=True))
    if gpu and cpu:
        raise UserError("--gpu and --cpu both given; pick one")
    if not gpu and not cpu and instance_type:
        gpu = cost.is_gpu_type(instance_type)
    profile = "gpu" if gpu else "cpu"
    itype = instance_type or (d.gpu_instance_type if gpu else d.cpu_instance_type)
    if instance_type and gpu and not cost.is_gpu_type(itype):
        raise UserError(f"--instance-type {itype} has no GPU but --gpu was given; use a g*/p* type or --cpu")
    if instance_type and cpu and cost.is_gpu_type(itype):
        raise UserError(
            f"--instance-type {itype} is a GPU type but --cpu was given; use --gpu, or a CPU type such as {d.cpu_instance_type}"
        )
    if not 1 <= nodes <= d.max_nodes:
        raise UserError(f"--nodes {nodes} must be between 1 and {d.max_nodes} (max_nodes in invoke.yaml)")
    hours = d.max_hours if max_hours is None else max_hours
    if not 0 < hours <= d.max_hours_limit:
        raise UserError(
            f"--max-hours {hours:g} must be more than 0 and at most {d.max_hours_limit:g} (max_hours_limit in invoke.yaml)"
        )
    idle = d.idle_minutes if idle_minutes is None else idle_minutes
    if idle < 1:
        raise UserError(f"--idle-minutes {idle} must be at least 1")
    disk = disk_gb if disk_gb is not None else (d.gpu_disk_gb if gpu else d.cpu_disk_gb)
    if not 8 <= disk <= 16384:
        raise UserError(f"--disk-gb {disk} must be between 8 and 16384")
    if allow_cidr:
        allow_cidr = check_cidr(allow_cidr, i_know)
    return NodeSpec(
        profile,
        itype,
        "spot" if spot else "on-demand",
        nodes,
        disk,
        hours,
        idle,
        allow_cidr,
        i_know,
        explicit_type=instance_type is not None,
        # invoke.yaml's data_buckets plus --data-bucket, sorted: the same set renders the same policy.
        data_buckets=tuple(sorted({valid_bucket(b) for b in [*d.data_buckets, *(data_bucket or [])]})),
    )


def _number(flag: str, value: object, whole: bool = False) -> float:
    """A numeric flag as a number; anything else is one line naming the flag."""
    try:
        num = float(str(value).strip())
    except ValueError:
        raise UserError(f"{flag} {value!r} is not a number; give e.g. {flag} 2") from None
    if num != num or num in (float("inf"), float("-inf")) or (whole and not num.is_integer()):
        raise UserError(f"{flag} {value!r} must be a {'whole ' if whole else ''}number; give e.g. {flag} 2")
    return num


# -- generated records ------------------------------------------------------------------
def _vars_file(ws: Workspace) -> Path:
    return ws.paths.generated / "node_vars.json"


def load_node_vars(ws: Workspace) -> dict[str, Any] | None:
    try:
        return json.loads(_vars_file(ws).read_text())
    except (OSError, ValueError):
        return None


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


def write_tfvars(ws: Workspace, spec: NodeSpec | None = None) -> Path:
    """`inv tfvars`: write the tfvars for `spec`, or for the last applied nodes, or for the defaults."""
    if spec is None:
        saved = load_node_vars(ws)
        if saved:
            return steps.write_tfvars(ws, saved | {"public_key": public_key(ws.paths.generated, ws.stage)})
        spec = resolve_spec(ws)
    values = node_variables(ws, spec, default_az(ws, spec.instance_type), spec.instance_type, spec.market)
    return steps.write_tfvars(ws, values)


def refresh_tfvars(ws: Workspace) -> Path | None:
    """Rewrite tfvars from the saved node variables (the sandbox endpoint may have moved)."""
    saved = load_node_vars(ws)
    return steps.write_tfvars(ws, saved) if saved else None


# -- terraform init, once ---------------------------------------------------------------
def _init_fingerprint(ws: Workspace, tf: Any) -> str | None:
    """What `terraform init` depends on, hashed; None when generated/terraform is not initialised."""
    dot = tf.workdir / ".terraform"
    if not (dot / "providers").is_dir():
        return None
    h = hashlib.sha256(f"{tf.binary}\0{tf.env.get('TF_CLI_CONFIG_FILE', '')}\0".encode())
    inputs = [ws.paths.backend_file, tf.workdir / "versions.tf", tf.workdir / ".terraform.lock.hcl"]
    inputs.append(dot / "terraform.tfstate")  # the backend init configured (a hand-run init changes it)
    if tf.env.get("TF_CLI_CONFIG_FILE"):
        inputs.append(Path(tf.env["TF_CLI_CONFIG_FILE"]))
    for f in inputs:
        try:
            h.update(f.read_bytes() + b"\0")
        except OSError:
            return None
    return h.hexdigest()


def init_once(ws: Workspace, tf: Any) -> None:
    """Render, check the state bucket, and `terraform init` only when the backend config, provider
    requirements or CLI config changed since the last init (init costs ~1.2 s per apply and destroy)."""
    steps.render(ws)
    steps.require_backend(ws)  # rewrites backend.hcl: the sandbox endpoint may have moved
    stamp = tf.workdir / ".terraform" / "remotefit-init.sha256"
    fingerprint = _init_fingerprint(ws, tf)
    try:
        if fingerprint and stamp.read_text().strip() == fingerprint:
            return
    except OSError:
        pass
    tf.init(ws.paths.backend_file)
    fingerprint = _init_fingerprint(ws, tf)
    if fingerprint:
        atomic_write(stamp, fingerprint)


def read_state(ws: Workspace) -> tuple[dict[str, Any], datetime] | None:
    """The stage's Terraform state and when it was last written, read from the bucket (no terraform
    process); None when the stage has no state yet. The state is the truth about what exists."""
    from botocore.exceptions import BotoCoreError, ClientError

    key = steps.state_key(ws.stage)
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


def _state_resource_count(ws: Workspace, got: tuple[dict[str, Any], datetime] | None = None) -> int:
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


def rebuild_inventory(ws: Workspace, state: dict[str, Any] | None = None) -> list[Node]:
    """Rebuild nodes.json and ssh_config from the state (local files lost, emptied or older than the
    state, e.g. after an interrupted apply). Nodes that are not running keep their EC2 address."""
    if state is None:
        got = state_if_any(ws)
        state = got[0] if got else {}
    insts = state_instances(state)
    if not insts:
        return []
    described = {i["InstanceId"]: i for i in _describe(ws, [i["id"] for i in insts])}
    ssh_user = (state.get("outputs", {}).get("ssh_user") or {}).get("value") or "ubuntu"
    saved = load_node_vars(ws) or {}
    python = _pinned_ami_python(ws, saved)
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


def _inventory_is_stale(ws: Workspace, state_written: datetime) -> bool:
    """nodes.json missing, empty, another stage's, or older than the state."""
    f = _inventory_file(ws)
    if not inventory(ws):
        return True
    return datetime.fromtimestamp(f.stat().st_mtime, UTC) < state_written


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


# -- plan / apply -----------------------------------------------------------------------
# Why the provider replaces a node, in words (attribute paths from `terraform show -json`'s replace_paths).
_REPLACE_WHY = {
    "availability_zone": "availability zone",
    "subnet_id": "availability zone (subnet)",
    "ami": "AMI",
    "user_data_base64": "boot script (deadline, idle timeout or a new remotefit version)",
    "instance_market_options": "market",
    "placement_group": "placement group",
    "associate_public_ip_address": "public IP setting",
    "key_name": "key pair",
}


def disruptions(plan: dict[str, Any]) -> list[str]:
    """What a saved plan does to existing nodes, one phrase per node (from `terraform show -json`). Pure."""
    out = []
    for rc in plan.get("resource_changes", []):
        if rc.get("type") != "aws_instance" or rc.get("mode") != "managed":
            continue
        change, addr = rc.get("change", {}), rc.get("address", "?")
        actions = change.get("actions", [])
        if actions == ["delete"]:
            out.append(f"{addr} is destroyed")
        elif "delete" in actions:
            paths = {str(p[0]) for p in change.get("replace_paths") or [] if p}
            why = sorted({_REPLACE_WHY.get(p, p) for p in paths})
            if rc.get("action_reason") == "replace_by_triggers":
                why.append("instance type of a spot node")
            out.append(f"{addr} is replaced ({', '.join(why) or rc.get('action_reason', 'forced')})")
        elif actions == ["update"]:
            before, after = change.get("before") or {}, change.get("after") or {}
            if before.get("instance_type") != after.get("instance_type"):
                out.append(
                    f"{addr} is stopped, resized {before.get('instance_type')} -> {after.get('instance_type')} and started"
                )
    return out


def _apply_over_running_nodes(ws: Workspace, tf: Any, confirm: Callable[[str], None] | None) -> None:
    """Plan first and say what the apply does to the running nodes (and ask, unless --yes) before doing it."""
    planfile = tf.workdir / "reapply.tfplan"
    try:
        if tf.plan(ws.paths.tfvars(ws.settings), detailed=True, quiet=True, out=planfile) == 0:
            echo("apply: no changes to the running nodes")
            return
        hits = disruptions(tf.show_json(planfile))
        if hits:
            msg = f"this apply disrupts running nodes: {'; '.join(hits)}; a job running on them is killed"
            echo(f"warning: {msg}")
            if confirm is not None:
                try:
                    confirm(f"{msg}. Go on?")
                except BaseException:
                    refresh_tfvars(ws)  # nothing was applied: keep the tfvars of what runs
                    raise
        tf.apply_plan(planfile)
    finally:
        planfile.unlink(missing_ok=True)


def _fallbacks(ws: Workspace, spec: NodeSpec) -> list[str]:
    if spec.explicit_type:
        return []
    return ws.defaults.gpu_fallback_types if spec.profile == "gpu" else ws.defaults.cpu_fallback_types


def preflight_checks(ws: Workspace, spec: NodeSpec) -> dict[str, list[str]]:
    """Instance types exist, AZs offer them, quotas cover them. Returns {type: [azs]} to try."""
    ec2 = ws.client("ec2")
    ws.caller_identity()  # missing or expired credentials: fail here, before anything is created
    preflight.check_instance_type(ec2, spec.instance_type)
    fallbacks = _fallbacks(ws, spec)
    azs: dict[str, list[str]] = {spec.instance_type: preflight.azs_offering(ec2, spec.instance_type)}
    for t in fallbacks:
        try:
            azs[t] = preflight.azs_offering(ec2, t)
        except UserError:
            continue  # a fallback not offered here is simply not tried
    azs = preflight.azs_with_default_subnet(azs, ws.default_subnets(), spec.instance_type, ws.settings.AWS_REGION)
    vcpus = preflight.vcpus_of(ec2, spec.instance_type) * spec.nodes
    result = preflight.check_quota(
        ws.client("service-quotas"), spec.instance_type, spec.market, vcpus, ws.settings.AWS_REGION, nodes=spec.nodes
    )  # type: ignore[arg-type]
    if result is None:
        echo("warning: could not read the vCPU quota for this instance family (Service Quotas unreachable); continuing")
    return azs


def cost_lines(ws: Workspace, spec: NodeSpec) -> list[str]:
    est = cost.estimate(
        spec.instance_type,
        spec.market,  # type: ignore[arg-type]
        spec.nodes,
        spec.max_hours,
        ws.settings.AWS_REGION,
        ec2=ws.client("ec2"),
        disk_gb=spec.disk_gb,
        public_ip=True,
    )
    return est.lines()


def node_rate(ws: Workspace, n: Node, disk_gb: float, az: str | None = None, ec2: Any = None) -> float | None:
    """$/h of one running node: a spot node at the spot price of the AZ it runs in, plus its disk and public IPv4."""
    spot_ec2 = (ec2 or ws.client("ec2")) if n.market == "spot" else None
    price = cost.hourly_price(
        n.instance_type,
        n.market,  # type: ignore[arg-type]
        ws.settings.AWS_REGION,
        ec2=spot_ec2,
        az=az or n.availability_zone or None,
    ).usd_per_hour
    return None if price is None else price + cost.extras_per_hour(disk_gb)


def plan(ws: Workspace, spec: NodeSpec) -> int:
    """Pre-flight, cost, then `terraform plan` with what apply would use. Returns plan's detailed code."""
    preflight_checks(ws, spec)
    for line in cost_lines(ws, spec):
        echo(line)
    steps.write_tfvars(
        ws, node_variables(ws, spec, default_az(ws, spec.instance_type), spec.instance_type, spec.market)
    )
    tf = steps.init(ws)
    return tf.plan(ws.paths.tfvars(ws.settings), detailed=True)


def apply(
    ws: Workspace,
    spec: NodeSpec,
    refresh_ami: bool = False,
    wait: bool = True,
    confirm: Callable[[str], None] | None = None,
) -> list[Node]:
    """Create (or change) the nodes; on capacity errors try other AZs, fallback types, then on-demand.

    With nodes running, their own type and AZ come first, the apply is planned before it runs, and
    `confirm` (None: go on) is asked when that plan would replace, destroy or resize any of them.
    Interrupted, it says that resources may exist and which tasks see and remove them."""
    try:
        return _apply(ws, spec, refresh_ami, wait, confirm)
    except KeyboardInterrupt:
        echo(
            "apply interrupted: some resources may exist and are billed; "
            "`inv status` shows them, `inv destroy` removes them, `inv apply` completes them"
        )
        raise


def _spec_file(ws: Workspace) -> Path:
    return ws.paths.generated / "node_spec.json"


def last_spec(ws: Workspace) -> NodeSpec | None:
    """What the last `inv apply` asked for (the spec, not where it landed): a spot recovery applies it again,
    with the same capacity fallbacks."""
    try:
        raw = json.loads(_spec_file(ws).read_text())
        return NodeSpec(**{**raw, "data_buckets": tuple(raw.get("data_buckets") or ())})
    except (OSError, ValueError, TypeError):
        return None


def _apply(
    ws: Workspace, spec: NodeSpec, refresh_ami: bool, wait: bool, confirm: Callable[[str], None] | None
) -> list[Node]:
    azs = preflight_checks(ws, spec)
    atomic_write(_spec_file(ws), json.dumps(asdict(spec), indent=2))
    for line in cost_lines(ws, spec):
        echo(line)
    ensure_key(ws.paths.generated, ws.stage)
    candidates = preflight.launch_candidates(
        spec.instance_type,
        spec.market,  # type: ignore[arg-type]
        azs,
        _fallbacks(ws, spec),
        ws.defaults.allow_on_demand_fallback,
    )
    current = current_placement(ws)
    candidates = preflight.prefer_current(candidates, current)
    if current is not None and candidates[:1] == [current]:
        candidates = candidates[:1]  # never move running nodes elsewhere to find capacity for more of them
    tf = steps.terraform(ws)
    tried: list[str] = []
    for cand in candidates:
        values = node_variables(ws, spec, cand.az, cand.instance_type, cand.market, refresh_ami)
        steps.write_tfvars(ws, values)
        if not tried:
            init_once(ws, tf)
        echo(f"apply: {spec.nodes} × {cand.instance_type} ({cand.market}) in {cand.az}")
        try:
            if current is not None and not tried:
                _apply_over_running_nodes(ws, tf, confirm)
            else:
                tf.apply(ws.paths.tfvars(ws.settings))
        except KeyboardInterrupt:
            atomic_write(_vars_file(ws), json.dumps(values, indent=2))  # what destroy needs
            raise
        except UserError as exc:
            kind = preflight.classify_launch_error(exc.message)
            if kind != "capacity":
                if "state is locked" in exc.message:
                    # another run holds the lock and nothing of ours ran: keep the last good tfvars
                    refresh_tfvars(ws)
                    raise
                # Part of the apply may exist (security group, role, some nodes): keep the values that
                # `inv destroy` needs to remove it, and say so.
                atomic_write(_vars_file(ws), json.dumps(values, indent=2))
                raise UserError(
                    f"{exc.message}; some resources may have been created: fix the cause and re-run "
                    "`inv apply`, or remove them with `inv destroy`",
                    code=exc.code,
                ) from None
            tried.append(f"{cand.instance_type}/{cand.market}/{cand.az}: {exc.message}")
            echo(f"apply: no capacity for {cand.instance_type} ({cand.market}) in {cand.az}; trying the next option")
            continue
        atomic_write(_vars_file(ws), json.dumps(values, indent=2))
        steps.write_tfvars(ws, values)  # a concurrent, failed apply may have overwritten them meanwhile
        nodes = _record_nodes(ws, tf)
        if wait:
            wait_ready(ws, nodes, gpu=spec.profile == "gpu")
        return nodes
    if current is not None:  # the running nodes stay as they are; only the extra capacity was missing
        refresh_tfvars(ws)
        raise UserError(
            "no capacity for more nodes where the running ones are: " + " | ".join(tried) + "; the running nodes "
            "are unchanged: try later, or `inv destroy` and apply again to start elsewhere"
        )
    # Nothing had capacity: leave nothing behind, and show every error we met.
    echo("apply: every option failed; destroying what was created")
    atomic_write(_vars_file(ws), json.dumps(values, indent=2))  # so `inv destroy` can retry if this fails
    tf.destroy(ws.paths.tfvars(ws.settings), quiet=True)
    _vars_file(ws).unlink(missing_ok=True)
    raise UserError("no capacity anywhere: " + " | ".join(tried) + "; try later, another region, or --instance-type")


def _record_nodes(ws: Workspace, tf: Any) -> list[Node]:
    out = tf.output()
    described = {i["InstanceId"]: i for i in _describe(ws, [n["id"] for n in out.get("nodes", [])])}
    pub = public_key(ws.paths.generated, ws.stage)
    saved = load_node_vars(ws) or {}
    python = _pinned_ami_python(ws, saved)
    nodes = []
    for idx, n in enumerate(out.get("nodes", [])):
        reach = ws.reach_node(n["id"], n.get("public_ip") or "", out.get("ssh_user", "ubuntu"), pub, saved)
        launch = described.get(n["id"], {}).get("LaunchTime")
        nodes.append(
            Node(
                index=idx,
                alias=alias(ws.stage, idx),
                instance_id=n["id"],
                host=reach.host,
                port=reach.port,
                user=reach.user,
                private_ip=reach.private_host or n.get("private_ip") or "",
                workdir=reach.workdir,
                python=reach.python or python,
                instance_type=n["instance_type"],
                market=n["market"],
                availability_zone=n["availability_zone"],
                launch_time=launch.isoformat() if launch else datetime.now(UTC).isoformat(),
            )
        )
    ws.forget_unreached({n.instance_id for n in nodes})
    write_inventory(ws, nodes)
    return nodes


def _pinned_ami_python(ws: Workspace, saved: dict[str, Any]) -> str:
    try:
        pins = json.loads((ws.paths.generated / "ami_pins.json").read_text())
    except (OSError, ValueError):
        return "python3"
    for pin in pins.values():
        if pin["id"] == saved.get("ami_id"):
            return str(pin["python"])
    return "python3"


def write_inventory(ws: Workspace, nodes: list[Node]) -> None:
    atomic_write(_inventory_file(ws), json.dumps({"stage": ws.stage, "nodes": [n.to_dict() for n in nodes]}, indent=2))
    key = ensure_key(ws.paths.generated, ws.stage)
    atomic_write(ws.paths.ssh_config, ssh_config_text(nodes, key, ws.paths.generated / "known_hosts"), mode=0o600)


# The boot script (templates/user_data.sh.tftpl) ends with one of these markers and logs to BOOT_LOG; a
# sandbox node says where its own are through REMOTEFIT_BOOT_DIR/REMOTEFIT_BOOT_LOG (sshd SetEnv).
BOOT_DIR = "/var/lib/remotefit"
BOOT_LOG = "/var/log/remotefit-boot.log"
BOOT_FAILED_RC = 97
BOOTING_RC = 98
BOOT_TAIL_LINES = 8


def ready_command(workdir: str) -> str:
    """The readiness check run over ssh: exit 0 once the boot script finished, BOOT_FAILED_RC with the
    failure marker and the boot log's tail when it failed, BOOTING_RC while it still runs."""
    return (
        # cloud-init finishing means the boot script ran to its end (or died): a marker must be there.
        "if command -v cloud-init >/dev/null 2>&1; then cloud-init status --wait >/dev/null 2>&1; done=1; "
        "else done=0; fi; "
        f'b="${{REMOTEFIT_BOOT_DIR:-{BOOT_DIR}}}"; log="${{REMOTEFIT_BOOT_LOG:-{BOOT_LOG}}}"; '
        'if [ -f "$b/boot-failed" ]; then printf "%s\\n" "$(head -n 1 "$b/boot-failed" | cut -c 1-300)"; '
        f'tail -n {BOOT_TAIL_LINES} "$log" 2>&1; exit {BOOT_FAILED_RC}; fi; '
        'if [ ! -f "$b/boot-done" ]; then '
        'if [ "$done" = 1 ]; then echo "the boot script ended without its ready marker"; '
        f'tail -n {BOOT_TAIL_LINES} "$log" 2>&1; exit {BOOT_FAILED_RC}; fi; '
        f'echo "still booting: $(tail -n 1 "$log" 2>/dev/null)"; exit {BOOTING_RC}; fi; '
        f"mkdir -p {shlex.quote(workdir)}"
    )


def boot_failure(node: Node, output: str) -> str:
    """One line for a node whose boot failed: which node, why, and the boot log's last lines."""
    lines = [ln.strip()[:200] for ln in output.strip().splitlines() if ln.strip()]
    why = lines[0] if lines else "no failure marker text"
    tail = " | ".join(lines[1:]) or "(the boot log is empty)"
    return (
        f"{node.alias} ({node.instance_id}): the node's boot failed: {why}; last lines of {BOOT_LOG}: {tail}; "
        f"the whole log: `inv ssh --node {node.index}` then `cat {BOOT_LOG}`; remove the nodes with "
        "`inv destroy` (they also stop themselves at the deadline), or fix the cause and run `inv apply` again"
    )


def wait_ready(ws: Workspace, nodes: list[Node], gpu: bool = False, timeout: float | None = None) -> float:
    """Wait (bounded) until every node answers over SSH and has finished booting; return seconds."""
    timeout = timeout or ws.defaults.ssh_ready_timeout_s
    t0 = time.monotonic()
    pending = list(nodes)
    last = ""
    while pending:
        for n in list(pending):
            try:
                res = run(
                    ssh_argv(ws.paths.ssh_config, n.alias, ready_command(n.workdir)),
                    capture=True,
                    check=False,
                    timeout=120,
                )
            except UserError:  # cloud-init still busy after 120 s (e.g. apt on stock Ubuntu): ask again
                last = "still booting"
                continue
            if res.returncode == 0:
                pending.remove(n)
                echo(f"ready: {n.alias} ({n.instance_id}) after {time.monotonic() - t0:.1f} s")
            elif res.returncode == BOOT_FAILED_RC:
                # Nodes, state and inventory are all recorded by now: `inv destroy` removes everything.
                raise UserError(boot_failure(n, res.stdout))
            elif res.returncode == BOOTING_RC:
                last = res.stdout.strip()[:300]
            else:
                tail = (res.stderr or res.stdout).strip().splitlines()
                last = tail[-1] if tail else f"ssh exit {res.returncode}"
        if pending and time.monotonic() - t0 > timeout:
            raise UserError(
                f"{', '.join(n.alias for n in pending)} did not answer over SSH within {timeout:.0f} s ({last}); "
                "check `inv status`, then `inv destroy` or retry `inv apply`"
            )
        if pending:
            time.sleep(1.0)
    if gpu:
        for n in nodes:
            res = run(
                ssh_argv(
                    ws.paths.ssh_config, n.alias, "nvidia-smi --query-gpu=name,driver_version --format=csv,noheader"
                ),
                capture=True,
                check=False,
            )
            if res.returncode != 0:
                raise UserError(
                    f"{n.alias}: nvidia-smi failed on a GPU node ({(res.stderr or res.stdout).strip()[:200]}); the image has no working driver"
                )
            echo(f"gpu: {n.alias}: {res.stdout.strip()}")
    return time.monotonic() - t0


# -- status / ssh / stop / start --------------------------------------------------------
def _describe(ws: Workspace, ids: list[str]) -> list[dict[str, Any]]:
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
        described = _describe(ws, [n.instance_id])
    except UserError as exc:
        return f"{n.alias} ({n.instance_id}) does not answer ssh, and EC2 could not be asked: {exc}"
    state = described[0].get("State", {}).get("Name") if described else None
    return unreachable_hint(n, state)


def status_rows(ws: Workspace, now: datetime | None = None) -> list[dict[str, str]]:
    now = now or datetime.now(UTC)
    nodes = inventory(ws)
    got = state_if_any(ws)
    if got and _inventory_is_stale(ws, got[1]):
        nodes = rebuild_inventory(ws, got[0]) or nodes
    saved = load_node_vars(ws) or {}
    described = {i["InstanceId"]: i for i in _describe(ws, [n.instance_id for n in nodes])}
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
        return table(rows)
    got = state_if_any(ws)
    held = _state_resource_count(ws, got) if got else 0
    if held:
        return [
            f"no nodes for stage {ws.stage}, but its state holds {held} resource(s) (an interrupted apply?): "
            "`inv destroy` removes them, `inv apply` completes them"
        ]
    return [f"no nodes for stage {ws.stage} (run `inv apply`)"]


def table(rows: list[dict[str, str]]) -> list[str]:
    if not rows:
        return []
    cols = list(rows[0])
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols}
    return ["  ".join(c.ljust(widths[c]) for c in cols).rstrip()] + [
        "  ".join(r[c].ljust(widths[c]) for c in cols).rstrip() for r in rows
    ]


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
    ws.forget_unreached(set())
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
    described = {i["InstanceId"]: i for i in _describe(ws, [n.instance_id for n in nodes])}
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


# -- destroy / gc -----------------------------------------------------------------------
def leftovers(ws: Workspace) -> list[str]:
    """Everything tagged with this stage that still exists (terminated instances don't count)."""
    ec2 = ws.client("ec2")
    filters = [{"Name": "tag:project", "Values": ["remotefit"]}, {"Name": "tag:stage", "Values": [ws.stage]}]
    found = []
    for r in ec2.describe_instances(Filters=filters)["Reservations"]:
        for i in r["Instances"]:
            if i["State"]["Name"] not in ("terminated", "shutting-down"):
                found.append(f"instance {i['InstanceId']} ({i['State']['Name']})")
    for sg in ec2.describe_security_groups(Filters=filters)["SecurityGroups"]:
        found.append(f"security group {sg['GroupId']}")
    for kp in ec2.describe_key_pairs(Filters=filters).get("KeyPairs", []):
        found.append(f"key pair {kp['KeyName']}")
    return found


def destroy(ws: Workspace) -> list[str]:
    """terraform destroy (fine when a node already terminated itself), then verify nothing is left."""
    lines = []
    nodes = inventory(ws)
    spent = _spent(ws, nodes)
    tf = steps.terraform(ws)
    init_once(ws, tf)
    state = _state_resource_count(ws)
    if not state:
        lines.append(f"nothing to destroy: stage {ws.stage} has no resources in its state")
    else:
        if refresh_tfvars(ws) is None:
            # node_vars.json is lost (a fresh clone, a deleted generated/): the state is enough.
            got = read_state(ws)
            steps.write_tfvars(ws, destroy_variables(ws, got[0] if got else {}))
            echo(f"destroy: {_vars_file(ws).name} is missing; node variables rebuilt from the state")
        from remotefit import tunnel

        tunnel.close(ws)  # their nodes are going
        for n in nodes:
            run(ssh_close_argv(ws.paths.ssh_config, n.alias), capture=True, check=False)
        tf.destroy(ws.paths.tfvars(ws.settings))
        lines.append(f"destroyed {state} resource(s) of stage {ws.stage}")
    ws.forget_unreached(set())
    if inventory(ws) or not _inventory_file(ws).exists():  # never drop another stage's records
        for f in (_inventory_file(ws), ws.paths.ssh_config):
            f.unlink(missing_ok=True)
    left = leftovers(ws)
    if left:
        raise UserError(f"after destroy these are still tagged stage={ws.stage}: {', '.join(left)}; run `inv gc --yes`")
    lines.append(f"verified: nothing tagged stage={ws.stage} is left in {ws.settings.AWS_REGION}")
    if spent is not None:
        lines.append(f"this stage's nodes cost about {cost.format_usd(spent)} in total")
    return lines


def _spent(ws: Workspace, nodes: list[Node]) -> float | None:
    if not nodes:
        return None
    now = datetime.now(UTC)
    total = 0.0
    disk_gb = float((load_node_vars(ws) or {}).get("disk_gb", 0))
    for n in nodes:
        price = node_rate(ws, n, disk_gb)
        if price is None:
            return None
        total += cost.cost_so_far(price, datetime.fromisoformat(n.launch_time), now, 1)
    return total


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


def ssh_interactive(ws: Workspace, index: int) -> int:
    n = pick_node(ws, index)
    import subprocess

    return subprocess.call(ssh_argv(ws.paths.ssh_config, n.alias, tty=True))  # noqa: S603


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


# -- spot recovery ------------------------------------------------------------------------------
def recover(ws: Workspace, interrupted: list[Node]) -> list[Node]:
    """After a spot interruption whose final upload is done: end the interrupted instances now (AWS reclaims
    them within two minutes anyway; waiting would only resume on a dying node), then apply the last spec
    again, with apply's capacity fallbacks. Returns the new nodes."""
    spec = last_spec(ws)
    if spec is None:
        raise UserError(
            "cannot recover: generated/node_spec.json (what `inv apply` asked for) is missing; "
            "run `inv apply --spot ...` again, then `inv fit JOB --resume latest`"
        )
    ids = [n.instance_id for n in interrupted]
    started = time.monotonic()
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        ws.client("ec2").terminate_instances(InstanceIds=ids)
    except (ClientError, BotoCoreError) as exc:
        raise UserError(f"cannot recover: TerminateInstances on {', '.join(ids)} failed: {exc}") from None
    deadline = time.monotonic() + 300
    while True:
        states = [i["State"]["Name"] for i in _describe(ws, ids)]
        if all(st in ("shutting-down", "terminated") for st in states):
            break
        if time.monotonic() > deadline:
            raise UserError(f"cannot recover: {', '.join(ids)} still not terminated after 5 minutes ({states})")
        time.sleep(2)
    echo(f"recovery: ended {', '.join(n.alias for n in interrupted)} ({time.monotonic() - started:.0f} s)")
    if len(interrupted) == len(inventory(ws)):
        # Nothing of the stage runs: apply may look for capacity anywhere, not only where it was just reclaimed.
        _inventory_file(ws).unlink(missing_ok=True)
    started = time.monotonic()
    nodes = apply(ws, spec)
    echo(f"recovery: {len(nodes)} node(s) ready after {time.monotonic() - started:.0f} s ({nodes[0].market})")
    return nodes

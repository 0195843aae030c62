"""Creating and removing the nodes: `plan`, `apply` with capacity fallback (other AZs, fallback types, then
on-demand), what a re-apply would do to running nodes (`disruptions`), pre-flight and cost, the new nodes'
records, `destroy` with verification, and the re-apply after a spot interruption (`recover`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, NoReturn

from remotefit import cost, preflight, stack
from remotefit.errors import UserError
from remotefit.inventory import inventory, inventory_file
from remotefit.keys import ensure_key, public_key
from remotefit.nodes.ec2 import describe_instances
from remotefit.nodes.ready import wait_ready
from remotefit.nodes.spec import NodeSpec, last_spec, save_spec
from remotefit.nodes.terraform_dir import (
    current_placement,
    destroy_variables,
    load_node_vars,
    node_variables,
    node_vars_file,
    pinned_ami_python,
    planned_node_variables,
    read_state,
    refresh_tfvars,
    save_node_vars,
    state_resource_count,
    write_inventory,
)
from remotefit.proc import echo, run
from remotefit.ssh import Node, alias, ssh_close_argv
from remotefit.terraform import Terraform, TerraformError
from remotefit.workspace import Workspace

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
    stack.write_tfvars(ws, planned_node_variables(ws, spec))
    tf = stack.terraform(ws)
    stack.init_once(ws, tf)
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


def _apply(
    ws: Workspace, spec: NodeSpec, refresh_ami: bool, wait: bool, confirm: Callable[[str], None] | None
) -> list[Node]:
    """Pre-flight and the cost, then each launch candidate in turn until one has capacity."""
    azs = preflight_checks(ws, spec)
    if ws.endpoint:  # the sandbox's bridge and node images (a first build takes minutes), before anything exists
        ws.sandbox.prepare_machines(list(azs))
    save_spec(ws, spec)
    for line in cost_lines(ws, spec):
        echo(line)
    ensure_key(ws.paths.generated, ws.stage)
    current = current_placement(ws)
    candidates = _candidates(ws, spec, azs, current)
    tf = stack.terraform(ws)
    tried: list[str] = []
    values: dict[str, Any] = {}
    for cand in candidates:
        values = node_variables(ws, spec, cand.az, cand.instance_type, cand.market, refresh_ami)
        stack.write_tfvars(ws, values)
        if not tried:
            stack.init_once(ws, tf)
        echo(f"apply: {spec.nodes} × {cand.instance_type} ({cand.market}) in {cand.az}")
        no_capacity = _launch(ws, tf, values, current is not None and not tried, confirm)
        if no_capacity is not None:
            tried.append(f"{cand.instance_type}/{cand.market}/{cand.az}: {no_capacity}")
            echo(f"apply: no capacity for {cand.instance_type} ({cand.market}) in {cand.az}; trying the next option")
            continue
        save_node_vars(ws, values)
        stack.write_tfvars(ws, values)  # a concurrent, failed apply may have overwritten them meanwhile
        nodes = _record_nodes(ws, tf)
        if wait:
            wait_ready(ws, nodes, gpu=spec.profile == "gpu")
        return nodes
    _no_capacity_anywhere(ws, tf, current, tried, values)


def _candidates(
    ws: Workspace, spec: NodeSpec, azs: dict[str, list[str]], current: preflight.Candidate | None
) -> list[preflight.Candidate]:
    """The (type, market, AZ) options in the order apply tries them; with nodes running, theirs first."""
    candidates = preflight.launch_candidates(
        spec.instance_type,
        spec.market,  # type: ignore[arg-type]
        azs,
        _fallbacks(ws, spec),
        ws.defaults.allow_on_demand_fallback,
    )
    candidates = preflight.prefer_current(candidates, current)
    if current is not None and candidates[:1] == [current]:
        candidates = candidates[:1]  # never move running nodes elsewhere to find capacity for more of them
    return candidates


def _launch(
    ws: Workspace,
    tf: Terraform,
    values: dict[str, Any],
    over_running_nodes: bool,
    confirm: Callable[[str], None] | None,
) -> str | None:
    """One `terraform apply` of the tfvars just written (`values`): None when it worked, the error when this
    option had no capacity. Any other failure is raised, saying what may be left and how to remove it."""
    try:
        if over_running_nodes:
            _apply_over_running_nodes(ws, tf, confirm)
        else:
            tf.apply(ws.paths.tfvars(ws.settings))
    except KeyboardInterrupt:
        save_node_vars(ws, values)  # what destroy needs
        raise
    except UserError as exc:
        kind = exc.kind if isinstance(exc, TerraformError) else "other"
        if kind == "capacity":
            return exc.message
        if kind == "locked":
            # another run holds the lock and nothing of ours ran: keep the last good tfvars
            refresh_tfvars(ws)
            raise
        # Part of the apply may exist (security group, role, some nodes): keep the values that
        # `inv destroy` needs to remove it, and say so.
        save_node_vars(ws, values)
        raise UserError(
            f"{exc.message}; some resources may have been created: fix the cause and re-run "
            "`inv apply`, or remove them with `inv destroy`",
            code=exc.code,
        ) from None
    return None


def _no_capacity_anywhere(
    ws: Workspace, tf: Terraform, current: preflight.Candidate | None, tried: list[str], values: dict[str, Any]
) -> NoReturn:
    """Every option failed for capacity: running nodes stay as they are; otherwise nothing is left behind.
    The error shows every error met (`tried`); `values` are the last option's node variables."""
    if current is not None:  # the running nodes stay as they are; only the extra capacity was missing
        refresh_tfvars(ws)
        raise UserError(
            "no capacity for more nodes where the running ones are: " + " | ".join(tried) + "; the running nodes "
            "are unchanged: try later, or `inv destroy` and apply again to start elsewhere"
        )
    echo("apply: every option failed; destroying what was created")
    save_node_vars(ws, values)  # so `inv destroy` can retry if this fails
    tf.destroy(ws.paths.tfvars(ws.settings), quiet=True)
    node_vars_file(ws).unlink(missing_ok=True)
    raise UserError("no capacity anywhere: " + " | ".join(tried) + "; try later, another region, or --instance-type")


def _record_nodes(ws: Workspace, tf: Any) -> list[Node]:
    out = tf.output()
    described = {i["InstanceId"]: i for i in describe_instances(ws, [n["id"] for n in out.get("nodes", [])])}
    pub = public_key(ws.paths.generated, ws.stage)
    saved = load_node_vars(ws) or {}
    python = pinned_ami_python(ws, saved)
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


# -- destroy ----------------------------------------------------------------------------
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
    tf = stack.terraform(ws)
    stack.init_once(ws, tf)
    state = state_resource_count(ws)
    if not state:
        lines.append(f"nothing to destroy: stage {ws.stage} has no resources in its state")
    else:
        if refresh_tfvars(ws) is None:
            # node_vars.json is lost (a fresh clone, a deleted generated/): the state is enough.
            got = read_state(ws)
            stack.write_tfvars(ws, destroy_variables(ws, got[0] if got else {}))
            echo(f"destroy: {node_vars_file(ws).name} is missing; node variables rebuilt from the state")
        from remotefit import tunnel

        tunnel.close(ws)  # their nodes are going
        for n in nodes:
            run(ssh_close_argv(ws.paths.ssh_config, n.alias), capture=True, check=False)
        tf.destroy(ws.paths.tfvars(ws.settings))
        lines.append(f"destroyed {state} resource(s) of stage {ws.stage}")
    ws.forget_unreached(set())
    if inventory(ws) or not inventory_file(ws).exists():  # never drop another stage's records
        for f in (inventory_file(ws), ws.paths.ssh_config):
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
        states = [i["State"]["Name"] for i in describe_instances(ws, ids)]
        if all(st in ("shutting-down", "terminated") for st in states):
            break
        if time.monotonic() > deadline:
            raise UserError(f"cannot recover: {', '.join(ids)} still not terminated after 5 minutes ({states})")
        time.sleep(2)
    echo(f"recovery: ended {', '.join(n.alias for n in interrupted)} ({time.monotonic() - started:.0f} s)")
    if len(interrupted) == len(inventory(ws)):
        # Nothing of the stage runs: apply may look for capacity anywhere, not only where it was just reclaimed.
        inventory_file(ws).unlink(missing_ok=True)
    started = time.monotonic()
    nodes = apply(ws, spec)
    echo(f"recovery: {len(nodes)} node(s) ready after {time.monotonic() - started:.0f} s ({nodes[0].market})")
    return nodes

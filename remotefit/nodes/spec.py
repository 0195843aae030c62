"""What the user asked for: the node spec from the plan/apply flags, validated before any API call, and
the spec of the last `inv apply` (generated/node_spec.json, applied again by a spot recovery)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from remotefit import cost
from remotefit.config import Defaults
from remotefit.data import valid_bucket
from remotefit.errors import UserError
from remotefit.proc import atomic_write
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
    gpu, itype = _profile(d, gpu, cpu, instance_type)
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
        "gpu" if gpu else "cpu",
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


def _profile(d: Defaults, gpu: bool, cpu: bool, instance_type: str | None) -> tuple[bool, str]:
    """(GPU or not, the instance type) from --gpu/--cpu/--instance-type; a contradiction is one line."""
    if gpu and cpu:
        raise UserError("--gpu and --cpu both given; pick one")
    if not gpu and not cpu and instance_type:
        gpu = cost.is_gpu_type(instance_type)
    itype = instance_type or (d.gpu_instance_type if gpu else d.cpu_instance_type)
    if instance_type and gpu and not cost.is_gpu_type(itype):
        raise UserError(f"--instance-type {itype} has no GPU but --gpu was given; use a g*/p* type or --cpu")
    if instance_type and cpu and cost.is_gpu_type(itype):
        raise UserError(
            f"--instance-type {itype} is a GPU type but --cpu was given; use --gpu, or a CPU type such as {d.cpu_instance_type}"
        )
    return gpu, itype


def _number(flag: str, value: object, whole: bool = False) -> float:
    """A numeric flag as a number; anything else is one line naming the flag."""
    try:
        num = float(str(value).strip())
    except ValueError:
        raise UserError(f"{flag} {value!r} is not a number; give e.g. {flag} 2") from None
    if num != num or num in (float("inf"), float("-inf")) or (whole and not num.is_integer()):
        raise UserError(f"{flag} {value!r} must be a {'whole ' if whole else ''}number; give e.g. {flag} 2")
    return num


# -- the last applied spec --------------------------------------------------------------
def _spec_file(ws: Workspace) -> Path:
    return ws.paths.generated / "node_spec.json"


def save_spec(ws: Workspace, spec: NodeSpec) -> None:
    """Keep what this `inv apply` asked for (see `last_spec`)."""
    atomic_write(_spec_file(ws), json.dumps(asdict(spec), indent=2))


def last_spec(ws: Workspace) -> NodeSpec | None:
    """What the last `inv apply` asked for (the spec, not where it landed): a spot recovery applies it again,
    with the same capacity fallbacks."""
    try:
        raw = json.loads(_spec_file(ws).read_text())
        return NodeSpec(**{**raw, "data_buckets": tuple(raw.get("data_buckets") or ())})
    except (OSError, ValueError, TypeError):
        return None

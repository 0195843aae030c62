"""Checks before `terraform apply`: fail fast, in one line, before anything is created.

- `check_instance_type` / `azs_offering`: the type exists and is offered somewhere in the region.
- `quota_code` / `check_quota`: the account's vCPU quota for that instance class covers the run.
- `launch_candidates`: what to try next when a launch fails for want of capacity (the failure's kind is
  `terraform.TerraformError.kind`).

Quota checks never block on the check itself failing (no Service Quotas access, not implemented
by a mock, no network): `check_quota` then returns None and the caller prints a warning.

boto3/botocore are imported lazily (the package must import fast for `inv --list`).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from remotefit.cost import Market, family_letters, instance_info, known_types
from remotefit.errors import UserError, aws_error_code

# boto3 clients, typed loosely so that importing this needs neither boto3 nor stub packages.
EC2Client = Any
ServiceQuotasClient = Any

_STANDARD = "Standard (A, C, D, H, I, M, R, T, Z)"
#: Family class letters (see `cost.family_letters`) counted against the Standard quotas.
#: `im`/`is` are the storage-optimized I families (im4gn, is4gen).
STANDARD_LETTERS = frozenset({"a", "c", "d", "h", "i", "im", "is", "m", "r", "t", "z"})
G_VT_LETTERS = frozenset({"g", "vt"})
P_LETTERS = frozenset({"p"})

# (class, market) -> (quota code, name as the Service Quotas console shows it). All count vCPUs.
_QUOTAS: dict[tuple[str, str], tuple[str, str]] = {
    ("g", "on-demand"): ("L-DB2E81BA", "Running On-Demand G and VT instances"),
    ("g", "spot"): ("L-3819A6DF", "All G and VT Spot Instance Requests"),
    ("p", "on-demand"): ("L-417A185B", "Running On-Demand P instances"),
    ("p", "spot"): ("L-7212CCBC", "All P Spot Instance Requests"),
    ("std", "on-demand"): ("L-1216C47A", f"Running On-Demand {_STANDARD} instances"),
    ("std", "spot"): ("L-34B43A08", f"All {_STANDARD} Spot Instance Requests"),
}


def _region(client: Any) -> str:
    return str(getattr(getattr(client, "meta", None), "region_name", None) or "this region")


def suggest_type(instance_type: str) -> str | None:
    """The closest instance type in the price table, or None if nothing is close."""
    close = difflib.get_close_matches(instance_type.strip().lower(), known_types(), n=1, cutoff=0.4)
    return close[0] if close else None


def check_instance_type(ec2: EC2Client, instance_type: str, flag: str = "--instance-type") -> None:
    """Raise UserError (naming `flag` and a close known type) if EC2 doesn't know `instance_type`."""
    from botocore.exceptions import ClientError

    try:
        found = ec2.describe_instance_types(InstanceTypes=[instance_type]).get("InstanceTypes", [])
    except ClientError as e:
        # InvalidInstanceType for a well-formed unknown name, InvalidParameterValue for a malformed one;
        # anything else (auth, throttling) is not the user's typo, so let it through.
        if aws_error_code(e) not in ("InvalidInstanceType", "InvalidParameterValue"):
            raise
        found = []
    if found:
        return
    guess = suggest_type(instance_type)
    hint = f"did you mean {guess}?" if guess else "pick one from remotefit/prices.json, e.g. c7i.xlarge or g5.xlarge"
    raise UserError(
        f"{flag} {instance_type!r} is not an EC2 instance type in {_region(ec2)}: {hint} "
        "(`aws ec2 describe-instance-types` lists them all)"
    )


def azs_offering(ec2: EC2Client, instance_type: str, flag: str = "--instance-type") -> list[str]:
    """The availability zones of the client's region that offer `instance_type`, sorted.

    Raises UserError if none does (the type exists but not in this region).
    """
    azs: set[str] = set()
    kwargs: dict[str, Any] = {
        "LocationType": "availability-zone",
        "Filters": [{"Name": "instance-type", "Values": [instance_type]}],
    }
    while True:
        resp = ec2.describe_instance_type_offerings(**kwargs)
        azs.update(o["Location"] for o in resp.get("InstanceTypeOfferings", []))
        token = resp.get("NextToken")
        if not token:
            break
        kwargs["NextToken"] = token
    if not azs:
        raise UserError(
            f"{flag} {instance_type} is not offered in any availability zone of {_region(ec2)}: "
            "pick another instance type or another region"
        )
    return sorted(azs)


def quota_code(instance_type: str, market: Market) -> tuple[str, str]:
    """(quota code, quota name) of the EC2 vCPU quota that `instance_type` in `market` counts against.

    Covers the G/VT, P and Standard classes. Other classes (F, X, U, Inf, Trn, DL, HPC, Mac) have
    their own quotas that remotefit doesn't map: ValueError, and `check_quota` skips them.
    """
    letters = family_letters(instance_type)
    if letters in G_VT_LETTERS:
        cls = "g"
    elif letters in P_LETTERS:
        cls = "p"
    elif letters in STANDARD_LETTERS:
        cls = "std"
    else:
        raise ValueError(f"no known EC2 quota class for {instance_type!r} (family class {letters!r})")
    if market not in ("on-demand", "spot"):
        raise ValueError(f"market must be 'on-demand' or 'spot', not {market!r}")
    return _QUOTAS[(cls, market)]


@dataclass(frozen=True)
class QuotaResult:
    """The quota a run counts against and whether it covers the run.

    `value_vcpus` is the account's quota, not its free headroom: vCPUs already running in the
    same class count too, and Service Quotas doesn't say how many (that needs CloudWatch usage
    metrics), so `ok` can be True and the launch still fail with VcpuLimitExceeded.
    """

    code: str
    name: str
    region: str
    value_vcpus: float
    needed_vcpus: int
    #: True when the value is AWS's default (no account-specific value could be read).
    is_default: bool = False

    @property
    def ok(self) -> bool:
        return self.value_vcpus >= self.needed_vcpus


def _fmt_num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def check_quota(
    sq: ServiceQuotasClient,
    instance_type: str,
    market: Market,
    vcpus_needed: int,
    region: str,
    nodes: int = 1,
) -> QuotaResult | None:
    """Compare the account's vCPU quota for `instance_type`/`market` with `vcpus_needed`.

    Returns the QuotaResult when it covers the run; raises UserError (with the console link and
    the CLI command to ask for more) when it doesn't; returns None when the quota can't be read
    (class not mapped, Service Quotas unreachable, AccessDenied, not implemented by a mock): the
    caller warns and goes on. `nodes` only makes the message read "2 × g5.xlarge".
    """
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        code, name = quota_code(instance_type, market)
    except ValueError:
        return None

    # The applied (account) value first; AWS's default when the account has none or that call fails.
    value: float | None = None
    is_default = False
    for op in ("get_service_quota", "get_aws_default_service_quota"):
        try:
            resp = getattr(sq, op)(ServiceCode="ec2", QuotaCode=code)
            value = float(resp["Quota"]["Value"])
            is_default = op == "get_aws_default_service_quota"
            break
        # NotImplementedError: moto's in-process mock for actions it lacks.
        except (BotoCoreError, ClientError, NotImplementedError, KeyError, TypeError, ValueError):
            continue
    if value is None:
        return None

    result = QuotaResult(code, name, region, value, int(vcpus_needed), is_default)
    if result.ok:
        return result
    what = f"{nodes} × {instance_type}" if nodes > 1 else instance_type
    need = int(vcpus_needed)
    raise UserError(
        f"the quota '{name}' ({code}) in {region} is {_fmt_num(value)} vCPUs but {what} needs {need}: "
        f"request an increase in the Service Quotas console "
        f"(https://console.aws.amazon.com/servicequotas/home/services/ec2/quotas/{code}) or run "
        f"`aws service-quotas request-service-quota-increase --service-code ec2 --quota-code {code} "
        f"--desired-value {need} --region {region}`"
    )


def vcpus_of(ec2: EC2Client | None, instance_type: str) -> int:
    """vCPUs of one `instance_type`: the price table, else DescribeInstanceTypes (needs `ec2`)."""
    known = instance_info(instance_type).vcpus
    if known is not None:
        return known
    if ec2 is None:
        raise ValueError(f"{instance_type} is not in remotefit/prices.json and no EC2 client was given")
    rows = ec2.describe_instance_types(InstanceTypes=[instance_type])["InstanceTypes"]
    return int(rows[0]["VCpuInfo"]["DefaultVCpus"])


@dataclass(frozen=True)
class Candidate:
    """One (type, market, AZ) to try launching in."""

    instance_type: str
    market: Market
    az: str


def launch_candidates(
    instance_type: str,
    market: Market,
    azs: Mapping[str, Sequence[str]],
    fallback_types: Sequence[str] = (),
    allow_on_demand_fallback: bool = False,
) -> list[Candidate]:
    """The order to try launches in. Pure.

    `azs` maps each instance type to the AZs that offer it (from `azs_offering`); a type missing
    from it is skipped. Order: the asked type over its AZs, then each fallback type over its AZs
    (duplicates dropped), then, if `market` is spot and `allow_on_demand_fallback`, all of that
    again on-demand — cheaper-but-different hardware before paying on-demand rates.
    """
    types: list[str] = []
    for t in (instance_type, *fallback_types):
        if t not in types:
            types.append(t)
    markets: list[Market] = [market]
    if market == "spot" and allow_on_demand_fallback:
        markets.append("on-demand")
    return [Candidate(t, m, az) for m in markets for t in types for az in azs.get(t, ())]


def azs_with_default_subnet(
    azs: Mapping[str, Sequence[str]], subnets: Mapping[str, bool], instance_type: str, region: str
) -> dict[str, list[str]]:
    """Keep only the AZs that have a default subnet (Terraform launches into it). Pure.

    A fallback type left with no AZ is dropped; the asked `instance_type` left with none is one line
    naming the command that creates the missing default subnet."""
    out = {t: [az for az in zones if az in subnets] for t, zones in azs.items()}
    if not out.get(instance_type):
        zones = list(azs.get(instance_type, ()))
        first = zones[0] if zones else f"{region}a"
        raise UserError(
            f"no availability zone that offers {instance_type} in {region} ({', '.join(zones) or 'none'}) has a "
            f"default subnet: create one with `aws ec2 create-default-subnet --availability-zone {first} "
            f"--region {region}`"
        )
    return {t: zones for t, zones in out.items() if zones}


def prefer_current(candidates: Sequence[Candidate], current: Candidate | None) -> list[Candidate]:
    """Put the running nodes' own (type, market, AZ) first; within each type and market, their AZ first. Pure.

    A re-apply then changes nothing that is already there, and a capacity fallback that moved the nodes
    once is not undone by the next apply (which would replace them)."""
    if current is None:
        return list(candidates)
    groups: list[tuple[str, str]] = []
    for c in candidates:
        if (c.instance_type, c.market) not in groups:
            groups.append((c.instance_type, c.market))
    return sorted(
        candidates, key=lambda c: (c != current, groups.index((c.instance_type, c.market)), c.az != current.az)
    )

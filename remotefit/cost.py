"""What a run costs: list prices, spot prices, the deadline cap, and what a stopped node still costs.

Prices come from `remotefit/prices.json` (hand-written us-east-1 On-Demand list prices with an
`as_of` date) and, for spot, from EC2's spot price history when a client is given. Every price
carries a `source` string saying where it came from, so nothing printed looks more exact than it is.
Estimates are for printing only; nothing in remotefit decides anything from them.

boto3/botocore are imported lazily (the package must import fast for `inv --list`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache
from importlib import resources
from typing import Any, Literal

# A boto3 EC2 client. Typed loosely so that neither boto3 nor stub packages are needed to import this.
EC2Client = Any

Market = Literal["on-demand", "spot"]
MARKETS: tuple[str, ...] = ("on-demand", "spot")

#: The region the price table was written for.
PRICE_REGION = "us-east-1"

#: Families whose accelerators are GPUs (what CUDA / nvidia-smi see): G (graphics/ML) and P (ML).
GPU_FAMILY_LETTERS = frozenset({"g", "p"})
#: ML accelerators that are *not* GPUs: Inferentia, Trainium, Habana Gaudi (DL1). They need their
#: own SDK (Neuron, SynapseAI) rather than CUDA, so `is_gpu_type` is False for them and
#: `is_accelerator_type` is True.
NON_GPU_ACCELERATOR_LETTERS = frozenset({"inf", "trn", "dl"})

# EC2 bills Linux instances per second with a 60-second minimum per launch.
MIN_BILLED_SECONDS = 60


@cache
def price_table() -> dict[str, Any]:
    """The parsed `prices.json` (cached; read through importlib.resources so it works from a wheel)."""
    text = resources.files("remotefit").joinpath("prices.json").read_text(encoding="utf-8")
    return json.loads(text)


def known_types() -> list[str]:
    """Instance types in the price table, sorted (used for "did you mean" suggestions)."""
    return sorted(price_table()["instance_types"])


def family_of(instance_type: str) -> str:
    """`g5.xlarge` -> `g5`, `p4d.24xlarge` -> `p4d`, `u-6tb1.metal` -> `u-6tb1`."""
    return instance_type.strip().lower().split(".", 1)[0]


def family_letters(instance_type: str) -> str:
    """The class prefix of the family: `g5` -> `g`, `inf2` -> `inf`, `c7i` -> `c`, `u-6tb1` -> `u`.

    It is the leading letters before the first digit; quotas and GPU-ness follow it, not the
    generation suffix (`g4dn`, `g4ad` and `g6e` are all `g`; Graviton `c7g` is `c`).
    """
    m = re.match(r"[a-z]+", family_of(instance_type))
    return m.group(0) if m else ""


def is_gpu_type(instance_type: str) -> bool:
    """True for G and P families (NVIDIA/AMD GPUs), False for everything else.

    Inferentia/Trainium/Gaudi (`inf*`, `trn*`, `dl*`) are accelerators but not GPUs: a CUDA
    image, driver check or `nvidia-smi` would be wrong there. Use `is_accelerator_type` for
    "needs an accelerator AMI / accelerator quota".
    """
    return family_letters(instance_type) in GPU_FAMILY_LETTERS


def is_accelerator_type(instance_type: str) -> bool:
    """GPU types plus the non-GPU ML accelerators (Inferentia, Trainium, Gaudi)."""
    letters = family_letters(instance_type)
    return letters in GPU_FAMILY_LETTERS or letters in NON_GPU_ACCELERATOR_LETTERS


@dataclass(frozen=True)
class InstanceInfo:
    """What the price table knows about one instance type.

    `vcpus`, `gpus` and `on_demand_usd_per_hour` are None when the type is not in the table
    (`known` is then False); `family` and `is_gpu` come from the name and are always set.
    """

    instance_type: str
    vcpus: int | None
    gpus: int | None
    family: str
    is_gpu: bool
    on_demand_usd_per_hour: float | None
    gpu_model: str | None = None

    @property
    def known(self) -> bool:
        return self.on_demand_usd_per_hour is not None


def instance_info(instance_type: str) -> InstanceInfo:
    """Look `instance_type` up in the price table (never raises for unknown types)."""
    t = instance_type.strip().lower()
    row = price_table()["instance_types"].get(t)
    if row is None:
        return InstanceInfo(t, None, None, family_of(t), is_gpu_type(t), None)
    return InstanceInfo(
        instance_type=t,
        vcpus=int(row["vcpus"]),
        gpus=int(row["gpus"]),
        family=family_of(t),
        is_gpu=is_gpu_type(t),
        on_demand_usd_per_hour=float(row["usd_per_hour"]),
        gpu_model=row.get("gpu"),
    )


@dataclass(frozen=True)
class Price:
    """An hourly price per node, with where it came from. `usd_per_hour` is None when unknown."""

    usd_per_hour: float | None
    source: str
    #: True when this is a stand-in (e.g. the on-demand price shown for spot), not a quoted price.
    estimated: bool = False


def _list_price_label(region: str) -> str:
    as_of = price_table()["as_of"]
    if region == PRICE_REGION:
        return f"{PRICE_REGION} list price as of {as_of}"
    return f"{PRICE_REGION} list price as of {as_of}, region {region} may differ"


def _spot_from_history(
    ec2: EC2Client, instance_type: str, now: datetime, az: str | None = None
) -> tuple[float, int] | None:
    """Lowest current spot price across AZs (or in `az` only) and the number of AZs quoted, or None."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        resp = ec2.describe_spot_price_history(
            InstanceTypes=[instance_type],
            ProductDescriptions=["Linux/UNIX"],
            # With StartTime=now EC2 returns the price in effect now, one row per AZ; 100 is
            # more than any region has AZs, so one page is enough.
            MaxResults=100,
            StartTime=now,
        )
        # Keep the newest row per AZ, then take the cheapest AZ.
        latest: dict[str, tuple[datetime, float]] = {}
        for row in resp.get("SpotPriceHistory", []):
            if row.get("InstanceType", instance_type) != instance_type:
                continue
            zone, ts, price = row["AvailabilityZone"], row["Timestamp"], float(row["SpotPrice"])
            if az is not None and zone != az:
                continue
            if zone not in latest or ts > latest[zone][0]:
                latest[zone] = (ts, price)
    # NotImplementedError: moto's in-process mock for actions it lacks; the rest: no network,
    # no credentials, AccessDenied, or a malformed row. An estimate must never stop a run.
    except (BotoCoreError, ClientError, NotImplementedError, KeyError, ValueError, TypeError):
        return None
    prices = [p for _, p in latest.values() if p > 0]
    if not prices:
        return None
    return min(prices), len(prices)


def hourly_price(
    instance_type: str,
    market: Market,
    region: str,
    ec2: EC2Client | None = None,
    now: datetime | None = None,
    az: str | None = None,
) -> Price:
    """Per-node $/hour for `instance_type` in `market`.

    - on-demand: the table's us-east-1 list price (labelled "region may differ" elsewhere).
    - spot: the lowest current price across AZs from `ec2.describe_spot_price_history` when a
      client is given and it answers; otherwise the on-demand list price, labelled as a stand-in:
      spot never charges more than on-demand (the default max price), so it is an upper bound.
    - a type missing from the table (and no spot answer): `Price(None, "unknown")`.
    """
    if market not in MARKETS:
        raise ValueError(f"market must be one of {MARKETS}, not {market!r}")
    t = instance_type.strip().lower()
    on_demand = instance_info(t).on_demand_usd_per_hour

    if market == "spot":
        if ec2 is not None:
            quoted = _spot_from_history(ec2, t, now or datetime.now(UTC), az)
            if quoted is not None:
                price, n_azs = quoted
                where = f"in {az}" if az else f"in {region}, lowest of {n_azs} AZs"
                return Price(price, f"current spot price {where}")
        if on_demand is None:
            return Price(None, "unknown")
        return Price(
            on_demand,
            "spot price unavailable: on-demand price shown as its ceiling, spot usually costs less; "
            + _list_price_label(region),
            estimated=True,
        )

    if on_demand is None:
        return Price(None, "unknown")
    return Price(on_demand, _list_price_label(region))


def extras_per_hour(disk_gb: float, public_ip: bool = True) -> float:
    """Per node $/h beyond the instance: its gp3 root volume and its public IPv4 address (billed since 2024)."""
    table = price_table()
    disk = float(table["ebs_gp3_usd_per_gb_month"]) * disk_gb / float(table["hours_per_month"])
    return disk + (float(table["public_ipv4_usd_per_hour"]) if public_ip else 0.0)


def format_usd(x: float, decimals: int = 2) -> str:
    """`$16.10`, `$1,234.50`; hourly rates use `decimals=3` (`$1.006`). Tiny non-zero -> `<$0.01`."""
    if x < 0:
        return "-" + format_usd(-x, decimals)
    smallest = 10.0**-decimals
    # Don't print a real (if tiny) charge as "$0.00".
    if 0 < x < smallest / 2:
        return f"<${smallest:.{decimals}f}"
    return f"${x:,.{decimals}f}"


def _rate(x: float) -> str:
    return format_usd(x, 3) + "/h"


@dataclass(frozen=True)
class Estimate:
    """The cost of a run, for printing before plan/apply. Money fields are None when the price is unknown."""

    instance_type: str
    market: Market
    nodes: int
    max_hours: float
    region: str
    price: Price
    disk_gb: float = 0.0  # the root volume of each node, counted in $/h when > 0
    public_ip: bool = False  # each node's public IPv4 address, counted in $/h when True

    @property
    def extras_usd_per_hour(self) -> float:
        return extras_per_hour(self.disk_gb, self.public_ip)

    @property
    def per_node_usd_per_hour(self) -> float | None:
        p = self.price.usd_per_hour
        return None if p is None else p + self.extras_usd_per_hour

    @property
    def total_usd_per_hour(self) -> float | None:
        p = self.per_node_usd_per_hour
        return None if p is None else p * self.nodes

    @property
    def deadline_cap_usd(self) -> float | None:
        """What the run costs if it runs until the hard deadline (with disks and addresses when counted)."""
        total = self.total_usd_per_hour
        return None if total is None else total * self.max_hours

    def lines(self) -> list[str]:
        """One summary line, plus a note when the price is a stand-in or unknown."""
        hours = f"{self.max_hours:g} h"
        head = f"{self.instance_type} {self.market}"
        p = self.price.usd_per_hour
        if p is None:
            return [
                f"{head}: price unknown ({self.instance_type} is not in remotefit/prices.json"
                + (" and EC2 gave no spot price" if self.market == "spot" else "")
                + f"); the {hours} hard deadline still stops {self._nodes_word()}"
            ]
        total = self.total_usd_per_hour
        cap = self.deadline_cap_usd
        node = self.per_node_usd_per_hour
        assert total is not None and cap is not None and node is not None  # narrowed by `p is not None`
        rate = (
            f"{_rate(node)} per node × {self.nodes} nodes = {_rate(total)}"
            if self.nodes > 1
            else f"{_rate(node)} (1 node)"
        )
        parts = [f"{self.disk_gb:g} GB gp3 disk"] if self.disk_gb > 0 else []
        parts += ["public IPv4 address"] if self.public_ip else []
        if parts:
            rate += f", of which {' and '.join(parts)} {_rate(self.extras_usd_per_hour)} per node"
        out = [f"{head}: {rate}; the {hours} hard deadline caps this run at {format_usd(cap)} ({self.price.source})"]
        # A list price the table itself flags as stale (e.g. P4/P5 after AWS's 2025 cut).
        row_note = price_table()["instance_types"].get(self.instance_type, {}).get("note")
        if row_note and self.price.usd_per_hour == instance_info(self.instance_type).on_demand_usd_per_hour:
            out.append(f"note: {self.instance_type} {row_note}")
        return out

    def _nodes_word(self) -> str:
        return "the node" if self.nodes == 1 else f"all {self.nodes} nodes"


def estimate(
    instance_type: str,
    market: Market,
    nodes: int,
    max_hours: float,
    region: str,
    ec2: EC2Client | None = None,
    now: datetime | None = None,
    disk_gb: float = 0.0,
    public_ip: bool = False,
) -> Estimate:
    """Price `nodes` × `instance_type` in `market` for at most `max_hours` (the hard deadline)."""
    if nodes < 1:
        raise ValueError(f"nodes must be >= 1, not {nodes}")
    if max_hours <= 0:
        raise ValueError(f"max_hours must be > 0, not {max_hours}")
    t = instance_type.strip().lower()
    price = hourly_price(t, market, region, ec2=ec2, now=now)
    return Estimate(t, market, nodes, float(max_hours), region, price, float(disk_gb), public_ip)


def cost_so_far(
    usd_per_hour: float,
    launch_time: datetime,
    now: datetime | None = None,
    nodes: int = 1,
) -> float:
    """What `nodes` instances launched at `launch_time` have cost until `now` (instance hours only).

    Per-second billing with EC2's 60-second minimum. Naive datetimes are taken as UTC (boto3
    returns aware ones); a launch time in the future counts as zero.
    """
    now = now or datetime.now(UTC)
    if launch_time.tzinfo is None:
        launch_time = launch_time.replace(tzinfo=UTC)
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    elapsed = now - launch_time
    if elapsed <= timedelta(0):
        return 0.0
    seconds = max(elapsed.total_seconds(), MIN_BILLED_SECONDS)
    return usd_per_hour * nodes * seconds / 3600.0


def stopped_cost_note(disk_gb: float, nodes: int = 1) -> str:
    """One line for `inv stop`: a stopped node pays no instance hours but still pays for its disk."""
    table = price_table()
    per_gb_month = float(table["ebs_gp3_usd_per_gb_month"])
    hours_per_month = float(table["hours_per_month"])
    per_month = per_gb_month * disk_gb * nodes
    per_hour = per_month / hours_per_month
    what = f"{disk_gb:g} GB" if nodes == 1 else f"{nodes} × {disk_gb:g} GB"
    return (
        f"stopped nodes still pay for their disks: {what} gp3 at {format_usd(per_gb_month)}/GB-month "
        f"≈ {_rate(per_hour)}, {format_usd(per_month)}/month ({_list_price_label(PRICE_REGION)}); "
        "destroy the run to stop this charge"
    )

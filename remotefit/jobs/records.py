"""Run records: what this laptop knows of each run it started (generated/runs/<run-id>.json), and run.json."""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from remotefit import cost
from remotefit.config import Paths
from remotefit.errors import UserError
from remotefit.node import contract
from remotefit.proc import atomic_write


@dataclass
class RunRecord:
    run_id: str
    job: str
    job_path: str
    command: str
    args: list[str]
    nodes: list[dict[str, Any]]
    started_at: str
    local: bool = False
    git_commit: str | None = None
    passed_env: list[str] = field(default_factory=list)  # names only, never values
    resumed_from: str | None = None  # `--resume`: the run whose outputs this one started from
    attempts: list[dict[str, Any]] = field(default_factory=list)  # the attempts before this one, oldest first

    def save(self, directory: Path) -> None:
        atomic_write(directory / f"{self.run_id}.json", json.dumps(self.__dict__, indent=2))


def _records_dir(paths: Paths) -> Path:
    return paths.generated / "runs"


RUN_ID_RE = re.compile(contract.RUN_ID_PATTERN)  # the runner's own rule


def check_run_id(run_id: str) -> str:
    """A run id is a file name here and on the node: never a path (`../node_vars`)."""
    if not RUN_ID_RE.fullmatch(run_id):
        raise UserError(
            f"--run {run_id!r} is not a run id (letters, digits, '.', '_', '-'); see `inv runs` for the ids"
        )
    return run_id


def load_record(paths: Paths, run_id: str | None) -> RunRecord:
    if run_id is not None:
        check_run_id(run_id)
    d = _records_dir(paths)
    files = sorted(d.glob("*.json"), key=lambda f: f.stat().st_mtime)
    if run_id is None:
        if not files:
            raise UserError("no runs yet: start one with `inv fit jobs/resnet`")
        return RunRecord(**json.loads(files[-1].read_text()))
    f = d / f"{run_id}.json"
    if not f.exists():
        known = [x.stem for x in files[-5:]]
        raise UserError(f"unknown run id {run_id}; recent runs: {', '.join(known) or 'none'} (see `inv runs`)")
    return RunRecord(**json.loads(f.read_text()))


# -- pull / logs / runs / cancel -------------------------------------------------------------
def local_run_dir(paths: Paths, job: str, run_id: str) -> Path:
    return paths.runs / job / run_id


def is_final(dest: Path) -> bool:
    """True when a local run folder holds a run.json written after the run's end was known.

    Folders from before `final` existed count as final unless their exit codes are negative (a
    killed ssh client taken for the job's status)."""
    try:
        info = json.loads((dest / "run.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(info, dict) or info.get("final") is False:
        return False
    codes = info.get("exit_codes") or [info.get("exit_code")]
    return all(not isinstance(c, int) or c >= 0 for c in codes)


def _run_json(record: RunRecord, statuses: list[dict[str, Any]], codes: list[int] | None) -> dict[str, Any]:
    s0 = statuses[0] if statuses else {}
    start, end = s0.get("started_at"), s0.get("ended_at")
    duration = _seconds(start, end)
    codes = codes if codes is not None else [s.get("exit_code") for s in statuses]
    first_bad = next((c for c in codes if c), 0)
    n0 = record.nodes[0]
    this = attempt_of(record.__dict__, start, end, first_bad if statuses else None, duration)
    attempts = [*record.attempts, this]
    known = [a["estimated_cost_usd"] for a in attempts if a.get("estimated_cost_usd") is not None]
    return {
        "run_id": record.run_id,
        "job": record.job,
        "job_path": record.job_path,
        "command": record.command,
        "arguments": record.args,
        "git_commit": record.git_commit,
        "passed_env": record.passed_env,  # the names forwarded from the laptop; values are never recorded
        "node_type": n0["instance_type"],
        "node_count": len(record.nodes),
        "market": n0["market"],
        "local": record.local,
        "start": start,
        "end": end,
        "duration_s": duration,
        "exit_code": first_bad,
        "exit_codes": codes,
        # Written only once every node's run has ended (finished, or lost without an exit code).
        "final": bool(statuses) and all(s.get("state") in ("finished", "lost") for s in statuses),
        "estimated_cost_usd": this["estimated_cost_usd"],
        "resumed_from": record.resumed_from,
        # Every attempt of the run so far (`--resume` chains them), this one last; the total adds them up.
        "attempts": attempts,
        "total_estimated_cost_usd": round(sum(known), 4) if known else None,
    }


def attempt_of(
    record: dict[str, Any], start: str | None, end: str | None, exit_code: int | None, duration: float | None
) -> dict[str, Any]:
    """One attempt of a run, as run.json lists it. The list price of the region the nodes ran in (their AZ
    without its letter); a spot run is estimated at that on-demand price too (an upper bound: run.json is
    written without asking EC2)."""
    nodes = record.get("nodes") or [{}]
    n0 = nodes[0]
    price = None
    if not record.get("local") and n0.get("instance_type"):
        region = str(n0.get("availability_zone") or "us-east-1a")[:-1]
        price = cost.hourly_price(n0["instance_type"], n0.get("market") or "on-demand", region).usd_per_hour  # type: ignore[arg-type]
    return {
        "run_id": record.get("run_id"),
        "nodes": [n.get("alias") for n in nodes],
        "node_type": n0.get("instance_type"),
        "market": n0.get("market"),
        "start": start,
        "end": end,
        "exit_code": exit_code,
        "estimated_cost_usd": (
            round(price * len(nodes) * duration / 3600, 4) if price is not None and duration is not None else None
        ),
    }


def _seconds(start: str | None, end: str | None) -> float | None:
    if not (start and end):
        return None
    parse = dt.datetime.fromisoformat
    return (parse(end.replace("Z", "+00:00")) - parse(start.replace("Z", "+00:00"))).total_seconds()


def kept_warning(status: dict[str, Any], run_id: str, alias: str) -> str | None:
    """One line when a node could not keep the run's results in the runs bucket (they are pulled, but
    would not have outlived the node)."""
    kept = status.get("kept")
    if not isinstance(kept, dict) or kept.get("complete"):
        return None
    errors = kept.get("errors") or ["no final upload"]
    if "NoSuchBucket" in errors[0]:
        hint = "run `inv backend` to create the runs bucket"
    elif "is missing" in errors[0]:
        hint = "its tool venv did not install at boot (see the boot log); `inv apply` a fresh node"
    else:
        hint = "see upload.log in the run's folder on the node"
    return f"warning: {alias} could not keep run {run_id} in the runs bucket ({errors[0]}); {hint}"

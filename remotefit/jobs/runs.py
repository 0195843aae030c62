"""Runs after the fact: pull, logs, cancel, the runs table and --resume, from the nodes or the runs bucket."""

from __future__ import annotations

import json
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from remotefit.config import Paths
from remotefit.errors import UserError
from remotefit.jobs.launch import (
    run_outputs,
)
from remotefit.jobs.records import (
    RUN_ID_RE,
    RunRecord,
    _run_json,
    _seconds,
    attempt_of,
    is_final,
    load_record,
    local_run_dir,
)
from remotefit.jobs.spec import (
    Job,
)
from remotefit.jobs.stream import _stream, run_status
from remotefit.node import contract
from remotefit.proc import atomic_write, echo
from remotefit.ssh import Node, remote
from remotefit.table import table
from remotefit.transport import Transport, transports
from remotefit.workspace import Workspace


def pull_run(
    paths: Paths,
    record: RunRecord,
    ts: list[Transport],
    codes: list[int] | None = None,
    statuses: list[dict[str, Any]] | None = None,
) -> Path:
    """Copy outputs and logs home into runs/<job>/<run-id>/ and write run.json last; a complete
    folder is never overwritten, an incomplete one (no final run.json) is completed in place.

    One rsync per node (rank 0: its outputs and log together); statuses already known are not asked
    for again.
    """
    dest, tmp = _landing(paths, record)
    for rank, t in enumerate(ts):
        log = contract.run_log(t.node.workdir, record.run_id)
        if rank == 0:
            outputs = t.target(run_outputs(t.node.workdir, record.run_id) + "/")
            t.rsync([outputs, t.target(log)], f"{tmp}/", stats=False)
            if len(ts) > 1:
                (tmp / "logs").mkdir(exist_ok=True)
                shutil.copyfile(tmp / "log", tmp / "logs" / "node-0.log")
        else:
            t.rsync(t.target(log), str(tmp / "logs" / f"node-{rank}.log"), stats=False)
    known = list(statuses or [])
    full = [known[i] if i < len(known) and known[i] else (run_status(t, record.run_id) or {}) for i, t in enumerate(ts)]
    return _landed(dest, tmp, _run_json(record, full, codes))


def _landing(paths: Paths, record: RunRecord) -> tuple[Path, Path]:
    """(the run's folder, where a pull writes): a fresh pull lands in a hidden folder renamed into
    place at the end; an incomplete folder (no final run.json) is filled in place (files are added
    and updated, never the user's own deleted), and run.json, written last, makes it complete."""
    dest = local_run_dir(paths, record.job, record.run_id)
    if is_final(dest):
        raise UserError(f"{dest} already exists; it is never overwritten: move it away to pull {record.run_id} again")
    tmp = dest if dest.exists() else dest.with_name(f".{dest.name}.partial")
    if tmp != dest and tmp.exists():
        shutil.rmtree(tmp)  # an earlier pull that was interrupted: ours, never the user's
    tmp.mkdir(parents=True, exist_ok=True)
    return dest, tmp


def _landed(dest: Path, tmp: Path, info: dict[str, Any]) -> Path:
    atomic_write(tmp / "run.json", json.dumps(info, indent=2))
    if tmp != dest:
        os.replace(tmp, dest)
    return dest


def runs_bucket(ws: Workspace) -> Any:
    """The stage's runs bucket (results.RunsBucket): where runs are read once their nodes are gone."""
    from remotefit.results import RunsBucket

    return RunsBucket(ws.client("s3"), ws.settings.runs_bucket, ws.stage)


def pull_kept(ws: Workspace, record: RunRecord) -> Path | None:
    """Pull a run from the runs bucket (None when it holds nothing of it): the same files and the same
    run.json as a pull from the nodes; a run cut short (no final status from every node) lands as an
    incomplete folder that a later pull completes."""
    kept = runs_bucket(ws).find(record.run_id)
    if kept is None:
        return None
    dest, tmp = _landing(ws.paths, record)
    statuses = runs_bucket(ws).download(record.job, record.run_id, tmp, len(record.nodes))
    return _landed(dest, tmp, _run_json(record, statuses, None))


@dataclass(frozen=True)
class ResumeFrom:
    run_id: str
    attempts: list[dict[str, Any]]  # the attempts up to and including that run, oldest first


def resume_source(ws: Workspace, job: Job, spec: str) -> ResumeFrom:
    """`--resume RUN_ID|latest`: the run of this job in the runs bucket to start from, checked before anything
    starts: it exists, it is this job's, and it no longer runs on a node."""
    bucket = runs_bucket(ws)
    if spec == "latest":
        mine = [k for k in bucket.runs() if k.job == job.name]
        if not mine:
            raise UserError(
                f"--resume latest: the runs bucket {bucket.bucket} holds no run of job {job.name} in stage "
                f"{ws.stage}; start one with `inv fit {job.path}`"
            )
        kept = max(mine, key=lambda k: k.run_id.rsplit("-", 1)[0])  # `<job>-<UTC time>-<random>`
    else:
        if not RUN_ID_RE.fullmatch(spec):
            raise UserError(f"--resume {spec!r} is not a run id (letters, digits, '.', '_', '-'); see `inv runs`")
        kept = bucket.find(spec)
        if kept is None:
            raise UserError(
                f"--resume {spec}: the runs bucket {bucket.bucket} has no run {spec} in stage {ws.stage}; "
                "see `inv runs` for the ids"
            )
        if kept.job != job.name:
            raise UserError(
                f"--resume {spec}: run {spec} is a run of job {kept.job}, not {job.name}; resume it with its own "
                "job folder"
            )
    from remotefit.inventory import inventory

    ts = transports(ws, inventory(ws))
    with ThreadPoolExecutor(max_workers=max(len(ts), 1)) as pool:
        states = list(pool.map(lambda t: run_status(t, kept.run_id), ts))
    running = [t.node.alias for t, st in zip(ts, states, strict=True) if st and st.get("state") == "running"]
    if running:
        raise UserError(
            f"--resume {kept.run_id}: that run is still running on {', '.join(running)}; wait for it "
            f"(`inv logs --run {kept.run_id} --follow`) or stop it (`inv cancel --run {kept.run_id}`) first"
        )
    record = bucket.record(kept.job, kept.run_id) or {"run_id": kept.run_id, "nodes": []}
    status = kept.statuses.get(0) or {}
    start = status.get("started_at") or record.get("started_at")
    # A run cut short (spot, deadline before its final status) ends, as far as anyone knows, at its last upload.
    end = status.get("ended_at") or bucket.last_upload(kept.job, kept.run_id)
    before = [a for a in record.get("attempts") or [] if isinstance(a, dict)]
    that = attempt_of(record, start, end, status.get("exit_code"), _seconds(start, end))
    return ResumeFrom(kept.run_id, [*before, that])


def _transports_for(ws: Workspace | None, record: RunRecord) -> list[Transport]:
    nodes = [Node(**n) for n in record.nodes]
    return transports(None if record.local else ws, nodes)


def load_any_record(ws: Workspace, run_id: str | None) -> RunRecord:
    """This laptop's record of the run, else the one its node put in the runs bucket (another laptop's
    run, or generated/ lost)."""
    try:
        return load_record(ws.paths, run_id)
    except UserError:
        if run_id is None:
            raise
        kept = runs_bucket(ws).find(run_id)
        record = runs_bucket(ws).record(kept.job, run_id) if kept else None
        if not record:
            raise
        return RunRecord(**{k: v for k, v in record.items() if k in RunRecord.__dataclass_fields__})


def pull(ws: Workspace, run_id: str | None) -> Path:
    record = load_any_record(ws, run_id)
    dest = local_run_dir(ws.paths, record.job, record.run_id)
    if is_final(dest):
        raise UserError(f"{dest} already exists; it is never overwritten: move it away to pull {record.run_id} again")
    ts = _transports_for(ws, record)
    st = run_status(ts[0], record.run_id)
    if st is None and not record.local:
        # The node is gone (destroyed, self-terminated, interrupted) or replaced: the runs bucket has it.
        pulled = pull_kept(ws, record)
        if pulled is not None:
            info = json.loads((pulled / "run.json").read_text())
            if not info.get("final"):
                echo(f"run {record.run_id}: its nodes are gone before it finished; pulled what the runs bucket has")
            return pulled
    if st is None:
        raise UserError(f"cannot pull run {record.run_id}: {_why_no_status(ws, record, ts[0])}")
    if st.get("state") == "running":
        raise UserError(
            f"run {record.run_id} is still running; wait with `inv logs --run {record.run_id} --follow`, then pull"
        )
    return pull_run(ws.paths, record, ts, statuses=[st])


def _why_no_status(ws: Workspace, record: RunRecord, t: Transport) -> str:
    """The node answers but has no such run (replaced by a new apply), or why it does not answer."""
    if t.run("true").returncode == 0:
        return f"{t.node.alias} has no run {record.run_id} (a node replaced by `inv apply` keeps nothing)"
    return t.unreachable(None if record.local else ws)


def logs(ws: Workspace, run_id: str | None, follow_log: bool = False, follow: bool | None = None) -> int:
    follow_log = follow_log or bool(follow)
    record = load_any_record(ws, run_id)
    local_copy = local_run_dir(ws.paths, record.job, record.run_id) / "log"
    ts = _transports_for(ws, record)
    st = run_status(ts[0], record.run_id)
    if st is None and local_copy.exists():
        sys.stdout.buffer.write(local_copy.read_bytes())
        sys.stdout.flush()
        info = json.loads((local_copy.parent / "run.json").read_text())
        echo(f"run {record.run_id}: exit code {info['exit_code']} (from the pulled copy)")
        return int(info["exit_code"] or 0)
    if st is None and not record.local:
        kept = runs_bucket(ws).log(record.job, record.run_id)
        if kept is not None:  # the node is gone: the log as the runs bucket has it
            sys.stdout.buffer.write(kept)
            sys.stdout.flush()
            found = runs_bucket(ws).find(record.run_id)
            status = found.statuses.get(0) if found else None
            if status and status.get("exit_code") is not None:
                echo(f"run {record.run_id}: exit code {status['exit_code']} (from the runs bucket)")
                return int(status["exit_code"])
            echo(f"run {record.run_id}: its node is gone before it finished (the log up to its last upload)")
            return contract.EXIT_LOST
    if st is None:
        raise UserError(f"run {record.run_id} was never pulled: {_why_no_status(ws, record, ts[0])}")
    if st.get("state") == "running" and not follow_log:
        res = ts[0].run_bytes(remote(["cat", st["log"]]))
        sys.stdout.buffer.write(res.stdout)  # bytes as the job wrote them, UTF-8 or not
        sys.stdout.flush()
        echo(f"run {record.run_id} is still running: `inv logs --run {record.run_id} --follow` to keep watching")
        return 0
    code = _stream(ts[0], record.run_id)[0]  # `follow` is the flag here
    echo(f"run {record.run_id}: exit code {code}")
    return code


def cancel(ws: Workspace, run_id: str | None) -> list[str]:
    record = load_record(ws.paths, run_id)
    out = []
    for t in _transports_for(ws, record):
        res = t.runner("cancel", "--run-id", record.run_id)
        out.append(f"{t.node.alias}: {(res.stdout or res.stderr).strip()}")
    return out


def runs_table(ws: Workspace) -> list[str]:
    rows = []
    for f in sorted(ws.paths.runs.glob("*/*/run.json")):
        info = json.loads(f.read_text())
        rows.append(
            (
                info["run_id"],
                "pulled",
                str(info["exit_code"]),
                f"{info.get('duration_s') or 0:.0f} s",
                info["node_type"],
            )
        )
    pulled = {r[0] for r in rows}
    from remotefit.inventory import inventory

    for n in inventory(ws):
        for st in run_status(transports(ws, [n])[0]) or []:
            if st["run_id"] not in pulled:
                rows.append(
                    (st["run_id"], f"{st['state']} on {n.alias}", str(st.get("exit_code", "-")), "-", n.instance_type)
                )
    # Runs whose nodes are gone: the runs bucket still has them (never a run left out).
    seen = {r[0] for r in rows}
    try:
        kept = runs_bucket(ws).runs()
    except UserError as exc:
        kept = []
        rows.append(("?", f"runs bucket not read: {exc}", "-", "-", "-"))
    for k in kept:
        if k.run_id not in seen:
            code = k.statuses.get(0, {}).get("exit_code")
            where = "in S3" if k.state == "finished" else "in S3, unfinished (its nodes gone or still running)"
            rows.append((k.run_id, where, "-" if code is None else str(code), "-", "-"))
    if not rows:
        return ["no runs yet: `inv fit jobs/resnet`"]
    return table(rows, ("run", "where", "exit", "duration", "node"))

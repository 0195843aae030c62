"""Before `inv destroy`: which runs would be lost or cut short, and stopping them safely."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from remotefit.config import Paths
from remotefit.jobs.records import (
    is_final,
    kept_warning,
)
from remotefit.jobs.stream import run_status
from remotefit.proc import echo
from remotefit.transport import transports
from remotefit.workspace import Workspace


# -- before a destroy ------------------------------------------------------------------------
@dataclass
class BeforeDestroy:
    """What `inv destroy` would take with the nodes: runs still active, finished runs not pulled."""

    active: dict[str, list[str]] = field(default_factory=dict)  # run id -> the aliases it runs on
    kept: list[str] = field(default_factory=list)  # finished, not pulled, complete in the runs bucket
    unkept: dict[str, str] = field(default_factory=dict)  # finished, not pulled, not kept: run id -> why
    unanswered: list[str] = field(default_factory=list)  # nodes that did not answer (not checked)

    def lines(self, bucket: str) -> list[str]:
        out = []
        for run_id, aliases in self.active.items():
            out.append(
                f"run {run_id} is still running on {', '.join(aliases)}: destroy stops it first (SIGTERM: a job "
                "that checkpoints saves one) and waits for its final upload to the runs bucket"
            )
        for run_id in self.kept:
            out.append(
                f"run {run_id} is not pulled; its results are safe in the runs bucket {bucket}: "
                f"`inv pull --run {run_id}` any time, also after destroy"
            )
        for run_id, why in self.unkept.items():
            out.append(
                f"run {run_id} is not pulled and is not kept in the runs bucket ({why}): its results go with "
                f"the node; pull them first with `inv pull --run {run_id}`"
            )
        for alias in self.unanswered:
            out.append(
                f"{alias} did not answer (stopped, or terminated already): its runs were not checked; "
                "`inv runs` lists what the runs bucket holds"
            )
        return out


def before_destroy_of(
    answers: dict[str, list[dict[str, Any]] | None], pulled: set[str], keeps: bool = True
) -> BeforeDestroy:
    """Sort the runs the nodes report (alias -> the runner's `status` list, None if it did not answer).
    Pure. `keeps` is False for the local transport, whose runs are never lost with a node."""
    out = BeforeDestroy()
    finished: dict[str, list[dict[str, Any]]] = {}
    for alias, statuses in answers.items():
        if statuses is None:
            out.unanswered.append(alias)
            continue
        for st in statuses:
            if st.get("state") == "running":
                out.active.setdefault(st["run_id"], []).append(alias)
            elif st["run_id"] not in pulled:
                finished.setdefault(st["run_id"], []).append(st)
    for run_id, sts in finished.items():
        if run_id in out.active or not keeps:
            continue
        kept = [st.get("kept") for st in sts]
        if all(isinstance(k, dict) and k.get("complete") for k in kept):
            out.kept.append(run_id)
        else:
            bad = next((k for k in kept if not (isinstance(k, dict) and k.get("complete"))), None)
            errors = (bad or {}).get("errors") if isinstance(bad, dict) else None
            out.unkept[run_id] = (
                "its node recorded no upload"
                if bad is None
                else f"its final upload was incomplete: {errors[0] if errors else 'no final upload'}"
            )
    return out


def pulled_runs(paths: Paths) -> set[str]:
    """Run ids with a complete pulled folder under runs/<job>/."""
    return {d.name for d in paths.runs.glob("*/*") if d.is_dir() and is_final(d)}


def before_destroy(ws: Workspace) -> BeforeDestroy:
    """Ask every node of the stage (one connection each, side by side) what a destroy would take."""
    from remotefit.inventory import inventory

    ts = transports(ws, inventory(ws))
    with ThreadPoolExecutor(max_workers=max(len(ts), 1)) as pool:
        answers = dict(zip([t.node.alias for t in ts], pool.map(run_status, ts), strict=True))
    return before_destroy_of(answers, pulled_runs(ws.paths))


def stop_for_destroy(ws: Workspace, before: BeforeDestroy) -> list[str]:
    """Cancel the active runs on their nodes; the runner's cancel returns once the run's exit code is
    recorded, which comes after its final upload. Says, per run, whether it is kept."""
    from remotefit.inventory import inventory

    by_alias = {t.node.alias: t for t in transports(ws, inventory(ws))}
    out = []
    for run_id, aliases in before.active.items():
        echo(f"stopping run {run_id} on {', '.join(aliases)} and waiting for its final upload ...")
        for alias in aliases:
            t = by_alias[alias]
            res = t.runner("cancel", "--run-id", run_id)
            if not res.ok:
                why = res.error(f"exit {res.code}")
                out.append(f"{alias}: could not stop run {run_id}: {why}")
                continue
            st = run_status(t, run_id) or {}
            kept = st.get("kept")
            if isinstance(kept, dict) and kept.get("complete"):
                out.append(
                    f"{alias}: stopped run {run_id} (exit code {st.get('exit_code')}); it is kept in the runs bucket"
                )
            else:
                out.append(
                    kept_warning(st, run_id, alias)
                    or f"warning: {alias} stopped run {run_id} but recorded no upload of it to the runs bucket"
                )
    return out

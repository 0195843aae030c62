"""`inv fit`: sync, start on every node, follow rank 0, pull; spot interruptions recovered while attached."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from remotefit import cost, data, tensorboard
from remotefit.config import Paths
from remotefit.errors import UserError
from remotefit.jobs.launch import (
    _check_local_cuda,
    git_commit,
    job_env,
    keep_spec,
    launch_command,
    master_port_for,
    new_run_id,
    run_outputs,
    start_command,
    start_input,
    start_request,
)
from remotefit.jobs.records import (
    RunRecord,
    _records_dir,
    _seconds,
    attempt_of,
    kept_warning,
)
from remotefit.jobs.runs import (
    ResumeFrom,
    pull_kept,
    pull_run,
    resume_source,
)
from remotefit.jobs.spec import (
    Job,
)
from remotefit.jobs.stream import _exit_of, _StartFailed, _stream, wait_status
from remotefit.jobs.syncing import sync
from remotefit.node import contract
from remotefit.proc import echo, ensure_writable
from remotefit.ssh import Node
from remotefit.transport import Transport, local_node, transports
from remotefit.workspace import Workspace


@dataclass
class _Run:
    """One attempt of `inv fit` as its steps share it: where it runs, under which id, and how."""

    ws: Workspace | None
    job: Job
    extra: Sequence[str]
    paths: Paths
    chosen: list[Node]
    ts: list[Transport]
    want_gpu: bool
    gpus: int
    local: bool
    secrets: dict[str, str]
    record: RunRecord | None = None
    port: int = 0

    @property
    def run_id(self) -> str:
        assert self.record is not None
        return self.record.run_id

    def command(self, rank: int, t: Transport, then_follow: bool) -> tuple[str, str]:
        """(start command line, its stdin) for one rank."""
        assert self.record is not None
        run_id = self.run_id
        env = job_env(self.job, run_id, self.chosen, rank, self.gpus, run_outputs(t.node.workdir, run_id), self.port)
        if self.ws is not None:
            env = {**self.ws.job_env_defaults(), **env}  # job.toml's [env] (in job_env) wins
        env |= self.secrets  # on stdin only (start_input), like job.toml's [env]
        if self.ws is not None and not self.local:  # results outlive the nodes: kept in the runs bucket
            env[contract.KEEP_KEY] = json.dumps(keep_spec(self.ws, self.job, self.record, rank))
        cmd = launch_command(self.job, self.extra, self.chosen, rank, self.gpus, master_port=self.port)
        request = start_request(self.job, run_id, cmd, self.want_gpu, env=env, then_follow=then_follow)
        return start_command(t), start_input(request)

    def refuse(self, t: Transport, code: int, stderr: str, started: list[Transport]) -> UserError:
        """The run could not start on `t`: cancel the ranks already started, forget the record, say why."""
        for s in started:  # don't leave the ranks already started waiting for a peer that never comes
            s.runner("cancel", "--run-id", self.run_id, "--grace", "5")
        _records_dir(self.paths).joinpath(f"{self.run_id}.json").unlink(missing_ok=True)
        why = contract.runner_error(stderr, f"exit {code}")
        keep = code in (contract.EXIT_BUSY, contract.EXIT_NO_CUDA)
        return UserError(f"{t.node.alias}: could not start the run: {why}", code=code if keep else 1)


def fit(
    ws: Workspace | None,
    job: Job,
    extra: Sequence[str] = (),
    *,
    gpu: bool = False,
    cpu: bool = False,
    detach: bool = False,
    nodes: int | None = None,
    local: bool = False,
    cancel_on_interrupt: bool = False,
    raise_interrupt: bool = False,
    paths: Paths | None = None,
    secrets: dict[str, str] | None = None,
    tensorboard_flag: bool = False,
    resume: str | None = None,
    max_recoveries: int = 0,
) -> int:
    """Sync, start, stream, pull. Returns the run's exit code (the first non-zero over the nodes).
    Ctrl-C while following detaches (or cancels, with cancel_on_interrupt) and returns 130; with
    raise_interrupt, KeyboardInterrupt goes on to the caller afterwards (the demo cleans up on it).

    Three round trips per node in the common case: the sync (which also checks that no run is
    active), start + follow in one connection (runner.py travels on its stdin), and one pull rsync.
    """
    if gpu and cpu:
        raise UserError("--gpu and --cpu both given; pick one")
    if max_recoveries < 0:
        raise UserError(f"--max-recoveries {max_recoveries}: give 0 (never recover) or more")
    r = _choose(ws, job, extra, gpu or (job.gpu and not cpu), nodes, local, paths, secrets or {})
    tb = tensorboard.plan(job, tensorboard_flag)
    earlier = _check_before(r, resume)
    _sync_and_record(r, earlier)
    started = _start_other_ranks(r, detach)

    def started_now() -> None:
        echo(f"run {r.run_id} started on {', '.join(n.alias for n in r.chosen)}")
        if tb is not None:
            tensorboard.start(ws, r.ts[0], tb, r.run_id)

    if detach:
        started_now()
        echo(f"detached: follow with `inv logs --run {r.run_id} --follow`, cancel with `inv cancel --run {r.run_id}`")
        return 0
    try:
        code, status = _stream(r.ts[0], r.run_id, first=r.command(0, r.ts[0], True), on_start=started_now)
    except _StartFailed as exc:
        raise r.refuse(r.ts[0], exc.code, exc.stderr, started) from None
    except KeyboardInterrupt:
        _interrupted(r, cancel_on_interrupt)
        if raise_interrupt:
            raise
        return 130
    if tb is not None:
        tensorboard.stop(ws, r.ts[0], r.run_id)
    statuses = [status or {}] + [wait_status(t, r.run_id) for t in r.ts[1:]]
    codes = [code] + [_exit_of(st) for st in statuses[1:]]
    final = next((c for c in codes if c), 0)
    hit = [t.node for t, st in zip(r.ts, statuses, strict=True) if st.get("spot_notice")]
    if not hit or ws is None or local:
        return _finish(r, codes, statuses, final)
    if not _keep_interrupted(r, hit, codes, statuses, final, max_recoveries):
        return final
    from remotefit import nodes as nd  # apply's machinery, loaded only when a node was reclaimed

    nd.recover(ws, hit)
    return fit(
        ws, job, extra, gpu=gpu, cpu=cpu, nodes=nodes, cancel_on_interrupt=cancel_on_interrupt,
        raise_interrupt=raise_interrupt, paths=r.paths, secrets=secrets, tensorboard_flag=tensorboard_flag,
        resume=r.run_id, max_recoveries=max_recoveries - 1,
    )  # fmt: skip


def _finish(r: _Run, codes: list[int], statuses: list[dict], final: int) -> int:
    """Pull every rank's results home and say where they are (and where the bucket copy fell short)."""
    assert r.record is not None
    dest = pull_run(r.paths, r.record, r.ts, codes, statuses)
    echo(f"run {r.run_id} finished with exit code {final}; results in {dest}")
    for t, st in zip(r.ts, statuses, strict=True):
        warning = kept_warning(st, r.run_id, t.node.alias)
        if warning:
            echo(warning)
    return final


def _choose(
    ws: Workspace | None,
    job: Job,
    extra: Sequence[str],
    want_gpu: bool,
    nodes: int | None,
    local: bool,
    paths: Paths | None,
    secrets: dict[str, str],
) -> _Run:
    """The nodes the run goes to (this machine with --local), checked against the job's needs."""
    paths = ws.paths if ws else (paths or Paths.at())
    if local:
        if want_gpu:
            _check_local_cuda()
        chosen = [local_node(paths)]
        return _Run(ws, job, extra, paths, chosen, transports(None, chosen), want_gpu, 0, True, secrets)
    assert ws is not None
    from remotefit.inventory import require_nodes

    provisioned = require_nodes(ws)
    if nodes and nodes > len(provisioned):
        raise UserError(
            f"--nodes {nodes} but only {len(provisioned)} node(s) are provisioned; run `inv apply --nodes {nodes}`"
        )
    chosen = provisioned[: nodes or len(provisioned)]
    if want_gpu and not cost.is_gpu_type(chosen[0].instance_type):
        raise UserError(
            f"--gpu (or job.toml gpu = true) but the node is a CPU {chosen[0].instance_type}; run `inv apply --gpu`, or pass --cpu"
        )
    gpus = cost.instance_info(chosen[0].instance_type).gpus or 0
    return _Run(ws, job, extra, paths, chosen, transports(ws, chosen), want_gpu, gpus, False, secrets)


def _check_before(r: _Run, resume: str | None) -> ResumeFrom | None:
    """What must hold before anything is sent: results can come home, data buckets are allowed, and the run
    to resume (if any) is there; returns that run."""
    # The results come home to runs/<job>/: find out now that they can, not after the run.
    ensure_writable(r.paths.runs)
    if (r.paths.runs / r.job.name).exists():
        ensure_writable(r.paths.runs / r.job.name)
    if r.job.data and not r.local:
        assert r.ws is not None
        data.check_buckets(r.job.data, data.allowed_buckets(r.ws), str(r.job.path / "job.toml"))
    if resume is None:
        return None
    if r.local or r.ws is None:
        raise UserError("--resume restores a run from the runs bucket onto nodes; it does not work with --local")
    return resume_source(r.ws, r.job, resume)


def _sync_and_record(r: _Run, earlier: ResumeFrom | None) -> None:
    """Sync the job (and fetch its data) to every node, then name the run and save its record."""
    # git's two calls and the data fetch run beside the sync (the fetch has its own connection and never
    # touches the synced files); all end before the run exists: a fetch that fails leaves nothing started.
    with ThreadPoolExecutor(max_workers=2) as pool:
        commit = pool.submit(git_commit, r.job.path)
        aws_env = {} if r.local else data.node_aws_env(r.ws)
        fetched = pool.submit(data.fetch, r.ts, r.job.data, r.job.name, aws_env)
        sync(r.ws, r.job, ts=r.ts)
        fetched.result()
    run_id = new_run_id(r.job)
    r.port = master_port_for(run_id)
    r.record = RunRecord(
        run_id,
        r.job.name,
        str(r.job.path),
        r.job.command,
        list(r.extra),
        [n.to_dict() for n in r.chosen],
        dt.datetime.now(dt.UTC).isoformat(),
        r.local,
        commit.result(),
        sorted(r.secrets),
        resumed_from=earlier.run_id if earlier else None,
        attempts=earlier.attempts if earlier else [],
    )
    if earlier is not None:
        echo(
            f"resuming run {earlier.run_id} as attempt {len(earlier.attempts) + 1}: its outputs come back from the "
            f"runs bucket onto {r.chosen[0].alias} before the job starts"
        )
    _records_dir(r.paths).mkdir(parents=True, exist_ok=True)
    r.record.save(_records_dir(r.paths))


def _start_other_ranks(r: _Run, detach: bool) -> list[Transport]:
    """Start the ranks other than 0 (they wait for rank 0's rendezvous), and rank 0 too when detached
    (attached, rank 0 starts in the connection that follows it)."""
    started: list[Transport] = []
    for rank, t in reversed(list(enumerate(r.ts))):
        if rank == 0 and not detach:
            break
        line, stdin = r.command(rank, t, False)
        res = t.run(line, stdin=stdin)
        if res.returncode != 0:
            raise r.refuse(t, res.returncode, res.stderr, started)
        started.append(t)
    return started


def _interrupted(r: _Run, cancel: bool) -> None:
    """Ctrl-C while following: cancel the run, or leave it running and say how to get back to it."""
    if cancel:
        for t in r.ts:
            t.runner("cancel", "--run-id", r.run_id, "--grace", "10")
        echo(f"\ncancelled run {r.run_id}")
        return
    echo(
        f"\ndetached from run {r.run_id}; it keeps running on the node.\n"
        f"  reattach: inv logs --run {r.run_id} --follow\n  cancel:   inv cancel --run {r.run_id}\n"
        f"  results:  inv pull --run {r.run_id}"
    )


def _keep_interrupted(
    r: _Run, hit: list[Node], codes: list[int], statuses: list[dict[str, Any]], final: int, max_recoveries: int
) -> bool:
    """A spot interruption hit the run: say so, bring its results home from the nodes when the bucket does
    not hold all of them, and return True when it is to be recovered (else say how to resume by hand)."""
    assert r.ws is not None and r.record is not None
    said_interrupted(r.ws, r.record, hit, statuses[0])
    home = None
    if not all(isinstance(st.get("kept"), dict) and st["kept"].get("complete") for st in statuses):
        # Not all of it is in the bucket: bring it home from the nodes before anything ends them.
        try:
            home = pull_run(r.paths, r.record, r.ts, codes, statuses)
            echo(f"run {r.run_id}: results pulled to {home}")
        except UserError as exc:
            echo(f"warning: could not pull run {r.run_id} from its nodes: {exc.message}")
    if max_recoveries > 0:
        echo(
            f"recovering run {r.run_id} ({max_recoveries - 1} more recover{'y' if max_recoveries == 2 else 'ies'} allowed after this one)"
        )
        return True
    echo(
        f"no recoveries left (--max-recoveries): resume by hand with `inv apply --spot`, then "
        f"`inv fit {r.job.path} --resume {r.run_id}`"
    )
    kept = home or pull_kept(r.ws, r.record)  # the node is being reclaimed: its results are in the runs bucket
    echo(f"run {r.run_id} was interrupted (exit code {final}); results in {kept}")
    return False


def said_interrupted(ws: Workspace, record: RunRecord, hit: list[Node], status: dict[str, Any]) -> None:
    """The interruption in words: where, when AWS takes the node, what the attempt cost; its results are kept."""
    notice = next((s for s in [status.get("spot_notice")] if isinstance(s, dict)), {}).get("notice") or {}
    start, end = status.get("started_at"), status.get("ended_at")
    took = _seconds(start, end)
    spent = attempt_of(record.__dict__, start, end, status.get("exit_code"), took)["estimated_cost_usd"]
    kept = status.get("kept")
    echo(
        f"run {record.run_id}: spot interruption on {', '.join(n.alias for n in hit)} (AWS ends it at "
        f"{notice.get('time', '?')}); the job was stopped"
        + (
            f" and its final upload is done: the results are kept in the runs bucket {ws.settings.runs_bucket}"
            if isinstance(kept, dict) and kept.get("complete")
            else ""
        )
    )
    warning = kept_warning(status, record.run_id, hit[0].alias)
    if warning:  # a resume then starts from what the bucket has, maybe nothing
        echo(warning)
    if took is not None:
        echo(
            f"this attempt ran {took:.0f} s"
            + (
                f", about {cost.format_usd(spent)} at the on-demand list price (an upper bound)"
                if spent is not None
                else ""
            )
        )

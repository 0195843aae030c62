"""Fitting jobs: a folder synced to the nodes, run there detached from SSH, outputs brought home.

On the node, scripts/node/runner.py (uploaded to <workdir>/.remotefit/) starts the job in its own
session, writes its log and exit code, and streams the log back on request; so a dropped connection
or a closed laptop never kills a run. `--local` drives the same runner on this machine through a
local "transport", so a job behaves the same before anyone pays for a node.
"""

from __future__ import annotations

import datetime as dt
import difflib
import json
import os
import secrets
import shlex
import subprocess
import sys
import time
import tomllib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from remotefit import cost
from remotefit.config import Paths
from remotefit.errors import UserError
from remotefit.proc import atomic_write, echo, run
from remotefit.ssh import Node, remote, rsync_argv, ssh_argv
from remotefit.workspace import Workspace

RUNNER = Path(__file__).resolve().parent.parent / "scripts" / "node" / "runner.py"
DEFAULT_EXCLUDES = (".git/", ".venv/", "venv/", ".env/", "__pycache__/", "*.pyc", ".ipynb_checkpoints/", ".remotefit/")
JOB_KEYS = {"command", "setup", "outputs", "exclude", "env", "gpu", "distributed", "requirements"}
MASTER_PORT = 29500
SSH_LOST = 255  # ssh's own exit status when the connection fails


@dataclass
class Job:
    path: Path
    name: str
    command: str
    setup: str = ""
    outputs: str = "outputs"
    exclude: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    gpu: bool = False
    distributed: bool = False
    requirements: str | None = None


def load_job(path: str | Path, cmd: str | None = None) -> Job:
    """Read a job folder and its optional job.toml; every problem names the file and line or flag."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"job folder {path} does not exist; give the path of a folder, e.g. jobs/resnet")
    if not p.is_dir():
        raise UserError(f"{path} is a file, not a job folder; give the folder that holds it")
    p = p.resolve()
    spec: dict[str, Any] = {}
    toml = p / "job.toml"
    if toml.exists():
        try:
            spec = tomllib.loads(toml.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise UserError(
                f"{toml}:{getattr(exc, 'lineno', '?')}: not valid TOML ({str(exc).split(' (at')[0]})"
            ) from None
        for key in spec:
            if key not in JOB_KEYS:
                close = difflib.get_close_matches(key, sorted(JOB_KEYS), n=1)
                hint = f"did you mean {close[0]}?" if close else f"known keys: {', '.join(sorted(JOB_KEYS))}"
                raise UserError(f"{toml}: unknown key {key!r}; {hint}")
    command = cmd or spec.get("command") or ("python train.py" if (p / "train.py").exists() else None)
    if not command:
        raise UserError(f'{path} has no train.py and no job.toml command; pass --cmd "python your_script.py"')
    requirements = spec.get("requirements") or ("requirements.txt" if (p / "requirements.txt").exists() else None)
    try:
        return Job(
            path=p,
            name=p.name,
            command=str(command),
            setup=str(spec.get("setup", "")),
            outputs=str(spec.get("outputs", "outputs")).strip("/") or "outputs",
            exclude=[str(x) for x in spec.get("exclude", [])],
            env={str(k): str(v) for k, v in dict(spec.get("env", {})).items()},
            gpu=bool(spec.get("gpu", False)),
            distributed=bool(spec.get("distributed", False)),
            requirements=requirements,
        )
    except (TypeError, ValueError) as exc:
        raise UserError(
            f"{toml}: a value has the wrong type ({exc}); see jobs/resnet/job.toml for the format"
        ) from None


# -- transports: the same runner over ssh, or on this machine ----------------------------
class Transport:
    """How to run a shell command on a node and address its files for rsync."""

    def __init__(self, node: Node, ssh_config: Path | None) -> None:
        self.node = node
        self.ssh_config = ssh_config

    @property
    def local(self) -> bool:
        return self.ssh_config is None

    def argv(self, command: str) -> list[str]:
        if self.ssh_config is None:
            return ["bash", "-c", command]
        return ssh_argv(self.ssh_config, self.node.alias, command)

    def target(self, path: str) -> str:
        return path if self.ssh_config is None else f"{self.node.alias}:{path}"

    def rsync(self, src: str, dest: str, **kw: Any) -> list[str]:
        argv = rsync_argv(self.ssh_config or Path("/dev/null"), src, dest, **kw)
        if self.ssh_config is None:
            i = argv.index("-e")
            del argv[i : i + 2]
        return argv

    def runner(self, *args: str) -> str:
        """The shell command that runs runner.py with the node's Python (the one that has PyTorch)."""
        base = self.node.workdir
        return remote([self.node.python, f"{base}/.remotefit/runner.py", args[0], "--base", base, *args[1:]])


def local_node(paths: Paths) -> Node:
    base = paths.generated / "local"
    return Node(
        0,
        "local",
        "local",
        "127.0.0.1",
        0,
        os.environ.get("USER", "me"),
        "127.0.0.1",
        str(base),
        sys.executable,
        "local",
        "local",
        "local",
        dt.datetime.now(dt.UTC).isoformat(),
    )


def transports(ws: Workspace | None, nodes: list[Node]) -> list[Transport]:
    return [Transport(n, ws.paths.ssh_config if ws else None) for n in nodes]


# -- sync ---------------------------------------------------------------------------------
def filter_args(job: Job) -> tuple[list[str], list[str]]:
    """(rsync --filter rules, excludes): .gitignore and .remotefitignore per directory, defaults, outputs."""
    filters = ["--filter=:- .gitignore", "--filter=:- .remotefitignore"]
    excludes = [*DEFAULT_EXCLUDES, f"/{job.outputs}/", *job.exclude]
    return filters, excludes


def plan_upload(job: Job) -> tuple[int, int, list[tuple[int, str]]]:
    """Files, bytes and the largest paths that a sync would send (a local rsync dry run, same filters)."""
    filters, excludes = filter_args(job)
    argv = [
        "rsync",
        "-a",
        "--safe-links",
        "--dry-run",
        "--out-format=%l %n",
        *filters,
        *[f"--exclude={e}" for e in excludes],
        f"{job.path}/",
        "/nonexistent-remotefit-dry-run/",
    ]
    out = run(argv, capture=True).stdout
    files = []
    for line in out.splitlines():
        size, _, name = line.partition(" ")
        if size.isdigit() and not name.endswith("/"):
            files.append((int(size), name))
    files.sort(reverse=True)
    return len(files), sum(s for s, _ in files), files[:5]


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def sync_argv(t: Transport, job: Job) -> list[str]:
    filters, excludes = filter_args(job)
    dest = f"{t.node.workdir}/jobs/{job.name}"
    argv = t.rsync(f"{job.path}/", t.target(dest) + "/", excludes=excludes, delete=True)
    # --safe-links: a symlink pointing outside the job folder is not sent; --rsync-path makes the
    # destination on the node in the same connection, without another round trip.
    extra = ["--safe-links", *filters]
    if not t.local:
        extra.append(f"--rsync-path=mkdir -p {shlex.quote(dest)} && rsync")
    return argv[:1] + extra + argv[1:]


def sync(
    ws: Workspace | None, job: Job, nodes: int | None = None, quiet: bool = False, ts: list[Transport] | None = None
) -> list[str]:
    """Upload the job to every node in parallel; return rsync's stats per node."""
    if ts is None:
        from remotefit.nodes import require_nodes

        assert ws is not None
        all_nodes = require_nodes(ws)
        ts = transports(ws, all_nodes[: nodes or len(all_nodes)])
    count, size, largest = plan_upload(job)
    if not quiet:
        echo(f"sync: {job.name}: {count} files, {_human(size)}")
    warn_mb = ws.defaults.sync_warn_mb if ws else 200
    if size > warn_mb * 1024 * 1024:
        names = ", ".join(f"{n} ({_human(s)})" for s, n in largest)
        echo(
            f"warning: the job is {_human(size)}, over sync_warn_mb={warn_mb}; largest: {names}. "
            "Add big data to .remotefitignore and download it on the node instead"
        )
    for t in ts:
        if t.local:
            Path(t.node.workdir, "jobs", job.name).mkdir(parents=True, exist_ok=True)

    def one(t: Transport) -> str:
        res = run(sync_argv(t, job), capture=True, check=False)
        if res.returncode != 0:
            raise UserError(f"sync to {t.node.alias} failed: {(res.stderr or res.stdout).strip().splitlines()[-1:]}")
        return res.stdout

    with ThreadPoolExecutor(max_workers=max(1, len(ts))) as pool:
        return list(pool.map(one, ts))


def upload_runner(t: Transport) -> None:
    dest = f"{t.node.workdir}/.remotefit"
    if t.local:
        Path(dest).mkdir(parents=True, exist_ok=True)
    argv = t.rsync(str(RUNNER), t.target(dest) + "/", stats=False)
    if not t.local:
        argv.insert(1, f"--rsync-path=mkdir -p {shlex.quote(dest)} && rsync")
    run(argv, capture=True)


# -- fit ------------------------------------------------------------------------------------
def new_run_id(job: Job) -> str:
    return f"{job.name}-{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def job_env(job: Job, run_id: str, nodes: list[Node], rank: int, gpus_per_node: int, outputs: str) -> dict[str, str]:
    """The environment every job process gets (documented in the README)."""
    master = nodes[0].private_ip or "127.0.0.1"
    return {
        **job.env,
        "REMOTEFIT_RUN_ID": run_id,
        "REMOTEFIT_JOB": job.name,
        "REMOTEFIT_NODE_RANK": str(rank),
        "REMOTEFIT_NUM_NODES": str(len(nodes)),
        "REMOTEFIT_NODE_IPS": ",".join(n.private_ip or "127.0.0.1" for n in nodes),
        "REMOTEFIT_MASTER_ADDR": master,
        "REMOTEFIT_MASTER_PORT": str(MASTER_PORT),
        "REMOTEFIT_GPUS_PER_NODE": str(gpus_per_node),
        "REMOTEFIT_OUTPUTS": outputs,
        "PYTHONUNBUFFERED": "1",
    }


def launch_command(job: Job, extra: Sequence[str], nodes: list[Node], rank: int, gpus_per_node: int) -> str:
    """The job's command, under torchrun when it is distributed over several processes."""
    cmd = job.command + ("" if not extra else " " + shlex.join(list(extra)))
    procs = max(gpus_per_node, 1)
    if job.distributed and (len(nodes) > 1 or procs > 1):
        words = shlex.split(job.command)
        if words and words[0] in ("python", "python3"):
            torchrun = [
                "python",
                "-m",
                "torch.distributed.run",
                f"--nnodes={len(nodes)}",
                f"--node_rank={rank}",
                f"--nproc_per_node={procs}",
                f"--master_addr={nodes[0].private_ip or '127.0.0.1'}",
                f"--master_port={MASTER_PORT}",
            ]
            cmd = shlex.join(torchrun + words[1:] + list(extra))
    return cmd


def run_outputs(base: str, run_id: str) -> str:
    """Each run's outputs folder on the node (the runner owns runs/<id>/, so it lives beside it)."""
    return f"{base}/outputs/{run_id}"


def start_command(t: Transport, job: Job, run_id: str, cmd: str, gpu: bool) -> str:
    base = t.node.workdir
    jobdir = f"{base}/jobs/{job.name}"
    outdir = run_outputs(base, run_id)
    envfile = f"{base}/.remotefit/env-{run_id}.json"
    # outputs/ in the job folder points at this run's own outputs: any script writing ./outputs works,
    # and runs never mix (one run at a time per node).
    link = (
        f"mkdir -p {shlex.quote(outdir)} && cd {shlex.quote(jobdir)} && "
        f"{{ [ ! -e {shlex.quote(job.outputs)} ] || [ -L {shlex.quote(job.outputs)} ] || "
        f"mv {shlex.quote(job.outputs)} {shlex.quote(job.outputs + '.before-' + run_id)}; }} && "
        f"ln -sfn {shlex.quote(outdir)} {shlex.quote(job.outputs)} && cat > {shlex.quote(envfile)}"
    )
    args = ["start", "--run-id", run_id, "--job-dir", jobdir, "--cmd", cmd, "--env-file", envfile, "--json"]
    if job.requirements:
        args += ["--requirements", job.requirements]
    if job.setup:
        args += ["--setup", job.setup]
    if gpu:
        args.append("--check-cuda")
    return f"{link} && {t.runner(*args)}"


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

    def save(self, directory: Path) -> None:
        atomic_write(directory / f"{self.run_id}.json", json.dumps(self.__dict__, indent=2))


def _records_dir(paths: Paths) -> Path:
    return paths.generated / "runs"


def load_record(paths: Paths, run_id: str | None) -> RunRecord:
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


def git_commit(path: Path) -> str | None:
    res = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, check=False)  # noqa: S603
    if res.returncode != 0:
        return None
    dirty = subprocess.run(
        ["git", "-C", str(path), "status", "--porcelain", "--", "."], capture_output=True, text=True, check=False
    )  # noqa: S603
    return res.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


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
    paths: Paths | None = None,
) -> int:
    """Sync, start, stream, pull. Returns the run's exit code (the first non-zero over the nodes)."""
    if gpu and cpu:
        raise UserError("--gpu and --cpu both given; pick one")
    want_gpu = gpu or (job.gpu and not cpu)
    paths = ws.paths if ws else (paths or Paths.at())
    if local:
        if want_gpu:
            _check_local_cuda()
        chosen = [local_node(paths)]
        ts = transports(None, chosen)
    else:
        assert ws is not None
        from remotefit.nodes import require_nodes

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
        ts = transports(ws, chosen)
    gpus = 0 if local else (cost.instance_info(chosen[0].instance_type).gpus or 0)
    sync(ws, job, ts=ts)
    for t in ts:
        upload_runner(t)
    run_id = new_run_id(job)
    record = RunRecord(
        run_id,
        job.name,
        str(job.path),
        job.command,
        list(extra),
        [n.to_dict() for n in chosen],
        dt.datetime.now(dt.UTC).isoformat(),
        local,
        git_commit(job.path),
    )
    # Start every node; a refusal (another run active) on any node stops the whole launch.
    for rank, t in enumerate(ts):
        outputs = run_outputs(t.node.workdir, run_id)
        env = job_env(job, run_id, chosen, rank, gpus, outputs)
        cmd = launch_command(job, extra, chosen, rank, gpus)
        res = run(
            t.argv(start_command(t, job, run_id, cmd, want_gpu)), capture=True, check=False, input_text=json.dumps(env)
        )
        if res.returncode != 0:
            msg = (res.stderr or res.stdout).strip().splitlines()
            line = msg[-1] if msg else f"exit {res.returncode}"
            if rank:  # don't leave the ranks already started waiting for a peer that never comes
                for started in ts[:rank]:
                    run(
                        started.argv(started.runner("cancel", "--run-id", run_id, "--grace", "5")),
                        capture=True,
                        check=False,
                    )
            code = res.returncode if res.returncode != 3 else 3
            raise UserError(
                f"{t.node.alias}: could not start the run: {line.removeprefix('runner: error: ')}", code=code
            )
    _records_dir(paths).mkdir(parents=True, exist_ok=True)
    record.save(_records_dir(paths))
    echo(f"run {run_id} started on {', '.join(n.alias for n in chosen)}")
    if detach:
        echo(f"detached: follow with `inv logs {run_id} --follow`, cancel with `inv cancel {run_id}`")
        return 0
    try:
        code = follow(ts[0], run_id)
    except KeyboardInterrupt:
        if cancel_on_interrupt:
            for t in ts:
                run(t.argv(t.runner("cancel", "--run-id", run_id, "--grace", "10")), capture=True, check=False)
            echo(f"\ncancelled run {run_id}")
            return 130
        echo(
            f"\ndetached from run {run_id}; it keeps running on the node.\n"
            f"  reattach: inv logs {run_id} --follow\n  cancel:   inv cancel {run_id}\n  results:  inv pull {run_id}"
        )
        return 130
    codes = [code] + [wait_exit(t, run_id) for t in ts[1:]]
    final = next((c for c in codes if c), 0)
    dest = pull_run(paths, record, ts, codes)
    echo(f"run {run_id} finished with exit code {final}; results in {dest}")
    return final


def _check_local_cuda() -> None:
    try:
        import torch
    except ImportError:
        raise UserError("--gpu with --local needs PyTorch on this machine") from None
    if not torch.cuda.is_available():
        raise UserError(f"--gpu with --local but CUDA is not usable here (torch {torch.__version__}); drop --gpu")


def follow(t: Transport, run_id: str, reconnect_for: float = 600.0) -> int:
    """Stream the run's log from rank 0 to stdout; reconnect after a dropped connection."""
    shown = 0
    lost_since: float | None = None
    out = sys.stdout.buffer
    while True:
        argv = t.argv(t.runner("follow", "--run-id", run_id, "--offset", str(shown), "-q"))
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)  # noqa: S603
        assert proc.stdout is not None
        try:
            while chunk := proc.stdout.read1(65536):  # type: ignore[attr-defined]
                out.write(chunk)
                out.flush()
                shown += len(chunk)
                lost_since = None
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        code = proc.wait()
        if code != SSH_LOST or t.local:
            if code == 2 and "unknown run" in err:
                raise UserError(err.strip().splitlines()[-1].removeprefix("runner: error: "))
            return code
        # 255: the connection dropped (or the run was lost): ask for its status on a fresh connection.
        state = run_status(t, run_id)
        if state and state.get("state") == "lost":
            echo(f"run {run_id}: the job process vanished without an exit code (node rebooted?)")
            return SSH_LOST
        lost_since = lost_since or time.monotonic()
        if time.monotonic() - lost_since > reconnect_for:
            raise UserError(
                f"lost the connection to {t.node.alias} for {reconnect_for:.0f} s; the run goes on: `inv logs {run_id} --follow`"
            )
        echo(f"(connection to {t.node.alias} lost; reconnecting…)")
        time.sleep(2)


def run_status(t: Transport, run_id: str | None = None) -> Any:
    args = ["status"] + (["--run-id", run_id] if run_id else [])
    res = run(t.argv(t.runner(*args)), capture=True, check=False)
    if res.returncode != 0:
        return None
    try:
        return json.loads(res.stdout)
    except ValueError:
        return None


def wait_exit(t: Transport, run_id: str, poll: float = 1.0) -> int:
    """Wait for a non-zero rank to finish; return its exit code."""
    while True:
        st = run_status(t, run_id)
        if st and st.get("state") in ("finished", "lost"):
            return int(st.get("exit_code") if st.get("exit_code") is not None else SSH_LOST)
        time.sleep(poll)


# -- pull / logs / runs / cancel -------------------------------------------------------------
def local_run_dir(paths: Paths, job: str, run_id: str) -> Path:
    return paths.runs / job / run_id


def pull_run(paths: Paths, record: RunRecord, ts: list[Transport], codes: list[int] | None = None) -> Path:
    """Copy outputs and logs home into runs/<job>/<run-id>/ and write run.json; never overwrite."""
    dest = local_run_dir(paths, record.job, record.run_id)
    if dest.exists():
        raise UserError(f"{dest} already exists; it is never overwritten: move it away to pull {record.run_id} again")
    tmp = dest.with_name(f".{dest.name}.partial")
    tmp.mkdir(parents=True, exist_ok=True)
    statuses = []
    for rank, t in enumerate(ts):
        src = f"{t.node.workdir}/runs/{record.run_id}/"
        if rank == 0:
            run(
                t.rsync(t.target(run_outputs(t.node.workdir, record.run_id) + "/"), f"{tmp}/", stats=False),
                capture=True,
            )
            run(t.rsync(t.target(src + "log"), str(tmp / "log"), stats=False), capture=True)
        if len(ts) > 1:
            (tmp / "logs").mkdir(exist_ok=True)
            run(t.rsync(t.target(src + "log"), str(tmp / "logs" / f"node-{rank}.log"), stats=False), capture=True)
        statuses.append(run_status(t, record.run_id) or {})
    info = _run_json(record, statuses, codes)
    atomic_write(tmp / "run.json", json.dumps(info, indent=2))
    os.replace(tmp, dest)
    return dest


def _run_json(record: RunRecord, statuses: list[dict[str, Any]], codes: list[int] | None) -> dict[str, Any]:
    s0 = statuses[0] if statuses else {}
    start, end = s0.get("started_at"), s0.get("ended_at")
    duration = None
    if start and end:
        duration = (
            dt.datetime.fromisoformat(end.replace("Z", "+00:00"))
            - dt.datetime.fromisoformat(start.replace("Z", "+00:00"))
        ).total_seconds()
    codes = codes if codes is not None else [s.get("exit_code") for s in statuses]
    first_bad = next((c for c in codes if c), 0)
    n0 = record.nodes[0]
    price = None if record.local else cost.hourly_price(n0["instance_type"], n0["market"], "us-east-1").usd_per_hour  # type: ignore[arg-type]
    return {
        "run_id": record.run_id,
        "job": record.job,
        "job_path": record.job_path,
        "command": record.command,
        "arguments": record.args,
        "git_commit": record.git_commit,
        "node_type": n0["instance_type"],
        "node_count": len(record.nodes),
        "market": n0["market"],
        "local": record.local,
        "start": start,
        "end": end,
        "duration_s": duration,
        "exit_code": first_bad,
        "exit_codes": codes,
        "estimated_cost_usd": round(price * len(record.nodes) * duration / 3600, 4) if price and duration else None,
    }


def _transports_for(ws: Workspace | None, record: RunRecord) -> list[Transport]:
    nodes = [Node(**n) for n in record.nodes]
    return transports(None if record.local else ws, nodes)


def pull(ws: Workspace, run_id: str | None) -> Path:
    record = load_record(ws.paths, run_id)
    ts = _transports_for(ws, record)
    st = run_status(ts[0], record.run_id)
    if st is None:
        raise UserError(
            f"cannot reach {ts[0].node.alias} or it has no run {record.run_id} (destroyed nodes keep nothing)"
        )
    if st.get("state") == "running":
        raise UserError(
            f"run {record.run_id} is still running; wait with `inv logs {record.run_id} --follow`, then pull"
        )
    return pull_run(ws.paths, record, ts)


def logs(ws: Workspace, run_id: str | None, follow_log: bool = False, follow: bool | None = None) -> int:
    follow_log = follow_log or bool(follow)
    record = load_record(ws.paths, run_id)
    local_copy = local_run_dir(ws.paths, record.job, record.run_id) / "log"
    ts = _transports_for(ws, record)
    st = run_status(ts[0], record.run_id)
    if st is None and local_copy.exists():
        sys.stdout.write(local_copy.read_text(errors="replace"))
        info = json.loads((local_copy.parent / "run.json").read_text())
        echo(f"run {record.run_id}: exit code {info['exit_code']} (from the pulled copy)")
        return int(info["exit_code"] or 0)
    if st is None:
        raise UserError(f"cannot reach {ts[0].node.alias} for run {record.run_id}, and it was never pulled")
    if st.get("state") == "running" and not follow_log:
        res = run(ts[0].argv(remote(["cat", st["log"]])), capture=True, check=False)
        sys.stdout.write(res.stdout)
        echo(f"run {record.run_id} is still running: `inv logs {record.run_id} --follow` to keep watching")
        return 0
    code = follow(ts[0], record.run_id)
    echo(f"run {record.run_id}: exit code {code}")
    return code


def cancel(ws: Workspace, run_id: str | None) -> list[str]:
    record = load_record(ws.paths, run_id)
    out = []
    for t in _transports_for(ws, record):
        res = run(t.argv(t.runner("cancel", "--run-id", record.run_id)), capture=True, check=False)
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
    from remotefit.nodes import inventory

    for n in inventory(ws):
        for st in run_status(Transport(n, ws.paths.ssh_config)) or []:
            if st["run_id"] not in pulled:
                rows.append(
                    (st["run_id"], f"{st['state']} on {n.alias}", str(st.get("exit_code", "-")), "-", n.instance_type)
                )
    if not rows:
        return ["no runs yet: `inv fit jobs/resnet`"]
    head = ("run", "where", "exit", "duration", "node")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(5)]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [head, *rows]]

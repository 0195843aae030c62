"""Fitting jobs: a folder synced to the nodes, run there detached from SSH, outputs brought home.

On the node, scripts/node/runner.py (uploaded to <workdir>/.remotefit/) starts the job in its own
session, writes its log and exit code, and streams the log back on request; so a dropped connection
or a closed laptop never kills a run. `--local` drives the same runner on this machine through a
local "transport", so a job behaves the same before anyone pays for a node.
"""

from __future__ import annotations

import datetime as dt
import difflib
import hashlib
import json
import os
import posixpath
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import threading
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
            raise UserError(f"{toml}:{_toml_line(exc, toml)}: not valid TOML ({str(exc).split(' (at')[0]})") from None
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


def _toml_line(exc: tomllib.TOMLDecodeError, toml: Path) -> int | str:
    """The line of a TOML error: .lineno from Python 3.14, parsed from the message before that."""
    if getattr(exc, "lineno", None):
        return int(exc.lineno)  # type: ignore[attr-defined]
    m = re.search(r"at line (\d+)", str(exc))
    if m:
        return int(m.group(1))
    if "end of document" in str(exc):
        return max(1, len(toml.read_text().splitlines()))
    return "?"


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
        # -S: the runner needs only the standard library; skipping site (PyTorch's .pth files and
        # all) saves ~40 ms per call. Its supervisor and job processes start with site as usual.
        return remote([self.node.python, "-S", f"{base}/.remotefit/runner.py", args[0], "--base", base, *args[1:]])


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
        # In the same connection: refuse (runner exit 3) while a run is active, so a second fit never
        # rewrites a running job's folder; an older runner without `idle` (exit 2) does not block.
        runner = f"{t.node.workdir}/.remotefit/runner.py"
        idle = f"{{ [ ! -f {shlex.quote(runner)} ] || {t.runner('idle')} || [ $? -ne 3 ]; }}"
        extra.append(f"--rsync-path={idle} && mkdir -p {shlex.quote(dest)} && rsync")
    # Exact numbers in --stats (rsync_argv asks for human-readable ones): the summary parses them.
    return argv[:1] + extra + argv[1:-2] + ["--no-human-readable"] + argv[-2:]


def sync_summary(stats: str) -> tuple[int, int, int]:
    """(regular files transferred, regular files in the job, bytes sent) from rsync --stats."""

    def num(pattern: str) -> int:
        m = re.search(pattern, stats)
        return int(m.group(1).replace(",", "")) if m else 0

    return (
        num(r"Number of regular files transferred: ([\d,]+)"),
        num(r"Number of files: [\d,]+ \(reg: ([\d,]+)"),
        num(r"Total bytes sent: ([\d,]+)"),
    )


def sync(
    ws: Workspace | None, job: Job, nodes: int | None = None, quiet: bool = False, ts: list[Transport] | None = None
) -> list[str]:
    """Upload the job to every node in parallel; return rsync's stats per node."""
    if ts is None:
        from remotefit.nodes import require_nodes

        assert ws is not None
        all_nodes = require_nodes(ws)
        ts = transports(ws, all_nodes[: nodes or len(all_nodes)])
    for t in ts:
        if t.local:
            if Path(t.node.workdir, ".remotefit", "runner.py").exists():
                res = run(t.argv(t.runner("idle")), capture=True, check=False)
                if res.returncode == 3:
                    raise UserError(_runner_error(res.stderr, "a run is active"), code=3)
            Path(t.node.workdir, "jobs", job.name).mkdir(parents=True, exist_ok=True)

    def one(t: Transport) -> str:
        res = run(sync_argv(t, job), capture=True, check=False)
        if res.returncode != 0:
            if "runner: error:" in (res.stderr or ""):
                raise UserError(f"{t.node.alias}: {_runner_error(res.stderr, '')}", code=3)
            last = (res.stderr or res.stdout).strip().splitlines()[-1:]
            raise UserError(f"sync to {t.node.alias} failed: {last[0] if last else f'rsync exit {res.returncode}'}")
        return res.stdout

    # The local listing (for the size warning) runs beside the transfers, not before them: it is
    # done long before any transfer big enough to warn about, and costs no wall time otherwise.
    with ThreadPoolExecutor(max_workers=len(ts) + 1) as pool:
        planned = pool.submit(plan_upload, job)
        sent = [pool.submit(one, t) for t in ts]
        count, size, largest = planned.result()
        if not quiet:
            echo(f"sync: {job.name}: {count} files, {_human(size)}")
        warn_mb = ws.defaults.sync_warn_mb if ws else 200
        if size > warn_mb * 1024 * 1024:
            names = ", ".join(f"{n} ({_human(s)})" for s, n in largest)
            echo(
                f"warning: the job is {_human(size)}, over sync_warn_mb={warn_mb}; largest: {names}. "
                "Add big data to .remotefitignore and download it on the node instead"
            )
        outs = [f.result() for f in sent]
    if not quiet:
        for t, out in zip(ts, outs, strict=True):
            moved, total, nbytes = sync_summary(out)
            echo(f"sync: {t.node.alias}: {moved} of {total} files transferred, {nbytes} bytes sent ({_human(nbytes)})")
    return outs


def _runner_error(stderr: str, default: str) -> str:
    """The runner's one-line error (without its prefix) out of a command's stderr."""
    for line in reversed((stderr or "").splitlines()):
        if "runner: error: " in line:
            return line.split("runner: error: ", 1)[1].strip()
    lines = (stderr or "").strip().splitlines()
    return lines[-1] if lines else default


def upload_runner(t: Transport) -> None:
    """Copy runner.py to the node on its own (fit sends it inside the start command instead)."""
    dest = f"{t.node.workdir}/.remotefit"
    if t.local:
        Path(dest).mkdir(parents=True, exist_ok=True)
    argv = t.rsync(str(RUNNER), t.target(dest) + "/", stats=False)
    if not t.local:
        argv.insert(1, f"--rsync-path=mkdir -p {shlex.quote(dest)} && rsync")
    run(argv, capture=True)


# -- fit ------------------------------------------------------------------------------------
def new_run_id(job: Job) -> str:
    """`<job>-<UTC time>-<random>`; the job part keeps only what the runner accepts in an id."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", job.name).strip("-._") or "job"
    return f"{safe}-{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def master_port_for(run_id: str) -> int:
    """torchrun's rendezvous port: one per run (29500-29999), so a port still held by an earlier run
    (or by another run on a shared host, as on the sandbox) rarely gets in the way."""
    return MASTER_PORT + int(hashlib.sha256(run_id.encode()).hexdigest(), 16) % 500


def job_env(
    job: Job,
    run_id: str,
    nodes: list[Node],
    rank: int,
    gpus_per_node: int,
    outputs: str,
    master_port: int = MASTER_PORT,
) -> dict[str, str]:
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
        "REMOTEFIT_MASTER_PORT": str(master_port),
        "REMOTEFIT_GPUS_PER_NODE": str(gpus_per_node),
        "REMOTEFIT_OUTPUTS": outputs,
        "PYTHONUNBUFFERED": "1",
    }


def launch_command(
    job: Job, extra: Sequence[str], nodes: list[Node], rank: int, gpus_per_node: int, master_port: int = MASTER_PORT
) -> str:
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
                f"--master_port={master_port}",
            ]
            cmd = shlex.join(torchrun + words[1:] + list(extra))
    return cmd


def run_outputs(base: str, run_id: str) -> str:
    """Each run's outputs folder on the node (the runner owns runs/<id>/, so it lives beside it)."""
    return f"{base}/outputs/{run_id}"


def start_command(
    t: Transport,
    job: Job,
    run_id: str,
    cmd: str,
    gpu: bool,
    env: dict[str, str] | None = None,
    then_follow: bool = False,
) -> str:
    """One shell line for the node: install runner.py (sent on stdin), link outputs/, write the env
    file, start the run; with then_follow, stream its log in the same connection (start's JSON goes
    to stderr then, and follow ends with the run's status as a JSON line on stderr)."""
    base = t.node.workdir
    rdir = f"{base}/.remotefit"
    jobdir = f"{base}/jobs/{job.name}"
    outdir = run_outputs(base, run_id)
    envfile = f"{rdir}/env-{run_id}.json"
    q = shlex.quote
    install = f"mkdir -p {q(rdir)} && cat > {q(rdir)}/runner.py.$$ && mv -f {q(rdir)}/runner.py.$$ {q(rdir)}/runner.py"
    # outputs/ in the job folder points at this run's own outputs: any script writing ./outputs works,
    # and runs never mix (one run at a time per node; sync has checked that none is active).
    link = (
        f"mkdir -p {q(outdir)} && cd {q(jobdir)} && "
        f"{{ [ ! -e {q(job.outputs)} ] || [ -L {q(job.outputs)} ] || "
        f"mv {q(job.outputs)} {q(job.outputs + '.before-' + run_id)}; }} && "
        f"ln -sfn {q(outdir)} {q(job.outputs)} && "
        # 0600: job.toml [env] may carry tokens
        f"(umask 077 && printf '%s' {q(json.dumps(env or {}))} > {q(envfile)})"
    )
    args = ["start", "--run-id", run_id, "--job-dir", jobdir, "--cmd", cmd, "--env-file", envfile, "--json"]
    if job.requirements:
        args += ["--requirements", job.requirements]
    if job.setup:
        args += ["--setup", job.setup]
    if gpu:
        args.append("--check-cuda")
    # The job's `python` is the node's Python (the one with PyTorch), ahead of whatever PATH has.
    py_dir = posixpath.dirname(t.node.python) if posixpath.isabs(t.node.python) else ""
    path = f'PATH={q(py_dir)}:"$PATH" ' if py_dir else ""
    line = f"{install} && {link} && {path}{t.runner(*args)}"
    if then_follow:
        line += f" >&2 && exec {t.runner('follow', '--run-id', run_id, '-q', '--status-json')}"
    return line


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
    """Sync, start, stream, pull. Returns the run's exit code (the first non-zero over the nodes).

    Three round trips per node in the common case: the sync (which also checks that no run is
    active), start + follow in one connection (runner.py travels on its stdin), and one pull rsync.
    """
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
    run_id = new_run_id(job)
    port = master_port_for(run_id)
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
    runner_src = RUNNER.read_text()

    def command(rank: int, t: Transport, then_follow: bool) -> str:
        env = job_env(job, run_id, chosen, rank, gpus, run_outputs(t.node.workdir, run_id), master_port=port)
        cmd = launch_command(job, extra, chosen, rank, gpus, master_port=port)
        return start_command(t, job, run_id, cmd, want_gpu, env=env, then_follow=then_follow)

    def refuse(t: Transport, code: int, stderr: str, started: list[Transport]) -> UserError:
        for s in started:  # don't leave the ranks already started waiting for a peer that never comes
            run(s.argv(s.runner("cancel", "--run-id", run_id, "--grace", "5")), capture=True, check=False)
        _records_dir(paths).joinpath(f"{run_id}.json").unlink(missing_ok=True)
        why = _runner_error(stderr, f"exit {code}")
        return UserError(f"{t.node.alias}: could not start the run: {why}", code=code if code in (3, 4) else 1)

    _records_dir(paths).mkdir(parents=True, exist_ok=True)
    record.save(_records_dir(paths))
    # The other ranks first (they wait for rank 0's rendezvous), then rank 0, followed in the same
    # connection unless detached.
    started: list[Transport] = []
    for rank, t in reversed(list(enumerate(ts))):
        if rank == 0 and not detach:
            break
        res = run(t.argv(command(rank, t, False)), capture=True, check=False, input_text=runner_src)
        if res.returncode != 0:
            raise refuse(t, res.returncode, res.stderr, started)
        started.append(t)
    where = ", ".join(n.alias for n in chosen)
    if detach:
        echo(f"run {run_id} started on {where}")
        echo(f"detached: follow with `inv logs --run {run_id} --follow`, cancel with `inv cancel --run {run_id}`")
        return 0
    try:
        code, status = _stream(
            ts[0],
            run_id,
            first=(command(0, ts[0], True), runner_src),
            on_start=lambda: echo(f"run {run_id} started on {where}"),
        )
    except _StartFailed as exc:
        raise refuse(ts[0], exc.code, exc.stderr, started) from None
    except KeyboardInterrupt:
        if cancel_on_interrupt:
            for t in ts:
                run(t.argv(t.runner("cancel", "--run-id", run_id, "--grace", "10")), capture=True, check=False)
            echo(f"\ncancelled run {run_id}")
            return 130
        echo(
            f"\ndetached from run {run_id}; it keeps running on the node.\n"
            f"  reattach: inv logs --run {run_id} --follow\n  cancel:   inv cancel --run {run_id}\n"
            f"  results:  inv pull --run {run_id}"
        )
        return 130
    statuses = [status or {}] + [wait_status(t, run_id) for t in ts[1:]]
    codes = [code] + [_exit_of(st) for st in statuses[1:]]
    final = next((c for c in codes if c), 0)
    dest = pull_run(paths, record, ts, codes, statuses)
    echo(f"run {run_id} finished with exit code {final}; results in {dest}")
    return final


def _check_local_cuda() -> None:
    try:
        import torch
    except ImportError:
        raise UserError("--gpu with --local needs PyTorch on this machine") from None
    if not torch.cuda.is_available():
        raise UserError(f"--gpu with --local but CUDA is not usable here (torch {torch.__version__}); drop --gpu")


class _StartFailed(Exception):
    def __init__(self, code: int, stderr: str) -> None:
        super().__init__(code, stderr)
        self.code = code
        self.stderr = stderr


def follow(t: Transport, run_id: str, reconnect_for: float = 600.0) -> int:
    """Stream the run's log from rank 0 to stdout; reconnect after a dropped connection."""
    return _stream(t, run_id, reconnect_for)[0]


def _stream(
    t: Transport,
    run_id: str,
    reconnect_for: float = 600.0,
    first: tuple[str, str] | None = None,
    on_start: Any = None,
) -> tuple[int, dict[str, Any] | None]:
    """(exit code, final status) of a run whose log is streamed to stdout.

    `first` is (start-and-follow command, its stdin): the run is started in the same connection; a
    refusal raises _StartFailed. Later attempts (after a dropped connection) only follow.
    """
    shown = 0
    lost_since: float | None = None
    out = sys.stdout.buffer
    started = first is None
    while True:
        if not started and first is not None:
            argv, stdin = t.argv(first[0]), first[1]
        else:
            argv, stdin = (
                t.argv(t.runner("follow", "--run-id", run_id, "--offset", str(shown), "-q", "--status-json")),
                None,
            )
        proc = subprocess.Popen(  # noqa: S603
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        )
        assert proc.stdout is not None and proc.stderr is not None
        box: dict[str, Any] = {"status": None, "started": False, "err": []}
        reader = threading.Thread(target=_read_stderr, args=(proc.stderr, box, on_start), daemon=True)
        reader.start()
        try:
            if stdin is not None:
                assert proc.stdin is not None
                try:
                    proc.stdin.write(stdin.encode())
                    proc.stdin.close()
                except BrokenPipeError:
                    pass
            while chunk := proc.stdout.read1(65536):  # type: ignore[attr-defined]
                out.write(chunk)
                out.flush()
                shown += len(chunk)
                lost_since = None
            code = proc.wait()
            reader.join()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        err, status = "\n".join(box["err"]), box["status"]
        if not started:
            if box["started"]:
                started = True
            elif code != SSH_LOST or t.local:
                raise _StartFailed(code, err)
            elif run_status(t, run_id) is None:
                raise UserError(
                    f"lost the connection to {t.node.alias} while starting run {run_id}: {err or 'no detail'}"
                )
            else:
                started = True  # it started; the connection dropped before we heard so
                if on_start:
                    on_start()
        if code != SSH_LOST or t.local:
            if code == 2 and "unknown run" in err:
                raise UserError(_runner_error(err, f"unknown run {run_id}"))
            return code, status
        if status and status.get("state") == "finished":
            return code, status  # the job itself exited 255: follow told us so before it ended
        # 255: the connection dropped (or the run was lost): ask for its status on a fresh connection.
        state = run_status(t, run_id)
        if state and state.get("state") == "finished":
            return _exit_of(state), state
        if state and state.get("state") == "lost":
            echo(f"run {run_id}: the job process vanished without an exit code (node rebooted?)")
            return SSH_LOST, state
        lost_since = lost_since or time.monotonic()
        if time.monotonic() - lost_since > reconnect_for:
            raise UserError(
                f"lost the connection to {t.node.alias} for {reconnect_for:.0f} s; the run goes on: "
                f"`inv logs --run {run_id} --follow`"
            )
        echo(f"(connection to {t.node.alias} lost; reconnecting…)")
        time.sleep(2)


def _read_stderr(stream: Any, box: dict[str, Any], on_start: Any) -> None:
    """Sort a start/follow command's stderr: start's JSON line, follow's final status, the rest."""
    for raw in stream:
        line = raw.decode(errors="replace").rstrip("\n")
        obj = None
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except ValueError:
                obj = None
        if isinstance(obj, dict) and "run_dir" in obj:
            box["started"] = True
            if on_start:
                on_start()
        elif isinstance(obj, dict) and "state" in obj:
            box["status"] = obj
        else:
            box["err"].append(line)


def run_status(t: Transport, run_id: str | None = None) -> Any:
    args = ["status"] + (["--run-id", run_id] if run_id else [])
    res = run(t.argv(t.runner(*args)), capture=True, check=False)
    if res.returncode != 0:
        return None
    try:
        return json.loads(res.stdout)
    except ValueError:
        return None


def _exit_of(st: dict[str, Any]) -> int:
    return int(st["exit_code"]) if st.get("exit_code") is not None else SSH_LOST


def wait_status(t: Transport, run_id: str, poll: float = 1.0, unreachable_for: float = 300.0) -> dict[str, Any]:
    """Wait for a non-zero rank to finish; return its final status. A node that stays unreachable
    (spot-interrupted, or terminated itself) counts as lost rather than hanging the launch forever."""
    gone_since: float | None = None
    while True:
        st = run_status(t, run_id)
        if st and st.get("state") in ("finished", "lost"):
            return st
        if st is None:
            gone_since = gone_since or time.monotonic()
            if time.monotonic() - gone_since > unreachable_for:
                echo(f"run {run_id}: {t.node.alias} unreachable for {unreachable_for:.0f} s; counting it as lost")
                return {"state": "lost", "exit_code": None}
        else:
            gone_since = None
        time.sleep(poll)


def wait_exit(t: Transport, run_id: str, poll: float = 1.0) -> int:
    """Wait for a non-zero rank to finish; return its exit code."""
    return _exit_of(wait_status(t, run_id, poll))


# -- pull / logs / runs / cancel -------------------------------------------------------------
def local_run_dir(paths: Paths, job: str, run_id: str) -> Path:
    return paths.runs / job / run_id


def pull_run(
    paths: Paths,
    record: RunRecord,
    ts: list[Transport],
    codes: list[int] | None = None,
    statuses: list[dict[str, Any]] | None = None,
) -> Path:
    """Copy outputs and logs home into runs/<job>/<run-id>/ and write run.json; never overwrite.

    One rsync per node (rank 0: its outputs and log together); statuses already known are not asked
    for again.
    """
    dest = local_run_dir(paths, record.job, record.run_id)
    if dest.exists():
        raise UserError(f"{dest} already exists; it is never overwritten: move it away to pull {record.run_id} again")
    tmp = dest.with_name(f".{dest.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)  # an earlier pull that was interrupted: ours, never the user's
    tmp.mkdir(parents=True)
    for rank, t in enumerate(ts):
        src = f"{t.node.workdir}/runs/{record.run_id}/"
        if rank == 0:
            argv = t.rsync(t.target(run_outputs(t.node.workdir, record.run_id) + "/"), f"{tmp}/", stats=False)
            argv.insert(-1, t.target(src + "log"))
            run(argv, capture=True)
            if len(ts) > 1:
                (tmp / "logs").mkdir(exist_ok=True)
                shutil.copyfile(tmp / "log", tmp / "logs" / "node-0.log")
        else:
            run(t.rsync(t.target(src + "log"), str(tmp / "logs" / f"node-{rank}.log"), stats=False), capture=True)
    known = list(statuses or [])
    full = [known[i] if i < len(known) and known[i] else (run_status(t, record.run_id) or {}) for i, t in enumerate(ts)]
    info = _run_json(record, full, codes)
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
        "estimated_cost_usd": (
            round(price * len(record.nodes) * duration / 3600, 4)
            if price is not None and duration is not None
            else None
        ),
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
            f"run {record.run_id} is still running; wait with `inv logs --run {record.run_id} --follow`, then pull"
        )
    return pull_run(ws.paths, record, ts, statuses=[st])


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
        echo(f"run {record.run_id} is still running: `inv logs --run {record.run_id} --follow` to keep watching")
        return 0
    code = _stream(ts[0], record.run_id)[0]  # `follow` is the flag here
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

"""Fitting jobs: a folder synced to the nodes, run there detached from SSH, outputs brought home.

On the node, remotefit/node/runner.py (uploaded with contract.py to <workdir>/.remotefit/) starts the job in its own
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

from remotefit import cost, data, tensorboard
from remotefit.config import Paths
from remotefit.data import DataEntry, parse_data
from remotefit.data import excludes as data_excludes
from remotefit.errors import UserError
from remotefit.node import NODE_DIR, contract
from remotefit.proc import atomic_write, echo, ensure_writable, run, run_bytes
from remotefit.ssh import Node, remote, rsync_argv, ssh_argv
from remotefit.workspace import Workspace

RUNNER = NODE_DIR / "runner.py"
CONTRACT = NODE_DIR / "contract.py"
UPLOADER = NODE_DIR / "uploader.py"
DEFAULT_EXCLUDES = (".git/", ".venv/", "venv/", ".env/", "__pycache__/", "*.pyc", ".ipynb_checkpoints/", ".remotefit/")
JOB_KEYS = {
    "command", "setup", "outputs", "exclude", "env", "pass_env", "gpu", "distributed", "requirements", "data",
    "tensorboard", "sync_every",
}  # fmt: skip
DEFAULT_SYNC_EVERY = 60.0  # seconds between uploads of a run's outputs and log to the runs bucket
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MASTER_PORT = 29500
SSH_FAILED = 255  # ssh's own exit status when the connection fails (not the runner's EXIT_LOST: a job lost)


@dataclass
class Job:
    path: Path
    name: str
    command: str
    setup: str = ""
    outputs: str = "outputs"
    exclude: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    pass_env: list[str] = field(default_factory=list)  # names forwarded from the laptop's environment
    gpu: bool = False
    distributed: bool = False
    requirements: str | None = None
    sync_every: float = DEFAULT_SYNC_EVERY  # job.toml sync_every: seconds between uploads to the runs bucket
    data: list[DataEntry] = field(default_factory=list)  # job.toml [data]: fetched on the node (remotefit/data.py)
    tensorboard: str | None = None  # job.toml tensorboard: the log dir TensorBoard serves (remotefit/tensorboard.py)


def load_job(path: str | Path, cmd: str | None = None) -> Job:
    """Read a job folder and its optional job.toml; every problem names the file and line or flag."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"job folder {path} does not exist; give the path of a folder, e.g. jobs/resnet")
    if not p.is_dir():
        raise UserError(f"{path} is a file, not a job folder; give the folder that holds it")
    p = p.resolve()
    # The name becomes a path on the node, carried in rsync and shell arguments: a newline there
    # would send the files to one folder and run the job in another. Control characters and bytes
    # that are not UTF-8 cannot be carried safely; everything else (spaces, quotes, $) can.
    bad = next((ch for ch in p.name if ord(ch) < 32 or ord(ch) == 127 or 0xDC80 <= ord(ch) <= 0xDCFF), None)
    if bad is not None:
        what = "a byte that is not UTF-8" if ord(bad) >= 0xDC80 else f"the control character {bad!r}"
        raise UserError(f"job folder name {p.name!r} has {what}; rename the folder (letters, digits, spaces, -_.)")
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
    if requirements is not None:
        requirements = inside_job(p, requirements, f"{toml}: requirements")
    outputs = inside_job(p, spec.get("outputs", "outputs"), f"{toml}: outputs")
    entries = parse_data(p, spec.get("data"), str(toml), outputs)
    tensorboard = None if "tensorboard" not in spec else inside_job(p, spec["tensorboard"], f"{toml}: tensorboard")
    pass_env = spec.get("pass_env", [])
    if not isinstance(pass_env, list) or not all(
        isinstance(n, str) and ENV_NAME_RE.fullmatch(n.removesuffix("?")) for n in pass_env
    ):
        raise UserError(
            f'{toml}: pass_env must be a list of variable names, e.g. pass_env = ["WANDB_API_KEY", "HF_TOKEN?"] '
            "(a trailing ? makes one optional)"
        )
    sync_every = spec.get("sync_every", DEFAULT_SYNC_EVERY)
    if isinstance(sync_every, bool) or not isinstance(sync_every, int | float) or not 0 < sync_every <= 86400:
        raise UserError(
            f"{toml}: sync_every must be a positive number of seconds (at most 86400), e.g. sync_every = 60; "
            f"got {sync_every!r}"
        )
    try:
        return Job(
            path=p,
            name=p.name,
            command=str(command),
            setup=str(spec.get("setup", "")),
            outputs=outputs,
            exclude=[str(x) for x in spec.get("exclude", [])],
            env={str(k): str(v) for k, v in dict(spec.get("env", {})).items()},
            pass_env=list(pass_env),
            gpu=bool(spec.get("gpu", False)),
            distributed=bool(spec.get("distributed", False)),
            requirements=requirements,
            sync_every=float(sync_every),
            data=entries,
            tensorboard=tensorboard,
        )
    except (TypeError, ValueError) as exc:
        raise UserError(
            f"{toml}: a value has the wrong type ({exc}); see jobs/resnet/job.toml for the format"
        ) from None


def passed_env(
    job: Job, cli: Sequence[str] = (), environ: dict[str, str] | None = None
) -> tuple[dict[str, str], list[str]]:
    """The variables forwarded to the job from this machine's environment: job.toml's pass_env plus
    `--env NAME` / `--env NAME=VALUE`. Returns (values, warnings). The values travel only on the start
    command's stdin into the node's 0600 env file: never into a file here, run.json or a log."""
    environ = dict(os.environ) if environ is None else environ
    values: dict[str, str] = {}
    warnings: list[str] = []
    for raw in job.pass_env:
        name, optional = raw.removesuffix("?"), raw.endswith("?")
        if name in environ:
            values[name] = environ[name]
        elif optional:
            warnings.append(f"warning: {name} (job.toml pass_env, optional) is not set here; the job runs without it")
        else:
            raise UserError(
                f"{name} (job.toml pass_env) is not set in this environment; export it, or write {name}? to make "
                "it optional"
            )
    for item in cli:
        name, eq, value = item.partition("=")
        if not ENV_NAME_RE.fullmatch(name):
            raise UserError(f"--env {item.split('=')[0]!r} is not a variable name; use --env NAME or --env NAME=VALUE")
        if eq:
            values[name] = value
        elif name in environ:
            values[name] = environ[name]
        else:
            raise UserError(
                f"--env {name}: {name} is not set in this environment; export it or pass --env {name}=VALUE"
            )
    reserved = sorted(n for n in values if n.startswith("REMOTEFIT_"))
    if reserved:
        raise UserError(f"{reserved[0]} is set by remotefit itself (see the README's job environment); rename it")
    return values, warnings


def inside_job(folder: Path, value: object, where: str) -> str:
    """`value` as a clean relative path inside the job folder, or a UserError naming `where`.

    job.toml paths become paths on the node (outputs is renamed and replaced with a symlink there),
    and on the sandbox or with --local the node is this machine: nothing may point outside."""
    fix = "use a relative path inside the job folder, e.g. outputs"
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{where} must be a non-empty string; {fix}")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise UserError(f"{where} = {value!r} has a control character; {fix}")
    pure = posixpath.normpath(value)
    if value.startswith(("/", "~")) or pure in (".", "") or pure == ".." or pure.startswith("../"):
        raise UserError(f"{where} = {value!r} is not inside the job folder; {fix}")
    # A symlink in the job folder must not lead the path out of it either.
    parent = (folder / pure).parent.resolve()
    if parent != folder and folder not in parent.parents:
        raise UserError(f"{where} = {value!r} leads out of the job folder through a symlink; {fix}")
    return pure


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

    def rsync(self, src: str | Sequence[str], dest: str, **kw: Any) -> list[str]:
        """rsync argv between this machine and the node (no ssh for a local transport)."""
        return rsync_argv(self.ssh_config, src, dest, **kw)

    def runner(self, *args: str) -> str:
        """The shell command that runs runner.py with the node's Python (the one that has PyTorch)."""
        base = self.node.workdir
        # -S: the runner needs only the standard library; skipping site (PyTorch's .pth files and
        # all) saves ~40 ms per call. Its supervisor and job processes start with site as usual.
        return remote([self.node.python, "-S", contract.runner_path(base), args[0], "--base", base, *args[1:]])


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
    excludes = [*DEFAULT_EXCLUDES, f"/{job.outputs}/", *job.exclude, *data_excludes(job.data)]
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
    dest = contract.job_dir(t.node.workdir, job.name)
    rsync_path = None
    if not t.local:
        # In the same connection, before rsync starts there: refuse (runner exit 3) while a run is
        # active, so a second fit never rewrites a running job's folder (an older runner without
        # `idle`, exit 2, does not block), and make the destination without another round trip.
        runner = contract.runner_path(t.node.workdir)
        idle = f"{{ [ ! -f {shlex.quote(runner)} ] || {t.runner('idle')} || [ $? -ne {contract.EXIT_BUSY} ]; }}"
        rsync_path = f"{idle} && mkdir -p {shlex.quote(dest)} && rsync"
    # --safe-links: a symlink pointing outside the job folder is not sent; exact numbers in --stats
    # (human=False): the summary parses them.
    return t.rsync(
        f"{job.path}/",
        t.target(dest) + "/",
        excludes=excludes,
        filters=filters,
        delete=True,
        human=False,
        safe_links=True,
        rsync_path=rsync_path,
    )


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
        from remotefit.inventory import require_nodes

        assert ws is not None
        all_nodes = require_nodes(ws)
        ts = transports(ws, all_nodes[: nodes or len(all_nodes)])
    for t in ts:
        if t.local:
            if Path(contract.runner_path(t.node.workdir)).exists():
                res = run(t.argv(t.runner("idle")), capture=True, check=False)
                if res.returncode == contract.EXIT_BUSY:
                    raise UserError(contract.runner_error(res.stderr, "a run is active"), code=contract.EXIT_BUSY)
            Path(contract.job_dir(t.node.workdir, job.name)).mkdir(parents=True, exist_ok=True)

    def one(t: Transport) -> str:
        res = run(sync_argv(t, job), capture=True, check=False)
        if res.returncode != 0:
            if contract.is_refusal(res.stderr):
                raise UserError(f"{t.node.alias}: {contract.runner_error(res.stderr, '')}", code=contract.EXIT_BUSY)
            if res.returncode in TRANSPORT_FAILED and ws is not None and not t.local:
                if "Permission denied" in (res.stderr or ""):
                    from remotefit.keys import key_path

                    raise UserError(
                        f"{t.node.alias} refuses this stage's ssh key {key_path(ws.paths.generated, ws.stage)}: a node "
                        "trusts only the key it was created with (was that file deleted or replaced?); restore it, "
                        "or `inv destroy` then `inv apply`"
                    )
                raise UserError(f"sync to {t.node.alias} failed: {unreachable(ws, t)}")
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


# rsync's exit codes when the connection (not the copy) failed: 10 socket I/O, 12 data stream
# (ssh died), 30/35 timeouts, 255 ssh's own.
TRANSPORT_FAILED = (10, 12, 30, 35, SSH_FAILED)


def unreachable(ws: Workspace | None, t: Transport) -> str:
    """Why a node did not answer: its EC2 state and the fix (`inv start`, `inv apply`)."""
    if ws is None or t.local:
        return f"{t.node.alias} did not answer"
    from remotefit.nodes import explain_unreachable

    return explain_unreachable(ws, t.node)


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
    return contract.outputs_dir(base, run_id)


def node_sources() -> tuple[str, str, str]:
    """(contract.py, uploader.py, runner.py) as uploaded at each start: read once per process."""
    global _SOURCES
    if _SOURCES is None:
        _SOURCES = (CONTRACT.read_text(), UPLOADER.read_text(), RUNNER.read_text())
    return _SOURCES


_SOURCES: tuple[str, str, str] | None = None


def keep_spec(ws: Workspace, job: Job, record: RunRecord, rank: int) -> dict[str, Any]:
    """What the node's uploader needs (contract.KEEP_KEY): where in the runs bucket, how often, and how
    to reach S3 — the region, plus the sandbox's endpoint; never a profile, a key or a secret (on
    EC2 the instance profile signs)."""
    from remotefit.results import log_key, run_prefix, status_key

    return {
        "bucket": ws.settings.runs_bucket,
        "prefix": run_prefix(ws.stage, job.name, record.run_id),
        "region": ws.settings.AWS_REGION,
        "every": job.sync_every,
        "log_key": log_key(rank),
        "status_key": status_key(rank),
        "outputs": rank == 0,  # rank 0's outputs are the run's, as in a pull from the nodes
        # `--resume`: rank 0 brings the earlier run's outputs (its checkpoint) back before the job starts.
        "restore_from": run_prefix(ws.stage, job.name, record.resumed_from)
        if rank == 0 and record.resumed_from
        else None,
        "record": record.__dict__ if rank == 0 else None,
        "aws_env": data.node_aws_env(ws),
    }


def start_command(
    t: Transport,
    job: Job,
    run_id: str,
    cmd: str,
    gpu: bool,
    env: dict[str, str] | None = None,
    then_follow: bool = False,
) -> str:
    """One shell line for the node: install contract.py + runner.py and write the env file (all sent
    on stdin, see start_input), start the run (the runner links outputs/); with then_follow, the same
    runner process streams its log (start's JSON goes to stderr then, and the run's status ends
    stderr as a JSON line)."""
    base = t.node.workdir
    rdir = contract.runner_dir(base)
    jobdir = contract.job_dir(base, job.name)
    outdir = run_outputs(base, run_id)
    envfile = contract.env_file(base, run_id)
    q = shlex.quote
    # stdin (start_input): the env as one JSON line, then contract.py, then runner.py. job.toml [env]
    # may carry tokens: they never appear in a command line (visible in `ps` on both machines), only
    # in a shell variable and a 0600 file that the runner deletes as soon as it has read it. `read`
    # takes exactly one line from a pipe, then exactly contract.py's bytes are read, and `cat` takes
    # the rest. contract.py is in place before the runner that imports it. Nodes run Linux, whose
    # GNU head never reads past -c; on this machine (--local, maybe a Mac whose head reads ahead)
    # dd bs=1 reads byte by byte instead (slower: a few ms).
    contract_src, uploader_src, _runner = node_sources()

    def exact(text: str) -> str:
        size = len(text.encode())
        return f"dd bs=1 count={size} 2>/dev/null" if t.local else f"head -c {size}"

    install = (
        f"IFS= read -r RF_ENV && mkdir -p {q(rdir)} && "
        f"{exact(contract_src)} > {q(rdir)}/contract.py.$$ && {exact(uploader_src)} > {q(rdir)}/uploader.py.$$ && "
        f"cat > {q(rdir)}/runner.py.$$ && mv -f {q(rdir)}/contract.py.$$ {q(rdir)}/contract.py && "
        f"mv -f {q(rdir)}/uploader.py.$$ {q(rdir)}/uploader.py && mv -f {q(rdir)}/runner.py.$$ {q(rdir)}/runner.py"
    )
    envwrite = f"(umask 077 && printf '%s' \"$RF_ENV\" > {q(envfile)})"
    # outputs/ in the job folder points at this run's own outputs (the runner links it, refusing any
    # path out of the job folder): any script writing ./outputs works, and runs never mix.
    args = ["start", "--run-id", run_id, "--job-dir", jobdir, "--cmd", cmd, "--env-file", envfile, "--json"]
    args += ["--outputs", job.outputs, "--outputs-dir", outdir]
    if job.requirements:
        args += ["--requirements", job.requirements]
    if job.setup:
        args += ["--setup", job.setup]
    if gpu:
        args.append("--check-cuda")
    if then_follow:
        args.append("--follow")
    # The job's `python` is the node's Python through the runner's shims (remotefit/node/runner.py), on a
    # stock node's PATH: nothing here puts the node Python's own folder (the sandbox's: our venv) on it.
    return f"{install} && {envwrite} && exec {t.runner(*args)}"


def start_input(env: dict[str, str] | None, runner_src: str | None = None) -> str:
    """What start_command reads on stdin: the env as one JSON line (json.dumps escapes newlines),
    then contract.py, uploader.py and runner.py (`runner_src` replaces the packaged runner, for tests)."""
    contract_src, uploader_src, packaged = node_sources()
    return json.dumps(env or {}) + "\n" + contract_src + uploader_src + (packaged if runner_src is None else runner_src)


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


def git_commit(path: Path) -> str | None:
    """The job folder's commit (`-dirty` with uncommitted changes there), None outside git or without it."""
    try:
        res = run(["git", "-C", str(path), "rev-parse", "HEAD"], capture=True, check=False)
    except UserError:  # git is not installed: a run needs no commit
        return None
    if res.returncode != 0:
        return None
    dirty = run(["git", "-C", str(path), "status", "--porcelain", "--", "."], capture=True, check=False)
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
    want_gpu = gpu or (job.gpu and not cpu)
    paths = ws.paths if ws else (paths or Paths.at())
    if local:
        if want_gpu:
            _check_local_cuda()
        chosen = [local_node(paths)]
        ts = transports(None, chosen)
    else:
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
        ts = transports(ws, chosen)
    gpus = 0 if local else (cost.instance_info(chosen[0].instance_type).gpus or 0)
    # The results come home to runs/<job>/: find out now that they can, not after the run.
    ensure_writable(paths.runs)
    if (paths.runs / job.name).exists():
        ensure_writable(paths.runs / job.name)
    if job.data and not local:
        assert ws is not None
        data.check_buckets(job.data, data.allowed_buckets(ws), str(job.path / "job.toml"))
    tb = tensorboard.plan(job, tensorboard_flag)
    earlier = None
    if resume is not None:
        if local or ws is None:
            raise UserError("--resume restores a run from the runs bucket onto nodes; it does not work with --local")
        earlier = resume_source(ws, job, resume)
    # git's two calls and the data fetch run beside the sync (the fetch has its own connection and never
    # touches the synced files); all end before the run exists: a fetch that fails leaves nothing started.
    with ThreadPoolExecutor(max_workers=2) as pool:
        commit = pool.submit(git_commit, job.path)
        fetched = pool.submit(data.fetch, ts, job.data, job.name, {} if local else data.node_aws_env(ws))
        sync(ws, job, ts=ts)
        fetched.result()
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
        commit.result(),
        sorted(secrets or {}),
        resumed_from=earlier.run_id if earlier else None,
        attempts=earlier.attempts if earlier else [],
    )
    if earlier is not None:
        echo(
            f"resuming run {earlier.run_id} as attempt {len(earlier.attempts) + 1}: its outputs come back from the "
            f"runs bucket onto {chosen[0].alias} before the job starts"
        )

    def command(rank: int, t: Transport, then_follow: bool) -> tuple[str, str]:
        """(start command line, its stdin) for one rank."""
        env = job_env(job, run_id, chosen, rank, gpus, run_outputs(t.node.workdir, run_id), master_port=port)
        env |= secrets or {}  # on stdin only (start_input), like job.toml's [env]
        if ws is not None and not local:  # results outlive the nodes: kept in the runs bucket
            env[contract.KEEP_KEY] = json.dumps(keep_spec(ws, job, record, rank))
        cmd = launch_command(job, extra, chosen, rank, gpus, master_port=port)
        line = start_command(t, job, run_id, cmd, want_gpu, env=env, then_follow=then_follow)
        return line, start_input(env)

    def refuse(t: Transport, code: int, stderr: str, started: list[Transport]) -> UserError:
        for s in started:  # don't leave the ranks already started waiting for a peer that never comes
            run(s.argv(s.runner("cancel", "--run-id", run_id, "--grace", "5")), capture=True, check=False)
        _records_dir(paths).joinpath(f"{run_id}.json").unlink(missing_ok=True)
        why = contract.runner_error(stderr, f"exit {code}")
        keep = code in (contract.EXIT_BUSY, contract.EXIT_NO_CUDA)
        return UserError(f"{t.node.alias}: could not start the run: {why}", code=code if keep else 1)

    _records_dir(paths).mkdir(parents=True, exist_ok=True)
    record.save(_records_dir(paths))
    # The other ranks first (they wait for rank 0's rendezvous), then rank 0, followed in the same
    # connection unless detached.
    started: list[Transport] = []
    for rank, t in reversed(list(enumerate(ts))):
        if rank == 0 and not detach:
            break
        line, stdin = command(rank, t, False)
        res = run(t.argv(line), capture=True, check=False, input_text=stdin)
        if res.returncode != 0:
            raise refuse(t, res.returncode, res.stderr, started)
        started.append(t)
    where = ", ".join(n.alias for n in chosen)

    def started_now() -> None:
        echo(f"run {run_id} started on {where}")
        if tb is not None:
            tensorboard.start(ws, ts[0], tb, run_id)

    if detach:
        started_now()
        echo(f"detached: follow with `inv logs --run {run_id} --follow`, cancel with `inv cancel --run {run_id}`")
        return 0
    try:
        code, status = _stream(
            ts[0],
            run_id,
            first=command(0, ts[0], True),
            on_start=started_now,
        )
    except _StartFailed as exc:
        raise refuse(ts[0], exc.code, exc.stderr, started) from None
    except KeyboardInterrupt:
        if cancel_on_interrupt:
            for t in ts:
                run(t.argv(t.runner("cancel", "--run-id", run_id, "--grace", "10")), capture=True, check=False)
            echo(f"\ncancelled run {run_id}")
        else:
            echo(
                f"\ndetached from run {run_id}; it keeps running on the node.\n"
                f"  reattach: inv logs --run {run_id} --follow\n  cancel:   inv cancel --run {run_id}\n"
                f"  results:  inv pull --run {run_id}"
            )
        if raise_interrupt:
            raise
        return 130
    if tb is not None:
        tensorboard.stop(ws, ts[0], run_id)
    statuses = [status or {}] + [wait_status(t, run_id) for t in ts[1:]]
    codes = [code] + [_exit_of(st) for st in statuses[1:]]
    final = next((c for c in codes if c), 0)
    hit = [t.node for t, st in zip(ts, statuses, strict=True) if st.get("spot_notice")]
    if hit and ws is not None and not local:
        said_interrupted(ws, record, hit, statuses[0])
        home = None
        if not all(isinstance(st.get("kept"), dict) and st["kept"].get("complete") for st in statuses):
            # Not all of it is in the bucket: bring it home from the nodes before anything ends them.
            try:
                home = pull_run(paths, record, ts, codes, statuses)
                echo(f"run {run_id}: results pulled to {home}")
            except UserError as exc:
                echo(f"warning: could not pull run {run_id} from its nodes: {exc.message}")
        if max_recoveries > 0:
            from remotefit import nodes as nd

            echo(
                f"recovering run {run_id} ({max_recoveries - 1} more recover{'y' if max_recoveries == 2 else 'ies'} allowed after this one)"
            )
            nd.recover(ws, hit)
            return fit(
                ws, job, extra, gpu=gpu, cpu=cpu, nodes=nodes, cancel_on_interrupt=cancel_on_interrupt,
                raise_interrupt=raise_interrupt, paths=paths, secrets=secrets, tensorboard_flag=tensorboard_flag,
                resume=run_id, max_recoveries=max_recoveries - 1,
            )  # fmt: skip
        echo(
            f"no recoveries left (--max-recoveries): resume by hand with `inv apply --spot`, then "
            f"`inv fit {job.path} --resume {run_id}`"
        )
        kept = home or pull_kept(ws, record)  # the node is being reclaimed: its results are in the runs bucket
        echo(f"run {run_id} was interrupted (exit code {final}); results in {kept}")
        return final
    dest = pull_run(paths, record, ts, codes, statuses)
    echo(f"run {run_id} finished with exit code {final}; results in {dest}")
    for t, st in zip(ts, statuses, strict=True):
        warning = kept_warning(st, run_id, t.node.alias)
        if warning:
            echo(warning)
    return final


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
        # Only the runner's own final status line says how the run ended. Any other end of the
        # command (ssh's SSH_FAILED, a client killed by a signal, a closed pipe) is a lost connection:
        # the run goes on on the node, so ask it, and reconnect until it ends.
        refused = contract.is_refusal(err) and 0 < code < SSH_FAILED
        if not started:
            if box["started"]:
                started = True
            elif refused or (0 <= code < SSH_FAILED and err.strip()):  # the node said no
                raise _StartFailed(code, err)
            elif run_status(t, run_id) is None:
                raise UserError(
                    f"lost the connection to {t.node.alias} while starting run {run_id}: {err or 'no detail'}; "
                    f"if it started, `inv logs --run {run_id} --follow` finds it"
                )
            else:
                started = True  # it started; the connection dropped before we heard so
                if on_start:
                    on_start()
        if refused:
            if "unknown run" in err:
                raise UserError(contract.runner_error(err, f"unknown run {run_id}"))
            raise UserError(f"{t.node.alias}: {contract.runner_error(err, f'runner exit {code}')}")
        if status is None:
            status = run_status(t, run_id)  # on a fresh connection
            if status and status.get("state") not in ("finished", "lost"):
                status = None
        # The end is known and every byte of the log was shown (a killed client may have lost the
        # tail while its status line still came through): done. Otherwise follow again from `shown`.
        if status is not None and int(status.get("log_bytes") or 0) <= shown:
            if status.get("state") == "lost":
                echo(f"run {run_id}: the job process vanished without an exit code (node rebooted?)")
            return _exit_of(status), status
        lost_since = lost_since or time.monotonic()
        if time.monotonic() - lost_since > reconnect_for:
            raise UserError(
                f"lost the connection to {t.node.alias} for {reconnect_for:.0f} s; run {run_id} goes on there: "
                f"reattach with `inv logs --run {run_id} --follow`, cancel with `inv cancel --run {run_id}`, "
                f"then `inv pull --run {run_id}`"
            )
        echo(f"(connection to {t.node.alias} lost; reconnecting…)")
        time.sleep(0.2 if status else 2)


def _read_stderr(stream: Any, box: dict[str, Any], on_start: Any) -> None:
    """Sort a start/follow command's stderr: start's JSON line, follow's final status, the rest."""
    for raw in stream:
        line = raw.decode(errors="replace").rstrip("\n")
        kind, obj = contract.parse_message(line)
        if kind == contract.MSG_STARTED:
            box["started"] = True
            if on_start:
                on_start()
        elif kind == contract.MSG_STATUS:
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
    return int(st["exit_code"]) if st.get("exit_code") is not None else contract.EXIT_LOST


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
            run(t.rsync([outputs, t.target(log)], f"{tmp}/", stats=False), capture=True)
            if len(ts) > 1:
                (tmp / "logs").mkdir(exist_ok=True)
                shutil.copyfile(tmp / "log", tmp / "logs" / "node-0.log")
        else:
            run(t.rsync(t.target(log), str(tmp / "logs" / f"node-{rank}.log"), stats=False), capture=True)
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
    res = run(t.argv("true"), capture=True, check=False)
    if res.returncode == 0:
        return f"{t.node.alias} has no run {record.run_id} (a node replaced by `inv apply` keeps nothing)"
    return unreachable(None if record.local else ws, t)


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
        res = run_bytes(ts[0].argv(remote(["cat", st["log"]])))
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
    from remotefit.inventory import inventory

    for n in inventory(ws):
        for st in run_status(Transport(n, ws.paths.ssh_config)) or []:
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
    head = ("run", "where", "exit", "duration", "node")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(5)]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [head, *rows]]


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
            res = run(t.argv(t.runner("cancel", "--run-id", run_id)), capture=True, check=False)
            if res.returncode != 0:
                why = contract.runner_error(res.stderr, f"exit {res.returncode}")
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

"""Launch: the run id, the job's environment and command line, and the one shell line that starts it on a node."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import secrets
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from remotefit import data
from remotefit.errors import UserError
from remotefit.jobs.records import (
    RunRecord,
)
from remotefit.jobs.spec import (
    Job,
)
from remotefit.node import NODE_DIR, contract
from remotefit.proc import run
from remotefit.ssh import Node
from remotefit.transport import Transport
from remotefit.workspace import Workspace

RUNNER = NODE_DIR / "runner.py"


CONTRACT = NODE_DIR / "contract.py"


UPLOADER = NODE_DIR / "uploader.py"


MASTER_PORT = 29500


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


def start_request(
    job: Job,
    run_id: str,
    cmd: str,
    gpu: bool,
    env: dict[str, str] | None = None,
    then_follow: bool = False,
) -> dict[str, Any]:
    """What the runner needs to start a run (contract.START_REQUEST); it derives the job and outputs folders
    from the node layout. With then_follow the same runner process streams the log (start's JSON goes to
    stderr then, and the run's status ends stderr as a JSON line)."""
    return {
        "run_id": run_id,
        "job": job.name,
        "cmd": cmd,
        "env": dict(env or {}),
        # outputs/ in the job folder points at this run's own outputs (the runner links it, refusing any
        # path out of the job folder): any script writing ./outputs works, and runs never mix.
        "outputs": job.outputs,
        "requirements": job.requirements,
        "setup": job.setup or None,
        "check_cuda": gpu,
        "follow": then_follow,
    }


def start_command(t: Transport) -> str:
    """One shell line for the node: install contract.py, uploader.py and runner.py, then start the run
    from the request (all sent on stdin, see start_input).

    The request comes first, as one line that `read` takes exactly from the pipe, and reaches the runner
    through a pipe from the shell's builtin printf: its env may carry tokens (job.toml [env], --env), which
    so never appear in a command line (visible in `ps` on both machines) nor in a file. Then exactly
    contract.py's and uploader.py's bytes are read and `cat` takes the rest (runner.py); each file is in
    place before the runner that imports it starts."""
    rdir = contract.runner_dir(t.node.workdir)
    q = shlex.quote
    contract_src, uploader_src, _runner = node_sources()

    def exact(text: str) -> str:
        return t.read_exact(len(text.encode()))

    install = (
        f"IFS= read -r RF_REQUEST && mkdir -p {q(rdir)} && "
        f"{exact(contract_src)} > {q(rdir)}/contract.py.$$ && {exact(uploader_src)} > {q(rdir)}/uploader.py.$$ && "
        f"cat > {q(rdir)}/runner.py.$$ && mv -f {q(rdir)}/contract.py.$$ {q(rdir)}/contract.py && "
        f"mv -f {q(rdir)}/uploader.py.$$ {q(rdir)}/uploader.py && mv -f {q(rdir)}/runner.py.$$ {q(rdir)}/runner.py"
    )
    # The job's `python` is the node's Python through the runner's shims (remotefit/node/runner.py), on a
    # stock node's PATH: nothing here puts the node Python's own folder (the sandbox's: our venv) on it.
    return f"{install} && printf '%s' \"$RF_REQUEST\" | {t.runner_line('start', '--request', '-')}"


def start_input(request: dict[str, Any], runner_src: str | None = None) -> str:
    """What start_command reads on stdin: the request as one JSON line (json.dumps escapes newlines), then
    contract.py, uploader.py and runner.py (`runner_src` replaces the packaged runner, for tests)."""
    contract_src, uploader_src, packaged = node_sources()
    line = json.dumps(request) + "\n"
    return line + contract_src + uploader_src + (packaged if runner_src is None else runner_src)


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


def _check_local_cuda() -> None:
    try:
        import torch
    except ImportError:
        raise UserError("--gpu with --local needs PyTorch on this machine") from None
    if not torch.cuda.is_available():
        raise UserError(f"--gpu with --local but CUDA is not usable here (torch {torch.__version__}); drop --gpu")

"""TensorBoard for a run: `inv fit --tensorboard`, or `tensorboard = "outputs/tb"` in job.toml.

TensorBoard comes from the job's own venv (its requirements must name it: the node image need not have
it). Once the run has started, remotefit/node/tensorboard_watch.py is sent to rank 0's node and started detached
there: it waits for the job's venv, serves the log dir on 127.0.0.1 of the node, and stops when the run
ends (or when `inv tunnel.close` closes its tunnel). The port comes here through the tunnel module; with
--local it is served on this machine directly.
"""

from __future__ import annotations

import hashlib
import re
import shlex
from dataclasses import dataclass
from typing import TYPE_CHECKING

from remotefit.errors import UserError
from remotefit.node import NODE_DIR
from remotefit.proc import echo

if TYPE_CHECKING:
    from remotefit.jobs import Job
    from remotefit.transport import Transport
    from remotefit.workspace import Workspace

SCRIPT = NODE_DIR / "tensorboard_watch.py"  # not tensorboard.py: beside runner.py it would shadow the package
BASE_PORT = 16006
LOCAL_PORT = 6006
REQUIRES_RE = re.compile(r"^\s*[^#]*\btensorboard\b", re.IGNORECASE | re.MULTILINE)


@dataclass(frozen=True)
class Plan:
    logdir: str  # relative to the job folder


def plan(job: Job, flag: bool) -> Plan | None:
    """The TensorBoard to start for this fit, or None (with one line saying why, when it was asked for)."""
    if not flag and job.tensorboard is None:
        return None
    logdir = job.tensorboard or f"{job.outputs}/tb"
    req = job.path / job.requirements if job.requirements else None
    if req is None or not REQUIRES_RE.search(req.read_text(errors="replace")):
        where = req.name if req else "requirements.txt"
        echo(
            f"tensorboard: not started: the job's requirements do not include it; add a line `tensorboard` to "
            f"{job.path.name}/{where} (its venv provides TensorBoard on the node)"
        )
        return None
    return Plan(logdir)


def remote_port(run_id: str) -> int:
    """One port per run (16006-17005): on a shared host (the sandbox) two runs never collide."""
    return BASE_PORT + int(hashlib.sha256(run_id.encode()).hexdigest(), 16) % 1000


def _paths(t: Transport, run_id: str) -> tuple[str, str]:
    base = t.node.workdir
    return f"{base}/.remotefit/tensorboard_watch.py", f"{base}/runs/{run_id}/tensorboard.pid"


def stop_command(t: Transport, run_id: str) -> str:
    """A shell line that stops the run's TensorBoard (its watcher ends TensorBoard on SIGTERM)."""
    _, pidfile = _paths(t, run_id)
    return f'kill -TERM "$(cat {shlex.quote(pidfile)} 2>/dev/null)" 2>/dev/null; true'


def start(ws: Workspace | None, t: Transport, p: Plan, run_id: str) -> None:
    """Start TensorBoard beside the run (detached) and print its URL; a failure here never stops the run."""
    script, pidfile = _paths(t, run_id)
    base = t.node.workdir
    port = remote_port(run_id)
    q = shlex.quote
    args = [t.node.python, script, "--base", base, "--run-id", run_id, "--logdir", p.logdir, "--port", str(port)]
    log = f"{base}/runs/{run_id}/tensorboard.log"
    line = (
        f"mkdir -p {q(base)}/.remotefit && cat > {q(script)}.$$ && mv -f {q(script)}.$$ {q(script)} && "
        f"(setsid nohup {shlex.join(args)} > {q(log)} 2>&1 < /dev/null & echo $! > {q(pidfile)})"
    )
    res = t.run(line, stdin=SCRIPT.read_text())
    if res.returncode != 0:
        echo(f"tensorboard: could not start it on {t.node.alias}: {(res.stderr or '').strip()[-200:]}")
        return
    note = f"serving {p.logdir}; it answers once the job's venv is ready, and stops when the run ends"
    if ws is None or not t.needs_tunnel():
        echo(f"tensorboard: http://127.0.0.1:{port}/ ({note})")
        return
    from remotefit import tunnel

    try:
        # Locally TensorBoard's usual 6006 (or the next free port), never the node's own port: a sandbox node
        # shares this machine's loopback, where the tunnel must not take the port TensorBoard is about to bind.
        tun, _ = tunnel.open_tunnel(
            ws, [t.node], port, local_port=LOCAL_PORT, wait_remote=False, stop_command=stop_command(t, run_id)
        )
    except UserError as exc:
        echo(f"tensorboard: started on {t.node.alias}:{port}, but no tunnel: {exc}")
        return
    echo(f"tensorboard: {tun.url} ({note}; `inv tunnel.close --port {tun.local_port}` stops it)")


def stop(ws: Workspace | None, t: Transport, run_id: str) -> None:
    """After the run: close its tunnel (TensorBoard on the node has stopped with the run)."""
    if ws is None or not t.needs_tunnel():
        return
    from remotefit import tunnel

    for tun in tunnel.load(ws):
        if tun.alias == t.node.alias and tun.remote_port == remote_port(run_id):
            tunnel.close(ws, tun.local_port)

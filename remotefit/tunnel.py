"""Tunnels: a node's port (TensorBoard, Jupyter, a job's own server) on this machine, over our ssh config.

Each tunnel is one background `ssh -N -L 127.0.0.1:LOCAL:127.0.0.1:PORT` with the stage's ssh config (same key,
same known_hosts, same host-key checks). It does not ride the shared ControlMaster: a master kept alive by
ControlPersist drops every forward when its idle timer runs out (listening forwards do not count as open
channels), so a tunnel there would die silently ten minutes after the last `inv` command. Tunnels bind to
127.0.0.1 only, are recorded in generated/tunnels.json, and end with `inv tunnel.close`, `inv destroy` or
the node. The node's watchdog does not count them as sessions (no command runs in them), so an open tunnel
never keeps an idle node billing.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from remotefit.errors import UserError
from remotefit.proc import atomic_write, run, spawn_daemon
from remotefit.ssh import Node, remote, ssh_argv
from remotefit.workspace import Workspace

PORT_SEARCH = 50  # how far past a busy local port to look for a free one


@dataclass(frozen=True)
class Tunnel:
    node: int
    alias: str
    remote_port: int
    local_port: int
    pid: int
    started: str
    stop_command: str | None = None  # run on the node when the tunnel closes (a TensorBoard the fit started)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.local_port}/"


def tunnel_argv(config: Path, alias: str, local_port: int, remote_port: int) -> list[str]:
    """A forward-only ssh (-N) of its own (-S none: not the ControlMaster, see the module doc); it exits at once
    if the local port cannot be bound (ExitOnForwardFailure)."""
    return [
        "ssh",
        "-F",
        str(config),
        "-N",
        "-S",
        "none",
        "-o",
        "ExitOnForwardFailure=yes",
        "-L",
        f"127.0.0.1:{local_port}:127.0.0.1:{remote_port}",
        alias,
    ]


def listening_probe(port: int) -> str:
    """A remote command that exits 0 when something on the node accepts connections on 127.0.0.1:port."""
    code = f"import socket,sys; s=socket.socket(); s.settimeout(2); sys.exit(s.connect_ex(('127.0.0.1', {port})))"
    return remote(["python3", "-c", code])


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pick_local_port(wanted: int, search: int = PORT_SEARCH) -> int:
    """`wanted` when free on 127.0.0.1, else the next free port above it."""
    for port in range(wanted, min(wanted + search + 1, 65536)):
        if port_free(port):
            return port
    raise UserError(f"no free local port in {wanted}..{wanted + search}; pass --local-port")


def valid_port(value: int, flag: str) -> int:
    if not 1 <= value <= 65535:
        raise UserError(f"{flag} {value} is not a TCP port; use 1..65535")
    return value


def _file(ws: Workspace) -> Path:
    return ws.paths.generated / "tunnels.json"


def _alive(t: Tunnel) -> bool:
    try:
        cmdline = Path(f"/proc/{t.pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        try:
            os.kill(t.pid, 0)  # no /proc (macOS): the pid alone
        except OSError:
            return False
        return True
    return (
        bool(cmdline)
        and Path(cmdline[0].decode(errors="replace")).name == "ssh"
        and (f"127.0.0.1:{t.local_port}:127.0.0.1:{t.remote_port}".encode() in cmdline)
    )


def load(ws: Workspace) -> list[Tunnel]:
    """The recorded tunnels whose ssh still runs (dead ones are dropped from the record)."""
    path = _file(ws)
    try:
        raw = json.loads(path.read_text())
        recorded = [Tunnel(**t) for t in raw]
    except FileNotFoundError:
        return []
    except (ValueError, TypeError):
        recorded = []
    live = [t for t in recorded if _alive(t)]
    if len(live) != len(recorded) or not path.exists():
        _save(ws, live)
    return live


def _save(ws: Workspace, tunnels: list[Tunnel]) -> None:
    atomic_write(_file(ws), json.dumps([asdict(t) for t in tunnels], indent=2) + "\n")


def _wait_remote(ws: Workspace, node: Node, port: int, wait_s: float) -> None:
    deadline = time.monotonic() + wait_s
    while True:
        res = run(ssh_argv(ws.paths.ssh_config, node.alias, listening_probe(port)), capture=True, check=False)
        if res.returncode == 0:
            return
        if res.returncode == 255:
            raise UserError(f"cannot reach {node.alias} over ssh; check `inv status` (start it with `inv start`)")
        if time.monotonic() >= deadline:
            raise UserError(
                f"nothing listens on port {port} of {node.alias} (waited {wait_s:.0f} s); start the server there "
                "first (e.g. from the job), or pass --wait with more seconds"
            )
        time.sleep(1)


def _wait_local(proc_pid: int, port: int, log: Path, wait_s: float = 15.0) -> None:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(proc_pid, os.WNOHANG)
        except ChildProcessError:
            done = proc_pid
        if done:
            tail = (log.read_text(errors="replace").strip().splitlines() or ["no output"])[-1]
            raise UserError(f"the tunnel's ssh exited at once: {tail}")
        with socket.socket() as s:
            s.settimeout(1)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    os.kill(proc_pid, signal.SIGTERM)
    raise UserError(f"the tunnel did not open 127.0.0.1:{port} within {wait_s:.0f} s; see {log}")


def open_tunnel(
    ws: Workspace,
    nodes: list[Node],
    remote_port: int,
    node: int = 0,
    local_port: int | None = None,
    wait_s: float = 10,
    wait_remote: bool = True,
    stop_command: str | None = None,
) -> tuple[Tunnel, list[str]]:
    """Forward `remote_port` of node `node` to this machine; returns the tunnel and the lines to print."""
    valid_port(remote_port, "PORT")
    if not 0 <= node < len(nodes):
        raise UserError(f"--node {node}: the stage has {len(nodes)} node(s) (0..{len(nodes) - 1})")
    n = nodes[node]
    for t in load(ws):
        if t.alias == n.alias and t.remote_port == remote_port:
            return t, [f"already open: {t.url} -> {t.alias}:{t.remote_port} (pid {t.pid})"]
    if wait_remote:  # a server still starting (TensorBoard waiting for its venv) is reached once it listens
        _wait_remote(ws, n, remote_port, wait_s)
    wanted = valid_port(local_port, "--local-port") if local_port is not None else remote_port
    port = pick_local_port(wanted)
    lines = [] if port == wanted else [f"local port {wanted} is in use; using {port}"]
    log = ws.paths.generated / "tunnels" / f"{n.alias}-{remote_port}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    proc = spawn_daemon(tunnel_argv(ws.paths.ssh_config, n.alias, port, remote_port), log)
    _wait_local(proc.pid, port, log)
    t = Tunnel(node, n.alias, remote_port, port, proc.pid, time.strftime("%Y-%m-%dT%H:%M:%S%z"), stop_command)
    _save(ws, [*load(ws), t])
    lines.append(f"tunnel open: {t.url} -> {n.alias}:{remote_port} (close it with `inv tunnel.close --port {port}`)")
    return t, lines


def list_lines(ws: Workspace) -> list[str]:
    tunnels = load(ws)
    if not tunnels:
        return ["no tunnels open; open one with `inv tunnel PORT`"]
    return [f"{t.url} -> {t.alias}:{t.remote_port} (pid {t.pid}, since {t.started})" for t in tunnels]


def close(ws: Workspace, local_port: int | None = None) -> list[str]:
    """Close one tunnel (by its local port) or all of them."""
    tunnels = load(ws)
    chosen = [t for t in tunnels if local_port is None or t.local_port == local_port]
    if local_port is not None and not chosen:
        open_ports = ", ".join(str(t.local_port) for t in tunnels) or "none"
        raise UserError(f"no tunnel on local port {local_port} (open: {open_ports}); see `inv tunnel.list`")
    for t in chosen:
        with contextlib.suppress(ProcessLookupError):
            os.kill(t.pid, signal.SIGTERM)
    deadline = time.monotonic() + 5
    while any(_alive(t) for t in chosen) and time.monotonic() < deadline:
        time.sleep(0.1)
    _save(ws, [t for t in tunnels if t not in chosen])
    for t in chosen:
        if t.stop_command:  # best effort: the node may be gone already
            run(ssh_argv(ws.paths.ssh_config, t.alias, t.stop_command), capture=True, check=False)
    return [f"closed {t.url} -> {t.alias}:{t.remote_port}" for t in chosen] or ["no tunnels open"]

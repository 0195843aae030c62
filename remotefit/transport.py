"""Transports: how the laptop runs a command on a node and moves files to and from it.

Two kinds with one interface: `SshTransport` (a node, through our ssh config and its shared connection)
and `LocalTransport` (this machine: `inv fit --local`). Each builds its argv once, in final form, with
pure methods (`argv`, `target`, `rsync_argv`, `runner_line`), and runs them through `remotefit.proc`
(`run`, `rsync`, `runner`, `popen`). Code above this module never asks which kind it holds.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from remotefit.config import Paths
from remotefit.errors import UserError
from remotefit.node import contract
from remotefit.proc import popen, run, run_bytes
from remotefit.ssh import Node, remote, rsync_argv, ssh_argv
from remotefit.workspace import Workspace

SSH_FAILED = 255  # ssh's own exit status when the connection fails (not the runner's EXIT_LOST: a job lost)
# rsync's exit codes when the connection (not the copy) failed: 10 socket I/O, 12 data stream
# (ssh died), 30/35 timeouts, 255 ssh's own.
TRANSPORT_FAILED = (10, 12, 30, 35, SSH_FAILED)
AFTER_MARK = "remotefit-after-rsync: "  # what precedes the output of sync_rsync_path's `after` on stderr


@dataclass(frozen=True)
class RunnerResult:
    """What one runner.py call answered: its exit code, stdout, and its one-line error if it refused."""

    code: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.code == 0

    @property
    def refused(self) -> bool:
        """The runner itself said no (a `runner: error:` line), as opposed to a dropped connection."""
        return contract.is_refusal(self.stderr)

    def error(self, default: str = "") -> str:
        return contract.runner_error(self.stderr, default)

    def json(self) -> Any:
        """stdout as JSON (None when the call failed or printed none)."""
        if not self.ok:
            return None
        try:
            return json.loads(self.stdout)
        except ValueError:
            return None


class Transport:
    """How to run a shell command on a node and address its files for rsync (see the module docstring)."""

    local = False  # only for what the user is told; behaviour differs through the methods below

    def __init__(self, node: Node) -> None:
        self.node = node

    # -- pure: argv and paths, in final form --------------------------------------------------
    def argv(self, command: str) -> list[str]:
        raise NotImplementedError

    def target(self, path: str) -> str:
        """A path on the node as rsync names it."""
        raise NotImplementedError

    def rsync_argv(self, src: str | Sequence[str], dest: str, **kw: Any) -> list[str]:
        raise NotImplementedError

    def runner_line(self, verb: str, *args: str) -> str:
        """The shell command that runs runner.py with the node's Python (the one that has PyTorch)."""
        base = self.node.workdir
        # -S: the runner needs only the standard library; skipping site (PyTorch's .pth files and
        # all) saves ~40 ms per call. Its supervisor and job processes start with site as usual.
        return remote([self.node.python, "-S", contract.runner_path(base), verb, "--base", base, *args])

    def read_exact(self, size: int) -> str:
        """A shell command that reads exactly `size` bytes of stdin and never more (the rest is for the
        next reader): GNU head never reads past -c on a Linux node."""
        return f"head -c {size}"

    def needs_tunnel(self) -> bool:
        """Whether a port a job listens on over there is reached from here only through a tunnel."""
        return True

    def tools_python(self) -> str:
        """The shell word for the Python that runs node-side tools (the fetcher): the node's tool venv."""
        return f'"${{{contract.TOOLS_PYTHON_ENV}:-{contract.TOOLS_PYTHON}}}"'

    def idle_check(self) -> str:
        """A shell condition that fails (runner exit 3, its error on stderr) while a run is active, so a
        second fit never rewrites a running job's folder; an older runner without `idle` (exit 2) does not
        block. No active-run record (the supervisor removes it once the run and its final upload are
        done): idle, without starting a Python. A record left by a crashed run is judged by the runner."""
        runner = contract.runner_path(self.node.workdir)
        active = contract.active_path(self.node.workdir)
        return (
            f"{{ [ ! -f {shlex.quote(runner)} ] || [ ! -f {shlex.quote(active)} ] || {self.runner_line('idle')} || "
            f"[ $? -ne {contract.EXIT_BUSY} ]; }}"
        )

    def sync_rsync_path(self, dest: str, after: str | None = None) -> str | None:
        """The command rsync starts on the receiving end: the idle check and the destination's mkdir, in
        the same connection; `after` (a shell command) runs once rsync has succeeded there, its output on
        stderr after AFTER_MARK. None: plain rsync (see before_sync)."""
        if after is None:
            return f"{self.idle_check()} && mkdir -p {shlex.quote(dest)} && rsync"
        # rsync appends its server arguments to this line: they become the function's "$@".
        then = f"{{ printf '%s' {shlex.quote(AFTER_MARK)}; {after}; }} >&2"
        wrap = f'_rf_rsync() {{ rsync "$@"; r=$?; [ $r -ne 0 ] || {then}; return $r; }}'
        return f"{wrap}; {self.idle_check()} && mkdir -p {shlex.quote(dest)} && _rf_rsync"

    # -- running, always through remotefit.proc ------------------------------------------------
    def run(
        self, command: str, *, stdin: str | None = None, timeout: float | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a shell line there; its exit code and output are the caller's to judge."""
        return run(self.argv(command), capture=True, check=False, input_text=stdin, timeout=timeout)

    def run_bytes(self, command: str) -> subprocess.CompletedProcess[bytes]:
        return run_bytes(self.argv(command))

    def popen(
        self, command: str, *, stdin: bool = False, text: bool = False, merge_stderr: bool = False
    ) -> subprocess.Popen[Any]:
        """Start a shell line there with its output piped back (streams: a log, a fetch's progress)."""
        return popen(self.argv(command), stdin=stdin, text=text, merge_stderr=merge_stderr)

    def rsync(self, src: str | Sequence[str], dest: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        """Run rsync between this machine and the node; raises UserError on failure unless check=False."""
        check = kw.pop("check", True)
        return run(self.rsync_argv(src, dest, **kw), capture=True, check=check)

    def runner(self, verb: str, *args: str) -> RunnerResult:
        res = self.run(self.runner_line(verb, *args))
        return RunnerResult(res.returncode, res.stdout or "", res.stderr or "")

    def before_sync(self, dest: str) -> None:
        """What must happen before a sync's rsync starts that sync_rsync_path could not do in its connection."""

    def connection_failed(self, code: int) -> bool:
        """True when an ssh or rsync exit code means the connection failed, not the command."""
        return code in TRANSPORT_FAILED

    def key_refused(self, ws: Workspace | None, stderr: str) -> str | None:
        """The fix, when the node refused our key (its only key is the stage's, made at its creation)."""
        if ws is None or "Permission denied" not in stderr:
            return None
        from remotefit.keys import key_path

        return (
            f"{self.node.alias} refuses this stage's ssh key {key_path(ws.paths.generated, ws.stage)}: a node "
            "trusts only the key it was created with (was that file deleted or replaced?); restore it, "
            "or `inv destroy` then `inv apply`"
        )

    def unreachable(self, ws: Workspace | None) -> str:
        """Why the node did not answer: its EC2 state and the fix (`inv start`, `inv apply`)."""
        if ws is None:
            return f"{self.node.alias} did not answer"
        from remotefit.nodes import explain_unreachable

        return explain_unreachable(ws, self.node)


class SshTransport(Transport):
    """A node reached through our ssh config (`generated/ssh_config`, one shared connection per node)."""

    def __init__(self, node: Node, ssh_config: Path) -> None:
        super().__init__(node)
        self.ssh_config = ssh_config

    def argv(self, command: str) -> list[str]:
        return ssh_argv(self.ssh_config, self.node.alias, command)

    def target(self, path: str) -> str:
        return f"{self.node.alias}:{path}"

    def rsync_argv(self, src: str | Sequence[str], dest: str, **kw: Any) -> list[str]:
        return rsync_argv(self.ssh_config, src, dest, **kw)


class LocalTransport(Transport):
    """This machine as the node (`--local`): the same runner, no ssh."""

    local = True

    def argv(self, command: str) -> list[str]:
        return ["bash", "-c", command]

    def target(self, path: str) -> str:
        return path

    def rsync_argv(self, src: str | Sequence[str], dest: str, **kw: Any) -> list[str]:
        return rsync_argv(None, src, dest, **kw)

    def read_exact(self, size: int) -> str:
        # This machine may be a Mac, whose head reads ahead: dd reads byte by byte (a few ms slower).
        return f"dd bs=1 count={size} 2>/dev/null"

    def needs_tunnel(self) -> bool:
        return False  # the job runs on this machine: its ports are here

    def tools_python(self) -> str:
        return shlex.quote(sys.executable)

    def sync_rsync_path(self, dest: str, after: str | None = None) -> str | None:
        return None

    def before_sync(self, dest: str) -> None:
        if Path(contract.runner_path(self.node.workdir)).exists():
            res = self.runner("idle")
            if res.code == contract.EXIT_BUSY:
                raise UserError(res.error("a run is active"), code=contract.EXIT_BUSY)
        Path(dest).mkdir(parents=True, exist_ok=True)

    def unreachable(self, ws: Workspace | None) -> str:
        return f"{self.node.alias} did not answer"

    def connection_failed(self, code: int) -> bool:
        return False  # no connection: rsync's codes here are about the copy

    def key_refused(self, ws: Workspace | None, stderr: str) -> str | None:
        return None


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
    """SSH transports to the nodes of the workspace; local ones (this machine) without one."""
    if ws is None:
        return [LocalTransport(n) for n in nodes]
    return [SshTransport(n, ws.paths.ssh_config) for n in nodes]

"""Stream: follow a run's log over a connection that may drop, and ask a node for a run's status."""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

from remotefit.errors import UserError
from remotefit.node import contract
from remotefit.proc import echo
from remotefit.transport import SSH_FAILED, Transport


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
            line, stdin = first
        else:
            line, stdin = (
                t.runner_line("follow", "--run-id", run_id, "--offset", str(shown), "-q", "--status-json"),
                None,
            )
        code, box, got = _follow_once(t, line, stdin, on_start, out)
        shown += got
        if got:
            lost_since = None
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


def _follow_once(
    t: Transport, line: str, stdin: str | None, on_start: Any, out: Any
) -> tuple[int, dict[str, Any], int]:
    """One connection: run `line` (stdin written first), copy its stdout to `out` as it comes, sort its
    stderr (_read_stderr). Returns (exit code, the sorted stderr, bytes shown)."""
    shown = 0
    proc = t.popen(line, stdin=stdin is not None)
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
        code = proc.wait()
        reader.join()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return code, box, shown


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
    """The runner's status of one run (a dict), or of all runs (a list); None when the node does not answer."""
    return t.runner("status", *(["--run-id", run_id] if run_id else [])).json()


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

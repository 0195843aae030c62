"""The one place where external commands run. Everything else builds argv lists in pure functions."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from remotefit.errors import UserError

_INSTALL_HINTS = {
    "terraform": "install Terraform >= 1.11 (https://developer.hashicorp.com/terraform/install); run `inv check`",
    "tofu": "install OpenTofu (https://opentofu.org/docs/intro/install/); run `inv check`",
    "ssh": "install the OpenSSH client (apt-get install openssh-client)",
    "rsync": "install rsync (apt-get install rsync)",
    "sshd": "install the OpenSSH server (apt-get install openssh-server)",
}


def echo(line: str) -> None:
    """Progress for humans: one line on stderr, so stdout stays parseable (`inv env`, `inv output`)."""
    print(line, file=sys.stderr, flush=True)


def run(
    argv: Sequence[str],
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    capture: bool = False,
    check: bool = True,
    timeout: float | None = None,
    input_text: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run argv; `env` is added to os.environ. A missing binary is a UserError with an install hint."""
    full_env = {**os.environ, **(env or {})}
    try:
        res = subprocess.run(  # noqa: S603 - argv lists only, never a shell
            list(argv),
            cwd=cwd,
            env=full_env,
            text=True,
            capture_output=capture,
            timeout=timeout,
            input=input_text,
            stdin=None if input_text is not None else subprocess.DEVNULL,
        )
    except FileNotFoundError:
        tool = Path(argv[0]).name
        raise UserError(f"{tool} not found on PATH; {_INSTALL_HINTS.get(tool, 'install it')}") from None
    except subprocess.TimeoutExpired:
        raise UserError(f"`{shlex.join(argv[:3])} …` did not finish within {timeout:.0f} s") from None
    if check and res.returncode != 0:
        detail = (res.stderr or res.stdout or "").strip().splitlines() if capture else []
        last = detail[-1] if detail else f"exit code {res.returncode}"
        raise UserError(f"`{shlex.join(argv[:3])} …` failed: {last}", code=res.returncode or 1)
    return res


def run_bytes(argv: Sequence[str]) -> subprocess.CompletedProcess[bytes]:
    """Run argv and capture its output as bytes (a job's log is whatever the job wrote, UTF-8 or not)."""
    try:
        return subprocess.run(list(argv), capture_output=True, stdin=subprocess.DEVNULL, check=False)  # noqa: S603
    except FileNotFoundError:
        tool = Path(argv[0]).name
        raise UserError(f"{tool} not found on PATH; {_INSTALL_HINTS.get(tool, 'install it')}") from None


def popen(
    argv: Sequence[str], *, stdin: bool = False, text: bool = False, merge_stderr: bool = False
) -> subprocess.Popen[Any]:
    """Start argv with its output piped back (and stdin piped when asked), for callers that stream it."""
    try:
        return subprocess.Popen(  # noqa: S603
            list(argv),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            text=text,
        )
    except FileNotFoundError:
        tool = Path(argv[0]).name
        raise UserError(f"{tool} not found on PATH; {_INSTALL_HINTS.get(tool, 'install it')}") from None


def interactive(argv: Sequence[str]) -> int:
    """Run argv attached to this terminal (an ssh session); its exit code."""
    try:
        return subprocess.call(list(argv))  # noqa: S603
    except FileNotFoundError:
        tool = Path(argv[0]).name
        raise UserError(f"{tool} not found on PATH; {_INSTALL_HINTS.get(tool, 'install it')}") from None


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive flock on `path` (made if missing) for the block: keeps two processes of this machine
    apart (image builds, wheelhouse downloads, address-slice claims)."""
    import fcntl

    with path.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def atomic_write(path: Path, text: str, mode: int = 0o644) -> None:
    """Write a file so that readers see the old or the new content, never half of it."""
    ensure_writable(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    except PermissionError:
        raise UserError(f"{path.parent} is not writable; fix its permissions (chmod u+w) and retry") from None
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def ensure_writable(directory: Path) -> None:
    """Fail early, with the fix, when we cannot write where we must (before anything is half-done)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except PermissionError:
        raise UserError(f"cannot create {directory}; fix the permissions of its parent and retry") from None
    except (FileExistsError, NotADirectoryError):
        raise UserError(
            f"cannot create the folder {directory}: it or one of its parents is a file; move that file away"
        ) from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise UserError(f"{directory} is not writable; fix its permissions (chmod u+w {directory}) and retry")


def run_tee(
    argv: Sequence[str],
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    quiet: bool = False,
    prefix: str = "  ",
    show: re.Pattern[str] | None = None,
) -> tuple[int, str]:
    """Run argv, echoing its output line by line (unless quiet; only lines matching `show` when given)
    and returning (exit code, output)."""
    full_env = {**os.environ, **(env or {})}
    lines: list[str] = []
    try:
        proc = subprocess.Popen(  # noqa: S603
            list(argv),
            cwd=cwd,
            env=full_env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    except FileNotFoundError:
        tool = Path(argv[0]).name
        raise UserError(f"{tool} not found on PATH; {_INSTALL_HINTS.get(tool, 'install it')}") from None
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            lines.append(line)
            if not quiet and (show is None or show.search(line)):
                sys.stderr.write(prefix + line)
                sys.stderr.flush()
        return proc.wait(), "".join(lines)
    except BaseException:
        # Interrupted: let the child (terraform) finish its own graceful stop before we go.
        proc.wait()
        raise


def spawn_daemon(argv: Sequence[str], log: Path, env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start a long-lived process in its own session (it outlives this one), output appended to `log`."""
    with open(log, "ab") as fh:
        return subprocess.Popen(  # noqa: S603
            list(argv),
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )

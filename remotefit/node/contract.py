"""The laptop <-> node contract: what runner.py, watchdog.py and the laptop agree on, in one place.

Standard library only, Python 3.8+: this file is uploaded beside runner.py (``<base>/.remotefit/``)
and written beside watchdog.py (``/opt/remotefit/``), where the node scripts import it as the
top-level module ``contract``; the laptop imports it as ``remotefit.node.contract``. It holds:

* the node folder layout under the runner's ``--base`` (the node's remotefit work directory);
* the runner's exit codes and the prefix of its one-line errors;
* the JSON messages the runner prints (each carries a ``type``);
* the active-run record (``active.json``): written by the runner, read by the runner, the
  watchdog and the sandbox, always through ``read_active`` / ``live_active``;
* process liveness that checks the start time (a recycled pid is not our process);
* atomic writes (readers on another ssh session never see half a file);
* the watchdog's config keys and defaults.
"""

from __future__ import annotations

import json
import os
import posixpath

# --------------------------------------------------------------------------- exit codes

EXIT_OK = 0
EXIT_FAIL = 1  # unexpected failure
EXIT_USAGE = 2  # bad usage, unknown run id
EXIT_BUSY = 3  # another run is active (start, idle)
EXIT_NO_CUDA = 4  # the CUDA check failed (start --check-cuda)
# `follow` of a run whose process vanished without recording an exit code. Its value is ssh's own
# failure status too, so the laptop never decides on the exit code alone: the runner's status line
# (MSG_STATUS, state "lost") is what says the job was lost rather than the connection.
EXIT_LOST = 255

ERROR_PREFIX = "runner: error: "  # every runner error is one stderr line starting with this

# --------------------------------------------------------------------------- JSON messages

MSG_STARTED = "started"  # `start --json`: {type, run_id, pid, pgid, run_dir, log}
MSG_STATUS = "status"  # `follow --status-json`'s last stderr line: a run's status (state, exit_code, ...)


def message_type(obj: object) -> str | None:
    """The type of a JSON line the runner printed, or None for anything else (a runner older than
    the ``type`` key is told apart by its keys)."""
    if not isinstance(obj, dict):
        return None
    kind = obj.get("type")
    if kind in (MSG_STARTED, MSG_STATUS):
        return kind
    if "run_dir" in obj:
        return MSG_STARTED
    if "state" in obj:
        return MSG_STATUS
    return None


def parse_message(line: str) -> tuple[str | None, dict | None]:
    """(type, object) of one output line; (None, None) when it is not a runner message."""
    if not line.startswith("{"):
        return None, None
    try:
        obj = json.loads(line)
    except ValueError:
        return None, None
    kind = message_type(obj)
    return (kind, obj) if kind else (None, None)


def is_refusal(stderr: str | None) -> bool:
    """True when a command's stderr holds the runner's own error line."""
    return ERROR_PREFIX.strip() in (stderr or "")


def runner_error(stderr: str | None, default: str) -> str:
    """The runner's one-line error (without its prefix) out of a command's stderr, else its last line."""
    for line in reversed((stderr or "").splitlines()):
        if ERROR_PREFIX in line:
            return line.split(ERROR_PREFIX, 1)[1].strip()
    lines = (stderr or "").strip().splitlines()
    return lines[-1] if lines else default


# --------------------------------------------------------------------------- layout

# Under --base (posix paths: the laptop builds the same strings for the node):
#   jobs/<job-name>/      the synced job folder (rsync)
#   runs/<run-id>/        run.json, log, exit_code, ended_at, supervisor.log
#   outputs/<run-id>/     the run's outputs (the job folder's outputs/ links here)
#   envs/<hash>/          cached venvs
#   .remotefit/           runner.py, contract.py, bin/ (shims), env-<run-id>.json (0600, read once)
#   active.json           the active run
RUNNER_DIR = ".remotefit"
SHIM_DIR = posixpath.join(RUNNER_DIR, "bin")
ACTIVE = "active.json"
LOCK = ".runner.lock"
UPLOADED = ("contract.py", "uploader.py", "runner.py")  # what the laptop installs in RUNNER_DIR, in this order
RUN_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"  # a file name on both sides, never a path

# Keeping a run's results in the runs bucket (remotefit/node/uploader.py, started by the supervisor).
# The laptop puts the spec in the start request's env JSON under KEEP_KEY (the runner takes it out: the
# job never sees it): {bucket, prefix, region, every, log_key, status_key, outputs, record, aws_env}.
KEEP_KEY = "REMOTEFIT_KEEP"
TOOLS_PYTHON = "/opt/remotefit-tools/bin/python"  # the node's tool venv (boto3), made by the user data
TOOLS_PYTHON_ENV = "REMOTEFIT_TOOLS_PYTHON"  # overrides it (the sandbox's: this checkout's venv)
KEEP_FINAL_TIMEOUT_S = 180  # the final upload's retries, at most (the watchdog waits for it: a busy node)


def runner_dir(base: str) -> str:
    return posixpath.join(base, RUNNER_DIR)


def runner_path(base: str) -> str:
    return posixpath.join(base, RUNNER_DIR, "runner.py")


def job_dir(base: str, job: str) -> str:
    return posixpath.join(base, "jobs", job)


def run_dir(base: str, run_id: str) -> str:
    return posixpath.join(base, "runs", run_id)


def run_log(base: str, run_id: str) -> str:
    return posixpath.join(base, "runs", run_id, "log")


def outputs_dir(base: str, run_id: str) -> str:
    """Each run's outputs folder (beside runs/, which the runner owns)."""
    return posixpath.join(base, "outputs", run_id)


def env_file(base: str, run_id: str) -> str:
    return posixpath.join(base, RUNNER_DIR, f"env-{run_id}.json")


# --------------------------------------------------------------------------- the start request

# `runner.py start --request -` reads one JSON object on its stdin (the laptop's start command pipes it
# from a shell variable: its env may hold tokens, which never appear in a command line or a file). The
# runner derives the job folder and the outputs folder from the layout above.
START_REQUEST = {
    "run_id": str,  # RUN_ID_PATTERN
    "job": str,  # the job's name: its folder is job_dir(base, job)
    "cmd": str,  # shell command (bash -c) run in the job folder
    "env": dict,  # extra environment (str: str); KEEP_KEY among it is for the uploader, not the job
    "outputs": (str, type(None)),  # folder in the job folder linked to outputs_dir(base, run_id)
    "requirements": (str, type(None)),  # requirements file in the job folder, for a cached venv
    "setup": (str, type(None)),  # shell command run before cmd
    "check_cuda": bool,  # fail with EXIT_NO_CUDA unless torch sees CUDA
    "follow": bool,  # then stream the log in the same process
}


def start_request_problem(request: object) -> str | None:
    """What is wrong with a start request (one line), or None."""
    if not isinstance(request, dict):
        return "the start request is not a JSON object"
    missing = sorted(set(START_REQUEST) - set(request))
    extra = sorted(set(request) - set(START_REQUEST))
    if missing or extra:
        return f"the start request has {'missing keys ' + ', '.join(missing) if missing else 'unknown keys ' + ', '.join(extra)}"
    for key, kind in START_REQUEST.items():
        if not isinstance(request[key], kind) or (
            kind is dict and not all(isinstance(v, str) for v in request[key].values())
        ):
            return f"the start request's {key} has the wrong type"
    return None


def spot_notice_path(base: str, run_id: str) -> str:
    """Written by the watchdog when it forwards a spot notice to the run: the runner's status then says the
    run was interrupted (not a job that failed with 143), and `fit` recovers it."""
    return posixpath.join(base, "runs", run_id, "spot-notice.json")


def active_path(base: str) -> str:
    return posixpath.join(base, ACTIVE)


# --------------------------------------------------------------------------- files


def read_json(path: str) -> dict | None:
    """A JSON object from path, or None (missing, unreadable, not an object)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_text(path: str, text: str) -> None:
    """Write-then-rename, so a reader (follow/status on another ssh session) never sees half a file."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json(path: str, obj: object) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------- processes


def proc_stat(pid: int, proc: str = "/proc") -> tuple[str, int, int, int] | None:
    """(state, ppid, pgrp, starttime) from <proc>/<pid>/stat, or None."""
    try:
        with open(os.path.join(proc, str(pid), "stat"), encoding="utf-8", errors="replace") as f:
            raw = f.read()
    except OSError:
        return None
    # comm may contain spaces and parens; the fields after the last ')' are fixed.
    fields = raw[raw.rfind(")") + 2 :].split()
    try:
        return fields[0], int(fields[1]), int(fields[2]), int(fields[19])
    except (IndexError, ValueError):
        return None


def start_ticks(pid: int, proc: str = "/proc") -> int | None:
    """A process's start time (clock ticks after boot): with the pid, it names one process."""
    st = proc_stat(pid, proc)
    return st[3] if st else None


def pid_alive(pid: object, started: object = None, proc: str = "/proc") -> bool:
    """True if pid runs and (when `started` is known) is the process that started then.

    Zombies count as dead (PID 1 in containers does not always reap them), and so does a recycled
    pid (another start time). Without a readable <proc>/self (no procfs, or a test's fake /proc)
    kill(0) is all there is to go on.
    """
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if not os.path.isdir(os.path.join(proc, "self")):
        return True
    try:
        with open(os.path.join(proc, str(pid), "stat"), encoding="utf-8", errors="replace") as f:
            raw = f.read()
    except OSError:
        return False  # exited since kill(0)
    fields = raw[raw.rfind(")") + 2 :].split()
    if not fields or fields[0] in ("Z", "X"):
        return False
    if isinstance(started, int) and not isinstance(started, bool):
        try:
            return int(fields[19]) == started
        except (IndexError, ValueError):
            return True
    return True


# --------------------------------------------------------------------------- the active run


def read_active(base: str) -> dict | None:
    """The active-run record as written: {run_id, pid, pgid, pid_start, started_at, supervisor_pid}."""
    return read_json(active_path(base))


def record_alive(record: dict, proc: str = "/proc") -> bool:
    """The run lives while its job does, and after it while its supervisor does the final upload:
    until then no cost guard may end the node and no second run may start."""
    return pid_alive(record.get("pid"), record.get("pid_start"), proc) or (
        record.get("supervisor_start") is not None
        and pid_alive(record.get("supervisor_pid"), record.get("supervisor_start"), proc)
    )


def live_active(base: str, proc: str = "/proc") -> dict | None:
    """The active-run record if its job (or its supervisor, still uploading) is still the process that
    was started, else None."""
    record = read_active(base)
    return record if record is not None and record_alive(record, proc) else None


# --------------------------------------------------------------------------- watchdog config

# Every key the watchdog reads from its JSON config (/etc/remotefit/watchdog.json), with its default.
WATCHDOG_DEFAULTS = {
    "deadline_epoch": None,
    "idle_minutes": 30.0,
    "base": "/home/ubuntu/remotefit",
    "imds": "http://169.254.169.254",
    "state": "/var/lib/remotefit/watchdog-state.json",
    "shutdown_cmd": ["shutdown", "-h", "now"],
    "started_epoch": None,
    "spot_service": False,
    # Before a shutdown with a run still active (the deadline): SIGTERM it, then wait this long for its
    # final upload (the supervisor clears active.json once its results are in the bucket).
    "final_wait_s": KEEP_FINAL_TIMEOUT_S + 30,
    # A shutdown's lines also go to the node's journal (syslog) when the tick's stdout is not the journal
    # (a tick run by hand over ssh): the shutdown ends that ssh session, maybe before its last lines left,
    # and the journal is what the console shows after the node is gone. Off for loopback sandbox nodes,
    # whose journal would be this machine's.
    "journal": True,
}


def watchdog_config(**values: object) -> dict:
    """A watchdog config: the defaults with `values` over them (an unknown key is a programming error)."""
    unknown = sorted(set(values) - set(WATCHDOG_DEFAULTS))
    if unknown:
        raise KeyError(f"not watchdog config keys: {', '.join(unknown)}")
    return {**WATCHDOG_DEFAULTS, **values}

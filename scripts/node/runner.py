#!/usr/bin/env python3
"""remotefit node runner: run one training job detached from the SSH session.

This file is copied to the node (``<base>/.remotefit/runner.py``) and called
over ssh by the laptop side. It is a single file using only the standard
library, and works on Python 3.8+, because the node's python3 is whatever the
image ships (Ubuntu 22.04/24.04, a Deep Learning AMI, or the local sandbox).

Layout under ``--base`` (the node's remotefit work directory)::

    jobs/<job-name>/     the synced job folder (written by rsync, not here)
    runs/<run-id>/       one per run: run.json, log, exit_code, ended_at,
                         requirements.txt (copy), supervisor.log
    envs/<hash>/         cached venvs, keyed by requirements + interpreter
    active.json          the active run: {run_id, pid, pgid, started_at, ...}

Process model: ``start`` spawns a small supervisor in a new session
(``runner.py _supervise``), which spawns the job in another new session
(``runner.py _job``: venv/pip install, optional CUDA check and setup, then
``exec bash -c CMD`` so the job keeps that pid and process group). The
supervisor waits for it, writes ``exit_code`` (128+N when killed by signal N)
and ``ended_at``, and clears ``active.json``. Nothing is tied to the ssh
session, so a dropped connection does not stop the job; the laptop re-attaches
with ``follow --offset <bytes already shown>``.

Exit codes: 0 ok; 1 unexpected failure; 2 bad usage / unknown run id;
3 another run is active; 4 CUDA check failed; ``follow`` exits with the job's
exit code (255 when the run was lost without recording one).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import site
import socket
import subprocess
import sys
import time

RUNNER = os.path.abspath(__file__)

EXIT_OK = 0
EXIT_FAIL = 1
EXIT_USAGE = 2
EXIT_BUSY = 3
EXIT_NO_CUDA = 4
EXIT_LOST = 255

READY_MARKER = ".remotefit-ready"
PTH_NAME = "remotefit-parent-site.pth"
RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
HAVE_PROC = os.path.isdir("/proc/self")

# Printed by the job's python for --check-cuda; one JSON line on stdout.
CUDA_PROBE = r"""
import json
out = {}
try:
    import torch
    out["torch"] = str(torch.__version__)
    out["cuda_build"] = torch.version.cuda
    out["available"] = bool(torch.cuda.is_available())
    if out["available"]:
        out["device"] = torch.cuda.get_device_name(0)
except Exception as exc:
    out["error"] = "%s: %s" % (type(exc).__name__, exc)
print(json.dumps(out))
"""


class RunnerError(Exception):
    """An error reported to the user as one line, with an exit code."""

    def __init__(self, message: str, code: int = EXIT_FAIL):
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------- helpers


def iso(t: float | None = None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if t is None else t))


def note(msg: str) -> None:
    """Runner's own messages go to stderr so stdout stays machine-readable."""
    print("runner: " + msg, file=sys.stderr, flush=True)


def read_json(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_json(path: str, obj: object) -> None:
    # Write-then-rename so readers (follow/status on another ssh session) never
    # see a half-written file.
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def read_int(path: str) -> int | None:
    try:
        with open(path, encoding="utf-8") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def read_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip() or None
    except OSError:
        return None


def proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, pgrp, starttime) from /proc/<pid>/stat, or None."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            raw = f.read()
    except OSError:
        return None
    # comm may contain spaces and parens; the fields after the last ')' are fixed.
    fields = raw[raw.rfind(")") + 2 :].split()
    try:
        return fields[0], int(fields[2]), int(fields[19])
    except (IndexError, ValueError):
        return None


def pid_alive(pid: object, start_ticks: object = None) -> bool:
    """True if pid runs and (when known) is the same process we started.

    Zombies count as dead: PID 1 in containers does not always reap them, and
    a recycled pid (different start time) is not our job.
    """
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if not HAVE_PROC:
        return True
    st = proc_stat(pid)
    if st is None or st[0] in ("Z", "X"):
        return False
    return not (isinstance(start_ticks, int) and st[2] != start_ticks)


def group_alive(pgid: int) -> bool:
    """True while any non-zombie process is left in process group pgid."""
    if not HAVE_PROC:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = proc_stat(int(name))
            if st is not None and st[1] == pgid and st[0] not in ("Z", "X"):
                return True
    return False


@contextlib.contextmanager
def locked(path: str):
    """Exclusive flock on path (serialises start/cleanup across ssh sessions)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def exit_code_of(returncode: int) -> int:
    # Popen reports "killed by signal N" as -N; shells report it as 128+N.
    return 128 - returncode if returncode < 0 else returncode


class Layout:
    def __init__(self, base: str):
        self.base = os.path.abspath(os.path.expanduser(base))
        self.runs = os.path.join(self.base, "runs")
        self.envs = os.path.join(self.base, "envs")
        self.active = os.path.join(self.base, "active.json")
        self.lock = os.path.join(self.base, ".runner.lock")

    def run_dir(self, run_id: str) -> str:
        return os.path.join(self.runs, run_id)

    def path(self, run_id: str, name: str) -> str:
        return os.path.join(self.runs, run_id, name)


def check_run_id(run_id: str) -> str:
    if not RUN_ID_RE.match(run_id or ""):
        raise RunnerError(f"invalid run id {run_id!r} (use letters, digits, '.', '_', '-')", EXIT_USAGE)
    return run_id


def require_run(layout: Layout, run_id: str) -> str:
    check_run_id(run_id)
    rd = layout.run_dir(run_id)
    if not os.path.isdir(rd):
        raise RunnerError(f"unknown run id {run_id!r} (no {rd})", EXIT_USAGE)
    return rd


def run_info(layout: Layout, run_id: str) -> dict:
    """Status of one run: running | finished | lost."""
    rd = require_run(layout, run_id)
    meta = read_json(os.path.join(rd, "run.json")) or {}
    exit_code = read_int(os.path.join(rd, "exit_code"))
    pid = meta.get("pid")
    if exit_code is not None:
        state = "finished"
    elif pid_alive(pid, meta.get("pid_start")):
        state = "running"
    elif pid_alive(meta.get("supervisor_pid"), meta.get("supervisor_start")):
        state = "running"  # job just ended; the supervisor is recording it
    elif pid is None and pid_alive(meta.get("starter_pid")):
        state = "running"  # `start` is still spawning it
    else:
        state = "lost"
    ended_at = read_text(os.path.join(rd, "ended_at"))
    try:
        log_bytes = os.path.getsize(os.path.join(rd, "log"))
    except OSError:
        log_bytes = 0
    active = read_json(layout.active) or {}
    return {
        "run_id": run_id,
        "state": state,
        "exit_code": exit_code,
        "started_at": meta.get("started_at"),
        "ended_at": ended_at,
        "pid": pid,
        "pgid": meta.get("pgid"),
        "command": meta.get("command"),
        "job_dir": meta.get("job_dir"),
        "hostname": meta.get("hostname"),
        "log": os.path.join(rd, "log"),
        "log_bytes": log_bytes,
        "active": active.get("run_id") == run_id and state == "running",
        "_supervisor_pid": meta.get("supervisor_pid"),
        "_supervisor_start": meta.get("supervisor_start"),
    }


def public(info: dict) -> dict:
    return {k: v for k, v in info.items() if not k.startswith("_")}


def current_active(layout: Layout, clean: bool) -> dict | None:
    """The active run if its process is alive; a stale active.json is removed."""
    data = read_json(layout.active)
    if data is None:
        if clean and os.path.exists(layout.active):
            os.unlink(layout.active)  # unreadable: cannot name a live run
        return None
    if pid_alive(data.get("pid"), data.get("pid_start")):
        return data
    if clean:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(layout.active)
        note(f"removed stale active.json (run {data.get('run_id')}, pid {data.get('pid')} is gone)")
    return None


def clear_active(layout: Layout, run_id: str) -> None:
    # Under the lock, and only if it still names this run: a new run may
    # already have replaced it.
    with locked(layout.lock):
        data = read_json(layout.active)
        if data is not None and data.get("run_id") == run_id:
            os.unlink(layout.active)


def record_exit(layout: Layout, run_id: str, code: int) -> None:
    """Write ended_at, then exit_code (exit_code is the 'finished' signal)."""
    ended = time.time()
    write_text(layout.path(run_id, "ended_at"), iso(ended) + "\n")
    meta = read_json(layout.path(run_id, "run.json")) or {}
    meta.update(exit_code=code, ended_at=iso(ended), ended_epoch=ended)
    write_json(layout.path(run_id, "run.json"), meta)
    write_text(layout.path(run_id, "exit_code"), f"{code}\n")
    clear_active(layout, run_id)


# --------------------------------------------------------------------------- venv


def env_hash(requirements: bytes) -> str:
    # The interpreter path is part of the key too: two interpreters of the same
    # version (system vs conda) must not share a venv.
    h = hashlib.sha256()
    h.update(requirements)
    h.update(b"\0" + sys.version.encode() + b"\0" + os.path.realpath(sys.executable).encode())
    return h.hexdigest()[:16]


def parent_site_dirs() -> list[str]:
    dirs = []
    with contextlib.suppress(AttributeError):
        dirs.extend(site.getsitepackages())
    with contextlib.suppress(AttributeError):
        user = site.getusersitepackages()
        if os.path.isdir(user):
            dirs.append(user)
    return [d for d in dirs if d]


def ensure_venv(venv_dir: str, requirements: str) -> int:
    """Create (or reuse) the cached venv and pip-install requirements; 0 on success.

    Output goes to stdout/stderr, which for the job process is the run log.
    """

    def say(msg: str) -> None:
        print("[remotefit] " + msg, flush=True)

    marker = os.path.join(venv_dir, READY_MARKER)
    os.makedirs(os.path.dirname(venv_dir), exist_ok=True)
    with locked(venv_dir + ".lock"):
        if os.path.isfile(marker):
            say(f"reusing venv {venv_dir} (requirements unchanged, nothing to install)")
            return 0
        if os.path.exists(venv_dir):
            say(f"removing incomplete venv {venv_dir} (a previous install failed)")
            shutil.rmtree(venv_dir)
        say(f"creating venv {venv_dir} (--system-site-packages, {sys.executable})")
        rc = subprocess.call([sys.executable, "-m", "venv", "--system-site-packages", venv_dir])
        if rc != 0:
            # Stock Ubuntu lacks ensurepip (python3-venv); pip can still come
            # from the parent site-packages through the .pth below.
            say(f"venv with pip failed (exit {rc}; is python3-venv installed?); retrying --without-pip")
            shutil.rmtree(venv_dir, ignore_errors=True)
            rc = subprocess.call([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv_dir])
            if rc != 0:
                say(f"creating the venv failed with exit code {rc}")
                return exit_code_of(rc)
        vpy = os.path.join(venv_dir, "bin", "python")
        purelib = subprocess.check_output(
            [vpy, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
        ).strip()
        # --system-site-packages only reaches the *base* interpreter; when the
        # creator is itself a venv or a conda/DLAMI env, its own site-packages
        # (where PyTorch lives) would be invisible without this .pth.
        with open(os.path.join(purelib, PTH_NAME), "w", encoding="utf-8") as f:
            for d in parent_site_dirs():
                f.write(d + "\n")
        say(f"pip install -r {requirements}")
        rc = subprocess.call(
            [vpy, "-m", "pip", "install", "--disable-pip-version-check", "-r", requirements],
            stdin=subprocess.DEVNULL,
        )
        if rc != 0:
            say(f"pip install failed with exit code {rc}; the venv is not marked ready")
            return exit_code_of(rc)
        write_json(marker, {"created_at": iso(), "python": sys.executable, "version": sys.version})
        say("venv ready")
    return 0


# --------------------------------------------------------------------------- CUDA


def job_python(env: dict) -> str:
    """The python the job's `python ...` command would run."""
    path = env.get("PATH", os.defpath)
    return shutil.which("python", path=path) or shutil.which("python3", path=path) or sys.executable


def driver_version() -> str:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return "nvidia-smi not found"
    try:
        out = subprocess.run(
            [exe, "--query-gpu=driver_version", "--format=csv,noheader"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"nvidia-smi failed ({exc})"
    first = (out.stdout.strip().splitlines() or [""])[0].strip()
    if out.returncode != 0:
        return f"nvidia-smi failed (exit {out.returncode}: {first})"
    return "NVIDIA driver " + (first or "unknown")


def check_cuda(python: str, env: dict, cwd: str) -> tuple[bool, str]:
    """(ok, one-line description) of torch.cuda.is_available() in python."""
    try:
        out = subprocess.run(
            [python, "-c", CUDA_PROBE],
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=600,
        )
        lines = out.stdout.strip().splitlines()
        probe = json.loads(lines[-1]) if lines else {}
    except (OSError, subprocess.TimeoutExpired, ValueError) as exc:
        probe = {"error": str(exc)}
    torch_v, cuda_v = probe.get("torch"), probe.get("cuda_build")
    if probe.get("available"):
        return True, f"CUDA available: torch {torch_v} (CUDA {cuda_v}) on {probe.get('device')}"
    drv = driver_version()
    if "error" in probe:
        err = probe["error"]
        return False, f"CUDA check failed: torch is not importable by {python} ({err}); {drv}"
    built = cuda_v or "none (CPU-only build)"
    return False, f"CUDA is not available to {python}: torch {torch_v}, built with CUDA {built}; {drv}"


# --------------------------------------------------------------------------- start


def load_env_file(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as exc:
        raise RunnerError(f"cannot read env file {path}: {exc.strerror}", EXIT_USAGE) from None
    except ValueError as exc:
        raise RunnerError(f"env file {path} is not valid JSON: {exc}", EXIT_USAGE) from None
    if not isinstance(data, dict):
        raise RunnerError(f"env file {path} must hold a JSON object", EXIT_USAGE)
    return data


def build_env(base_env: dict, extra: dict, venv_dir: str | None, run_dir: str, run_id: str) -> dict:
    env = dict(base_env)
    for key, value in extra.items():
        if value is None:
            env.pop(key, None)
        else:
            env[str(key)] = value if isinstance(value, str) else json.dumps(value)
    for key in ("SSH_CLIENT", "SSH2_CLIENT", "SSH_CONNECTION", "SSH_TTY"):
        env.pop(key, None)  # the job is not an ssh session (and bash must not act like one)
    if venv_dir:
        env["PATH"] = os.path.join(venv_dir, "bin") + os.pathsep + env.get("PATH", os.defpath)
        env["VIRTUAL_ENV"] = venv_dir
    env["REMOTEFIT_RUN_DIR"] = run_dir
    env["REMOTEFIT_RUN_ID"] = run_id
    # Logs are followed live; block-buffered python output would arrive late.
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def cmd_start(args: argparse.Namespace) -> int:
    layout = Layout(args.base)
    run_id = check_run_id(args.run_id)
    job_dir = os.path.abspath(os.path.expanduser(args.job_dir))
    if not os.path.isdir(job_dir):
        raise RunnerError(f"job dir {job_dir} does not exist", EXIT_USAGE)
    extra_env = load_env_file(args.env_file) if args.env_file else {}
    req_bytes = None
    if args.requirements:
        try:
            with open(os.path.join(job_dir, args.requirements), "rb") as f:
                req_bytes = f.read()
        except OSError as exc:
            raise RunnerError(f"cannot read requirements {args.requirements}: {exc.strerror}", EXIT_USAGE) from None
    for d in (layout.runs, layout.envs):
        os.makedirs(d, exist_ok=True)

    with locked(layout.lock):
        active = current_active(layout, clean=True)
        if active is not None:
            raise RunnerError(
                f"run {active.get('run_id')} is still active (pid {active.get('pid')}); "
                "cancel it or wait for it to finish",
                EXIT_BUSY,
            )
        rd = layout.run_dir(run_id)
        if os.path.exists(rd):
            raise RunnerError(f"run id {run_id} already exists ({rd})", EXIT_USAGE)
        venv_dir = os.path.join(layout.envs, env_hash(req_bytes)) if req_bytes is not None else None
        env = build_env(dict(os.environ), extra_env, venv_dir, rd, run_id)

        cuda_checked = False
        if args.check_cuda and (venv_dir is None or os.path.isfile(os.path.join(venv_dir, READY_MARKER))):
            # The job's python exists already: fail now, before anything starts.
            # Otherwise the job process checks after installing requirements.
            ok, line = check_cuda(job_python(env), env, job_dir)
            if not ok:
                raise RunnerError(line, EXIT_NO_CUDA)
            note(line)
            cuda_checked = True

        os.makedirs(rd)
        req_copy = None
        if req_bytes is not None:
            req_copy = os.path.join(rd, "requirements.txt")
            with open(req_copy, "wb") as f:
                f.write(req_bytes)
        open(os.path.join(rd, "log"), "ab").close()  # `follow` may start right away
        started = time.time()
        write_json(
            os.path.join(rd, "run.json"),
            {
                "run_id": run_id,
                "command": args.cmd,
                "job_dir": job_dir,
                "setup": args.setup,
                "requirements": args.requirements,
                "requirements_copy": req_copy,
                "venv": venv_dir,
                "check_cuda": bool(args.check_cuda),
                "cuda_checked": cuda_checked,
                "env_file_keys": sorted(str(k) for k in extra_env),
                "started_at": iso(started),
                "started_epoch": started,
                "hostname": socket.gethostname(),
                "python": sys.executable,
                "starter_pid": os.getpid(),
            },
        )
        with open(os.path.join(rd, "supervisor.log"), "ab") as slog:
            # -I: the env file may set PYTHONPATH/PYTHONHOME for the job; they
            # must not break the runner's own interpreter.
            sup = subprocess.Popen(
                [sys.executable, "-I", RUNNER, "_supervise", "--base", layout.base, "--run-id", run_id],
                cwd=rd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=slog,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
            )
        meta = wait_for_pid(layout, run_id, sup)

    if args.json:
        print(
            json.dumps(
                {
                    "run_id": run_id,
                    "pid": meta["pid"],
                    "pgid": meta.get("pgid"),
                    "run_dir": rd,
                    "log": os.path.join(rd, "log"),
                }
            )
        )
    else:
        print(run_id)
    sys.stdout.flush()
    sup.returncode = 0  # detached on purpose; silence Popen's "still running" warning
    return EXIT_OK


def wait_for_pid(layout: Layout, run_id: str, sup: subprocess.Popen, timeout: float = 60.0) -> dict:
    deadline = time.time() + timeout
    while True:
        meta = read_json(layout.path(run_id, "run.json")) or {}
        if meta.get("pid"):
            return meta
        code = read_int(layout.path(run_id, "exit_code"))
        if code is not None:
            log = layout.path(run_id, "log")
            raise RunnerError(f"run {run_id} failed to start (exit code {code}); see {log}")
        if sup.poll() is not None or time.time() > deadline:
            tail = (read_text(layout.path(run_id, "supervisor.log")) or "").splitlines()[-1:]
            detail = (": " + tail[0]) if tail else ""
            raise RunnerError(f"supervisor for run {run_id} did not start the job{detail}")
        time.sleep(0.02)


# --------------------------------------------------------------------------- supervisor / job


def cmd_supervise(args: argparse.Namespace) -> int:
    layout = Layout(args.base)
    run_id = args.run_id
    meta = read_json(layout.path(run_id, "run.json")) or {}
    with open(layout.path(run_id, "log"), "ab") as log:
        try:
            job = subprocess.Popen(
                [sys.executable, "-I", RUNNER, "_job", "--base", layout.base, "--run-id", run_id],
                cwd=meta["job_dir"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                close_fds=True,
            )
        except (OSError, KeyError) as exc:
            log.write((f"[remotefit] cannot start the job: {exc}\n").encode())
            log.flush()
            record_exit(layout, run_id, 127)
            return EXIT_OK
    # Ignored only now, after the job exec'd with default handlers: cancel,
    # spot forwarding and shutdown signal the job, and the supervisor must
    # live on to record how it ended.
    for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    st = proc_stat(job.pid)
    me = proc_stat(os.getpid())
    meta.update(
        pid=job.pid,
        pgid=job.pid,
        pid_start=st[2] if st else None,
        supervisor_pid=os.getpid(),
        supervisor_start=me[2] if me else None,
    )
    write_json(
        layout.active,
        {
            "run_id": run_id,
            "pid": job.pid,
            "pgid": job.pid,
            "pid_start": meta["pid_start"],
            "started_at": meta.get("started_at"),
            "supervisor_pid": os.getpid(),
        },
    )
    write_json(layout.path(run_id, "run.json"), meta)  # `start` waits for this pid
    code = exit_code_of(job.wait())
    print(f"{iso()} job {job.pid} exited with {code}", flush=True)
    record_exit(layout, run_id, code)
    return EXIT_OK


def cmd_job(args: argparse.Namespace) -> int:
    # Python ignores SIGPIPE and that would survive exec into the job.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    layout = Layout(args.base)
    meta = read_json(layout.path(args.run_id, "run.json")) or {}
    if meta.get("requirements_copy"):
        rc = ensure_venv(meta["venv"], meta["requirements_copy"])
        if rc:
            return rc
    if meta.get("check_cuda") and not meta.get("cuda_checked"):
        ok, line = check_cuda(job_python(dict(os.environ)), dict(os.environ), os.getcwd())
        if not ok:
            print("runner: error: " + line, file=sys.stderr, flush=True)
            return EXIT_NO_CUDA
        print("[remotefit] " + line, flush=True)
    if meta.get("setup"):
        print("[remotefit] setup: {}".format(meta["setup"]), flush=True)
        rc = exit_code_of(
            subprocess.call(["bash", "--norc", "--noprofile", "-c", meta["setup"]], stdin=subprocess.DEVNULL)
        )
        if rc:
            print(f"[remotefit] setup failed with exit code {rc}", flush=True)
            return rc
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        # exec keeps this pid/process group, which start already recorded.
        # --norc: bash run under sshd would otherwise source ~/.bashrc, whose PATH edits (pyenv,
        # conda) can hide the job's venv.
        os.execvp("bash", ["bash", "--norc", "--noprofile", "-c", meta["command"]])  # noqa: S606 - bash is the point
    except OSError as exc:
        print(f"[remotefit] cannot exec bash: {exc}", flush=True)
    return 127


# --------------------------------------------------------------------------- follow / status / cancel


def cmd_follow(args: argparse.Namespace) -> int:
    layout = Layout(args.base)
    rd = require_run(layout, args.run_id)
    if args.offset < 0:
        raise RunnerError("--offset must be >= 0", EXIT_USAGE)
    log_path = os.path.join(rd, "log")
    out = sys.stdout.buffer
    pos = args.offset
    f = None
    lost_since = None
    sleep = 0.01

    def drain() -> bool:
        nonlocal pos
        got = False
        while f is not None:
            chunk = f.read(65536)
            if not chunk:
                break
            out.write(chunk)
            out.flush()
            pos += len(chunk)
            got = True
        return got

    try:
        while True:
            if f is None and os.path.exists(log_path):
                f = open(log_path, "rb")  # noqa: SIM115 - kept open while following
                f.seek(pos)
            if drain():
                sleep = 0.02
                continue
            info = run_info(layout, args.run_id)
            if info["state"] == "finished":
                drain()  # anything written between the last read and the exit
                if args.status_json:
                    status_line(info)
                if not args.quiet:
                    note(f"run {args.run_id} finished with exit code {info['exit_code']}")
                return info["exit_code"]
            if info["state"] == "lost":
                # Give a just-exited supervisor a moment to write exit_code.
                lost_since = lost_since or time.time()
                if time.time() - lost_since > 3:
                    drain()
                    if args.status_json:
                        status_line(info)
                    note(f"run {args.run_id} was lost: its process is gone and no exit code was recorded")
                    return EXIT_LOST
            else:
                lost_since = None
            # Short runs end quickly after a quick look; long quiet ones are polled every --poll s.
            time.sleep(min(args.poll, sleep))
            sleep = min(args.poll, sleep * 2)
    except BrokenPipeError:
        # The ssh side went away; nothing left to tell.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAIL
    finally:
        if f is not None:
            f.close()


def status_line(info: dict) -> None:
    """The run's final status as one JSON line on stderr (saves the laptop a `status` round trip)."""
    sys.stderr.write(json.dumps(public(info), sort_keys=True) + "\n")
    sys.stderr.flush()


def cmd_status(args: argparse.Namespace) -> int:
    layout = Layout(args.base)
    if args.run_id:
        print(json.dumps(public(run_info(layout, args.run_id)), indent=2))
        return EXIT_OK
    infos = []
    if os.path.isdir(layout.runs):
        for name in os.listdir(layout.runs):
            if RUN_ID_RE.match(name) and os.path.isdir(layout.run_dir(name)):
                infos.append(public(run_info(layout, name)))
    infos.sort(key=lambda i: (i.get("started_at") or "", i["run_id"]))
    print(json.dumps(infos, indent=2))
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    layout = Layout(args.base)
    run_id = args.run_id
    if not run_id:
        active = current_active(layout, clean=False)
        if active is None:
            note("no active run; nothing to cancel")
            return EXIT_OK
        run_id = active["run_id"]
    info = run_info(layout, run_id)
    if info["state"] == "finished":
        note("run {} already finished (exit code {}); nothing to cancel".format(run_id, info["exit_code"]))
        return EXIT_OK
    if info["state"] == "lost":
        note(f"run {run_id} is not running (lost, no exit code); nothing to cancel")
        return EXIT_OK
    deadline = time.time() + 30
    while info["pgid"] is None:  # `start` is still spawning it
        if time.time() > deadline:
            raise RunnerError(f"run {run_id} has no process group yet; retry")
        time.sleep(0.1)
        info = run_info(layout, run_id)
    pgid = info["pgid"]
    killed = False
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
        note(f"sent SIGTERM to run {run_id} (process group {pgid}); waiting up to {args.grace:g}s")
    deadline = time.time() + args.grace
    while group_alive(pgid) and time.time() < deadline:
        time.sleep(0.1)
    if group_alive(pgid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
            killed = True
            note(f"grace period over; sent SIGKILL to process group {pgid}")
    # The supervisor records the exit code; give it a moment.
    deadline = time.time() + 10
    code = None
    while time.time() < deadline:
        code = read_int(layout.path(run_id, "exit_code"))
        if code is not None:
            break
        if not pid_alive(info["_supervisor_pid"], info["_supervisor_start"]) and not group_alive(pgid):
            # Supervisor is gone (killed?): record it ourselves, best guess.
            code = 128 + (signal.SIGKILL if killed else signal.SIGTERM)
            record_exit(layout, run_id, code)
            break
        time.sleep(0.05)
    if code is None:
        raise RunnerError(f"run {run_id} was signalled but no exit code was recorded yet")
    print(f"cancelled run {run_id} (exit code {code})")
    return EXIT_OK


def cmd_idle(args: argparse.Namespace) -> int:
    """Exit 3 (with the active run's id) while a run is active: checked before a sync touches the job."""
    active = current_active(Layout(args.base), clean=False)
    if active is not None:
        raise RunnerError(
            f"run {active.get('run_id')} is still active (pid {active.get('pid')}); cancel it or wait for it to finish",
            EXIT_BUSY,
        )
    return EXIT_OK


def cmd_log_path(args: argparse.Namespace) -> int:
    layout = Layout(args.base)
    print(os.path.join(require_run(layout, args.run_id), "log"))
    return EXIT_OK


# --------------------------------------------------------------------------- CLI


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        sys.stderr.write(f"runner: error: {message}\n")
        sys.exit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="runner", description="Run a remotefit job on this node, detached from ssh.")
    sub = p.add_subparsers(dest="command", metavar="{start,follow,status,cancel,idle,log-path}")
    sub.required = True

    def add(name: str, help_text: str | None, run_id: str = "required") -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_text) if help_text else sub.add_parser(name)
        sp.add_argument("--base", required=True, help="the node's remotefit work directory")
        if run_id == "required":
            sp.add_argument("--run-id", required=True)
        elif run_id == "optional":
            sp.add_argument("--run-id")
        return sp

    sp = add("start", "start a job in the background and print its run id")
    sp.add_argument("--job-dir", required=True, help="directory the command runs in")
    sp.add_argument("--cmd", required=True, help="shell command (run with bash -c)")
    sp.add_argument("--env-file", help="JSON object of extra environment variables")
    sp.add_argument("--requirements", help="requirements file (relative to --job-dir) for a cached venv")
    sp.add_argument("--setup", help="shell command run in the job dir before --cmd")
    sp.add_argument("--check-cuda", action="store_true", help="fail (exit 4) unless torch sees CUDA")
    sp.add_argument("--json", action="store_true", help="print {run_id, pid, pgid, run_dir, log}")
    sp.set_defaults(func=cmd_start)

    sp = add("follow", "stream a run's log; exit with the job's exit code")
    sp.add_argument("--offset", type=int, default=0, help="byte offset to resume from")
    sp.add_argument("--poll", type=float, default=0.2, help="seconds between checks")
    sp.add_argument("-q", "--quiet", action="store_true", help="no closing note on stderr")
    sp.add_argument("--status-json", action="store_true", help="end with the run's status as a JSON line on stderr")
    sp.set_defaults(func=cmd_follow)

    sp = add("status", "JSON status of one run or of all runs", run_id="optional")
    sp.set_defaults(func=cmd_status)

    sp = add("cancel", "SIGTERM (then SIGKILL) a run's process group", run_id="optional")
    sp.add_argument("--grace", type=float, default=30.0, help="seconds between SIGTERM and SIGKILL")
    sp.set_defaults(func=cmd_cancel)

    sp = add("idle", "exit 0 when no run is active, else 3 naming the active run", run_id="none")
    sp.set_defaults(func=cmd_idle)

    sp = add("log-path", "print the path of a run's log")
    sp.set_defaults(func=cmd_log_path)

    # Internal: the detached supervisor and the job process.
    add("_supervise", None).set_defaults(func=cmd_supervise)
    add("_job", None).set_defaults(func=cmd_job)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except RunnerError as exc:
        sys.stderr.write(f"runner: error: {exc}\n")
        return exc.code
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if os.environ.get("REMOTEFIT_DEBUG"):
            raise
        sys.stderr.write(f"runner: error: {type(exc).__name__}: {exc}\n")
        return EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())

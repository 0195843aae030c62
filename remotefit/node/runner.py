#!/usr/bin/env python3
"""remotefit node runner: run one training job detached from the SSH session.

This file is copied to the node (``<base>/.remotefit/runner.py``, beside the
``contract.py`` it imports) and called over ssh by the laptop side. It uses only
the standard library, and works on Python 3.8+, because the node's python3 is
whatever the image ships (Ubuntu 22.04/24.04, a Deep Learning AMI, or the local
sandbox). The folder layout under ``--base``, the exit codes, the JSON messages
and the active-run record are the contract's (contract.py), shared with the
laptop and the watchdog.

The job's PATH is [its venv's bin,] .remotefit/bin, then a stock node's PATH (/etc/environment's,
else Ubuntu's default), never the PATH of whatever started the runner (a laptop's venv, pyenv or
conda from ~/.bashrc): so `python` means the same on every node, a sandbox node included. The
shims run the Python this runner runs under (the node's Python, the one with PyTorch): stock
Ubuntu 24.04 has no `python`, and the Deep Learning AMI's PyTorch lives outside PATH.

Process model: ``start`` spawns a small supervisor in a new session
(``runner.py _supervise``), which spawns the job in another new session
(``runner.py _job``: venv/pip install, optional CUDA check and setup, then
``exec bash -c CMD`` so the job keeps that pid and process group). The
supervisor waits for it, writes ``exit_code`` (128+N when killed by signal N)
and ``ended_at``, and clears ``active.json``. Nothing is tied to the ssh
session, so a dropped connection does not stop the job; the laptop re-attaches
with ``follow --offset <bytes already shown>``.

Exit codes (contract.EXIT_*): 0 ok; 1 unexpected failure; 2 bad usage / unknown
run id; 3 another run is active; 4 CUDA check failed; ``follow`` exits with the
job's exit code (EXIT_LOST when the run was lost without recording one).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import shlex
import signal
import sys
import time

# hashlib, shutil, site, socket and subprocess are imported where they are used: `idle`, `follow`
# and `status` (a call on every fit) need none of them, and they cost ~20 ms per interpreter start.
TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing
if TYPE_CHECKING:
    import subprocess

RUNNER = os.path.abspath(__file__)
# contract.py travels beside this file; the supervisor and job run with -I, which leaves the
# script's folder off sys.path, so it is put there explicitly.
sys.path.insert(0, os.path.dirname(RUNNER))
import contract  # noqa: E402
from contract import (  # noqa: E402
    EXIT_BUSY,
    EXIT_FAIL,
    EXIT_LOST,
    EXIT_NO_CUDA,
    EXIT_OK,
    EXIT_USAGE,
    pid_alive,
    proc_stat,
    read_json,
    write_json,
    write_text,
)

READY_MARKER = ".remotefit-ready"
# Ubuntu's /etc/environment PATH: what a stock node's login gets when that file says nothing.
STOCK_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/usr/games:/usr/local/games:/snap/bin"
# Each shim: `python`/`python3` run the node's Python; the others run a module of whichever `python`
# comes first on PATH, so in a job with requirements they use the job's venv.
SHIMS = {
    "python": 'exec {python} "$@"',
    "python3": 'exec {python} "$@"',
    "pip": 'exec python -m pip "$@"',
    "pip3": 'exec python -m pip "$@"',
    "torchrun": 'exec python -m torch.distributed.run "$@"',
}
PTH_NAME = "remotefit-parent-site.pth"
RUN_ID_RE = re.compile(contract.RUN_ID_PATTERN)
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
            if st is not None and st[2] == pgid and st[0] not in ("Z", "X"):
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
    """The contract's folder layout, under one absolute --base."""

    def __init__(self, base: str):
        self.base = os.path.abspath(os.path.expanduser(base))
        self.runs = os.path.join(self.base, "runs")
        self.envs = os.path.join(self.base, "envs")
        self.active = contract.active_path(self.base)
        self.lock = os.path.join(self.base, contract.LOCK)
        self.shims = os.path.join(self.base, contract.SHIM_DIR)

    def run_dir(self, run_id: str) -> str:
        return contract.run_dir(self.base, run_id)

    def path(self, run_id: str, name: str) -> str:
        return os.path.join(self.run_dir(run_id), name)


def check_run_id(run_id: str) -> str:
    if not RUN_ID_RE.fullmatch(run_id or ""):
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
    active = contract.read_active(layout.base) or {}
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
        # The final upload to the runs bucket ({files, bytes, complete, errors}); None when not kept.
        "kept": read_json(os.path.join(rd, "upload.json")) if meta.get("keep") else None,
        # A spot interruption notice the watchdog forwarded to this run ({notice, forwarded_at}), if any.
        "spot_notice": read_json(contract.spot_notice_path(layout.base, run_id)),
        "_supervisor_pid": meta.get("supervisor_pid"),
        "_supervisor_start": meta.get("supervisor_start"),
    }


def public(info: dict) -> dict:
    return {k: v for k, v in info.items() if not k.startswith("_")}


def current_active(layout: Layout, clean: bool) -> dict | None:
    """The active run if its process is alive; a stale active.json is removed."""
    data = contract.read_active(layout.base)
    if data is None:
        if clean and os.path.exists(layout.active):
            os.unlink(layout.active)  # unreadable: cannot name a live run
        return None
    if contract.record_alive(data):
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
        data = contract.read_active(layout.base)
        if data is not None and data.get("run_id") == run_id:
            os.unlink(layout.active)


def record_exit(layout: Layout, run_id: str, code: int, ended: float | None = None) -> None:
    """Write ended_at, then exit_code (exit_code is the 'finished' signal)."""
    ended = time.time() if ended is None else ended
    write_text(layout.path(run_id, "ended_at"), iso(ended) + "\n")
    meta = read_json(layout.path(run_id, "run.json")) or {}
    meta.update(exit_code=code, ended_at=iso(ended), ended_epoch=ended)
    write_json(layout.path(run_id, "run.json"), meta)
    write_text(layout.path(run_id, "exit_code"), f"{code}\n")
    clear_active(layout, run_id)


# --------------------------------------------------------------------------- venv


def env_hash(requirements: bytes) -> str:
    import hashlib

    # The interpreter path is part of the key too: two interpreters of the same
    # version (system vs conda) must not share a venv.
    h = hashlib.sha256()
    h.update(requirements)
    h.update(b"\0" + sys.version.encode() + b"\0" + os.path.realpath(sys.executable).encode())
    return h.hexdigest()[:16]


def parent_site_dirs() -> list[str]:
    import site

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
    import shutil
    import subprocess

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
        # No pip of its own where this Python's pip reaches the venv (system site-packages, or the parent's
        # through the .pth below): ensurepip byte-compiles a whole pip, ~6 CPU-s a venv. bin/pip is then a
        # shim for `python -m pip`, so a job's own `pip install` still installs into its venv.
        import importlib.util

        own_pip = importlib.util.find_spec("pip") is None
        flags = ["--system-site-packages"] + ([] if own_pip else ["--without-pip"])
        say(f"creating venv {venv_dir} ({' '.join(flags)}, {sys.executable})")
        rc = subprocess.call([sys.executable, "-m", "venv", *flags, venv_dir])
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
        for name in ("pip", "pip3"):
            shim = os.path.join(venv_dir, "bin", name)
            if not os.path.exists(shim):
                with open(shim, "w", encoding="utf-8") as f:
                    f.write(f'#!/bin/sh\nexec {shlex.quote(vpy)} -m pip "$@"\n')
                os.chmod(shim, 0o755)  # noqa: S103 - an executable like the venv's own bin/ scripts
        say(f"pip install -r {requirements}")
        # --no-compile: byte-compiling every installed module (torch's thousands) costs more than the first
        # run's imports compile (measured: torch, numpy, scikit-learn, matplotlib install in 21 instead of
        # 46-67 CPU-s; their first import takes 6.5 s more, once: its .pyc files stay in the cached venv).
        rc = subprocess.call(
            [vpy, "-m", "pip", "install", "--disable-pip-version-check", "--no-compile", "-r", requirements],
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
    import shutil

    path = env.get("PATH", os.defpath)
    return shutil.which("python", path=path) or shutil.which("python3", path=path) or sys.executable


def driver_version() -> str:
    import shutil
    import subprocess

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
    import subprocess

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


def from_request(args: argparse.Namespace, layout: Layout) -> tuple[argparse.Namespace, dict]:
    """`start --request -`: the start's arguments and the job's extra environment from one JSON object on
    stdin (contract.START_REQUEST). The env stays in memory: no file on the node ever holds it."""
    source = sys.stdin if args.request == "-" else None
    if source is None:
        raise RunnerError("--request takes only - (the request on stdin)", EXIT_USAGE)
    try:
        request = json.loads(source.read())
    except ValueError as exc:
        raise RunnerError(f"the start request is not valid JSON: {exc}", EXIT_USAGE) from None
    problem = contract.start_request_problem(request)
    if problem:
        raise RunnerError(problem, EXIT_USAGE)
    run_id = check_run_id(request["run_id"])
    filled = argparse.Namespace(**vars(args))
    filled.run_id = run_id
    filled.job_dir = contract.job_dir(layout.base, request["job"])
    filled.cmd = request["cmd"]
    filled.outputs = request["outputs"]
    filled.outputs_dir = contract.outputs_dir(layout.base, run_id) if request["outputs"] is not None else None
    filled.requirements = request["requirements"]
    filled.setup = request["setup"]
    filled.check_cuda = request["check_cuda"]
    filled.follow = request["follow"]
    filled.json = True
    return filled, dict(request["env"])


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


def stock_path(environment: str = "/etc/environment") -> str:
    """PATH as a stock node's login has it: /etc/environment's PATH line, else Ubuntu's default."""
    try:
        with open(environment, encoding="utf-8") as f:
            for line in f:
                key, _, value = line.strip().partition("=")
                if key.strip() == "PATH" and value.strip():
                    return value.strip().strip("\"'")
    except OSError:
        pass
    return STOCK_PATH


def write_shims(shim_dir: str, python: str) -> str:
    """(Re)write the job's command shims for `python` (each an atomic replace); return the folder."""
    os.makedirs(shim_dir, exist_ok=True)
    for name, body in SHIMS.items():
        text = (
            "#!/bin/sh\n# remotefit: written by runner.py for jobs\n" + body.format(python=shlex.quote(python)) + "\n"
        )
        path = os.path.join(shim_dir, name)
        tmp = f"{path}.tmp.{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o700)  # only the job user runs them
        os.replace(tmp, path)
    return shim_dir


def build_env(
    base_env: dict, extra: dict, venv_dir: str | None, run_dir: str, run_id: str, shim_dir: str | None = None
) -> dict:
    env = dict(base_env)
    env["PATH"] = stock_path()  # not the caller's: see the module docstring
    for key, value in extra.items():
        if value is None:
            env.pop(key, None)
        else:
            env[str(key)] = value if isinstance(value, str) else json.dumps(value)
    for key in ("SSH_CLIENT", "SSH2_CLIENT", "SSH_CONNECTION", "SSH_TTY", "VIRTUAL_ENV"):
        env.pop(key, None)  # the job is not an ssh session (and bash must not act like one)
    if shim_dir:
        env["PATH"] = shim_dir + os.pathsep + env["PATH"]
    if venv_dir:
        env["PATH"] = os.path.join(venv_dir, "bin") + os.pathsep + env["PATH"]
        env["VIRTUAL_ENV"] = venv_dir
    env["REMOTEFIT_RUN_DIR"] = run_dir
    env["REMOTEFIT_RUN_ID"] = run_id
    # Logs are followed live; block-buffered python output would arrive late.
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def inside(root: str, rel: str, what: str) -> str:
    """root/rel, refused unless it is a relative path that stays inside root (symlinks included).

    The laptop checks job.toml too; this is the node's own guard, since on the sandbox or with
    --local the node is the user's own machine."""
    norm = os.path.normpath(rel or ".")
    if os.path.isabs(rel or "") or norm in (".", "..") or norm.startswith("../") or "\n" in rel:
        raise RunnerError(f"{what} {rel!r} is not a relative path inside {root}", EXIT_USAGE)
    full = os.path.join(root, norm)
    parent = os.path.realpath(os.path.dirname(full))
    real_root = os.path.realpath(root)
    if parent != real_root and not parent.startswith(real_root + os.sep):
        raise RunnerError(f"{what} {rel!r} leads out of {root} through a symlink", EXIT_USAGE)
    return full


def link_outputs(job_dir: str, name: str, target: str, run_id: str) -> None:
    """<job_dir>/<name> becomes a symlink to this run's outputs folder (a real folder there is kept
    aside as <name>.before-<run id>), so any script writing ./outputs works and runs never mix."""
    link = inside(job_dir, name, "--outputs")
    os.makedirs(target, exist_ok=True)
    os.makedirs(os.path.dirname(link), exist_ok=True)
    if os.path.lexists(link) and not os.path.islink(link):
        os.rename(link, f"{link}.before-{run_id}")
    tmp = f"{link}.tmp-{run_id}"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    os.symlink(target, tmp)
    os.replace(tmp, link)


def cmd_start(args: argparse.Namespace) -> int:
    """Start a run: check the request, create its folder and record, spawn its supervisor; print the
    started message (or, with --follow, stream the log here until the run ends)."""
    layout = Layout(args.base)
    args, extra_env = start_request(args, layout)
    keep = keep_spec(extra_env.pop(contract.KEEP_KEY, None))  # for the supervisor's uploader, not the job
    run_id = check_run_id(args.run_id)
    job_dir, req_bytes = check_start_paths(args, layout)
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
        if args.outputs is not None:
            link_outputs(job_dir, args.outputs, os.path.abspath(args.outputs_dir), run_id)
        venv_dir = os.path.join(layout.envs, env_hash(req_bytes)) if req_bytes is not None else None
        env = build_env(dict(os.environ), extra_env, venv_dir, rd, run_id, write_shims(layout.shims, sys.executable))
        cuda_checked = check_cuda_early(args, env, venv_dir, job_dir)
        os.makedirs(rd)
        req_copy = None
        if req_bytes is not None:
            req_copy = os.path.join(rd, "requirements.txt")
            with open(req_copy, "wb") as f:
                f.write(req_bytes)
        open(os.path.join(rd, "log"), "ab").close()  # `follow` may start right away
        write_run_record(
            rd,
            args,
            run_id,
            job_dir=job_dir,
            req_copy=req_copy,
            venv_dir=venv_dir,
            cuda_checked=cuda_checked,
            env_keys=extra_env,
            keep=keep,
        )
        sup = spawn_supervisor(layout, rd, run_id, env)
        meta = wait_for_pid(layout, run_id, sup)

    sup.returncode = 0  # detached on purpose; silence Popen's "still running" warning
    return reply_started(args, run_id, meta, rd)


def reply_started(args: argparse.Namespace, run_id: str, meta: dict, rd: str) -> int:
    """The started message on stdout; with --follow, on stderr, then the log on stdout until the run ends
    (one interpreter start less per fit), its status ending stderr."""
    started = {
        "type": contract.MSG_STARTED,
        "run_id": run_id,
        "pid": meta["pid"],
        "pgid": meta.get("pgid"),
        "run_dir": rd,
        "log": os.path.join(rd, "log"),
    }
    if args.follow:
        sys.stderr.write(json.dumps(started) + "\n")
        sys.stderr.flush()
        follow = argparse.Namespace(base=args.base, run_id=run_id, offset=0, poll=0.2, quiet=True, status_json=True)
        return cmd_follow(follow)
    print(json.dumps(started) if args.json else run_id)
    sys.stdout.flush()
    return EXIT_OK


def start_request(args: argparse.Namespace, layout: Layout) -> tuple[argparse.Namespace, dict]:
    """The start's arguments and the job's extra environment: from a JSON request on stdin, or from
    flags and an env file."""
    if args.request is not None:
        return from_request(args, layout)
    if not (args.run_id and args.job_dir and args.cmd):
        raise RunnerError("start needs --run-id, --job-dir and --cmd, or --request -", EXIT_USAGE)
    if not args.env_file:
        return args, {}
    # It may hold tokens (job.toml [env]): read once, then gone; the job gets them in its
    # environment, and nothing else keeps them.
    try:
        return args, load_env_file(args.env_file)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(args.env_file)


def check_start_paths(args: argparse.Namespace, layout: Layout) -> tuple[str, bytes | None]:
    """The job folder (absolute) and the requirements' bytes, or None; every path checked to stay
    where it belongs."""
    job_dir = os.path.abspath(os.path.expanduser(args.job_dir))
    if not os.path.isdir(job_dir):
        raise RunnerError(f"job dir {job_dir} does not exist", EXIT_USAGE)
    if args.outputs is not None:
        inside(job_dir, args.outputs, "--outputs")
        out_dir = os.path.abspath(args.outputs_dir or "")
        if not args.outputs_dir or not out_dir.startswith(layout.base + os.sep):
            raise RunnerError(f"--outputs-dir {args.outputs_dir!r} must be a folder inside {layout.base}", EXIT_USAGE)
    if not args.requirements:
        return job_dir, None
    try:
        with open(inside(job_dir, args.requirements, "--requirements"), "rb") as f:
            return job_dir, f.read()
    except OSError as exc:
        raise RunnerError(f"cannot read requirements {args.requirements}: {exc.strerror}", EXIT_USAGE) from None


def check_cuda_early(args: argparse.Namespace, env: dict, venv_dir: str | None, job_dir: str) -> bool:
    """When the job's python exists already, fail now, before anything starts (otherwise the job
    process checks after installing requirements). True when checked here."""
    if not args.check_cuda or (venv_dir is not None and not os.path.isfile(os.path.join(venv_dir, READY_MARKER))):
        return False
    ok, line = check_cuda(job_python(env), env, job_dir)
    if not ok:
        raise RunnerError(line, EXIT_NO_CUDA)
    note(line)
    return True


def write_run_record(
    rd: str,
    args: argparse.Namespace,
    run_id: str,
    *,
    job_dir: str,
    req_copy: str | None,
    venv_dir: str | None,
    cuda_checked: bool,
    env_keys: dict,
    keep: dict,
) -> None:
    """run.json: what the supervisor runs and what `status` reports (the env file's keys, never its values)."""
    import socket

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
            "env_file_keys": sorted(str(k) for k in env_keys),
            "started_at": iso(started),
            "started_epoch": started,
            "hostname": socket.gethostname(),
            "python": sys.executable,
            "starter_pid": os.getpid(),
            "outputs_dir": os.path.abspath(args.outputs_dir) if args.outputs is not None else None,
            "keep": keep,
        },
    )


def spawn_supervisor(layout: Layout, rd: str, run_id: str, env: dict) -> subprocess.Popen:
    """The run's supervisor, detached in its own session, its output in supervisor.log."""
    import subprocess

    with open(os.path.join(rd, "supervisor.log"), "ab") as slog:
        # -I: the env file may set PYTHONPATH/PYTHONHOME for the job; they must not break the runner's
        # own interpreter. -S: the supervisor needs only the standard library (and contract.py); skipping
        # site saves a node Python's .pth files on every start. The job process keeps site: it builds
        # venvs from the parent's site-packages.
        return subprocess.Popen(
            [sys.executable, "-I", "-S", RUNNER, "_supervise", "--base", layout.base, "--run-id", run_id],
            cwd=rd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=slog,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )


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
        time.sleep(0.005)


# --------------------------------------------------------------------------- supervisor / job


def cmd_supervise(args: argparse.Namespace) -> int:
    import subprocess

    layout = Layout(args.base)
    run_id = args.run_id
    meta = read_json(layout.path(run_id, "run.json")) or {}
    with open(layout.path(run_id, "log"), "ab") as log:
        try:
            job = subprocess.Popen(
                # Site only when a venv is to be built (it reads the parent's site-packages); without
                # requirements the job process needs the standard library alone, and starts faster.
                [sys.executable, *(["-I"] if meta.get("requirements_copy") else ["-I", "-S"]), RUNNER, "_job"]
                + ["--base", layout.base, "--run-id", run_id],
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
    meta.update(
        pid=job.pid,
        pgid=job.pid,
        pid_start=contract.start_ticks(job.pid),
        supervisor_pid=os.getpid(),
        supervisor_start=contract.start_ticks(os.getpid()),
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
            "supervisor_start": meta["supervisor_start"],
        },
    )
    write_json(layout.path(run_id, "run.json"), meta)  # `start` waits for this pid
    uploader = start_uploader(layout, run_id, meta)
    code = exit_code_of(job.wait())
    print(f"{iso()} job {job.pid} exited with {code}", flush=True)
    ended = time.time()
    if uploader is not None:
        # The run counts as finished only once its results are in the bucket (bounded): until then it
        # stays active, so the watchdog sees a busy node and no cost guard ends it mid-upload.
        finish_upload(layout, run_id, meta, code, ended, uploader)
    record_exit(layout, run_id, code, ended)
    return EXIT_OK


def keep_spec(raw: object) -> dict | None:
    """The laptop's KEEP_KEY entry (a JSON object in a string), or None when results stay on the node."""
    if raw is None:
        return None
    try:
        spec = json.loads(str(raw))
    except ValueError:
        spec = None
    if not isinstance(spec, dict) or not all(isinstance(spec.get(k), str) for k in ("bucket", "prefix")):
        raise RunnerError(
            f"{contract.KEEP_KEY} is not a results spec (a JSON object with bucket and prefix)", EXIT_USAGE
        )
    return spec


def start_uploader(layout: Layout, run_id: str, meta: dict):  # -> subprocess.Popen | None
    """Start remotefit/node/uploader.py beside the job (its own session: a cancel of the job's group
    does not stop it), under the tool venv's Python; None when this run keeps nothing or cannot."""
    import subprocess

    keep = meta.get("keep")
    if not keep:
        return None
    rd = layout.run_dir(run_id)
    python = os.environ.get(contract.TOOLS_PYTHON_ENV) or contract.TOOLS_PYTHON
    script = os.path.join(os.path.dirname(RUNNER), "uploader.py")
    if not (os.path.isfile(python) and os.path.isfile(script)):
        missing = python if not os.path.isfile(python) else script
        print(f"{iso()} results are NOT kept in S3: {missing} is missing", flush=True)
        write_json(os.path.join(rd, "upload.json"), {"complete": False, "errors": [f"{missing} is missing"]})
        return None
    argv = [python, script, "--bucket", keep["bucket"], "--prefix", keep["prefix"]]
    argv += ["--every", str(keep.get("every") or 60), "--log", os.path.join(rd, "log")]
    argv += ["--log-key", str(keep.get("log_key") or "log"), "--stop-file", os.path.join(rd, "upload-stop")]
    argv += ["--done-file", os.path.join(rd, "upload.json"), "--final-timeout", str(contract.KEEP_FINAL_TIMEOUT_S)]
    argv += ["--also", f"{os.path.join(rd, 'keep-status.json')}={keep.get('status_key') or 'status.json'}"]
    if keep.get("region"):
        argv += ["--region", str(keep["region"])]
    if keep.get("outputs") and meta.get("outputs_dir"):
        argv += ["--outputs", meta["outputs_dir"]]
    if isinstance(keep.get("record"), dict):
        write_json(os.path.join(rd, "record.json"), keep["record"])
        argv += ["--also", f"{os.path.join(rd, 'record.json')}=record.json"]
    env = dict(os.environ)
    env.update({str(k): str(v) for k, v in (keep.get("aws_env") or {}).items()})
    with open(os.path.join(rd, "upload.log"), "ab") as out:
        return subprocess.Popen(
            argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def finish_upload(layout: Layout, run_id: str, meta: dict, code: int, ended: float, uploader) -> None:
    """The run's final status goes beside its results, then the uploader's final pass (bounded)."""
    import subprocess

    rd = layout.run_dir(run_id)
    status = {
        "run_id": run_id,
        "state": "finished",
        "exit_code": code,
        "started_at": meta.get("started_at"),
        "ended_at": iso(ended),
        "hostname": meta.get("hostname"),
    }
    write_json(os.path.join(rd, "keep-status.json"), status)
    write_text(os.path.join(rd, "upload-stop"), "")
    try:
        uploader.wait(timeout=contract.KEEP_FINAL_TIMEOUT_S + 60)
    except subprocess.TimeoutExpired:
        uploader.kill()
        print(f"{iso()} the final upload did not end in time; stopped it", flush=True)
    done = read_json(os.path.join(rd, "upload.json")) or {}
    print(f"{iso()} final upload: {'complete' if done.get('complete') else 'INCOMPLETE'}", flush=True)


def restore_outputs(keep: dict, outputs_dir: str) -> int:
    """`inv fit --resume`: the earlier run's outputs from the runs bucket into this run's, before the job
    (through the uploader, under the tool venv's Python); its lines go to the run's log."""
    import subprocess

    python = os.environ.get(contract.TOOLS_PYTHON_ENV) or contract.TOOLS_PYTHON
    script = os.path.join(os.path.dirname(RUNNER), "uploader.py")
    source = "s3://{}/{}/outputs/".format(keep["bucket"], keep["restore_from"])
    if not (os.path.isfile(python) and os.path.isfile(script)):
        print(f"[remotefit] cannot resume: {python if not os.path.isfile(python) else script} is missing", flush=True)
        return EXIT_FAIL
    print(f"[remotefit] resuming: restoring the outputs of {source}", flush=True)
    argv = [
        python,
        script,
        "--bucket",
        keep["bucket"],
        "--restore-from",
        keep["restore_from"],
        "--outputs",
        outputs_dir,
    ]
    if keep.get("region"):
        argv += ["--region", str(keep["region"])]
    env = dict(os.environ)
    env.update({str(k): str(v) for k, v in (keep.get("aws_env") or {}).items()})
    sys.stdout.flush()
    rc = exit_code_of(subprocess.call(argv, env=env, stdin=subprocess.DEVNULL))
    if rc:
        print(f"[remotefit] cannot resume: the restore from {source} failed (exit code {rc})", flush=True)
    return rc


def cmd_job(args: argparse.Namespace) -> int:
    import subprocess

    # Python ignores SIGPIPE and that would survive exec into the job.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    layout = Layout(args.base)
    meta = read_json(layout.path(args.run_id, "run.json")) or {}
    keep = meta.get("keep") or {}
    if keep.get("restore_from") and keep.get("outputs") and meta.get("outputs_dir"):
        rc = restore_outputs(keep, meta["outputs_dir"])
        if rc:
            return rc
    if meta.get("requirements_copy"):
        rc = ensure_venv(meta["venv"], meta["requirements_copy"])
        if rc:
            return rc
    if meta.get("check_cuda") and not meta.get("cuda_checked"):
        ok, line = check_cuda(job_python(dict(os.environ)), dict(os.environ), os.getcwd())
        if not ok:
            print(contract.ERROR_PREFIX + line, file=sys.stderr, flush=True)
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


class LogTail:
    """A run's log, copied to stdout from an offset on, as it grows (the file may not exist yet)."""

    def __init__(self, path: str, offset: int) -> None:
        self.path, self.pos, self.f = path, offset, None
        self.out = sys.stdout.buffer

    def drain(self) -> bool:
        """Copy what was written since the last call; True when there was something."""
        if self.f is None and os.path.exists(self.path):
            self.f = open(self.path, "rb")  # noqa: SIM115 - kept open while following
            self.f.seek(self.pos)
        got = False
        while self.f is not None:
            chunk = self.f.read(65536)
            if not chunk:
                break
            self.out.write(chunk)
            self.out.flush()
            self.pos += len(chunk)
            got = True
        return got

    def close(self) -> None:
        if self.f is not None:
            self.f.close()


def cmd_follow(args: argparse.Namespace) -> int:
    """Stream a run's log until it ends; the run's exit code (EXIT_LOST for a run gone without one)."""
    layout = Layout(args.base)
    rd = require_run(layout, args.run_id)
    if args.offset < 0:
        raise RunnerError("--offset must be >= 0", EXIT_USAGE)
    tail = LogTail(os.path.join(rd, "log"), args.offset)
    lost_since = None
    sleep = 0.005
    began = time.time()
    try:
        while True:
            if tail.drain():
                sleep = 0.02
                continue
            info = run_info(layout, args.run_id)
            # Give a just-exited supervisor a moment to write exit_code before calling a run lost.
            lost_since = (lost_since or time.time()) if info["state"] == "lost" else None
            if info["state"] == "finished" or (lost_since and time.time() - lost_since > 3):
                tail.drain()  # anything written between the last read and the exit
                return followed_to_the_end(args, info)
            # Short runs end quickly after a quick look (every 20 ms for the first seconds: a check
            # reads a few small files); long quiet ones are polled every --poll s.
            time.sleep(min(args.poll, sleep))
            sleep = min(args.poll, sleep * 2) if time.time() - began > 3 else min(0.02, sleep * 2)
    except BrokenPipeError:
        # The ssh side went away; nothing left to tell.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAIL
    finally:
        tail.close()


def followed_to_the_end(args: argparse.Namespace, info: dict) -> int:
    """What `follow` says once a run has finished or is lost, and its exit code."""
    if args.status_json:
        status_line(info)
    if info["state"] == "lost":
        note(f"run {args.run_id} was lost: its process is gone and no exit code was recorded")
        return EXIT_LOST
    if not args.quiet:
        note(f"run {args.run_id} finished with exit code {info['exit_code']}")
    return info["exit_code"]


def status_line(info: dict) -> None:
    """The run's final status as one JSON line on stderr (saves the laptop a `status` round trip)."""
    sys.stderr.write(json.dumps(dict(public(info), type=contract.MSG_STATUS), sort_keys=True) + "\n")
    sys.stderr.flush()


def cmd_status(args: argparse.Namespace) -> int:
    layout = Layout(args.base)
    if args.run_id:
        print(json.dumps(public(run_info(layout, args.run_id)), indent=2))
        return EXIT_OK
    infos = []
    if os.path.isdir(layout.runs):
        for name in os.listdir(layout.runs):
            if RUN_ID_RE.fullmatch(name) and os.path.isdir(layout.run_dir(name)):
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
    # The supervisor records the exit code; give it a moment (more when it first does the final upload).
    keeps = bool((read_json(layout.path(run_id, "run.json")) or {}).get("keep"))
    deadline = time.time() + (contract.KEEP_FINAL_TIMEOUT_S + 60 if keeps else 10)
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


# --------------------------------------------------------------------------- CLI


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        sys.stderr.write(f"{contract.ERROR_PREFIX}{message}\n")
        sys.exit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="runner", description="Run a remotefit job on this node, detached from ssh.")
    sub = p.add_subparsers(dest="command", metavar="{start,follow,status,cancel,idle}")
    sub.required = True

    def add(name: str, help_text: str | None, run_id: str = "required") -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_text) if help_text else sub.add_parser(name)
        sp.add_argument("--base", required=True, help="the node's remotefit work directory")
        if run_id == "required":
            sp.add_argument("--run-id", required=True)
        elif run_id == "optional":
            sp.add_argument("--run-id")
        return sp

    sp = add("start", "start a job in the background and print its run id", run_id="optional")
    sp.add_argument("--request", help="- : everything below as one JSON object on stdin (contract.START_REQUEST)")
    sp.add_argument("--job-dir", help="directory the command runs in (required without --request)")
    sp.add_argument("--cmd", help="shell command (run with bash -c; required without --request)")
    sp.add_argument("--env-file", help="JSON object of extra environment variables")
    sp.add_argument("--requirements", help="requirements file (relative to --job-dir) for a cached venv")
    sp.add_argument("--outputs", help="folder (relative to --job-dir) to link to --outputs-dir")
    sp.add_argument("--outputs-dir", help="this run's outputs folder (inside --base)")
    sp.add_argument("--setup", help="shell command run in the job dir before --cmd")
    sp.add_argument("--check-cuda", action="store_true", help="fail (exit 4) unless torch sees CUDA")
    sp.add_argument("--json", action="store_true", help="print {run_id, pid, pgid, run_dir, log}")
    sp.add_argument(
        "--follow",
        action="store_true",
        help="then stream the log like `follow -q --status-json` (that JSON goes to stderr first)",
    )
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

    # Internal: the detached supervisor and the job process.
    add("_supervise", None).set_defaults(func=cmd_supervise)
    add("_job", None).set_defaults(func=cmd_job)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except RunnerError as exc:
        sys.stderr.write(f"{contract.ERROR_PREFIX}{exc}\n")
        return exc.code
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if os.environ.get("REMOTEFIT_DEBUG"):
            raise
        sys.stderr.write(f"{contract.ERROR_PREFIX}{type(exc).__name__}: {exc}\n")
        return EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())

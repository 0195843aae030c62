"""Tests for remotefit/node/runner.py: detached runs, follow/status/cancel, cached venvs."""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import signal
import site
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "remotefit" / "node" / "runner.py"


def _load():
    spec = importlib.util.spec_from_file_location("remotefit_node_runner", RUNNER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


runner = _load()


@pytest.fixture
def base(tmp_path):
    b = tmp_path / "base"
    (b / "jobs" / "job").mkdir(parents=True)
    yield b
    # Never leave a job behind: kill whatever active.json still names.
    active = runner.read_json(str(b / "active.json"))
    if active and runner.pid_alive(active.get("pid")):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(active["pgid"], signal.SIGKILL)


def rf(base, sub, *args, timeout=60, env=None):
    return subprocess.run(
        [sys.executable, str(RUNNER), sub, "--base", str(base), *args],
        capture_output=True,
        timeout=timeout,
        env=env,
    )


def start(base, run_id, cmd, *extra, env=None):
    return rf(base, "start", "--run-id", run_id, "--job-dir", str(base / "jobs" / "job"), "--cmd", cmd, *extra, env=env)


def wait_exit_code(base, run_id, timeout=20.0):
    path = base / "runs" / run_id / "exit_code"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and path.read_text().strip():
            return int(path.read_text())
        time.sleep(0.05)
    raise AssertionError(f"run {run_id} did not finish in {timeout}s")


def one_line_error(stderr: bytes) -> str:
    lines = stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("runner: error: ")
    assert "Traceback" not in lines[0]
    return lines[0]


def test_start_follow_exit_code_and_files(base):
    r = start(base, "r1", "echo hi; sleep 1; exit 3", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["run_id"] == "r1" and info["pid"] > 0 and info["pgid"] == info["pid"]
    active = json.loads((base / "active.json").read_text())
    assert active["run_id"] == "r1" and active["pid"] == info["pid"]

    f = rf(base, "follow", "--run-id", "r1")
    assert f.stdout == b"hi\n"
    assert f.returncode == 3

    run_dir = base / "runs" / "r1"
    assert (run_dir / "exit_code").read_text().strip() == "3"
    assert (run_dir / "ended_at").read_text().strip()
    meta = json.loads((run_dir / "run.json").read_text())
    for key in ("command", "job_dir", "started_at", "pid", "pgid", "hostname"):
        assert meta[key], key
    assert not (base / "active.json").exists()

    st = json.loads(rf(base, "status", "--run-id", "r1").stdout)
    assert st["state"] == "finished" and st["exit_code"] == 3 and st["ended_at"]
    all_runs = json.loads(rf(base, "status").stdout)
    assert [s["run_id"] for s in all_runs] == ["r1"]


def test_job_survives_parent_death(base):
    # The "ssh session": a shell that starts the job and then hangs around.
    job = base / "jobs" / "job"
    script = f"{sys.executable} {RUNNER} start --base {base} --run-id r1 --job-dir {job} "
    script += "--cmd 'sleep 1; echo survived; exit 5'; sleep 60"
    parent = subprocess.Popen(
        ["bash", "-c", script], start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 10
    while not (base / "active.json").exists():
        assert time.time() < deadline, "start did not write active.json"
        time.sleep(0.02)
    # What sshd does when the connection drops, then worse.
    os.killpg(parent.pid, signal.SIGHUP)
    os.killpg(parent.pid, signal.SIGKILL)
    parent.wait()
    assert wait_exit_code(base, "r1") == 5
    assert (base / "runs" / "r1" / "log").read_bytes() == b"survived\n"


def test_second_start_refused_then_cancel(base):
    assert start(base, "r1", "echo started; sleep 30").returncode == 0
    r = start(base, "r2", "echo no")
    assert r.returncode == 3
    assert "r1" in one_line_error(r.stderr)
    assert not (base / "runs" / "r2").exists()

    c = rf(base, "cancel", "--grace", "5")
    assert c.returncode == 0, c.stderr
    assert b"143" in c.stdout
    assert wait_exit_code(base, "r1") == 143
    assert not (base / "active.json").exists()
    assert json.loads(rf(base, "status", "--run-id", "r1").stdout)["state"] == "finished"

    again = rf(base, "cancel", "--run-id", "r1")
    assert again.returncode == 0
    assert b"already finished" in again.stderr
    # The slot is free again.
    assert start(base, "r2", "exit 0").returncode == 0
    assert wait_exit_code(base, "r2") == 0


def test_cancel_escalates_to_sigkill(base):
    # `trap '' TERM` is inherited by sleep, so only SIGKILL ends the group.
    # Cancel only once the trap is set: a TERM before it ends the shell with 143 (a test race, seen in CI).
    assert start(base, "r1", "trap '' TERM; echo trapped; sleep 30").returncode == 0
    log = base / "runs" / "r1" / "log"
    deadline = time.time() + 20
    while not (log.exists() and b"trapped" in log.read_bytes()):
        assert time.time() < deadline, "the job never set its trap"
        time.sleep(0.02)
    c = rf(base, "cancel", "--run-id", "r1", "--grace", "0.5")
    assert c.returncode == 0, c.stderr
    assert wait_exit_code(base, "r1") == 137


def test_stale_active_json_is_cleaned(base):
    dead = subprocess.Popen(["true"])
    dead.wait()
    (base / "active.json").write_text(json.dumps({"run_id": "old", "pid": dead.pid, "pgid": dead.pid}))
    r = start(base, "r1", "exit 0")
    assert r.returncode == 0, r.stderr
    assert b"stale" in r.stderr
    assert wait_exit_code(base, "r1") == 0


def test_follow_offset_resumes_without_repeating(base):
    cmd = "echo first; sleep 1.5; echo second; exit 0"
    assert start(base, "r1", cmd).returncode == 0
    f = subprocess.Popen(
        [sys.executable, str(RUNNER), "follow", "--base", str(base), "--run-id", "r1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    first = f.stdout.readline()
    f.kill()  # the ssh connection drops mid-run
    f.wait()
    assert first == b"first\n"
    rest = rf(base, "follow", "--run-id", "r1", "--offset", str(len(first)))
    assert rest.returncode == 0
    assert rest.stdout == b"second\n"
    # Past the end of a finished log: nothing, just the exit code.
    tail = rf(base, "follow", "--run-id", "r1", "--offset", "13")
    assert tail.stdout == b"" and tail.returncode == 0


def test_unknown_run_id(base):
    for sub in ("follow", "status", "cancel"):
        r = rf(base, sub, "--run-id", "nope")
        assert r.returncode == 2, sub
        assert "nope" in one_line_error(r.stderr)


def test_bad_usage_is_one_line(base):
    r = rf(base, "start", "--run-id", "../evil", "--job-dir", str(base), "--cmd", "true")
    assert r.returncode == 2
    one_line_error(r.stderr)
    r = rf(base, "start", "--run-id", "r1", "--job-dir", str(base / "missing"), "--cmd", "true")
    assert r.returncode == 2
    one_line_error(r.stderr)


def test_setup_env_file_and_env(base):
    env_file = base / "env.json"
    env_file.write_text(json.dumps({"MY_SECRET": "s3", "EPOCHS": 2}))
    job = base / "jobs" / "job"
    r = start(
        base,
        "r1",
        'echo "$MY_SECRET $EPOCHS $(cat made-by-setup) $REMOTEFIT_RUN_DIR"',
        "--env-file",
        str(env_file),
        "--setup",
        "echo ok > made-by-setup",
    )
    assert r.returncode == 0, r.stderr
    f = rf(base, "follow", "--run-id", "r1")
    assert f.returncode == 0
    assert f.stdout.decode().splitlines()[-1] == "s3 2 ok %s" % (base / "runs" / "r1")
    assert (job / "made-by-setup").exists()
    # The env file's values are not copied to disk.
    assert b"s3" not in (base / "runs" / "r1" / "run.json").read_bytes()

    r = start(base, "r2", "echo should-not-run", "--setup", "exit 7")
    assert r.returncode == 0
    f = rf(base, "follow", "--run-id", "r2")
    assert f.returncode == 7
    assert b"should-not-run" not in f.stdout


def test_requirements_venv_created_once_and_sees_parent_site(base):
    job = base / "jobs" / "job"
    (job / "requirements.txt").write_text("# nothing to install: no network needed\n")
    # jinja2 lives in the creating interpreter's site-packages (the project venv).
    cmd = 'python -c "import sys, jinja2; print(sys.prefix); print(jinja2.__file__)"'

    assert start(base, "r1", cmd, "--requirements", "requirements.txt").returncode == 0
    f1 = rf(base, "follow", "--run-id", "r1", timeout=120)
    assert f1.returncode == 0, f1.stdout
    envs = [p for p in (base / "envs").iterdir() if p.is_dir()]
    assert len(envs) == 1
    venv = envs[0]
    assert len(venv.name) == 16
    assert (venv / runner.READY_MARKER).exists()
    out1 = f1.stdout.decode()
    assert "creating venv" in out1 and "pip install -r" in out1
    prefix, jinja_file = out1.strip().splitlines()[-2:]
    assert Path(prefix) == venv
    parent_sites = [d for d in site.getsitepackages() if d]
    assert any(jinja_file.startswith(d) for d in parent_sites), (jinja_file, parent_sites)
    pth = list(venv.glob("lib/python*/site-packages/" + runner.PTH_NAME))
    assert len(pth) == 1 and parent_sites[0] in pth[0].read_text()

    marker_mtime = (venv / runner.READY_MARKER).stat().st_mtime_ns
    assert start(base, "r2", cmd, "--requirements", "requirements.txt").returncode == 0
    f2 = rf(base, "follow", "--run-id", "r2", timeout=60)
    assert f2.returncode == 0, f2.stdout
    out2 = f2.stdout.decode()
    assert "reusing venv" in out2
    assert "creating venv" not in out2 and "pip install" not in out2
    assert (venv / runner.READY_MARKER).stat().st_mtime_ns == marker_mtime
    assert Path(out2.strip().splitlines()[-2]) == venv


def test_failed_install_fails_run_and_is_not_marked(base, tmp_path):
    job = base / "jobs" / "job"
    # A local path that does not exist: pip fails without touching the network.
    (job / "requirements.txt").write_text(str(tmp_path / "no-such-package-dir") + "\n")
    assert start(base, "r1", "echo should-not-run", "--requirements", "requirements.txt").returncode == 0
    f = rf(base, "follow", "--run-id", "r1", timeout=120)
    assert f.returncode != 0
    assert b"should-not-run" not in f.stdout
    assert b"pip install failed" in f.stdout
    (venv,) = [p for p in (base / "envs").iterdir() if p.is_dir()]
    assert not (venv / runner.READY_MARKER).exists()


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch not importable")
@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine may have CUDA")
def test_check_cuda_fails_loudly_without_cuda(base):
    env = dict(os.environ)
    # Ignored now: the job gets a stock PATH; its `python` shim runs this interpreter (which has torch).
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    r = start(base, "r1", "echo should-not-run", "--check-cuda", env=env)
    assert r.returncode == 4
    line = one_line_error(r.stderr)
    # "torch 2.x.y+cpu": the distribution version, without importing torch here.
    assert f"torch {importlib.metadata.version('torch')}" in line
    assert "built with CUDA" in line
    assert "nvidia-smi not found" in line
    assert not (base / "runs" / "r1").exists()
    assert not (base / "active.json").exists()


def test_helpers():
    assert runner.exit_code_of(-15) == 143
    assert runner.exit_code_of(3) == 3
    assert not runner.pid_alive(None)
    assert runner.pid_alive(os.getpid())
    with pytest.raises(runner.RunnerError):
        runner.check_run_id("a/b")


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch not importable")
@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine may have CUDA")
def test_check_cuda_after_install_fails_the_run(base):
    # The venv does not exist yet, so the check runs in the job after the
    # install (torch comes from the creator's site-packages via the .pth).
    (base / "jobs" / "job" / "requirements.txt").write_text("\n")
    r = start(base, "r1", "echo should-not-run", "--requirements", "requirements.txt", "--check-cuda")
    assert r.returncode == 0, r.stderr
    f = rf(base, "follow", "--run-id", "r1", timeout=120)
    assert f.returncode == 4
    assert b"should-not-run" not in f.stdout
    (line,) = [ln for ln in f.stdout.decode().splitlines() if ln.startswith("runner: error:")]
    assert "CUDA is not available" in line and "nvidia-smi not found" in line


def test_status_reports_lost_run(base):
    dead = subprocess.Popen(["true"])
    dead.wait()
    run_dir = base / "runs" / "gone"
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text(
        json.dumps({"run_id": "gone", "pid": dead.pid, "pgid": dead.pid, "started_at": "2030-01-01T00:00:00Z"})
    )
    st = json.loads(rf(base, "status", "--run-id", "gone").stdout)
    assert st["state"] == "lost" and st["exit_code"] is None
    c = rf(base, "cancel", "--run-id", "gone")
    assert c.returncode == 0 and b"nothing to cancel" in c.stderr


def test_start_with_follow_streams_in_the_same_process(base):
    """`start --follow` (what `inv fit` runs): stdout is the log, stderr the start message first and
    the run's final status last, and the exit code is the job's."""
    r = start(base, "r1", "echo hi; exit 3", "--json", "--follow")
    assert r.returncode == 3, r.stderr
    assert r.stdout == b"hi\n"
    lines = [json.loads(ln) for ln in r.stderr.decode().splitlines() if ln.startswith("{")]
    assert [m["type"] for m in lines] == ["started", "status"], r.stderr
    assert lines[0]["run_id"] == "r1" and lines[1]["state"] == "finished" and lines[1]["exit_code"] == 3


def _request(**over):
    request = {
        "run_id": "r-1",
        "job": "job",
        "cmd": 'echo "$TOKEN" > outputs/token; echo done',
        "env": {"TOKEN": "s3cr3t"},
        "outputs": "outputs",
        "requirements": None,
        "setup": None,
        "check_cuda": False,
        "follow": False,
    }
    return {**request, **over}


def test_start_from_a_request_on_stdin(base):
    """The laptop's form: one JSON request on stdin; the runner derives the job and outputs folders from
    its layout, gives the job the env, and no file ever holds it."""
    res = subprocess.run(
        [sys.executable, str(RUNNER), "start", "--base", str(base), "--request", "-"],
        input=json.dumps(_request()).encode(),
        capture_output=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    started = json.loads(res.stdout)  # the request implies --json
    assert started["run_id"] == "r-1"
    assert wait_exit_code(base, "r-1") == 0
    assert (base / "outputs" / "r-1" / "token").read_text() == "s3cr3t\n"
    assert (base / "jobs" / "job" / "outputs").resolve() == (base / "outputs" / "r-1").resolve()
    leftovers = [p for p in base.rglob("*") if p.is_file() and "s3cr3t" in p.read_text(errors="ignore")]
    assert leftovers == [base / "outputs" / "r-1" / "token"]  # only what the job itself wrote


@pytest.mark.parametrize(
    ("stdin", "needle"),
    [
        (b"not json", "the start request is not valid JSON"),
        (b"[]", "the start request is not a JSON object"),
        (json.dumps({k: v for k, v in _request().items() if k != "cmd"}).encode(), "missing keys cmd"),
        (json.dumps(_request(extra=1)).encode(), "unknown keys extra"),
        (json.dumps(_request(env={"A": 1})).encode(), "env has the wrong type"),
        (json.dumps(_request(follow="yes")).encode(), "follow has the wrong type"),
        (json.dumps(_request(run_id="../x")).encode(), "run id"),
    ],
)
def test_a_bad_start_request_is_one_line(base, stdin, needle):
    res = subprocess.run(
        [sys.executable, str(RUNNER), "start", "--base", str(base), "--request", "-"],
        input=stdin,
        capture_output=True,
        timeout=60,
    )
    assert res.returncode == 2
    assert needle in one_line_error(res.stderr)
    assert not (base / "runs").exists() or not any((base / "runs").iterdir())


def test_start_without_a_request_needs_its_flags(base):
    res = rf(base, "start", "--cmd", "true")
    assert res.returncode == 2
    assert "start needs --run-id, --job-dir and --cmd, or --request -" in one_line_error(res.stderr)

"""Tests for remotefit/node/watchdog.py against a fake IMDSv2, fake clock, fake /proc and fake shutdown."""

from __future__ import annotations

import configparser
import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NODE = ROOT / "remotefit" / "node"
WATCHDOG = NODE / "watchdog.py"
TOKEN = "fake-imds-token"
SPOT_PATH = "/latest/meta-data/spot/instance-action"
T0 = 1_700_000_000.0


def _load():
    spec = importlib.util.spec_from_file_location("remotefit_node_watchdog", WATCHDOG)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


watchdog = _load()


class FakeIMDS(BaseHTTPRequestHandler):
    """IMDSv2: PUT a token first; GETs without it are 401."""

    def do_PUT(self):
        self.server.calls.append(("PUT", self.path))
        if self.path != "/latest/api/token" or not self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
            self._reply(400, b"")
            return
        self._reply(200, TOKEN.encode())

    def do_GET(self):
        self.server.calls.append(("GET", self.path))
        if self.headers.get("X-aws-ec2-metadata-token") != TOKEN:
            self._reply(401, b"")
        elif self.path == SPOT_PATH and self.server.notice is not None:
            self._reply(200, json.dumps(self.server.notice).encode())
        else:
            self._reply(404, b"Not Found")

    def _reply(self, code, body):
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def imds():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeIMDS)
    server.notice = None
    server.calls = []
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield server
    server.shutdown()
    server.server_close()


DECISION = re.compile(r"^watchdog: \S+ action=(?P<action>\S+) decision=(?P<decision>\S+) reason=(?P<reason>.*)$")


def decisions(out: str) -> list[dict[str, str]]:
    """Every decision line a run printed, parsed: action, decision, reason (the rest of the line)."""
    found = [m.groupdict() for m in map(DECISION.match, out.splitlines()) if m]
    return found


def decided(out: str) -> dict[str, str]:
    """The one decision a single tick printed."""
    (one,) = decisions(out)
    return one


class Node:
    """A fake node: base dir, fake /proc, state file, shutdown marker."""

    def __init__(self, tmp_path, imds_url):
        self.base = tmp_path / "base"
        self.base.mkdir()
        self.proc = tmp_path / "proc"
        self.proc.mkdir()
        self.state = tmp_path / "state" / "watchdog-state.json"
        self.marker = tmp_path / "shutdown-called"
        self.config = tmp_path / "watchdog.json"
        self.imds_url = imds_url
        self.write_config()

    def write_config(self, **overrides):
        cfg = {
            "deadline_epoch": T0 + 3 * 3600,
            "idle_minutes": 30,
            "base": str(self.base),
            "imds": self.imds_url,
            "state": str(self.state),
            "shutdown_cmd": [
                sys.executable,
                "-c",
                "import pathlib, sys; pathlib.Path(sys.argv[1]).write_text('x')",
                str(self.marker),
            ],
            "journal": False,  # this machine's journal is not a fake node's
        }
        cfg.update(overrides)
        self.config.write_text(json.dumps(cfg))

    def tick(self, now, *extra, capsys) -> dict[str, str]:
        """One tick; returns what it decided (parsed from its one decision line), also kept in the state."""
        rc = watchdog.main(
            ["--config", str(self.config), "--proc", str(self.proc), "--now", str(now), "--imds-timeout", "1", *extra]
        )
        captured = capsys.readouterr()
        assert rc == 0, captured.err
        assert "tick crashed" not in captured.err, captured.err
        got = decided(captured.out)
        got["out"] = captured.out
        if "--dry-run" not in extra:
            state = json.loads(self.state.read_text())
            assert (state["last_action"], state["last_decision"]) == (got["action"], got["decision"])
        return got

    def add_proc(self, pid, cmdline: bytes, ppid: int = 1, state: str = "S"):
        d = self.proc / str(pid)
        d.mkdir()
        (d / "cmdline").write_bytes(cmdline)
        (d / "stat").write_text(f"{pid} (x) {state} {ppid} {pid} {pid} 0")

    def set_active(self, pid, run_id="r1"):
        (self.base / "active.json").write_text(
            json.dumps({"run_id": run_id, "pid": pid, "pgid": pid, "started_at": "x"})
        )

    @property
    def shut_down(self):
        return self.marker.exists()


@pytest.fixture
def node(tmp_path, imds):
    return Node(tmp_path, imds.url)


def spawn_session(*cmd):
    """A child in its own session/process group, like a runner job."""
    return subprocess.Popen(
        list(cmd) or ["sleep", "30"], start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )


def keeps(d: dict[str, str], decision: str) -> None:
    assert (d["action"], d["decision"]) == ("keep", decision), d["out"]


def shuts_down(d: dict[str, str], decision: str) -> None:
    assert (d["action"], d["decision"]) == ("shutdown", decision), d["out"]
    assert "running " in d["out"] and "shutdown command ran" in d["out"], d["out"]


def test_deadline_shuts_down(node, capsys):
    d = node.tick(T0 + 3600, capsys=capsys)
    keeps(d, "waiting")
    assert "deadline in 2.0h" in d["reason"]
    assert not node.shut_down
    d = node.tick(T0 + 3 * 3600, capsys=capsys)
    shuts_down(d, "deadline")
    assert d["reason"].startswith("deadline 2023-11-15T01:13:20Z passed 0.0min ago"), d["reason"]
    assert node.shut_down


@pytest.mark.parametrize("under_systemd", [False, True])
def test_a_shutdown_also_goes_to_the_journal_unless_stdout_is_the_journal(
    node, capsys, monkeypatch, tmp_path, under_systemd
):
    """A tick run by hand over ssh may lose its last lines with the session the shutdown ends: its shutdown
    lines go to the journal too (once: a service's stdout is the journal already)."""
    sent = []
    fake = type(sys)("syslog")
    fake.LOG_DAEMON, fake.LOG_NOTICE = 24, 5
    fake.openlog = lambda *a: None
    fake.syslog = lambda prio, msg: sent.append(msg)
    monkeypatch.setitem(sys.modules, "syslog", fake)
    (tmp_path / "log").touch()
    monkeypatch.setattr(watchdog, "JOURNAL_SOCKET", str(tmp_path / "log"))
    if under_systemd:
        monkeypatch.setenv("JOURNAL_STREAM", "8:1234")
    else:
        monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    node.write_config(journal=True)
    keeps(node.tick(T0, capsys=capsys), "waiting")
    assert sent == []  # a keep is routine: stdout only
    d = node.tick(T0 + 3 * 3600, capsys=capsys)
    shuts_down(d, "deadline")
    if under_systemd:
        assert sent == []
    else:
        assert len(sent) == 2 and "action=shutdown decision=deadline" in sent[0], sent
        assert sent[1].startswith("watchdog: running ") and "shutdown command ran" in sent[1], sent
    node.write_config(journal=False)  # loopback sandbox nodes: the journal is this machine's
    sent.clear()
    node.state.unlink()
    shuts_down(node.tick(T0 + 3 * 3600, capsys=capsys), "deadline")
    assert sent == []


def test_deadline_wins_over_busy(node, capsys):
    node.add_proc(4242, b"sshd: ubuntu@pts/0\0\0")
    d = node.tick(T0 + 4 * 3600, capsys=capsys)
    shuts_down(d, "deadline")
    assert "passed 60.0min ago" in d["reason"]
    assert node.shut_down


def test_idle_shuts_down_after_idle_minutes(node, capsys):
    keeps(node.tick(T0, capsys=capsys), "waiting")
    d = node.tick(T0 + 29 * 60, capsys=capsys)
    keeps(d, "waiting")
    assert d["reason"].startswith("idle for 29.0min of 30min")
    assert not node.shut_down
    d = node.tick(T0 + 30 * 60, capsys=capsys)
    shuts_down(d, "idle")
    assert d["reason"].startswith("idle for 30.0min >= 30min (no active run, no session)"), d["reason"]
    assert node.shut_down
    state = json.loads(node.state.read_text())
    assert state["first_tick"] == T0 and state["shutdown_first_requested_at"] == T0 + 30 * 60


def test_active_run_keeps_node_then_idle_counts_from_last_busy(node, capsys):
    job = spawn_session("sleep", "30")
    try:
        node.set_active(job.pid)
        keeps(node.tick(T0, capsys=capsys), "busy")
        d = node.tick(T0 + 45 * 60, capsys=capsys)
        keeps(d, "busy")
        assert d["reason"].startswith(f"busy: run r1 (pid {job.pid});"), d["reason"]
        assert not node.shut_down
    finally:
        job.kill()
        job.wait()
    # The run is over (stale active.json): idle counts from the last busy tick.
    d = node.tick(T0 + 74 * 60, capsys=capsys)
    keeps(d, "waiting")
    assert d["reason"].startswith("idle for 29.0min of 30min"), d["reason"]
    assert not node.shut_down
    shuts_down(node.tick(T0 + 75 * 60, capsys=capsys), "idle")
    assert node.shut_down


def test_ssh_session_keeps_node_listener_does_not(node, capsys):
    node.add_proc(1, b"/sbin/init\0")
    node.add_proc(100, b"sshd: /usr/sbin/sshd -D [listener] 0 of 10-100 startups\0")
    node.add_proc(200, b"sshd: ubuntu [priv]\0")
    assert watchdog.ssh_sessions(str(node.proc)) == []
    node.add_proc(201, b"sshd: ubuntu@pts/0\0\0\0")
    node.add_proc(202, b"sshd-session: ubuntu@notty\0")
    node.add_proc(203, b"rsync\0--server\0", ppid=202)  # a command running over that connection
    assert watchdog.ssh_sessions(str(node.proc)) == ["sshd-session: ubuntu@notty", "sshd: ubuntu@pts/0"]

    keeps(node.tick(T0, capsys=capsys), "busy")
    d = node.tick(T0 + 40 * 60, capsys=capsys)
    keeps(d, "busy")
    assert d["reason"].startswith("busy: 2 session(s): "), d["reason"]
    assert not node.shut_down
    for pid in (201, 202, 203):
        for f in (node.proc / str(pid)).iterdir():
            f.unlink()
        (node.proc / str(pid)).rmdir()
    keeps(node.tick(T0 + 69 * 60, capsys=capsys), "waiting")  # the listener alone is not a session
    assert not node.shut_down
    shuts_down(node.tick(T0 + 70 * 60, capsys=capsys), "idle")
    assert node.shut_down


def test_spot_notice_sigterms_the_run_group(node, imds, capsys):
    job = spawn_session("sleep", "30")
    node.set_active(job.pid)
    imds.notice = {"action": "terminate", "time": "2030-01-01T00:02:00Z"}
    d = node.tick(T0, capsys=capsys)
    assert job.wait(timeout=5) == -signal.SIGTERM
    assert f"sent SIGTERM to run r1, process group {job.pid}" in d["reason"], d["out"]
    assert "terminate at 2030-01-01T00:02:00Z" in d["reason"]
    keeps(d, "busy")  # the notice is forwarded; shutting down is AWS's part, not the watchdog's
    assert json.loads(node.state.read_text())["spot_forwarded"] == f"r1:{job.pid}"
    assert ("PUT", "/latest/api/token") in imds.calls and ("GET", SPOT_PATH) in imds.calls
    assert not node.shut_down


def test_spot_notice_forwarded_exactly_once(node, imds, tmp_path, capsys):
    # A job that survives SIGTERM (checkpointing) and counts the signals it got.
    count = tmp_path / "terms"
    code = (
        "import signal, sys, time\n"
        "def on_term(*_):\n"
        "    with open(sys.argv[1], 'a') as f: f.write('TERM\\n')\n"
        "signal.signal(signal.SIGTERM, on_term)\n"
        "print('ready', flush=True)\n"
        "time.sleep(30)\n"
    )
    job = spawn_session(sys.executable, "-c", code, str(count))
    try:
        assert job.stdout.readline() == b"ready\n"
        node.set_active(job.pid)
        imds.notice = {"action": "stop", "time": "2030-01-01T00:02:00Z"}
        first = node.tick(T0, capsys=capsys)
        assert "sent SIGTERM to run r1" in first["reason"], first["out"]
        second = node.tick(T0 + 60, capsys=capsys)
        assert "SIGTERM already sent to run r1" in second["reason"], second["out"]
        keeps(second, "busy")
        deadline = time.time() + 5
        while not count.exists() and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(0.2)
        assert count.read_text() == "TERM\n"
        assert job.poll() is None
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()


def test_no_spot_notice_is_404(node, imds, capsys):
    d = node.tick(T0, capsys=capsys)
    assert d["reason"].endswith(" spot=none"), d["reason"]
    keeps(d, "waiting")
    # The fake really enforces IMDSv2: a GET without the token is refused.
    status, _ = watchdog.spot_notice(imds.url, 1)
    assert status == "none"
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(imds.url + SPOT_PATH, timeout=2)
    assert err.value.code == 401


def test_imds_unreachable_tick_still_completes(node, capsys):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    node.write_config(imds=f"http://127.0.0.1:{port}", deadline_epoch=T0)
    d = node.tick(T0, capsys=capsys)
    assert "spot=error: IMDS unreachable" in d["reason"]
    shuts_down(d, "deadline")  # the deadline check still ran
    assert node.shut_down


def test_bad_config_falls_back_to_defaults_and_flags(node, capsys):
    node.config.write_text("{not json")
    rc = watchdog.main(
        [
            "--config",
            str(node.config),
            "--proc",
            str(node.proc),
            "--now",
            str(T0),
            "--state",
            str(node.state),
            "--base",
            str(node.base),
            "--imds",
            node.imds_url,
            "--deadline-epoch",
            str(T0 - 1),
            "--shutdown-cmd",
            json.dumps(["touch", str(node.marker)]),
        ]
    )
    assert rc == 0
    captured = capsys.readouterr()
    assert "cannot read config" in captured.err
    assert decided(captured.out)["decision"] == "deadline"
    assert node.shut_down


def test_cli_dry_run_with_fake_now_env(node):
    env = dict(os.environ, REMOTEFIT_FAKE_NOW=str(T0 + 5 * 3600))
    r = subprocess.run(
        [sys.executable, str(WATCHDOG), "--config", str(node.config), "--proc", str(node.proc), "--dry-run"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1
    d = decided(lines[0])
    assert (d["action"], d["decision"]) == ("shutdown", "deadline") and "passed 2.0h ago" in d["reason"]
    assert d["reason"].endswith(
        "(dry run: not running " + shlex.join(json.loads(node.config.read_text())["shutdown_cmd"]) + ")"
    )
    assert not node.shut_down
    assert not node.state.exists()


def test_loop_mode_ticks_repeatedly(node, capsys):
    rc = watchdog.main(
        ["--config", str(node.config), "--proc", str(node.proc), "--now", str(T0), "--loop", "0.01", "--max-ticks", "3"]
    )
    assert rc == 0
    assert [(d["action"], d["decision"]) for d in decisions(capsys.readouterr().out)] == [("keep", "waiting")] * 3


# -- a crashed tick is said, with its own exit code, and the next tick still runs ---------------
REAL_TICK = watchdog.tick


def crash_on(calls: list[int], crash_at: set[int]):
    """A stand-in for tick() that crashes on the given calls (1-based) and decides normally otherwise."""

    def tick(opts, now):
        calls.append(now)
        if len(calls) in crash_at:
            raise KeyError("boom")
        return REAL_TICK(opts, now)

    return tick


def test_a_crashed_tick_is_logged_and_exits_3(node, capsys, monkeypatch):
    calls: list[float] = []
    monkeypatch.setattr(watchdog, "tick", crash_on(calls, {1}))
    rc = watchdog.main(["--config", str(node.config), "--proc", str(node.proc), "--now", str(T0 + 4 * 3600)])
    captured = capsys.readouterr()
    assert rc == watchdog.TICK_CRASHED == 3
    assert captured.err.strip() == "watchdog: error: tick crashed, nothing decided: KeyError: 'boom'"
    assert decisions(captured.out) == [] and not node.shut_down  # nothing was decided, nothing acted
    # The unit takes exit 3 as success: the timer's next tick runs, and that one decides.
    service = (NODE / "remotefit-watchdog.service").read_text()
    assert re.search(r"^SuccessExitStatus=3$", service, re.M)
    shuts_down(node.tick(T0 + 4 * 3600, capsys=capsys), "deadline")


def test_loop_mode_survives_a_crashed_tick_and_reports_the_last(node, capsys, monkeypatch):
    argv = ["--config", str(node.config), "--proc", str(node.proc), "--now", str(T0), "--loop", "0.01"]
    calls: list[float] = []
    monkeypatch.setattr(watchdog, "tick", crash_on(calls, {2}))
    assert watchdog.main([*argv, "--max-ticks", "3"]) == 0  # the crash was not the last tick
    out, err = capsys.readouterr()
    assert len(calls) == 3 and err.count("tick crashed") == 1
    assert [d["decision"] for d in decisions(out)] == ["waiting", "waiting"]
    calls.clear()
    assert watchdog.main([*argv, "--max-ticks", "2"]) == 3
    assert capsys.readouterr().err.count("tick crashed") == 1


def test_systemd_units():
    service = configparser.ConfigParser(strict=False, interpolation=None)
    service.optionxform = str
    service.read(NODE / "remotefit-watchdog.service")
    assert service["Service"]["Type"] == "oneshot"
    assert service["Service"]["User"] == "root"
    assert service["Service"]["ExecStart"] == (
        "/usr/bin/python3 /opt/remotefit/watchdog.py --config /etc/remotefit/watchdog.json"
    )
    timer = configparser.ConfigParser(strict=False, interpolation=None)
    timer.optionxform = str
    timer.read(NODE / "remotefit-watchdog.timer")
    assert timer["Timer"]["OnBootSec"] == "1min"
    assert timer["Timer"]["OnUnitActiveSec"] == "1min"
    assert timer["Timer"]["AccuracySec"] == "10s"
    assert timer["Timer"]["Unit"] == "remotefit-watchdog.service"
    assert timer["Install"]["WantedBy"] == "timers.target"


def test_node_scripts_run_with_only_their_folder(tmp_path):
    """runner.py and watchdog.py are uploaded as files with contract.py beside them: they run with the
    standard library and that folder only (no remotefit installed, no site, isolated mode)."""
    import shutil

    for path in (NODE / "runner.py", NODE / "watchdog.py"):
        assert os.access(path, os.X_OK), path
        assert path.read_text().startswith("#!/usr/bin/env python3\n"), path
    for name in ("runner.py", "watchdog.py", "contract.py"):
        shutil.copy(NODE / name, tmp_path / name)
    env = {"PATH": os.environ["PATH"]}
    idle = subprocess.run(
        [sys.executable, "-I", "-S", str(tmp_path / "runner.py"), "idle", "--base", str(tmp_path / "base")],
        capture_output=True,
        text=True,
        env=env,
        cwd="/",
    )
    assert idle.returncode == 0, idle.stderr
    cfg = tmp_path / "cfg.json"
    cfg.write_text(
        json.dumps({"base": str(tmp_path / "base"), "state": str(tmp_path / "st.json"), "imds": "http://127.0.0.1:9"})
    )
    dry = subprocess.run(
        [
            sys.executable,
            "-I",
            "-S",
            str(tmp_path / "watchdog.py"),
            "--config",
            str(cfg),
            "--dry-run",
            "--imds-timeout",
            "0.2",
            "--idle-minutes",
            "0",  # this host's uptime is not a node's idle time
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd="/",
    )
    assert dry.returncode == 0 and "action=keep" in dry.stdout, dry.stdout + dry.stderr
    # contract.py is ASCII: the laptop sends it with an exact byte count.
    (NODE / "contract.py").read_text().encode("ascii")


def test_a_recycled_pid_in_active_json_is_not_a_live_run(tmp_path):
    """The watchdog checks the run's start time like the runner does: a pid reused by another process
    (another start time) must not keep the node busy until its deadline."""
    contract = watchdog.contract
    job = spawn_session("sleep", "30")
    try:
        started = contract.start_ticks(job.pid)
        assert started is not None
        record = {"run_id": "r1", "pid": job.pid, "pgid": job.pid, "pid_start": started}
        (tmp_path / "active.json").write_text(json.dumps(record))
        assert watchdog.active_run(str(tmp_path), "/proc") == record
        (tmp_path / "active.json").write_text(json.dumps({**record, "pid_start": started + 1}))
        assert watchdog.active_run(str(tmp_path), "/proc") is None
    finally:
        job.kill()
        job.wait()


def test_sessions_can_be_limited_to_one_sshd_listener(tmp_path):
    """A sandbox node shares the host: only sessions under its own sshd keep it busy."""
    wd = watchdog
    proc = tmp_path / "proc"

    def fake(pid: int, ppid: int, title: str) -> None:
        d = proc / str(pid)
        d.mkdir(parents=True)
        (d / "cmdline").write_bytes(title.replace(" ", "\0").encode() + b"\0")
        (d / "stat").write_text(f"{pid} (sshd) S {ppid} {pid} {pid} 0")

    fake(100, 1, "sshd: /usr/sbin/sshd -D")  # this node's listener
    fake(101, 100, "sshd: root@notty")  # a session of this node, running a command
    fake(102, 101, "bash -c true")
    fake(200, 1, "sshd: /usr/sbin/sshd -D")  # another node's listener
    fake(201, 200, "sshd: root@pts/1")  # a session elsewhere
    assert wd.ssh_sessions(str(proc)) == ["sshd: root@notty", "sshd: root@pts/1"]
    assert wd.ssh_sessions(str(proc), "100") == ["sshd: root@notty"]
    assert wd.ssh_sessions(str(proc), "300") == []


def test_idle_control_master_is_not_a_session(node, capsys):
    """Our ControlPersist master stays connected 10 min after the last command as `sshd: user@notty`
    with no child: it must not keep an idle node alive. A command over it (a child) does."""
    node.add_proc(300, b"sshd-session: ubuntu [priv]\0")
    node.add_proc(301, b"sshd-session: ubuntu@notty\0", ppid=300)
    assert watchdog.ssh_sessions(str(node.proc)) == []
    node.add_proc(302, b"bash\0-c\0sleep 9\0", ppid=301, state="Z")  # a zombie child is not a command
    assert watchdog.ssh_sessions(str(node.proc)) == []
    keeps(node.tick(T0, capsys=capsys), "waiting")
    d = node.tick(T0 + 30 * 60, capsys=capsys)
    shuts_down(d, "idle")
    assert node.shut_down and "no session" in d["reason"]


def test_control_master_running_a_command_is_a_session(node):
    node.add_proc(301, b"sshd: ubuntu@notty\0")
    node.add_proc(302, b"bash\0-c\0python3 runner.py follow\0", ppid=301)
    assert watchdog.ssh_sessions(str(node.proc)) == ["sshd: ubuntu@notty"]


def test_ssm_session_counts_as_a_session(node, capsys):
    """An open Session Manager session (shell or port forwarding) is a person on the node."""
    node.add_proc(400, b"/usr/bin/amazon-ssm-agent\0")
    node.add_proc(401, b"/usr/bin/ssm-agent-worker\0", ppid=400)
    assert watchdog.ssh_sessions(str(node.proc)) == []
    node.add_proc(402, b"/snap/amazon-ssm-agent/11797/ssm-session-worker\0alice-0123456789abcdef0\0i-0abc\0", ppid=401)
    assert watchdog.ssh_sessions(str(node.proc)) == ["ssm alice-0123456789abcdef0"]
    keeps(node.tick(T0, capsys=capsys), "busy")
    d = node.tick(T0 + 45 * 60, capsys=capsys)
    keeps(d, "busy")
    assert not node.shut_down and "ssm alice-0123456789abcdef0" in d["reason"]
    # A sandbox node (limited to its own sshd) never counts the host's SSM sessions.
    assert watchdog.ssh_sessions(str(node.proc), "999") == []


def test_tick_leaves_spot_to_the_service(node, imds, capsys):
    node.write_config(spot_service=True)
    imds.notice = {"action": "terminate", "time": "2030-01-01T00:02:00Z"}
    d = node.tick(T0, capsys=capsys)
    keeps(d, "waiting")
    assert "spot=polled-by-service" in d["out"]
    assert imds.calls == []  # the minute tick no longer asks IMDS


def test_spot_poll_forwards_within_one_poll_and_once(node, imds, tmp_path, capsys):
    """--spot-poll (remotefit-spot.service) polls every few seconds; SIGTERM goes out once, and the
    loop keeps its own state file so the minute tick's idle clock is never overwritten."""
    count = tmp_path / "terms"
    code = (
        "import signal, sys, time\n"
        "def on_term(*_):\n"
        "    with open(sys.argv[1], 'a') as f: f.write('TERM\\n')\n"
        "signal.signal(signal.SIGTERM, on_term)\n"
        "print('ready', flush=True)\n"
        "time.sleep(30)\n"
    )
    job = spawn_session(sys.executable, "-c", code, str(count))
    try:
        assert job.stdout.readline() == b"ready\n"
        node.set_active(job.pid)
        node.write_config(spot_service=True)
        node.tick(T0, capsys=capsys)  # the minute tick's own state
        before = node.state.read_text()
        imds.notice = {"action": "terminate", "time": "2030-01-01T00:02:00Z"}
        t0 = time.monotonic()
        rc = watchdog.main(
            ["--config", str(node.config), "--proc", str(node.proc), "--spot-poll", "0.05", "--max-ticks", "4"]
        )
        assert rc == 0
        assert time.monotonic() - t0 < 5
        out = capsys.readouterr().out
        assert out.count("sent SIGTERM to run r1") == 1, out
        assert "already sent" in out  # later polls saw the same notice and did not signal again
        assert len(out.strip().splitlines()) == 2  # a line per change, not per poll
        deadline = time.time() + 5
        while not count.exists() and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(0.2)
        assert count.read_text() == "TERM\n"
        assert sum(1 for c in imds.calls if c == ("GET", SPOT_PATH)) == 4
        assert node.state.read_text() == before
        spot_state = json.loads(Path(watchdog.spot_state_path(str(node.state))).read_text())
        assert spot_state["spot_forwarded"] == f"r1:{job.pid}"
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()


def test_spot_poll_survives_an_unreachable_imds(node, capsys):
    node.write_config(imds="http://127.0.0.1:9")
    rc = watchdog.main(
        ["--config", str(node.config), "--proc", str(node.proc), "--spot-poll", "0.01", "--max-ticks", "3"]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert out.count("spot=error: IMDS unreachable") == 1  # logged once, not every poll
    assert not node.shut_down


def test_spot_service_unit():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read(NODE / "remotefit-spot.service")
    assert unit["Service"]["Type"] == "simple"
    assert unit["Service"]["Restart"] == "always"
    assert unit["Service"]["ExecStart"] == (
        "/usr/bin/python3 /opt/remotefit/watchdog.py --config /etc/remotefit/watchdog.json --spot-poll 5"
    )
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    assert watchdog.SPOT_POLL_DEFAULT == 5.0


# -- the deadline with a run still active: SIGTERM, its final upload, then the shutdown ---------------
def reap(proc: subprocess.Popen) -> None:
    """Reap in the background: with a fake /proc only kill(0) tells liveness, and a zombie answers it."""
    threading.Thread(target=proc.wait, daemon=True).start()


def test_deadline_with_an_active_run_waits_for_its_final_upload(node, tmp_path, capsys):
    job = spawn_session("sleep", "30")
    reap(job)
    active = node.base / "active.json"
    # The supervisor outlives the job by the final upload, then clears active.json (as runner.py does).
    sup = subprocess.Popen(
        [sys.executable, "-c", f"import os, time; time.sleep(1.5); os.unlink({str(active)!r})"],
        start_new_session=True,
    )
    reap(sup)
    active.write_text(
        json.dumps({"run_id": "r1", "pid": job.pid, "pgid": job.pid, "supervisor_pid": sup.pid, "supervisor_start": 1})
    )
    started = time.monotonic()
    d = node.tick(T0 + 3 * 3600, capsys=capsys)
    shuts_down(d, "deadline")
    assert time.monotonic() - started >= 1.4  # it waited for the upload
    assert f"run r1 is active: sent SIGTERM to its process group {job.pid}; waiting up to 210s" in d["out"], d["out"]
    assert re.search(r"run r1 ended and its final upload is done after \d+\.\ds", d["out"]), d["out"]
    assert job.wait(timeout=5) == -signal.SIGTERM
    assert node.shut_down


def test_deadline_wait_for_the_final_upload_is_bounded(node, capsys):
    node.write_config(final_wait_s=1)
    job = spawn_session("sleep", "30")
    try:
        node.set_active(job.pid)
        # The job ignores nothing here, but a supervisor that never finishes is the same as a job that
        # never exits: keep it alive by not reaping it until after the tick.
        d = node.tick(T0 + 3 * 3600, capsys=capsys)
        shuts_down(d, "deadline")
        assert "still active after 1." in d["out"] and "shutting down anyway" in d["out"], d["out"]
        assert node.shut_down
    finally:
        job.kill()
        job.wait()


def test_boot_time_is_when_init_started_so_a_container_node_is_not_as_old_as_its_host(tmp_path):
    """In a container (the sandbox's booted nodes) /proc/uptime and boot_id are the host kernel's: the node's
    boot is when its PID 1 started, else a fresh node would look idle since the host booted."""
    proc = tmp_path / "proc"
    (proc / "1").mkdir(parents=True)
    (proc / "stat").write_text("cpu  1 2 3\nbtime 1700000000\nprocesses 9\n")
    (proc / "uptime").write_text("86400.00 1.00\n")  # the host has been up a day
    hz = os.sysconf("SC_CLK_TCK")
    fields = ["S", "0"] + ["0"] * 17 + [str(3600 * hz)]  # state, ppid, ..., starttime (field 22)
    (proc / "1" / "stat").write_text("1 (systemd) " + " ".join(fields) + "\n")
    assert watchdog.init_start(str(proc)) == 3600 * hz
    assert watchdog.boot_time(str(proc), now=1700090000.0) == 1700003600.0  # an hour after the host
    (proc / "1" / "stat").unlink()  # no init to read: the uptime, as before
    assert watchdog.boot_time(str(proc), now=1700090000.0) == 1700090000.0 - 86400.0

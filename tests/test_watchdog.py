"""Tests for scripts/node/watchdog.py against a fake IMDSv2, fake clock, fake /proc and fake shutdown."""

from __future__ import annotations

import configparser
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NODE = ROOT / "scripts" / "node"
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
        }
        cfg.update(overrides)
        self.config.write_text(json.dumps(cfg))

    def tick(self, now, *extra, capsys=None):
        rc = watchdog.main(
            ["--config", str(self.config), "--proc", str(self.proc), "--now", str(now), "--imds-timeout", "1", *extra]
        )
        assert rc == 0
        if capsys is not None:
            return capsys.readouterr().out

    def add_proc(self, pid, cmdline: bytes):
        d = self.proc / str(pid)
        d.mkdir()
        (d / "cmdline").write_bytes(cmdline)

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


def test_deadline_shuts_down(node, capsys):
    out = node.tick(T0 + 3600, capsys=capsys)
    assert not node.shut_down
    assert "action=keep" in out
    out = node.tick(T0 + 3 * 3600, capsys=capsys)
    assert node.shut_down
    assert "action=shutdown" in out and "deadline" in out


def test_deadline_wins_over_busy(node, capsys):
    node.add_proc(4242, b"sshd: ubuntu@pts/0\0\0")
    out = node.tick(T0 + 4 * 3600, capsys=capsys)
    assert node.shut_down
    assert "deadline" in out


def test_idle_shuts_down_after_idle_minutes(node, capsys):
    node.tick(T0)
    node.tick(T0 + 29 * 60)
    assert not node.shut_down
    out = node.tick(T0 + 30 * 60, capsys=capsys)
    assert node.shut_down
    assert "idle for 30.0min >= 30min" in out
    state = json.loads(node.state.read_text())
    assert state["first_tick"] == T0


def test_active_run_keeps_node_then_idle_counts_from_last_busy(node, capsys):
    job = spawn_session("sleep", "30")
    try:
        node.set_active(job.pid)
        node.tick(T0)
        out = node.tick(T0 + 45 * 60, capsys=capsys)
        assert not node.shut_down
        assert "busy: run r1" in out
    finally:
        job.kill()
        job.wait()
    # The run is over (stale active.json): idle counts from the last busy tick.
    node.tick(T0 + 74 * 60)
    assert not node.shut_down
    node.tick(T0 + 75 * 60)
    assert node.shut_down


def test_ssh_session_keeps_node_listener_does_not(node, capsys):
    node.add_proc(1, b"/sbin/init\0")
    node.add_proc(100, b"sshd: /usr/sbin/sshd -D [listener] 0 of 10-100 startups\0")
    node.add_proc(200, b"sshd: ubuntu [priv]\0")
    assert watchdog.ssh_sessions(str(node.proc)) == []
    node.add_proc(201, b"sshd: ubuntu@pts/0\0\0\0")
    node.add_proc(202, b"sshd-session: ubuntu@notty\0")
    assert watchdog.ssh_sessions(str(node.proc)) == ["sshd-session: ubuntu@notty", "sshd: ubuntu@pts/0"]

    node.tick(T0)
    out = node.tick(T0 + 40 * 60, capsys=capsys)
    assert not node.shut_down
    assert "2 ssh session(s)" in out
    for pid in (201, 202):
        for f in (node.proc / str(pid)).iterdir():
            f.unlink()
        (node.proc / str(pid)).rmdir()
    node.tick(T0 + 69 * 60)
    assert not node.shut_down
    node.tick(T0 + 70 * 60)
    assert node.shut_down


def test_spot_notice_sigterms_the_run_group(node, imds, capsys):
    job = spawn_session("sleep", "30")
    node.set_active(job.pid)
    imds.notice = {"action": "terminate", "time": "2030-01-01T00:02:00Z"}
    out = node.tick(T0, capsys=capsys)
    assert job.wait(timeout=5) == -signal.SIGTERM
    assert "sent SIGTERM to run r1" in out
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
        node.tick(T0)
        out = node.tick(T0 + 60, capsys=capsys)
        assert "already sent" in out
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
    out = node.tick(T0, capsys=capsys)
    assert "spot=none" in out
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
    out = node.tick(T0, capsys=capsys)
    assert "spot=error: IMDS unreachable" in out
    assert node.shut_down  # the deadline check still ran


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
    assert "action=shutdown" in lines[0] and "dry run" in lines[0]
    assert not node.shut_down
    assert not node.state.exists()


def test_loop_mode_ticks_repeatedly(node, capsys):
    rc = watchdog.main(
        ["--config", str(node.config), "--proc", str(node.proc), "--now", str(T0), "--loop", "0.01", "--max-ticks", "3"]
    )
    assert rc == 0
    assert capsys.readouterr().out.count("action=keep") == 3


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


def test_scripts_are_executable_stdlib_single_files():
    for path in (NODE / "runner.py", NODE / "watchdog.py"):
        assert os.access(path, os.X_OK), path
        assert path.read_text().startswith("#!/usr/bin/env python3\n"), path


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
    fake(101, 100, "sshd: root@notty")  # a session of this node
    fake(200, 1, "sshd: /usr/sbin/sshd -D")  # another node's listener
    fake(201, 200, "sshd: root@pts/1")  # a session elsewhere
    assert wd.ssh_sessions(str(proc)) == ["sshd: root@notty", "sshd: root@pts/1"]
    assert wd.ssh_sessions(str(proc), "100") == ["sshd: root@notty"]
    assert wd.ssh_sessions(str(proc), "300") == []

"""apply's readiness check against the boot script's markers: the real check command runs in bash
(standing in for the node's shell over ssh), and a failed boot is one line naming the node with the
boot log's tail, raised after everything `inv destroy` needs is recorded."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from remotefit import nodes
from remotefit.config import Settings
from remotefit.errors import UserError
from remotefit.nodes import ready
from remotefit.ssh import Node
from remotefit.workspace import Workspace

SETTINGS_KEYS = ("AWS_ACCOUNT", "AWS_REGION", "STAGE", "TF_STATE_BUCKET", "AWS_PROFILE", "TARGET")
HAS_CLOUD_INIT = shutil.which("cloud-init") is not None


def node(tmp_path: Path, index: int = 0) -> Node:
    return Node(
        index=index,
        alias=f"rf-test-{index}",
        instance_id=f"i-0000000000000000{index}",
        host="127.0.0.1",
        port=22,
        user="ubuntu",
        private_ip="10.0.0.1",
        workdir=str(tmp_path / "work dir" / "remotefit"),
        python="python3",
        instance_type="c7i.xlarge",
        market="on-demand",
        availability_zone="us-east-1a",
        launch_time="2030-01-01T00:00:00+00:00",
    )


class BootDir:
    """A node's /var/lib/remotefit and /var/log/remotefit-boot.log, in a temp folder."""

    def __init__(self, tmp_path: Path) -> None:
        self.dir = tmp_path / "boot"
        self.dir.mkdir()
        self.log = tmp_path / "remotefit-boot.log"
        self.env = {"REMOTEFIT_BOOT_DIR": str(self.dir), "REMOTEFIT_BOOT_LOG": str(self.log), "PATH": "/usr/bin:/bin"}

    def check(self, workdir: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", "-c", nodes.ready_command(workdir)], env=self.env, capture_output=True, text=True, timeout=30
        )


@pytest.fixture
def boot(tmp_path: Path) -> BootDir:
    return BootDir(tmp_path)


def test_ready_when_the_boot_script_left_boot_done(boot: BootDir, tmp_path: Path) -> None:
    (boot.dir / "boot-done").write_text("remotefit node 0 ready\n")
    workdir = tmp_path / "work dir" / "remotefit"
    res = boot.check(str(workdir))
    assert res.returncode == 0, res
    assert workdir.is_dir()


def test_failed_boot_reports_marker_and_log_tail(boot: BootDir) -> None:
    (boot.dir / "boot-failed").write_text("step 'installing python3-venv' failed (exit 100) at 2030-01-01T00:01:00Z\n")
    boot.log.write_text("".join(f"line {i}\n" for i in range(20)) + "E: Unable to locate package python3-venv\n")
    res = boot.check("/nonexistent/never-created")
    assert res.returncode == nodes.BOOT_FAILED_RC
    out = res.stdout.splitlines()
    assert out[0].startswith("step 'installing python3-venv' failed (exit 100)")
    assert out[1:] == [f"line {i}" for i in range(13, 20)] + ["E: Unable to locate package python3-venv"]
    assert not Path("/nonexistent/never-created").exists()


def test_no_marker_yet_is_still_booting(boot: BootDir) -> None:
    boot.log.write_text("remotefit-boot: 2030-01-01T00:00:10Z installing python3-venv python3-pip\n")
    res = boot.check("/tmp/x")
    if HAS_CLOUD_INIT:  # cloud-init is done on this machine, so a missing marker means the script died
        assert res.returncode == nodes.BOOT_FAILED_RC
    else:
        assert res.returncode == nodes.BOOTING_RC
        assert (
            res.stdout.strip()
            == "still booting: remotefit-boot: 2030-01-01T00:00:10Z installing python3-venv python3-pip"
        )


def test_cloud_init_done_without_a_marker_is_a_failed_boot(boot: BootDir, tmp_path: Path) -> None:
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "cloud-init").write_text("#!/bin/sh\nexit 1\n")  # status --wait: done, with an error
    (fake / "cloud-init").chmod(0o755)
    boot.env["PATH"] = f"{fake}:/usr/bin:/bin"
    boot.log.write_text("remotefit-boot: 2030-01-01T00:00:10Z installing the watchdog\nKilled\n")
    res = boot.check("/tmp/x")
    assert res.returncode == nodes.BOOT_FAILED_RC
    assert res.stdout.splitlines() == [
        "the boot script ended without its ready marker",
        "remotefit-boot: 2030-01-01T00:00:10Z installing the watchdog",
        "Killed",
    ]


@pytest.fixture
def ws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Workspace:
    for k in SETTINGS_KEYS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("REMOTEFIT_GENERATED", str(tmp_path / "generated"))
    settings = Settings(
        AWS_ACCOUNT="testacct", AWS_REGION="us-east-1", STAGE="test", TF_STATE_BUCKET="remotefit-test-state"
    )
    return Workspace(root=tmp_path, defaults={}, settings=settings)


def run_locally(boot: BootDir, calls: list[str]):
    """ready.run with ssh replaced by a local bash: the command after `--` is what the node runs."""

    def fake_run(argv, capture=True, check=False, timeout=None):
        assert argv[0] == "ssh" and argv[-2] == "--", argv
        calls.append(argv[-3])
        return subprocess.run(["bash", "-c", argv[-1]], env=boot.env, capture_output=True, text=True, timeout=30)

    return fake_run


def test_wait_ready_fails_in_one_line_naming_the_node(
    ws: Workspace, boot: BootDir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (boot.dir / "boot-failed").write_text("step 'installing python-is-python3' failed (exit 100) at T\n")
    boot.log.write_text("Waiting for cache lock: Could not get lock /var/lib/dpkg/lock-frontend\nE: timeout\n")
    calls: list[str] = []
    monkeypatch.setattr(ready, "run", run_locally(boot, calls))
    n = node(tmp_path, index=1)
    with pytest.raises(UserError) as exc:
        nodes.wait_ready(ws, [n], timeout=60)
    msg = exc.value.message
    assert "\n" not in msg and exc.value.code != 0
    assert msg.startswith(
        "rf-test-1 (i-00000000000000001): the node's boot failed: step 'installing python-is-python3'"
    )
    assert "last lines of /var/log/remotefit-boot.log: Waiting for cache lock" in msg
    assert "| E: timeout" in msg
    assert "`inv destroy`" in msg and "`inv ssh --node 1`" in msg
    assert calls == ["rf-test-1"]  # failed at once, not after the readiness timeout


def test_wait_ready_waits_for_the_marker(
    ws: Workspace, boot: BootDir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if HAS_CLOUD_INIT:
        pytest.skip("this machine's cloud-init is done: a missing marker is a failed boot here")
    calls: list[str] = []
    fake = run_locally(boot, calls)

    def marker_on_second_call(*args, **kwargs):
        if calls:
            (boot.dir / "boot-done").write_text("ready\n")
        return fake(*args, **kwargs)

    monkeypatch.setattr(ready, "run", marker_on_second_call)
    monkeypatch.setattr(ready.time, "sleep", lambda s: None)
    nodes.wait_ready(ws, [node(tmp_path)], timeout=60)
    assert len(calls) == 2


def test_wait_ready_timeout_says_where_the_boot_is(
    ws: Workspace, boot: BootDir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if HAS_CLOUD_INIT:
        pytest.skip("this machine's cloud-init is done: a missing marker is a failed boot here")
    boot.log.write_text("remotefit-boot: T installing python3-venv python3-pip\n")
    monkeypatch.setattr(ready, "run", run_locally(boot, []))
    clock = iter(range(0, 10_000, 50))
    monkeypatch.setattr(ready.time, "monotonic", lambda: float(next(clock)))
    monkeypatch.setattr(ready.time, "sleep", lambda s: None)
    with pytest.raises(UserError) as exc:
        nodes.wait_ready(ws, [node(tmp_path)], timeout=120)
    assert "did not answer over SSH within 120 s (still booting: remotefit-boot: T installing python3-venv" in (
        exc.value.message
    )

"""Boot on a clean OS: the rendered user data runs as root in a clean Debian root (debootstrap
--variant=minbase: python3 but no venv, no pip, no `python`), with `systemctl`/`shutdown` shims that
record their calls and the dpkg lock held, as unattended-upgrades holds it on a stock node's first boot.

The root is built once and cached outside the repo ($REMOTEFIT_TEST_CACHE, default
~/.cache/remotefit/); each test copies it. Needs root (chroot), debootstrap and network access to a
Debian mirror ($REMOTEFIT_DEBIAN_MIRROR) the first time, and to refresh apt's lists in each test.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from remotefit import nodes
from tests.conftest import ROOT, require_root, requires
from tests.test_user_data import render_user_data

pytestmark = requires("terraform", "debootstrap", "chroot", "unshare")

CACHE = Path(os.environ.get("REMOTEFIT_TEST_CACHE") or Path.home() / ".cache" / "remotefit")
ROOTFS = CACHE / "debian-bookworm-minbase"
MIRROR = os.environ.get("REMOTEFIT_DEBIAN_MIRROR", "http://deb.debian.org/debian")
# What the boot script installs on this image; downloaded into the cached root so tests fetch only lists.
BOOT_PACKAGES = ("python3-venv", "python3-pip", "python-is-python3")
# The boto3 the user data pins (templates/main.tf.j2), which it installs in the node tools' venv.
BOTO3_VERSION = re.search(r'boto3_version\s*=\s*"([^"]+)"', (ROOT / "templates" / "main.tf.j2").read_text())[1]
CHROOT_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C"}
SHIM = '#!/bin/sh\necho "$(date +%s.%N) {name} $*" >> /var/log/remotefit-test-calls\n'


@pytest.fixture(autouse=True)
def _needs_root(request: pytest.FixtureRequest) -> None:
    require_root(request, "chroot needs root")


def in_root(root: Path, *argv: str) -> list[str]:
    """argv that runs in the root with its own /proc (a real node has one; bash's process substitution
    needs it) in a private mount and pid namespace: nothing outlives the command, nothing stays mounted."""
    return ["unshare", "--mount", "--pid", "--fork", f"--mount-proc={root}/proc", "chroot", str(root), *argv]


def chroot(root: Path, *argv: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(in_root(root, *argv), env=CHROOT_ENV, capture_output=True, text=True, timeout=timeout)


def base_root() -> Path:
    """The cached clean root, built once (a lock keeps parallel workers from building it twice)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".debootstrap.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (ROOTFS / ".remotefit-complete").exists():
            return ROOTFS
        tmp = ROOTFS.with_name(ROOTFS.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        res = subprocess.run(
            ["debootstrap", "--variant=minbase", "--include=python3", "bookworm", str(tmp), MIRROR],
            capture_output=True,
            text=True,
            timeout=1200,
        )
        assert res.returncode == 0, f"debootstrap failed: {res.stdout[-2000:]}{res.stderr[-2000:]}"
        for argv in (
            ["useradd", "-m", "-s", "/bin/bash", "ubuntu"],  # cloud-init makes the default user before user data
            ["apt-get", "clean"],
            ["apt-get", "-q", "update"],
            ["apt-get", "install", "-q", "-d", "-y", "--no-install-recommends", *BOOT_PACKAGES],
        ):
            res = chroot(tmp, *argv, timeout=600)
            assert res.returncode == 0, f"{' '.join(argv)} in the new root failed: {res.stdout[-2000:]}{res.stderr}"
        (tmp / ".remotefit-complete").write_text("built by tests/test_boot_clean_os.py\n")
        os.rename(tmp, ROOTFS)
        return ROOTFS


@pytest.fixture
def clean_root(tmp_path: Path) -> Iterator[Path]:
    """A fresh copy of the clean root with recording shutdown/systemctl shims."""
    base = base_root()
    root = tmp_path / "root"
    subprocess.run(["cp", "-a", "--reflink=auto", str(base), str(root)], check=True, timeout=600)
    for name in ("shutdown", "systemctl"):
        shim = root / "usr" / "local" / "sbin" / name
        shim.write_text(SHIM.format(name=name))
        shim.chmod(0o755)
    yield root
    # cp -a may leave read-only folders behind for pytest's cleanup: remove the copy now.
    shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def dpkg_lock_held(root: Path) -> Iterator[None]:
    """Hold dpkg's locks the way apt/unattended-upgrades do (fcntl write locks on both files)."""
    files = []
    try:
        for name in ("lock-frontend", "lock"):
            f = open(root / "var" / "lib" / "dpkg" / name, "a+")  # noqa: SIM115 - closed below
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            files.append(f)
        yield
    finally:
        for f in files:
            f.close()  # closing drops the lock


def calls(root: Path) -> list[tuple[float, str]]:
    path = root / "var" / "log" / "remotefit-test-calls"
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        stamp, what = line.split(" ", 1)
        out.append((float(stamp), what))
    return out


def boto3_offline(root: Path) -> None:
    """pip in the root finds the tool venv's boto3 (and what it needs) in a local folder, as the sandbox's
    images do: this machine reaches its package index only through its own configuration."""
    from remotefit import sandbox_image

    house, wheels = sandbox_image.wheelhouse(), root / sandbox_image.WHEELS_MOUNT.lstrip("/")
    wheels.mkdir(parents=True, exist_ok=True)
    for whl in house.glob("*.whl"):
        if whl.name.split("-")[0].lower() in (
            "boto3",
            "botocore",
            "jmespath",
            "s3transfer",
            "python_dateutil",
            "six",
            "urllib3",
        ):
            shutil.copy2(whl, wheels)
    (root / "etc/xdg/pip").mkdir(parents=True, exist_ok=True)
    (root / "etc/xdg/pip/pip.conf").write_text(sandbox_image.PIP_CONF)


def boot_log(root: Path) -> str:
    path = root / "var" / "log" / "remotefit-boot.log"
    return path.read_text(errors="replace") if path.exists() else ""


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"the boot script exited ({proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout:.0f} s"
        time.sleep(0.2)


def start_boot(root: Path, script: str) -> subprocess.Popen[str]:
    (root / "root" / "user-data.sh").write_text(script)
    return subprocess.Popen(
        in_root(root, "/bin/bash", "/root/user-data.sh"),
        env=CHROOT_ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_boot_waits_for_the_dpkg_lock_and_python_resolves(clean_root: Path, tmp_path: Path) -> None:
    root = clean_root
    assert chroot(root, "bash", "-c", "command -v python").returncode != 0  # the image has no `python`
    script = render_user_data(tmp_path, max_minutes=90, idle=15)
    boto3_offline(root)
    with dpkg_lock_held(root):
        proc = start_boot(root, script)
        try:
            # The guards are armed while apt is still locked out...
            wait_for(lambda: any("enable --now" in c for _, c in calls(root)), 120, "watchdog enabled", proc)
            # ...and apt waits for the lock instead of failing (what a lost race did before).
            wait_for(lambda: "lock-frontend" in boot_log(root), 240, "wait for the dpkg lock", proc)
            time.sleep(2)  # keep it waiting a little: the boot must neither fail nor go on meanwhile
            assert proc.poll() is None, boot_log(root)
            assert not (root / "var/lib/remotefit/boot-done").exists()
            assert not (root / "var/lib/remotefit/boot-failed").exists()
            released = time.time()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    out, _ = proc.communicate(timeout=600)
    log = boot_log(root)
    assert proc.returncode == 0, log[-3000:]
    assert (root / "var/lib/remotefit/boot-done").read_text().startswith("remotefit node 0 ready at ")
    assert not (root / "var/lib/remotefit/boot-failed").exists()
    assert "installing python3-venv python3-pip python-is-python3" in log and "remotefit-boot: " in out

    recorded = calls(root)
    # The deadline is the very first thing, long before the lock was released.
    assert recorded[0][1] == "shutdown -h +90 remotefit: hard deadline reached"
    assert recorded[0][0] < released
    assert [c for _, c in recorded[1:]] == [
        "systemctl daemon-reload",
        "systemctl enable --now remotefit-watchdog.timer remotefit-spot.service",
    ]
    for unit in ("remotefit-watchdog.service", "remotefit-watchdog.timer", "remotefit-spot.service"):
        assert (root / "etc/systemd/system" / unit).exists(), unit
    cfg = chroot(root, "python3", "-c", "import json; print(json.load(open('/etc/remotefit/watchdog.json')))")
    assert cfg.returncode == 0 and "'spot_service': True" in cfg.stdout, cfg
    # The installed watchdog runs with the written config (idle off here: this kernel's uptime is the host's).
    dry = chroot(
        root,
        "python3",
        "/opt/remotefit/watchdog.py",
        "--config",
        "/etc/remotefit/watchdog.json",
        "--dry-run",
        "--idle-minutes",
        "0",
    )
    assert dry.returncode == 0 and "action=keep" in dry.stdout, dry
    assert re.search(r"deadline in (89\.\d|90\.0)min", dry.stdout), dry.stdout  # --max-hours 1.5

    # Afterwards `python` resolves, and a job venv with pip can be made: what the runner needs.
    py = chroot(root, "bash", "-c", "command -v python && python -c 'import sys; print(sys.version_info[0])'")
    assert py.returncode == 0 and py.stdout.split() == ["/usr/bin/python", "3"], py
    venv = chroot(root, "bash", "-c", "python3 -m venv /tmp/v && /tmp/v/bin/python -m pip --version")
    assert venv.returncode == 0 and "/tmp/v" in venv.stdout, venv
    assert (root / "home/ubuntu/remotefit").is_dir()
    # The node tools' venv has boto3, installed by the system's pip (bookworm's pip 23 has --python): the
    # venv carries no pip of its own, whose byte-compiling was a third of a small node's boot.
    tools = chroot(root, "/opt/remotefit-tools/bin/python", "-c", "import boto3; print(boto3.__version__)")
    assert tools.returncode == 0 and tools.stdout.strip() == BOTO3_VERSION, tools.stdout + tools.stderr + log[-3000:]
    assert not (root / "opt/remotefit-tools/bin/pip").exists()
    # And apply's readiness check, run on this node, says ready.
    ready = chroot(root, "bash", "-c", nodes.ready_command("/home/ubuntu/remotefit"))
    assert ready.returncode == 0, ready


def test_boot_that_cannot_get_the_lock_fails_with_a_marker(clean_root: Path, tmp_path: Path) -> None:
    """A lock that is never released: bounded retries, then boot-failed naming the step, the guards
    still armed, and apply's readiness check reports it with the log's tail."""
    root = clean_root
    script = render_user_data(tmp_path, max_minutes=90, idle=15)
    script = script.replace("DPkg::Lock::Timeout=300", "DPkg::Lock::Timeout=1").replace("sleep 10", "sleep 1")
    with dpkg_lock_held(root):
        proc = start_boot(root, script)
        try:
            proc.communicate(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode != 0
    marker = (root / "var/lib/remotefit/boot-failed").read_text()
    assert marker.startswith("step 'installing python3-venv python3-pip python-is-python3' failed (exit ")
    assert not (root / "var/lib/remotefit/boot-done").exists()
    log = boot_log(root)
    assert log.count("remotefit-boot: apt-get ") == 3 and "(try 3 of 3)" in log, log[-3000:]
    recorded = [c for _, c in calls(root)]
    assert recorded[0].startswith("shutdown -h +90 ")  # the deadline still ends the bill
    assert "systemctl enable --now remotefit-watchdog.timer remotefit-spot.service" in recorded

    ready = chroot(root, "bash", "-c", nodes.ready_command("/home/ubuntu/remotefit"))
    assert ready.returncode == nodes.BOOT_FAILED_RC
    lines = ready.stdout.splitlines()
    assert lines[0] == marker.strip()
    assert lines[-1].startswith("remotefit-boot: FAILED at step 'installing python3-venv")

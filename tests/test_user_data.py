"""The node's boot script: rendered by Terraform's own templatefile(), valid bash, guards armed first."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
from pathlib import Path

from remotefit import render
from tests.conftest import requires

ROOT = Path(__file__).resolve().parent.parent
NODE = ROOT / "remotefit" / "node"

pytestmark = requires("terraform")


def render_user_data(tmp_path: Path, max_minutes: int = 480, idle: int = 30) -> str:
    """The user data as Terraform renders it, with the arguments templates/main.tf.j2 passes."""
    for name in ("user_data.sh.tftpl",):
        shutil.copy(ROOT / "templates" / name, tmp_path / name)
    render.write_node_files(tmp_path)
    main_tf = (ROOT / "templates" / "main.tf.j2").read_text()
    lock_timeout = re.search(r"apt_lock_timeout_s\s*=\s*(\d+)", main_tf)
    assert lock_timeout, "main.tf.j2 passes apt_lock_timeout_s to the user data"
    boto3 = re.search(r'boto3_version\s*=\s*"([^"]+)"', main_tf)
    assert boto3, "main.tf.j2 pins the data fetcher's boto3 for the user data"
    expr = (
        f'templatefile("user_data.sh.tftpl", {{max_minutes = {max_minutes}, idle_minutes = {idle}, ssh_user = "ubuntu", node_index = 0, '
        'watchdog_py = file("watchdog.py"), contract_py = file("contract.py"), service_unit = file("remotefit-watchdog.service"), '
        'timer_unit = file("remotefit-watchdog.timer"), spot_unit = file("remotefit-spot.service"), '
        f'apt_lock_timeout_s = {lock_timeout.group(1)}, boto3_version = "{boto3.group(1)}"}})'
    )
    res = subprocess.run(
        ["terraform", "console"],
        input=expr,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/local/bin:/usr/bin:/bin", "TF_CLI_CONFIG_FILE": "/dev/null"},
    )
    assert res.returncode == 0, res.stderr
    out = res.stdout.strip()
    # terraform console prints a heredoc for multi-line strings
    assert out.startswith("<<EOT"), out[:200]
    return out.split("\n", 1)[1].rsplit("\nEOT", 1)[0]


def test_user_data_is_valid_bash_and_arms_the_deadline_first(tmp_path: Path) -> None:
    script = render_user_data(tmp_path, max_minutes=90, idle=15)
    (tmp_path / "ud.sh").write_text(script)
    assert subprocess.run(["bash", "-n", str(tmp_path / "ud.sh")], capture_output=True).returncode == 0
    lines = [ln for ln in script.splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines[1].startswith("shutdown -h +90 "), lines[:3]  # the first command after `set`
    assert '"idle_minutes": 15' in script
    assert "systemctl enable --now remotefit-watchdog.timer remotefit-spot.service" in script
    # The embedded watchdog is the repo's script, without its comments and docstrings (the size cap).
    body = script.split("<<'REMOTEFIT_WATCHDOG_EOF'\n", 1)[1].split("\nREMOTEFIT_WATCHDOG_EOF", 1)[0]
    source = (NODE / "watchdog.py").read_text()
    assert body.startswith("#!/usr/bin/env python3\n")
    assert ast.dump(ast.parse(body)) == ast.dump(ast.parse(render.compact_python(source)))


def test_user_data_fits_ec2_limit_once_gzipped(tmp_path: Path) -> None:
    import base64
    import gzip

    script = render_user_data(tmp_path)
    assert len(base64.b64encode(gzip.compress(script.encode()))) < 16 * 1024  # EC2's user data limit


def test_user_data_waits_for_the_dpkg_lock_logs_and_marks_the_boot(tmp_path: Path) -> None:
    script = render_user_data(tmp_path)
    # apt waits for the lock unattended-upgrades holds on first boot, and is retried a bounded number of times.
    assert re.search(r"apt-get -o DPkg::Lock::Timeout=\d+ ", script)
    assert "for try in 1 2 3; do" in script
    assert "|| true" not in script.split("set -eE", 1)[1]  # no failure is swallowed after the guards
    assert 'exec > >(tee -a "$BOOT_LOG") 2>&1' in script and "BOOT_LOG=/var/log/remotefit-boot.log" in script
    assert "trap 'failed $?' ERR" in script and '> "$BOOT_DIR/boot-failed"' in script
    assert script.rstrip().endswith('> "$BOOT_DIR/boot-done"')
    # `python` must resolve on stock Ubuntu 24.04 (python3 only).
    assert "command -v python >/dev/null 2>&1 || PACKAGES+=(python-is-python3)" in script
    # The markers are where apply's readiness check looks for them.
    from remotefit import nodes

    assert f"BOOT_DIR={nodes.BOOT_DIR}\n" in script and f"BOOT_LOG={nodes.BOOT_LOG}\n" in script


def test_user_data_embeds_the_spot_service(tmp_path: Path) -> None:
    script = render_user_data(tmp_path)
    body = script.split("remotefit-spot.service <<'REMOTEFIT_UNIT_EOF'\n", 1)[1].split("\nREMOTEFIT_UNIT_EOF", 1)[0]
    assert body.strip() == (NODE / "remotefit-spot.service").read_text().strip()
    assert '"spot_service": true' in script  # the minute tick leaves spot notices to that service

"""The node's boot script: rendered by Terraform's own templatefile(), valid bash, guards armed first."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(not shutil.which("terraform"), reason="terraform is needed")


def render_user_data(tmp_path: Path, max_minutes: int = 480, idle: int = 30) -> str:
    for name in ("user_data.sh.tftpl",):
        shutil.copy(ROOT / "templates" / name, tmp_path / name)
    for name in ("watchdog.py", "remotefit-watchdog.service", "remotefit-watchdog.timer"):
        shutil.copy(ROOT / "scripts" / "node" / name, tmp_path / name)
    expr = (
        f'templatefile("user_data.sh.tftpl", {{max_minutes = {max_minutes}, idle_minutes = {idle}, ssh_user = "ubuntu", node_index = 0, '
        'watchdog_py = file("watchdog.py"), service_unit = file("remotefit-watchdog.service"), '
        'timer_unit = file("remotefit-watchdog.timer")})'
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
    assert "systemctl enable --now remotefit-watchdog.timer" in script
    # The embedded watchdog is byte-for-byte the repo's script.
    body = script.split("<<'REMOTEFIT_WATCHDOG_EOF'\n", 1)[1].split("\nREMOTEFIT_WATCHDOG_EOF", 1)[0]
    assert body.strip() == (ROOT / "scripts" / "node" / "watchdog.py").read_text().strip()


def test_user_data_fits_ec2_limit_once_gzipped(tmp_path: Path) -> None:
    import base64
    import gzip

    script = render_user_data(tmp_path)
    assert len(base64.b64encode(gzip.compress(script.encode()))) < 16 * 1024  # EC2's user data limit

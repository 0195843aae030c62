"""The install sets: a lean AWS-only laptop install, the sandbox set, the dev set; `inv check` names which."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from remotefit.tools import install_set
from tests.conftest import ROOT

LEAN_LIMIT_MB = 150


def test_install_set_is_named_from_what_imports() -> None:
    assert install_set({"moto": True, "torch": True, "pytest": True}) == ("dev", [])
    name, notes = install_set({"moto": True, "torch": True, "pytest": False})
    assert name == "sandbox" and len(notes) == 1 and notes[0].startswith("pytest: not installed")
    name, notes = install_set({"moto": False, "torch": False, "pytest": False})
    assert name == "aws-only"
    assert any("moto" in n and "sandbox" in n and "scripts/bootstrap --sandbox" in n for n in notes)
    assert any("torch" in n and "--local" in n for n in notes)
    assert install_set({"moto": True, "torch": False, "pytest": False})[0] == "aws-only, partly sandbox"


def test_this_venv_is_the_dev_set() -> None:
    assert install_set() == ("dev", [])


def du_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink()) / 2**20


@pytest.mark.slow
def test_the_lean_install_drives_the_tasks_in_under_150_mb(tmp_path: Path) -> None:
    """What `scripts/bootstrap --aws-only` installs: remotefit and its core dependencies only."""
    venv = tmp_path / "lean"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    res = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    size = du_mb(venv)
    assert size < LEAN_LIMIT_MB, f"the lean venv is {size:.0f} MB"
    for heavy in ("moto", "torch", "pytest", "matplotlib", "sklearn"):
        assert not list((venv / "lib").glob(f"python3*/site-packages/{heavy}")), heavy
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REMOTEFIT_", "AWS_"))}
    out = subprocess.run(
        [str(venv / "bin" / "inv"), "check", "--offline"], cwd=ROOT, capture_output=True, text=True, env=env
    )
    assert "install set: aws-only" in out.stdout, out.stdout + out.stderr
    assert "scripts/bootstrap --sandbox" in out.stdout
    assert "Traceback" not in out.stderr
    listing = subprocess.run([str(venv / "bin" / "inv"), "--list"], cwd=ROOT, capture_output=True, text=True)
    assert listing.returncode == 0 and "apply" in listing.stdout and "fit" in listing.stdout

"""The job's PATH (issue 11.4): `python` resolves through the runner's shims on every node, and the
caller's PATH (a laptop venv, ~/.bashrc's pyenv) never leaks into the job: a sandbox node runs jobs
with a stock node's PATH, so a missing `python` fails here as it would on stock Ubuntu."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from pathlib import Path

import pytest

from tests.test_runner import rf, runner, start

SHIMS = ".remotefit/bin"


@pytest.fixture
def node_base(tmp_path: Path):
    b = tmp_path / "base"
    (b / "jobs" / "job").mkdir(parents=True)
    yield b
    active = runner.read_json(str(b / "active.json"))
    if active and runner.pid_alive(active.get("pid")):  # never leave a job behind
        with contextlib.suppress(ProcessLookupError):
            os.killpg(active["pgid"], signal.SIGKILL)


def run_job(base: Path, cmd: str, *extra: str, env: dict | None = None) -> str:
    r = start(base, "r1", cmd, *extra, env=env)
    assert r.returncode == 0, r.stderr
    f = rf(base, "follow", "--run-id", "r1", timeout=120)
    assert f.returncode == 0, f.stdout + f.stderr
    return f.stdout.decode()


def hostile_caller_env(tmp_path: Path) -> dict:
    """What an ssh session under pyenv/conda looks like: a `python` without our packages first on PATH."""
    evil = tmp_path / "evil-bin"
    evil.mkdir()
    for name in ("python", "python3", "pip"):
        (evil / name).write_text("#!/bin/sh\necho EVIL-PYTHON; exit 99\n")
        (evil / name).chmod(0o755)
    return {**os.environ, "PATH": f"{evil}:{os.path.dirname(sys.executable)}:/usr/bin:/bin", "VIRTUAL_ENV": "/x"}


def test_python_is_the_node_python_through_the_shim(node_base: Path, tmp_path: Path) -> None:
    out = run_job(
        node_base,
        'echo "PATH=$PATH"; command -v python; '
        'python -c "import sys; print(sys.executable)"; python3 -c "import sys; print(sys.executable)"',
        env=hostile_caller_env(tmp_path),
    )
    path_line, which, exe, exe3 = out.strip().splitlines()
    shims = str(node_base / SHIMS)
    assert path_line == f"PATH={shims}:{runner.stock_path()}"
    assert which == f"{shims}/python"
    assert exe == exe3 == sys.executable  # the Python the runner runs under: the node's
    assert "evil-bin" not in out and os.path.dirname(sys.executable) not in path_line
    assert "EVIL-PYTHON" not in out


def tiny_wheel(d: Path) -> Path:
    """A one-module wheel, made by hand (no build backend, no index)."""
    import zipfile

    whl = d / "tinypkg_rf-1.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr("tinypkg_rf.py", "X = 1\n")
        z.writestr("tinypkg_rf-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: tinypkg-rf\nVersion: 1.0\n")
        z.writestr(
            "tinypkg_rf-1.0.dist-info/WHEEL",
            "Wheel-Version: 1.0\nGenerator: hand\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        z.writestr("tinypkg_rf-1.0.dist-info/RECORD", "")
    return whl


def test_job_venv_comes_first_and_pip_uses_it(node_base: Path, tmp_path: Path) -> None:
    (node_base / "jobs" / "job" / "requirements.txt").write_text("\n")
    whl = tiny_wheel(tmp_path)
    out = run_job(
        node_base,
        'echo "WHICH=$(command -v python)"; python -c "import sys; print(\'PREFIX=\' + sys.prefix)"; '
        'echo "PIP=$(command -v pip) $(pip --version)"; echo "VENV=$VIRTUAL_ENV"; '
        f"pip install -q --no-index --disable-pip-version-check {whl} >&2",
        "--requirements",
        "requirements.txt",
        env=hostile_caller_env(tmp_path),
    )
    got = dict(ln.split("=", 1) for ln in out.splitlines() if ln.split("=", 1)[0] in ("WHICH", "PREFIX", "PIP", "VENV"))
    (venv,) = [p for p in (node_base / "envs").iterdir() if p.is_dir()]
    assert got["WHICH"] == f"{venv}/bin/python"
    assert got["PREFIX"] == str(venv)
    # pip is the venv's: its own, or (the venv made without one, the node's pip reaching it) a shim that runs
    # the node's pip under the venv's python, which installs into the venv.
    assert got["PIP"].startswith(f"{venv}/bin/pip pip "), got["PIP"]
    # ... and a job's own `pip install` lands in its venv.
    assert list(venv.glob("lib/python3*/site-packages/tinypkg_rf.py")), out
    assert got["VENV"] == str(venv)


def test_env_file_path_is_honoured_after_the_shims(node_base: Path, tmp_path: Path) -> None:
    envfile = tmp_path / "env.json"
    envfile.write_text(json.dumps({"PATH": "/opt/tools/bin:/usr/bin:/bin"}))
    out = run_job(node_base, 'echo "$PATH"', "--env-file", str(envfile))
    assert out.strip() == f"{node_base / SHIMS}:/opt/tools/bin:/usr/bin:/bin"


def test_shims_are_small_sh_scripts(tmp_path: Path) -> None:
    d = runner.write_shims(str(tmp_path / "bin"), "/opt/py env/bin/python3")
    assert sorted(os.listdir(d)) == ["pip", "pip3", "python", "python3", "torchrun"]
    assert (Path(d) / "python").read_text().splitlines()[-1] == "exec '/opt/py env/bin/python3' \"$@\""
    assert (Path(d) / "torchrun").read_text().splitlines()[-1] == 'exec python -m torch.distributed.run "$@"'
    assert all(os.access(Path(d) / n, os.X_OK) for n in os.listdir(d))


def test_stock_path_reads_etc_environment(tmp_path: Path) -> None:
    env = tmp_path / "environment"
    env.write_text('LANG=C.UTF-8\nPATH="/usr/local/bin:/usr/bin:/bin:/snap/bin"\n')
    assert runner.stock_path(str(env)) == "/usr/local/bin:/usr/bin:/bin:/snap/bin"
    env.write_text("LANG=C.UTF-8\n")
    assert runner.stock_path(str(env)) == runner.STOCK_PATH
    assert runner.stock_path(str(tmp_path / "missing")) == runner.STOCK_PATH

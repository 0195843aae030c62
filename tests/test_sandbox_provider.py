"""The sandbox's provider daemon (remotefit/sandbox_provider.py): started once, reattached, restarted when what
it read at start changes, stopped by `sandbox.down`; Terraform's own provider wherever it cannot serve."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from remotefit import sandbox_provider
from remotefit.sandbox import pid_alive

# A stand-in with the provider's name and its managed-debug behaviour: print the reattach line, serve until
# stopped (its "socket" is a file it makes). Terraform itself reattaches in tests/test_e2e_foundation.py.
FAKE = """#!/bin/sh
sock="$(dirname "$0")/sock.$$"
: > "$sock"
echo "Provider started. To attach Terraform CLI, set the TF_REATTACH_PROVIDERS environment variable with the following:"
echo ""
printf "\\tBash:\\texport TF_REATTACH_PROVIDERS='{\\"registry.terraform.io/hashicorp/aws\\":{\\"Protocol\\":\\"grpc\\",\\"ProtocolVersion\\":5,\\"Pid\\":%s,\\"Test\\":true,\\"Addr\\":{\\"Network\\":\\"unix\\",\\"String\\":\\"%s\\"}}}'\\n" $$ "$sock"
echo "endpoint=$AWS_ENDPOINT_URL ca=${AWS_CA_BUNDLE:-none}"
sleep 600
"""


def fake_provider(tfdir: Path, script: str = FAKE) -> Path:
    d = tfdir / ".terraform/providers/registry.terraform.io/hashicorp/aws/5.100.0/linux_amd64"
    d.mkdir(parents=True)
    binary = d / "terraform-provider-aws_v5.100.0_x5"
    binary.write_text(script)
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    return binary


@pytest.fixture
def dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    for name in ("TF_LOG", sandbox_provider.DAEMON_ENV):
        monkeypatch.delenv(name, raising=False)
    sandbox, tfdir = tmp_path / "sandbox", tmp_path / "tf"
    yield sandbox, tfdir
    sandbox_provider.stop(sandbox)


def test_no_provider_installed_means_terraforms_own(dirs) -> None:
    sandbox, tfdir = dirs
    assert sandbox_provider.reattach_env(sandbox, tfdir, {"AWS_ENDPOINT_URL": "http://127.0.0.1:1"}) == {}


def test_one_daemon_serves_every_command_until_its_environment_changes(dirs) -> None:
    sandbox, tfdir = dirs
    fake_provider(tfdir)
    env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:1", "GOGC": "400", "AWS_CA_BUNDLE": "/x.pem"}  # moto is http
    first = sandbox_provider.reattach_env(sandbox, tfdir, env)["TF_REATTACH_PROVIDERS"]
    pid = json.loads(first)["registry.terraform.io/hashicorp/aws"]["Pid"]
    assert pid_alive(pid, sandbox_provider.MARKER)
    assert "endpoint=http://127.0.0.1:1 ca=none" in (sandbox / "provider.log").read_text()  # the sandbox's env
    assert sandbox_provider.reattach_env(sandbox, tfdir, env) == {"TF_REATTACH_PROVIDERS": first}  # reused
    # The moto server moved: a new daemon that reads the new endpoint, the old one stopped.
    moved = sandbox_provider.reattach_env(sandbox, tfdir, env | {"AWS_ENDPOINT_URL": "http://127.0.0.1:2"})
    second = json.loads(moved["TF_REATTACH_PROVIDERS"])["registry.terraform.io/hashicorp/aws"]["Pid"]
    assert second != pid and not pid_alive(pid, sandbox_provider.MARKER)
    assert sandbox_provider.stop(sandbox) == second and not pid_alive(second, sandbox_provider.MARKER)
    assert not (sandbox / sandbox_provider.RECORD).exists() and sandbox_provider.stop(sandbox) is None


def test_a_dead_daemon_is_replaced(dirs) -> None:
    sandbox, tfdir = dirs
    fake_provider(tfdir)
    first = json.loads(sandbox_provider.reattach_env(sandbox, tfdir, {})["TF_REATTACH_PROVIDERS"])
    pid = first["registry.terraform.io/hashicorp/aws"]["Pid"]
    os.killpg(pid, 9)
    os.waitpid(pid, 0)
    again = json.loads(sandbox_provider.reattach_env(sandbox, tfdir, {})["TF_REATTACH_PROVIDERS"])
    assert again["registry.terraform.io/hashicorp/aws"]["Pid"] != pid


@pytest.mark.parametrize("env", [{"TF_LOG": "debug"}, {"REMOTEFIT_SANDBOX_PROVIDER_DAEMON": "0"}])
def test_where_a_daemon_cannot_serve_terraform_starts_its_own(dirs, env: dict[str, str]) -> None:
    sandbox, tfdir = dirs
    fake_provider(tfdir)
    assert sandbox_provider.reattach_env(sandbox, tfdir, env) == {}
    assert not (sandbox / sandbox_provider.RECORD).exists()


def test_a_daemon_that_does_not_start_leaves_nothing(dirs, monkeypatch: pytest.MonkeyPatch) -> None:
    sandbox, tfdir = dirs
    fake_provider(tfdir, "#!/bin/sh\necho 'no reattach line'\nsleep 600\n")
    monkeypatch.setattr(sandbox_provider, "START_TIMEOUT_S", 0.5)
    assert sandbox_provider.reattach_env(sandbox, tfdir, {}) == {}
    assert not (sandbox / sandbox_provider.RECORD).exists()

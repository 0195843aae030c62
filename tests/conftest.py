"""Shared fixtures. End-to-end tests drive the real `inv` tasks in an isolated project: their own
aws_env_vars, generated/ and runs/ folders (REMOTEFIT_ENV_FILE / REMOTEFIT_GENERATED / REMOTEFIT_RUNS),
so they never touch a developer's sandbox, and each gets its own moto server and sshd nodes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
INV = str(Path(sys.executable).parent / "inv")

ENV_FILE = """\
AWS_ACCOUNT=testacct
AWS_REGION={region}
STAGE={stage}
TF_STATE_BUCKET={bucket}
TARGET=sandbox
"""


def tools_present() -> bool:
    return all(shutil.which(t) for t in ("terraform", "ssh", "rsync")) and Path("/usr/sbin/sshd").exists()


needs_tools = pytest.mark.skipif(
    not tools_present(), reason="terraform, ssh, rsync and sshd are needed (scripts/bootstrap)"
)


@dataclass
class Project:
    """An isolated remotefit project that runs the real tasks from the repo root."""

    dir: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def generated(self) -> Path:
        return self.dir / "generated"

    @property
    def runs(self) -> Path:
        return self.dir / "runs"

    @property
    def env_file(self) -> Path:
        return self.dir / "aws_env_vars"

    def inv(
        self, *args: str, check: bool = True, timeout: float = 600, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run `inv ARGS` from the repo root with this project's files; check=True asserts exit 0."""
        res = subprocess.run(
            [INV, *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
        if check and res.returncode != 0:
            raise AssertionError(
                f"inv {' '.join(args)} exited {res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}"
            )
        return res

    def ssh(self, alias: str, command: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run `command` on a node through the project's own ssh config, as a user would by hand."""
        return subprocess.run(
            ["ssh", "-F", str(self.generated / "ssh_config"), alias, command],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def workspace(self):  # noqa: ANN201 - a Workspace bound to this project, for boto3 assertions
        from remotefit.workspace import Workspace

        old = {k: os.environ.get(k) for k in self.env if k.startswith("REMOTEFIT_")}
        os.environ.update({k: v for k, v in self.env.items() if k.startswith("REMOTEFIT_")})
        try:
            return Workspace(root=ROOT, defaults={"terraform_mirror": "/opt/tf-plugins"})
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def down(self) -> None:
        self.inv("sandbox.down", check=False, timeout=60)


def make_project(
    base: Path, stage: str = "test", region: str = "us-east-1", bucket: str = "remotefit-test-state"
) -> Project:
    base.mkdir(parents=True, exist_ok=True)
    (base / "aws_env_vars").write_text(ENV_FILE.format(region=region, stage=stage, bucket=bucket))
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "REMOTEFIT_", "TARGET", "STAGE", "TF_STATE"))
    }
    env.update(
        {
            "REMOTEFIT_ENV_FILE": str(base / "aws_env_vars"),
            "REMOTEFIT_GENERATED": str(base / "generated"),
            "REMOTEFIT_RUNS": str(base / "runs"),
            "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
        }
    )
    return Project(base, env)


@pytest.fixture
def project(tmp_path: Path):
    """A fresh isolated project; its sandbox is stopped afterwards."""
    p = make_project(tmp_path / "proj")
    yield p
    p.down()


@pytest.fixture(scope="module")
def module_project(tmp_path_factory: pytest.TempPathFactory):
    """One isolated project shared by a module's tests (one sandbox, one apply), stopped afterwards."""
    p = make_project(tmp_path_factory.mktemp("proj"))
    yield p
    p.down()

"""The `inv` contract: task wiring, and every bad input → ONE clear `error:` line, a non-zero exit, no
traceback, and generated/ left exactly as it was. Also `inv env` (eval-able) and `inv tfvars` (HCL)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import hcl2
import pytest

from tests.conftest import ROOT, e2e, make_project

TASKS = [
    "check",
    "env",
    "tfvars",
    "backend",
    "render",
    "validate",
    "plan",
    "apply",
    "status",
    "ssh",
    "stop",
    "start",
    "destroy",
    "gc",
    "sync",
    "fit",
    "logs",
    "pull",
    "runs",
    "cancel",
    "demo",
    "sandbox.up",
    "sandbox.down",
    "sandbox.status",
    "sandbox.console",
    "sandbox.interrupt",
    "tunnel.open",
    "tunnel.list",
    "tunnel.close",
]


# -- helpers ---------------------------------------------------------------------------------------
def snapshot(directory: Path) -> dict[str, bytes] | None:
    """Every file under `directory` with its bytes (None when the folder does not exist)."""
    if not directory.exists():
        return None
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def assert_one_error(res: subprocess.CompletedProcess[str], *needles: str, only_line: bool = True) -> str:
    """Non-zero exit, no traceback, exactly one `error:` line that holds every needle; return that line."""
    assert res.returncode != 0, f"expected a failure\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    assert "Traceback" not in res.stderr + res.stdout, res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, res.stderr
    if only_line:
        assert res.stderr.strip().splitlines() == errors, f"stderr should be the error line only:\n{res.stderr}"
    for needle in needles:
        assert needle in errors[0], f"{needle!r} not in {errors[0]!r}"
    return errors[0]


@pytest.fixture
def proj(tmp_path):
    """An isolated project with some generated/ content to prove that failures leave it alone."""
    p = make_project(tmp_path / "proj")
    (p.generated / "terraform").mkdir(parents=True)
    (p.generated / "terraform" / "main.tf").write_text("# previous render\n")
    (p.generated / "backend.hcl").write_text("# previous backend config\n")
    yield p
    if (p.sandbox / "moto.json").exists():
        p.down()


def fails_cleanly(p, *args: str, needles: tuple[str, ...] = (), only_line: bool = True) -> str:
    before = snapshot(p.generated)
    res = p.inv(*args, check=False, timeout=120)
    line = assert_one_error(res, *needles, only_line=only_line)
    assert snapshot(p.generated) == before, "generated/ changed"
    return line


# -- wiring ------------------------------------------------------------------------------------------
def _tasks_module():
    sys.path.insert(0, str(ROOT))
    try:
        import tasks
    finally:
        sys.path.remove(str(ROOT))
    return tasks


def _all_tasks(coll, prefix=""):
    for name, t in coll.tasks.items():
        yield prefix + name, t
    for cname, sub in coll.collections.items():
        yield from _all_tasks(sub, f"{prefix}{cname}.")


def test_inv_list_names_every_task():
    res = subprocess.run(
        [sys.executable, "-m", "invoke", "--list"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr
    listed = {ln.split()[0] for ln in res.stdout.splitlines() if ln.startswith("  ") and ln.split()}
    assert set(TASKS) <= listed, set(TASKS) - listed


def test_every_task_has_a_docstring_and_every_flag_has_help():
    tasks = dict(_all_tasks(_tasks_module().ns))
    assert set(tasks) == set(TASKS)
    for name, t in tasks.items():
        assert (t.__doc__ or "").strip(), f"{name} has no docstring"
        for arg in t.get_arguments():
            assert (arg.help or "").strip(), f"inv {name} --{arg.name} has no help"


def test_importing_tasks_is_light():
    """`inv --list` must stay fast: tasks.py imports nothing heavy at module level."""
    code = (
        "import sys; sys.path.insert(0, '.'); import tasks; "
        "heavy = ('boto3', 'botocore', 'pydantic', 'pydantic_settings', 'jinja2', 'hcl2', 'lark', 'moto', 'remotefit'); "
        "print([m for m in sys.modules if m.split('.')[0] in heavy])"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


# -- bad aws_env_vars --------------------------------------------------------------------------------
def test_missing_aws_env_vars(proj):
    proj.env_file.unlink()
    fails_cleanly(proj, "render", needles=("aws_env_vars: file not found", str(proj.env_file)))


def test_malformed_line(proj):
    proj.env_file.write_text(proj.env_file.read_text() + "oops no equals sign\n")
    fails_cleanly(proj, "env", needles=("aws_env_vars:6: malformed line", "KEY=VALUE"))


def test_unknown_key_suggests(proj):
    proj.env_file.write_text(proj.env_file.read_text().replace("AWS_REGION=", "AWS_REGON="))
    line = fails_cleanly(proj, "tfvars")
    assert line == "error: aws_env_vars:2: unknown key AWS_REGON; did you mean AWS_REGION?"


def test_empty_account(proj):
    proj.env_file.write_text(proj.env_file.read_text().replace("AWS_ACCOUNT=testacct", "AWS_ACCOUNT="))
    fails_cleanly(proj, "backend", needles=("aws_env_vars:1: AWS_ACCOUNT=''", "must not be empty"))


def test_invalid_region(proj):
    proj.env_file.write_text(proj.env_file.read_text().replace("us-east-1", "us-east-9"))
    fails_cleanly(
        proj, "render", needles=("aws_env_vars:2: AWS_REGION='us-east-9' is not an AWS region", "did you mean")
    )


@pytest.mark.parametrize(
    ("bucket", "rule"), [("Remotefit_State", "lowercase letters"), ("remotefit--ol-s3", "--ol-s3")]
)
def test_bad_bucket_name(proj, bucket, rule):
    proj.env_file.write_text(proj.env_file.read_text().replace("remotefit-test-state", bucket))
    fails_cleanly(
        proj, "backend", needles=(f"aws_env_vars:4: TF_STATE_BUCKET='{bucket}'", "not a valid S3 bucket name", rule)
    )


def test_bad_target(proj):
    proj.env_file.write_text(proj.env_file.read_text().replace("TARGET=sandbox", "TARGET=azure"))
    fails_cleanly(proj, "env", needles=("aws_env_vars:5: TARGET='azure' must be aws or sandbox",))


def test_environment_variable_wins_and_is_named(proj):
    proj.env["AWS_REGION"] = "eu-west-9"  # the file says us-east-1, which is fine
    fails_cleanly(proj, "render", needles=("environment variable AWS_REGION='eu-west-9'", "did you mean eu-west-"))


def test_environment_override_reaches_inv_env(proj):
    proj.env |= {"TARGET": "aws", "AWS_REGION": "eu-central-1"}  # TARGET=aws: no sandbox, no network
    res = proj.inv("env")
    assert "export AWS_REGION=eu-central-1" in res.stdout.splitlines()
    assert "export TARGET=aws" in res.stdout.splitlines()


# -- credentials, tools, invoke.yaml, generated/ -------------------------------------------------------
def test_no_credentials_on_aws_is_one_line_and_fast(proj, tmp_path):
    (tmp_path / "credentials").write_text("")
    (tmp_path / "config").write_text("")
    proj.env = {k: v for k, v in proj.env.items() if not k.startswith("AWS_")}
    proj.env |= {
        "TARGET": "aws",
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "credentials"),
        "AWS_CONFIG_FILE": str(tmp_path / "config"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    t0 = time.monotonic()
    line = fails_cleanly(proj, "check", needles=("no AWS credentials found", "aws configure"))
    assert time.monotonic() - t0 < 30, "a missing credential must fail fast, not wait on metadata endpoints"
    assert "Traceback" not in line


def test_terraform_missing_from_path(proj):
    path = f"{Path(sys.executable).parent}:/usr/bin:/bin"
    if shutil.which("terraform", path=path):
        pytest.skip("terraform is installed in /usr/bin or /bin")
    proj.env["PATH"] = path
    fails_cleanly(proj, "validate", needles=("terraform not found on PATH", "install Terraform >= 1.11"))


def _fake_terraform(tmp_path: Path, version: str) -> Path:
    fake = tmp_path / "fakebin" / "terraform"
    fake.parent.mkdir(parents=True, exist_ok=True)
    fake.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = version ] && [ "$2" = -json ]; then echo \'{{"terraform_version":"{version}"}}\'; exit 0; fi\n'
        f'if [ "$1" = version ]; then echo "Terraform v{version}"; exit 0; fi\n'
        "echo 'fake terraform: only version works' >&2; exit 1\n"
    )
    fake.chmod(0o755)
    return fake


def _runtime_config(tmp_path: Path, **remotefit: str) -> Path:
    """An invoke runtime config (`inv -f FILE`), merged over the project's invoke.yaml."""
    cfg = tmp_path / "runtime.yaml"
    cfg.write_text("remotefit:\n" + "".join(f"  {k}: {json.dumps(v)}\n" for k, v in remotefit.items()))
    return cfg


def test_terraform_too_old(proj, tmp_path):
    fake = _fake_terraform(tmp_path, "1.9.0")
    cfg = _runtime_config(tmp_path, terraform_binary=str(fake))
    fails_cleanly(proj, "-f", str(cfg), "validate", needles=(f"{fake} 1.9.0 is older than 1.11", "use_lockfile"))


def test_check_reports_old_terraform(proj, tmp_path):
    fake = _fake_terraform(tmp_path, "1.9.0")
    cfg = _runtime_config(tmp_path, terraform_binary=str(fake))
    res = proj.inv("-f", str(cfg), "check", "--offline", check=False, timeout=120)
    assert_one_error(res, "too old")
    assert any(str(fake) in ln and "too old" in ln for ln in res.stdout.splitlines()), res.stdout


def test_invoke_yaml_unknown_key(proj, tmp_path):
    cfg = _runtime_config(tmp_path, terraform_binry="terraform")
    fails_cleanly(
        proj,
        "-f",
        str(cfg),
        "check",
        "--offline",
        needles=("remotefit.terraform_binry is not a known setting", "did you mean terraform_binary?"),
    )


def test_generated_under_a_file(proj, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    proj.env["REMOTEFIT_GENERATED"] = str(blocker / "generated")
    for task in ("render", "backend", "sandbox.up"):
        res = proj.inv(task, check=False, timeout=120)
        assert_one_error(res, "REMOTEFIT_GENERATED", f"{blocker} is a file")
    assert blocker.read_text() == "a file, not a folder"


# -- env and tfvars on the sandbox ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def sandbox_project(tmp_path_factory):
    p = make_project(tmp_path_factory.mktemp("sbx"))
    p.env_file.write_text(p.env_file.read_text() + "AWS_PROFILE='team profile'  # a value with a space\n")
    yield p
    p.down()


def test_inv_env_is_eval_able(sandbox_project):
    p = sandbox_project
    out = p.inv("env").stdout
    assert "export AWS_PROFILE='team profile'" in out.splitlines()
    script = 'eval "$(inv env)" && printf "%s|%s|%s|%s" "$AWS_REGION" "$AWS_ENDPOINT_URL" "$AWS_PROFILE" "$STAGE"'
    res = subprocess.run(["bash", "-c", script], cwd=ROOT, env=p.env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    region, endpoint, profile, stage = res.stdout.split("|")
    assert (region, profile, stage) == ("us-east-1", "team profile", "test")
    server = json.loads((p.sandbox / "moto.json").read_text())
    assert endpoint == f"http://127.0.0.1:{server['port']}"


@e2e
def test_inv_tfvars_parses_with_the_seed_variables(sandbox_project):
    p = sandbox_project
    res = p.inv("tfvars")
    path = p.generated / "testacct.tfvars"
    assert res.stdout.strip() == f"wrote {path}"
    parsed = hcl2.loads(path.read_text())
    plain = {k: json.loads(v) if isinstance(v, str) and v.startswith('"') else v for k, v in parsed.items()}
    assert plain["name"] == "testacct"
    assert plain["region"] == "us-east-1"
    assert plain["environment"] == "test"
    assert plain["aws_endpoint"].startswith("http://127.0.0.1:")
    assert os.access(path, os.R_OK)


def test_untranslated_aws_and_os_errors_are_one_line(monkeypatch) -> None:
    """The task guard turns an AWS or file error we did not foresee into one line, not a traceback."""
    import botocore.exceptions
    from invoke import Context, Exit

    import tasks
    from remotefit.nodes import fleet

    def boom_aws(ws):
        raise botocore.exceptions.ClientError(
            {"Error": {"Code": "UnauthorizedOperation", "Message": "no"}}, "DescribeInstances"
        )

    def boom_os(ws):
        raise PermissionError(13, "Permission denied", "generated/nodes.json")

    monkeypatch.setattr(tasks, "_ws", lambda c: object())
    for boom, needle in ((boom_aws, "UnauthorizedOperation"), (boom_os, "Permission denied")):
        monkeypatch.setattr(fleet, "status_rows", boom)
        with pytest.raises(Exit) as exc:
            tasks.status(Context())
        assert exc.value.code == 1
        assert "\n" not in str(exc.value.message) and needle in str(exc.value.message)

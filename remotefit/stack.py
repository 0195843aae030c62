"""The Terraform stack in generated/: what the seed README's steps set up before any node exists.

`inv check` (the tools it needs), `inv env`, the tfvars file (`write_tfvars`, the only writer of it), the
state backend (`inv backend`), the templates rendered into generated/terraform (`inv render`),
`inv validate`, and `terraform init` (`init_once`: cached, for plan, apply and destroy alike).

Named for what it builds and drives, the stack of templates, backend and variables that Terraform runs
on, rather than after the README's numbered steps it began as (steps.py); the nodes that run on it are
remotefit/nodes/.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import time
from pathlib import Path

from remotefit import tools
from remotefit.errors import UserError
from remotefit.proc import atomic_write, echo, run
from remotefit.render import render_terraform, terraformrc_text, write_hcl_file
from remotefit.terraform import Terraform
from remotefit.workspace import Workspace


def state_key(stage: str) -> str:
    return f"remotefit/{stage}/terraform.tfstate"


# -- check ------------------------------------------------------------------------------
def check(ws: Workspace | None, offline: bool, terraform_binary: str = "terraform") -> bool:
    """Print the tool table and (unless offline) the caller identity; return True when all is well."""
    statuses = [tools.probe(t) for t in tools.tool_table(terraform_binary)]
    for line in tools.table_lines(statuses):
        print(line)
    name, notes = tools.install_set()
    print(f"\ninstall set: {name}")
    for note in notes:
        print(f"  {note}")
    missing = [s.tool.name for s in statuses if not s.ok]
    ok = not missing
    if missing:
        print(f"\nmissing or too old (required): {', '.join(missing)}")
    if ws and not offline:
        ident = ws.caller_identity()
        where = f" (sandbox at {ws.endpoint})" if ws.endpoint else ""
        print(f"\ncredentials: account {ident['Account']} as {ident['Arn']}{where}")
        if ws.endpoint:
            mode, why = ws.sandbox.node_mode()
            print(f"sandbox nodes: {mode} ({why})")
    return ok


# -- env --------------------------------------------------------------------------------
def env_lines(ws: Workspace) -> list[str]:
    """`export` lines for `eval "$(inv env)"`: the settings plus what the aws CLI needs."""
    lines = ws.settings.env_lines()
    for key, value in ws.aws_env().items():
        if key not in ws.settings.model_fields:
            lines.append(f"export {key}={shlex.quote(value)}")
    return lines


# -- tfvars -----------------------------------------------------------------------------
def write_tfvars(ws: Workspace, node_values: dict[str, object]) -> Path:
    """Write generated/<AWS_ACCOUNT>.tfvars: the seed's name/region/environment, then `node_values` (what
    remotefit/nodes/ computed for the templates). Every tfvars file is written here."""
    s = ws.settings
    values: dict[str, object] = {"name": s.AWS_ACCOUNT, "region": s.AWS_REGION, "environment": s.STAGE}
    values["aws_endpoint"] = ws.endpoint
    values["runs_bucket"] = s.runs_bucket
    values |= node_values
    return write_hcl_file(
        ws.paths.tfvars(s),
        values,
        "Written by remotefit (`inv tfvars` / `inv apply`); edit aws_env_vars or flags instead.",
    )


# -- backend ----------------------------------------------------------------------------
def backend_values(ws: Workspace) -> dict[str, object]:
    s = ws.settings
    values: dict[str, object] = {
        "bucket": s.TF_STATE_BUCKET,
        "key": state_key(s.STAGE),
        "region": s.AWS_REGION,
        "use_lockfile": True,
        "encrypt": True,
    }
    values |= ws.backend_overrides()
    if s.AWS_PROFILE:
        values["profile"] = s.AWS_PROFILE
    return values


def write_backend_config(ws: Workspace) -> Path:
    return write_hcl_file(
        ws.paths.backend_file, backend_values(ws), "Partial S3 backend config written by `inv backend`."
    )


def backend(ws: Workspace) -> list[str]:
    """Create (or repair) the hardened state and runs buckets, then write the backend config."""
    from remotefit.backend import ensure_runs_bucket, ensure_state_bucket

    ws.paths.generated.mkdir(parents=True, exist_ok=True)
    s3, region, tags = ws.client("s3"), ws.settings.AWS_REGION, ws.tags()
    # moto applies a TLS-only policy to every request, https too, which would lock Terraform out.
    tls = ws.supports("tls_bucket_policy")
    report = ensure_state_bucket(s3, ws.settings.TF_STATE_BUCKET, region, tags, require_tls=tls)
    runs = ensure_runs_bucket(s3, ws.settings.runs_bucket, region, tags, require_tls=tls)
    path = write_backend_config(ws)
    return [
        *report.lines(),
        *runs.lines(),
        f"runs bucket {runs.bucket}: every run's outputs and logs; `inv destroy` never touches it",
        f"wrote {path.relative_to(ws.paths.root) if path.is_relative_to(ws.paths.root) else path}",
    ]


def require_backend(ws: Workspace) -> None:
    """Before init: the state bucket must exist (made by `inv backend`)."""
    from botocore.exceptions import ClientError

    try:
        ws.client("s3").head_bucket(Bucket=ws.settings.TF_STATE_BUCKET)
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("404", "NoSuchBucket", "NotFound"):
            raise UserError(
                f"the state bucket {ws.settings.TF_STATE_BUCKET} does not exist yet: run `inv backend` first"
            ) from None
        raise UserError(
            f"cannot read the state bucket {ws.settings.TF_STATE_BUCKET} ({code}); check your credentials"
        ) from None
    write_backend_config(ws)  # the sandbox endpoint may have moved since `inv backend`


# -- render / terraform -----------------------------------------------------------------
def render(ws: Workspace) -> list[Path]:
    return render_terraform(ws.paths.templates, ws.paths.terraform_dir)


def terraform(ws: Workspace, with_cloud: bool = True) -> Terraform:
    """A Terraform bound to generated/terraform, the provider mirror and (optionally) the cloud env."""
    env: dict[str, str] = ws.aws_env() if with_cloud else {}
    mirror = ws.defaults.terraform_mirror
    rc = ws.paths.generated / "terraformrc"
    if mirror:
        if Path(mirror).is_dir():
            env["TF_CLI_CONFIG_FILE"] = str(rc)
        else:
            echo(f"warning: invoke.yaml terraform_mirror {mirror} does not exist; using the Terraform registry")
    tf = Terraform(ws.defaults.terraform_binary, ws.paths.terraform_dir, env)
    if with_cloud and ws.settings.is_sandbox:
        from remotefit import sandbox_provider

        tf.provider_env = lambda: sandbox_provider.reattach_env(ws.sandbox.dir, tf.workdir, tf.env)
    tf.version()  # before writing anything: a missing or old terraform leaves generated/ as it was
    if "TF_CLI_CONFIG_FILE" in env:
        atomic_write(rc, terraformrc_text(Path(mirror)))
    return tf


def _init_fingerprint(ws: Workspace, tf: Terraform) -> str | None:
    """What `terraform init` depends on, hashed; None when generated/terraform is not initialised."""
    dot = tf.workdir / ".terraform"
    if not (dot / "providers").is_dir():
        return None
    h = hashlib.sha256(f"{tf.binary}\0{tf.env.get('TF_CLI_CONFIG_FILE', '')}\0".encode())
    inputs = [ws.paths.backend_file, tf.workdir / "versions.tf", tf.workdir / ".terraform.lock.hcl"]
    inputs.append(dot / "terraform.tfstate")  # the backend init configured (a hand-run init changes it)
    if tf.env.get("TF_CLI_CONFIG_FILE"):
        inputs.append(Path(tf.env["TF_CLI_CONFIG_FILE"]))
    for f in inputs:
        try:
            h.update(f.read_bytes() + b"\0")
        except OSError:
            return None
    return h.hexdigest()


def init_once(ws: Workspace, tf: Terraform) -> None:
    """Render, check the state bucket, and `terraform init` against the S3 backend only when the backend
    config, provider requirements or CLI config changed since the last init (init costs ~1.2 s per plan,
    apply and destroy)."""
    render(ws)
    require_backend(ws)  # rewrites backend.hcl: the sandbox endpoint may have moved
    stamp = tf.workdir / ".terraform" / "remotefit-init.sha256"
    fingerprint = _init_fingerprint(ws, tf)
    try:
        if fingerprint and stamp.read_text().strip() == fingerprint:
            return
    except OSError:
        pass
    tf.init(ws.paths.backend_file)
    fingerprint = _init_fingerprint(ws, tf)
    if fingerprint:
        atomic_write(stamp, fingerprint)


def validate(ws: Workspace) -> list[str]:
    """python-hcl2 parse (in render), fmt -check, init -backend=false + validate, then tflint and checkov."""
    done = []
    tf = terraform(ws, with_cloud=False)  # a missing or old terraform fails before anything is written
    t0 = time.perf_counter()
    render(ws)
    done.append(f"rendered and parsed with python-hcl2 in {time.perf_counter() - t0:.2f} s")
    # Check a copy without backend state: the real working dir may hold an initialised S3 backend,
    # which `init -backend=false` would still try to reach.
    scratch = ws.paths.generated / "validate"
    shutil.rmtree(scratch, ignore_errors=True)
    shutil.copytree(ws.paths.terraform_dir, scratch, ignore=shutil.ignore_patterns(".terraform*", "last-*.log"))
    tf.workdir = scratch
    tf.fmt_check()
    done.append("terraform fmt -check: ok")
    t0 = time.perf_counter()
    tf.init(None)
    tf.validate()
    done.append(f"terraform validate: ok ({time.perf_counter() - t0:.1f} s)")
    tflint = tools.find_binary("tflint")
    if tflint:
        cfg = ws.paths.root / ".tflint.hcl"
        run([tflint, "--init", f"--config={cfg}"], cwd=tf.workdir, capture=True, check=False)
        res = run([tflint, f"--config={cfg}", "--format=compact"], cwd=tf.workdir, capture=True, check=False)
        if res.returncode != 0:
            raise UserError(f"tflint: {(res.stdout or res.stderr).strip().splitlines()[0]}")
        done.append("tflint: ok")
    else:
        done.append("tflint: not installed, skipped (optional; see `inv check`)")
    checkov = tools.find_binary("checkov")
    if checkov:
        done.append(run_checkov(checkov, tf.workdir))
    else:
        done.append("checkov: not installed, skipped (scripts/bootstrap installs it)")
    return done


def checkov_argv(checkov: str, directory: Path) -> list[str]:
    return [
        checkov,
        "-d",
        str(directory),
        "--framework",
        "terraform",
        "--quiet",
        "--compact",
        "--skip-download",
        "-o",
        "cli",
    ]


def run_checkov(checkov: str, directory: Path) -> str:
    env = {"BC_SKIP_MAPPING": "TRUE", "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false", "LOG_LEVEL": "ERROR"}
    res = run(checkov_argv(checkov, directory), capture=True, check=False, env={**os.environ, **env})
    out = res.stdout + res.stderr
    if res.returncode != 0:
        failed = [ln.strip() for ln in out.splitlines() if ln.strip().startswith("Check: ")]
        first = failed[0] if failed else (out.strip().splitlines() or ["?"])[-1]
        raise UserError(f"checkov: {len(failed) or 'some'} failed check(s), first: {first}")
    return "checkov: 0 failed checks"

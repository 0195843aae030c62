"""Running Terraform: argv builders (pure) and the few wrappers that run them through proc.

Terraform always runs in generated/terraform with the S3 backend; on the sandbox the backend and
provider point at the moto server through generated/backend.hcl and the tfvars.

A failed run raises `TerraformError`: its message is the one line a user sees, its `kind` says what
went wrong for the code that decides what to do next (`summarize` sets both, in one place), so no
caller matches Terraform's text.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from remotefit.errors import UserError
from remotefit.proc import run, run_tee

MIN_VERSION = (1, 11, 0)
# Go's garbage collector target for Terraform and the AWS provider it starts (plugins inherit the
# environment). The provider walks its whole schema in every walk of a command (PrepareProviderConfig: ~2
# CPU-s here, three walks per apply; twice that with an `endpoints` block, which is why providers.tf has
# none), allocating as it goes; at Go's default (100) a quarter of its CPU is collection. 400: apply + plan +
# destroy 0.91x the CPU of 200 (bench/bench_gogc.py), one `terraform validate` ~0.72x that of 100, for
# ~100 MB more peak memory per provider (~730 MB). A GOGC set by the user wins.
PROVIDER_GOGC = "400"
# What a person needs to see of apply/destroy; the whole output goes to generated/terraform/last-*.log.
PROGRESS = re.compile(
    r"(Creation complete|Destruction complete|Modifications complete|Apply complete|Destroy complete|"
    r"^Plan:|No changes|Error|Warning|will be (created|destroyed|updated|replaced)|must be replaced)"
)


# EC2 error codes, as they appear in API errors and in terraform's error text.
# capacity: this type/market/AZ can't be had right now -> try the next AZ or fallback type.
CAPACITY_ERRORS = (
    "InsufficientInstanceCapacity",
    "InsufficientCapacity",
    "UnfulfillableCapacity",
    "MaxSpotInstanceCountExceeded",
    "Unsupported",
    "SpotMaxPriceTooLow",
    "InsufficientHostCapacity",
)
# quota: the account's limit -> another AZ won't help; only a type in another quota class might.
QUOTA_ERRORS = ("VcpuLimitExceeded", "InstanceLimitExceeded")
_CAPACITY_RE = re.compile(r"\b(" + "|".join(CAPACITY_ERRORS) + r")\b")
_QUOTA_RE = re.compile(r"\b(" + "|".join(QUOTA_ERRORS) + r")\b")

LaunchErrorKind = Literal["capacity", "quota", "other"]
#: What a failed terraform run ran into: "locked" (another run holds the state lock; nothing of ours
#: ran), or the kind of launch error (`launch_error_kind`).
ErrorKind = Literal["locked", "capacity", "quota", "other"]


class TerraformError(UserError):
    """A terraform command that failed: `message` is the one line a user sees, `kind` what it ran into."""

    def __init__(self, message: str, kind: ErrorKind = "other", code: int = 2) -> None:
        super().__init__(message, code=code)
        self.kind: ErrorKind = kind


def launch_error_kind(message: str) -> LaunchErrorKind:
    """'capacity' (try the next AZ / fallback type), 'quota' (ask for more quota) or 'other'.

    Matches EC2 error codes as whole words, so `UnsupportedOperation` is not `Unsupported`.
    """
    if _QUOTA_RE.search(message):
        return "quota"
    if _CAPACITY_RE.search(message):
        return "capacity"
    return "other"


def parse_version(text: str) -> tuple[int, int, int] | None:
    m = re.search(r"v?(\d+)\.(\d+)\.(\d+)", text)
    return (int(m[1]), int(m[2]), int(m[3])) if m else None


def version_argv(binary: str) -> list[str]:
    return [binary, "version", "-json"]


def init_argv(binary: str, backend_file: Path | None) -> list[str]:
    argv = [binary, "init", "-input=false", "-no-color"]
    # -reconfigure: the sandbox endpoint changes between runs; we never migrate state between backends.
    return argv + (["-reconfigure", f"-backend-config={backend_file}"] if backend_file else ["-backend=false"])


def plan_argv(
    binary: str, tfvars: Path, detailed: bool = False, destroy: bool = False, out: Path | None = None
) -> list[str]:
    argv = [binary, "plan", "-input=false", "-no-color", "-lock-timeout=0s", f"-var-file={tfvars}"]
    argv += (["-detailed-exitcode"] if detailed else []) + (["-destroy"] if destroy else [])
    return argv + ([f"-out={out}"] if out else [])


def apply_plan_argv(binary: str, planfile: Path) -> list[str]:
    return [binary, "apply", "-input=false", "-no-color", "-lock-timeout=0s", str(planfile)]


def show_json_argv(binary: str, planfile: Path) -> list[str]:
    return [binary, "show", "-json", "-no-color", str(planfile)]


def apply_argv(binary: str, tfvars: Path) -> list[str]:
    return [binary, "apply", "-input=false", "-no-color", "-auto-approve", "-lock-timeout=0s", f"-var-file={tfvars}"]


def destroy_argv(binary: str, tfvars: Path) -> list[str]:
    return [binary, "destroy", "-input=false", "-no-color", "-auto-approve", "-lock-timeout=0s", f"-var-file={tfvars}"]


def output_argv(binary: str) -> list[str]:
    return [binary, "output", "-json", "-no-color"]


def fmt_check_argv(binary: str) -> list[str]:
    return [binary, "fmt", "-check", "-diff", "-no-color"]


def validate_argv(binary: str) -> list[str]:
    return [binary, "validate", "-no-color"]


class Terraform:
    """A Terraform binary bound to a working directory and an environment."""

    def __init__(self, binary: str, workdir: Path, env: dict[str, str]) -> None:
        from remotefit.tools import find_binary

        self.binary = find_binary(binary) or binary
        self.workdir = workdir
        self.env = {"TF_IN_AUTOMATION": "1", "TF_INPUT": "0", "CHECKPOINT_DISABLE": "1", **env}
        if "GOGC" not in os.environ:
            self.env.setdefault("GOGC", PROVIDER_GOGC)
        # The environment for the commands that run the provider (plan, apply, destroy, show): on the sandbox,
        # TF_REATTACH_PROVIDERS naming a provider it keeps running (sandbox_provider.py); {} = Terraform's own.
        self.provider_env: Callable[[], dict[str, str]] = dict

    def _provider_env(self) -> dict[str, str]:
        return {**self.env, **self.provider_env()}

    def version(self) -> tuple[int, int, int]:
        if not shutil.which(self.binary):
            raise UserError(
                f"{self.binary} not found on PATH; install Terraform >= 1.11 "
                "(https://developer.hashicorp.com/terraform/install) and run `inv check`"
            )
        out = run(version_argv(self.binary), capture=True, env=self.env).stdout
        try:
            text = str(json.loads(out)["terraform_version"])
        except (ValueError, KeyError, TypeError):
            text = out
        ver = parse_version(text)
        if ver is None:
            first = (text.strip().splitlines() or ["no output"])[0][:80]
            raise UserError(
                f"{self.binary}: cannot read its version from `version -json` ({first!r}); "
                "install Terraform >= 1.11, or set terraform_binary in invoke.yaml"
            )
        if ver < MIN_VERSION:
            raise UserError(
                f"{self.binary} {'.'.join(map(str, ver))} is older than 1.11 (needed for S3 state locking with "
                "use_lockfile); upgrade Terraform, or set terraform_binary in invoke.yaml"
            )
        return ver

    def _run(self, argv: list[str], what: str, quiet: bool = False) -> str:
        env = self.env if what == "init" else self._provider_env()
        code, out = run_tee(argv, cwd=self.workdir, env=env, quiet=quiet, show=PROGRESS)
        log = self.workdir / f"last-{what}.log"
        with contextlib.suppress(OSError):
            log.write_text(out)
        if code != 0:
            raise failure(f"terraform {what} failed", out, self.workdir, code=code, note=f" (full output: {log})")
        return out

    def init(self, backend_file: Path | None, quiet: bool = True) -> None:
        self._run(init_argv(self.binary, backend_file), "init", quiet=quiet)

    def plan(
        self, tfvars: Path, detailed: bool = False, quiet: bool = False, destroy: bool = False, out: Path | None = None
    ) -> int:
        """Return 0 (no changes) or 2 (changes) with -detailed-exitcode; raise on errors."""
        argv = plan_argv(self.binary, tfvars, detailed=detailed, destroy=destroy, out=out)
        code, out = run_tee(argv, cwd=self.workdir, env=self._provider_env(), quiet=quiet)
        if code == 2 and detailed:
            return 2
        if code != 0:
            raise failure("terraform plan failed", out, self.workdir, code=code)
        return 0

    def apply(self, tfvars: Path, quiet: bool = False) -> str:
        return self._run(apply_argv(self.binary, tfvars), "apply", quiet=quiet)

    def apply_plan(self, planfile: Path, quiet: bool = False) -> str:
        """Apply a plan saved with `plan(out=...)`: exactly what was shown, nothing re-planned."""
        return self._run(apply_plan_argv(self.binary, planfile), "apply", quiet=quiet)

    def show_json(self, planfile: Path) -> dict[str, Any]:
        res = run(
            show_json_argv(self.binary, planfile), cwd=self.workdir, env=self._provider_env(), capture=True, check=False
        )
        if res.returncode != 0:
            raise failure("terraform show failed", res.stderr + res.stdout)
        return dict(json.loads(res.stdout or "{}"))

    def destroy(self, tfvars: Path, quiet: bool = False) -> str:
        return self._run(destroy_argv(self.binary, tfvars), "destroy", quiet=quiet)

    def output(self) -> dict[str, Any]:
        res = run(output_argv(self.binary), cwd=self.workdir, env=self.env, capture=True, check=False)
        if res.returncode != 0:
            raise failure("terraform output failed", res.stderr + res.stdout)
        return {k: v.get("value") for k, v in json.loads(res.stdout or "{}").items()}

    def fmt_check(self) -> None:
        res = run(fmt_check_argv(self.binary), cwd=self.workdir, env=self.env, capture=True, check=False)
        if res.returncode != 0:
            files = ", ".join(res.stdout.split("\n")[:1]) or "?"
            raise UserError(
                f"terraform fmt -check: {files} is not formatted; run `terraform fmt` on the template output and fix the template"
            )

    def validate(self) -> None:
        res = run(validate_argv(self.binary), cwd=self.workdir, env=self.env, capture=True, check=False)
        if res.returncode != 0:
            raise failure("terraform validate", res.stdout + res.stderr)


# Anchored to the start of a line: the S3 error above the Lock Info block also holds "RequestID: ...".
_LOCK_ID = re.compile(r"^[\s│]*ID:\s+(\S+)", re.M)
_LOCK_WHO = re.compile(r"^[\s│]*Who:\s+(.+)", re.M)
_LOCK_WHEN = re.compile(r"^[\s│]*Created:\s+(.+)", re.M)


def summarize(output: str, workdir: Path | str = "generated/terraform") -> tuple[str, ErrorKind]:
    """Turn Terraform's boxed error output into one line a user can act on, and say what kind of error it
    is: the one place both are decided."""
    if "Error acquiring the state lock" in output:
        lock_id = _LOCK_ID.search(output)
        who = _LOCK_WHO.search(output)
        when = _LOCK_WHEN.search(output)
        line = (
            f"the state is locked by another run (lock {lock_id[1] if lock_id else '?'}, held by "
            f"{who[1].strip() if who else '?'} since {when[1].strip() if when else '?'}); wait for it to finish, "
            f"or if it died run `terraform -chdir={workdir} force-unlock {lock_id[1] if lock_id else 'ID'}`"
        )
        return line, "locked"
    errors = re.findall(r"Error: (.+)", output)
    if errors:
        first = errors[0].strip()
        detail = ""
        m = re.search(r"Error: .+\n(?:.*\n)*?\s*(?:on (\S+) line (\d+))", output)
        if m:
            detail = f" ({m[1]}:{m[2]})"
        line = first + detail
    else:
        tail = [ln for ln in output.strip().splitlines() if ln.strip()]
        line = tail[-1] if tail else "no output"
    return line, launch_error_kind(line)


def summarize_error(output: str, workdir: Path | str = "generated/terraform") -> str:
    """The one line of `summarize`."""
    return summarize(output, workdir)[0]


def failure(
    what: str, output: str, workdir: Path | str = "generated/terraform", code: int = 2, note: str = ""
) -> TerraformError:
    """The error for a failed run: `what: <summary><note>`, with the summary's kind."""
    line, kind = summarize(output, workdir)
    return TerraformError(f"{what}: {line}{note}", kind=kind, code=code)

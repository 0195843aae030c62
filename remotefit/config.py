"""Configuration: the user's `aws_env_vars` file, process environment overrides, tool defaults.

`aws_env_vars` is the seed's file, kept as plain `KEY=VALUE` lines so that shell users can still read
it. We parse it ourselves (with line numbers) rather than `export $(cat aws_env_vars | xargs)`, which
breaks on comments and spaces. Precedence: process environment > `aws_env_vars` > model defaults.
Tool defaults (instance types, sizes, timeouts) live in `invoke.yaml` under `remotefit:`.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from remotefit.ami import DEFAULT_GPU_IMAGE
from remotefit.errors import UserError, did_you_mean

ENV_FILE = "aws_env_vars"
ENV_FILE_ENV = "REMOTEFIT_ENV_FILE"  # lets tests and users point at another file
GENERATED_ENV = "REMOTEFIT_GENERATED"  # lets tests isolate generated/
RUNS_ENV = "REMOTEFIT_RUNS"  # and runs/
HOME_ENV = "REMOTEFIT_HOME"  # where records that must outlive generated/ are kept (keys, the sandbox)

# IAM role/instance profile name_prefix allows 38 characters (64 minus the provider's 26-character suffix);
# "remotefit-" + STAGE + "-" must fit.
STAGE_MAX = 38 - len("remotefit-") - 1

_LINE = re.compile(r"^(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)$")


@cache
def aws_regions() -> frozenset[str]:
    """Every commercial, China and GovCloud region name botocore knows (its own endpoint data)."""
    import importlib.util
    import json

    # Read botocore's data file without importing botocore (tens of ms on every `inv` call).
    spec = importlib.util.find_spec("botocore")
    data_file = Path(spec.origin).parent / "data" / "endpoints.json" if spec and spec.origin else None
    if data_file and data_file.exists():
        # Only the partitions' "regions" objects, decoded where they stand: parsing the whole 1.2 MB
        # file (every service's endpoints) cost ~25 ms on every `inv` call.
        text = data_file.read_text(encoding="utf-8")
        decoder = json.JSONDecoder()
        found: set[str] = set()
        for m in re.finditer(r'"regions"\s*:\s*(?=\{)', text):
            regions, _ = decoder.raw_decode(text, m.end())
            found.update(regions)
        if found:
            return frozenset(found)
        data = json.loads(text)
    else:
        import botocore.loaders

        # A bare loader, not a session: a session reads AWS_PROFILE and raises ProfileNotFound for a bad one.
        data = botocore.loaders.create_loader().load_data("endpoints")
    return frozenset(r for part in data["partitions"] for r in part.get("regions", {}))


def bucket_name_problem(name: str) -> str | None:
    """Return why `name` breaks S3's general-purpose bucket naming rules, or None when it is valid."""
    if not 3 <= len(name) <= 63:
        return f"must be 3 to 63 characters long (it has {len(name)})"
    if not re.fullmatch(r"[a-z0-9.-]+", name):
        return "may hold only lowercase letters, digits, dots and hyphens"
    if not (name[0].isalnum() and name[-1].isalnum()):
        return "must start and end with a lowercase letter or digit"
    if ".." in name:
        return "must not contain two adjacent dots"
    try:
        ipaddress.IPv4Address(name)
        return "must not be formatted as an IP address"
    except ValueError:
        pass
    for prefix in ("xn--", "sthree-", "amzn-s3-demo-"):
        if name.startswith(prefix):
            return f"must not start with '{prefix}'"
    for suffix in ("-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3"):
        if name.endswith(suffix):
            return f"must not end with '{suffix}'"
    return None


class Settings(BaseModel):
    """What `aws_env_vars` (and the environment) says about the account and stage. load_settings lays the
    environment over the file (a plain model, not pydantic-settings: its import alone cost every `inv`
    call ~0.13 s, and every field here is a plain string)."""

    model_config = ConfigDict(extra="forbid", validate_default=True)

    AWS_ACCOUNT: str = Field(description="A name for the AWS account; names generated/<AWS_ACCOUNT>.tfvars.")
    AWS_REGION: str = Field(description="The AWS region the nodes and the state bucket live in.")
    STAGE: str = Field(description="Stage (environment) name: one state key and one set of nodes per stage.")
    TF_STATE_BUCKET: str = Field(description="The S3 bucket holding Terraform state.")
    RUNS_BUCKET: str | None = Field(
        default=None,
        description="The S3 bucket keeping every run's outputs and logs (default: TF_STATE_BUCKET + '-runs').",
    )
    AWS_PROFILE: str | None = Field(default=None, description="Named profile from ~/.aws for real AWS.")
    TARGET: Literal["aws", "sandbox"] = Field(default="sandbox", description="aws, or the embedded sandbox.")

    @field_validator("AWS_ACCOUNT")
    @classmethod
    def _account(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty; set it to a short name for your account, e.g. myteam")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", v):
            raise ValueError("must be usable in a file name: letters, digits, '.', '_' and '-', e.g. myteam")
        return v

    @field_validator("AWS_REGION")
    @classmethod
    def _region(cls, v: str) -> str:
        if v not in aws_regions():
            hint = did_you_mean(v, sorted(aws_regions()), "use a region name such as us-east-1")
            raise ValueError(f"is not an AWS region; {hint}")
        return v

    @field_validator("STAGE")
    @classmethod
    def _stage(cls, v: str) -> str:
        if not re.fullmatch(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?", v):
            raise ValueError("must be lowercase letters, digits and hyphens, not starting or ending with one, e.g. dev")
        if len(v) > STAGE_MAX:
            raise ValueError(
                f"is {len(v)} characters; at most {STAGE_MAX}: 'remotefit-<STAGE>-' is the name prefix of the "
                "nodes' IAM role and instance profile, and AWS allows 38 characters there"
            )
        return v

    @field_validator("TF_STATE_BUCKET", "RUNS_BUCKET")
    @classmethod
    def _bucket(cls, v: str | None) -> str | None:
        problem = bucket_name_problem(v) if v is not None else None
        if problem:
            raise ValueError(f"is not a valid S3 bucket name: it {problem}")
        return v

    @field_validator("RUNS_BUCKET")
    @classmethod
    def _runs_apart(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is not None and v == info.data.get("TF_STATE_BUCKET"):
            raise ValueError("must not be TF_STATE_BUCKET: nodes write their results there, never near the state")
        return v

    @property
    def runs_bucket(self) -> str:
        """RUNS_BUCKET, or the state bucket's name + '-runs' (shortened to S3's 63 characters)."""
        if self.RUNS_BUCKET:
            return self.RUNS_BUCKET
        return self.TF_STATE_BUCKET[: 63 - len("-runs")].rstrip(".-") + "-runs"

    @property
    def is_sandbox(self) -> bool:
        return self.TARGET == "sandbox"

    def env_lines(self) -> list[str]:
        """Shell-quoted `export` lines for the settings, for `eval "$(inv env)"`."""
        return [f"export {k}={shlex.quote(str(v))}" for k, v in self.model_dump().items() if v is not None]


class Defaults(BaseModel):
    """Tool defaults a user may override in invoke.yaml under `remotefit:`."""

    model_config = ConfigDict(extra="forbid")

    gpu_instance_type: str = "g5.xlarge"
    cpu_instance_type: str = "c7i.xlarge"
    gpu_fallback_types: list[str] = ["g6.xlarge", "g4dn.xlarge"]
    cpu_fallback_types: list[str] = ["c6i.xlarge", "m7i.xlarge"]
    # Off by default: a user who asked for spot confirmed a spot price, not one ~3x higher.
    allow_on_demand_fallback: bool = False
    max_nodes: int = Field(default=8, ge=1)
    max_hours: float = 8.0
    max_hours_limit: float = Field(default=72.0, description="Refuse --max-hours above this.")
    idle_minutes: int = 30
    gpu_disk_gb: int = 150
    cpu_disk_gb: int = 50
    ssh_ready_timeout_s: int = 900
    sync_warn_mb: int = 200
    # S3 buckets every node may read for job.toml [data] (`inv apply --data-bucket NAME` adds more).
    data_buckets: list[str] = []
    terraform_binary: str = "terraform"
    terraform_mirror: str | None = Field(default=None, description="Filesystem provider mirror for init.")
    caller_ip_url: str = "https://checkip.amazonaws.com"
    # The Deep Learning AMI line of GPU nodes (a name under /aws/service/deeplearning/ami/x86_64/); the
    # default and why it is that one: remotefit/ami.py DEFAULT_GPU_IMAGE.
    gpu_image: str = Field(
        default=DEFAULT_GPU_IMAGE,
        description="Deep Learning AMI line for GPU nodes, e.g. oss-nvidia-driver-gpu-pytorch-2.12-ubuntu-24.04.",
    )

    @field_validator("gpu_image")
    @classmethod
    def _gpu_image(cls, v: str) -> str:
        # Ubuntu lines only: nodes log in as `ubuntu` and the boot script uses apt.
        if not re.fullmatch(r"[a-z0-9][a-z0-9.-]*-ubuntu-[0-9]{2}\.[0-9]{2}", v):
            raise ValueError(
                "must name an Ubuntu Deep Learning AMI line under /aws/service/deeplearning/ami/x86_64/, "
                "e.g. oss-nvidia-driver-gpu-pytorch-2.12-ubuntu-24.04"
            )
        return v


@dataclass(frozen=True)
class Paths:
    """Where things live. What we write goes under `generated/` (all of it can be rebuilt), except the
    records in `kept` that cannot be (keys, the sandbox's own state)."""

    root: Path
    generated: Path
    runs: Path
    home: Path = field(default_factory=lambda: remotefit_home())  # read once, when the paths are made

    @classmethod
    def at(cls, root: Path | str | None = None) -> Paths:
        root = Path(root or Path.cwd()).resolve()
        gen = os.environ.get(GENERATED_ENV)
        runs = os.environ.get(RUNS_ENV)
        generated = Path(gen).resolve() if gen else root / "generated"
        _check_folder(generated, GENERATED_ENV if gen else "generated/")
        return cls(
            root=root,
            generated=generated,
            runs=Path(runs).resolve() if runs else root / "runs",
        )

    @property
    def templates(self) -> Path:
        return self.root / "templates"

    @property
    def terraform_dir(self) -> Path:
        return self.generated / "terraform"

    @property
    def kept(self) -> Path:
        """Records that must outlive `generated/` (a stage's private key, the sandbox's own records):
        `rm -rf generated/` must not lock us out of running nodes. One folder per generated/ folder."""
        return kept_dir(self.generated, self.home)

    @property
    def sandbox_dir(self) -> Path:
        legacy = self.generated / "sandbox"  # where older versions kept it: used while it still holds a server
        return legacy if (legacy / "moto.json").exists() else self.kept / "sandbox"

    @property
    def backend_file(self) -> Path:
        return self.generated / "backend.hcl"

    @property
    def ssh_config(self) -> Path:
        return self.generated / "ssh_config"

    def tfvars(self, settings: Settings) -> Path:
        return self.generated / f"{settings.AWS_ACCOUNT}.tfvars"


def remotefit_home(environ: Mapping[str, str] = os.environ) -> Path:
    """$REMOTEFIT_HOME, else $XDG_DATA_HOME/remotefit, else ~/.local/share/remotefit."""
    home = environ.get(HOME_ENV)
    if home:
        return Path(home).expanduser().resolve()
    xdg = environ.get("XDG_DATA_HOME")
    return (Path(xdg) if xdg else Path(environ.get("HOME") or Path.home()) / ".local" / "share") / "remotefit"


def kept_dir(generated: Path, home: Path | None = None) -> Path:
    """The kept-records folder of the project whose generated/ folder this is: named after that folder's
    absolute path (readable part + hash), so it survives the folder's removal and never collides."""
    where = generated.resolve()
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{where.parent.name}-{where.name}").strip("_.") or "project"
    digest = hashlib.sha256(str(where).encode()).hexdigest()[:12]
    return (home or remotefit_home()) / "projects" / f"{slug[:40]}-{digest}"


def _check_folder(path: Path, what: str) -> None:
    """Fail early when a folder we must write cannot exist because a file sits in its way."""
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise UserError(
                    f"{what}: cannot use {path} as a folder because {p} is a file; "
                    f"move that file away or point {GENERATED_ENV} at another folder"
                )
            return


def parse_env_file(path: Path) -> dict[str, tuple[str, int]]:
    """Parse KEY=VALUE lines into {key: (value, line number)}; comments and blanks are skipped."""
    if not path.exists():
        raise UserError(
            f"{path.name}: file not found at {path}; copy the shipped aws_env_vars from the repo root "
            f"or point {ENV_FILE_ENV} at yours"
        )
    out: dict[str, tuple[str, int]] = {}
    for no, raw_bytes in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            raw = raw_bytes.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UserError(
                f"{path.name}:{no}: not UTF-8 text (byte {raw_bytes[exc.start]:#04x} at column {exc.start + 1}); "
                "save it as plain text with KEY=VALUE lines"
            ) from None
        bad = next((ch for ch in raw if (ord(ch) < 32 and ch != "\t") or ord(ch) == 127), None)
        if bad is not None:
            raise UserError(
                f"{path.name}:{no}: control character {bad!r} at column {raw.index(bad) + 1}; "
                "save it as plain text with KEY=VALUE lines"
            )
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if not m:
            raise UserError(f"{path.name}:{no}: malformed line {raw.strip()!r}; expected KEY=VALUE")
        key, value = m.group(1), m.group(2).strip()
        if value[:1] in "\"'":
            try:
                parts = shlex.split(value, comments=True)
            except ValueError as exc:
                raise UserError(f"{path.name}:{no}: {key} has an unclosed quote ({exc}); close it") from None
            value = parts[0] if parts else ""
        else:
            value = re.sub(r"\s+#.*$", "", value)  # trailing comment
        out[key] = (value, no)
    return out


def _field_source(key: str, file_values: dict[str, tuple[str, int]], path: Path) -> str:
    if key in os.environ:
        return f"environment variable {key}"
    if key in file_values:
        return f"{path.name}:{file_values[key][1]}: {key}"
    return f"{path.name}: {key}"


def load_settings(root: Path | str | None = None) -> Settings:
    """Load and validate `aws_env_vars`, with environment overrides; UserError names file, key and fix."""
    root = Path(root or Path.cwd())
    path = Path(os.environ.get(ENV_FILE_ENV) or root / ENV_FILE)
    values = parse_env_file(path)
    known = list(Settings.model_fields)
    for key, (_, no) in values.items():
        if key not in known:
            hint = did_you_mean(key, known, f"known keys: {', '.join(known)}", cutoff=0.5)
            raise UserError(f"{path.name}:{no}: unknown key {key}; {hint}")
    try:
        # The environment wins over the file (names exactly as written, as `export` sets them).
        merged = {k: v for k, (v, _) in values.items()} | {k: os.environ[k] for k in known if k in os.environ}
        return Settings(**merged)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = str(err["loc"][0]) if err["loc"] else "?"
        where = _field_source(key, values, path)
        if err["type"] == "missing":
            raise UserError(f"{where} is missing; add a line {key}=... to {path.name}") from None
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "literal_error":
            msg = "must be aws or sandbox"
        raise UserError(f"{where}={err.get('input')!r} {msg}") from None


def load_defaults(raw: dict[str, Any] | None) -> Defaults:
    """Validate the `remotefit:` section of invoke.yaml; a typo is an error that suggests the key."""
    raw = dict(raw or {})
    known = list(Defaults.model_fields)
    for key in raw:
        if key not in known:
            hint = did_you_mean(key, known, "see remotefit/config.py Defaults", cutoff=0.5)
            raise UserError(f"invoke.yaml: remotefit.{key} is not a known setting; {hint}")
    try:
        return Defaults(**raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        msg = str(err["msg"]).removeprefix("Value error, ")
        raise UserError(f"invoke.yaml: remotefit.{key}={err.get('input')!r}: {msg}") from None

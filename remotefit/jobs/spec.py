"""job.toml: what a job is (its command, setup, outputs, env, data) and how it is checked."""

from __future__ import annotations

import os
import posixpath
import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from remotefit.data import DataEntry, parse_data
from remotefit.errors import UserError, did_you_mean

DEFAULT_EXCLUDES = (".git/", ".venv/", "venv/", ".env/", "__pycache__/", "*.pyc", ".ipynb_checkpoints/", ".remotefit/")


class JobFile(BaseModel):
    """job.toml as written: every key it may hold, with its type (extra keys are refused). Paths, names and
    ranges are checked by load_job, whose messages name the key and the fix."""

    model_config = ConfigDict(extra="forbid")

    command: StrictStr | None = None
    setup: StrictStr = ""
    outputs: Any = "outputs"  # a path inside the job folder (inside_job says what is wrong with it)
    exclude: list[StrictStr] = []
    env: dict[str, StrictStr | StrictInt | StrictFloat | StrictBool] = {}  # values become strings
    pass_env: Any = []  # checked by load_job (names, optional ones ending in ?)
    gpu: StrictBool = False
    distributed: StrictBool = False
    requirements: Any = None  # a path inside the job folder
    data: Any = None  # the [data] table: remotefit/data.py parse_data
    tensorboard: Any = None  # a path inside the job folder
    sync_every: Any = None  # checked by load_job (a positive number of seconds)


JOB_KEYS = set(JobFile.model_fields)


DEFAULT_SYNC_EVERY = 60.0  # seconds between uploads of a run's outputs and log to the runs bucket


ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass
class Job:
    path: Path
    name: str
    command: str
    setup: str = ""
    outputs: str = "outputs"
    exclude: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    pass_env: list[str] = field(default_factory=list)  # names forwarded from the laptop's environment
    gpu: bool = False
    distributed: bool = False
    requirements: str | None = None
    sync_every: float = DEFAULT_SYNC_EVERY  # job.toml sync_every: seconds between uploads to the runs bucket
    data: list[DataEntry] = field(default_factory=list)  # job.toml [data]: fetched on the node (remotefit/data.py)
    tensorboard: str | None = None  # job.toml tensorboard: the log dir TensorBoard serves (remotefit/tensorboard.py)


def load_job(path: str | Path, cmd: str | None = None) -> Job:
    """Read a job folder and its optional job.toml; every problem names the file and line or flag."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"job folder {path} does not exist; give the path of a folder, e.g. jobs/resnet")
    if not p.is_dir():
        raise UserError(f"{path} is a file, not a job folder; give the folder that holds it")
    p = p.resolve()
    # The name becomes a path on the node, carried in rsync and shell arguments: a newline there
    # would send the files to one folder and run the job in another. Control characters and bytes
    # that are not UTF-8 cannot be carried safely; everything else (spaces, quotes, $) can.
    bad = next((ch for ch in p.name if ord(ch) < 32 or ord(ch) == 127 or 0xDC80 <= ord(ch) <= 0xDCFF), None)
    if bad is not None:
        what = "a byte that is not UTF-8" if ord(bad) >= 0xDC80 else f"the control character {bad!r}"
        raise UserError(f"job folder name {p.name!r} has {what}; rename the folder (letters, digits, spaces, -_.)")
    toml = p / "job.toml"
    spec = _read_job_file(toml)
    command = cmd or spec.get("command") or ("python train.py" if (p / "train.py").exists() else None)
    if not command:
        raise UserError(f'{path} has no train.py and no job.toml command; pass --cmd "python your_script.py"')
    requirements = spec.get("requirements") or ("requirements.txt" if (p / "requirements.txt").exists() else None)
    if requirements is not None:
        requirements = inside_job(p, requirements, f"{toml}: requirements")
    outputs = inside_job(p, spec.get("outputs", "outputs"), f"{toml}: outputs")
    entries = parse_data(p, spec.get("data"), str(toml), outputs)
    tensorboard = None if "tensorboard" not in spec else inside_job(p, spec["tensorboard"], f"{toml}: tensorboard")
    pass_env = spec.get("pass_env", [])
    if not isinstance(pass_env, list) or not all(
        isinstance(n, str) and ENV_NAME_RE.fullmatch(n.removesuffix("?")) for n in pass_env
    ):
        raise UserError(
            f'{toml}: pass_env must be a list of variable names, e.g. pass_env = ["WANDB_API_KEY", "HF_TOKEN?"] '
            "(a trailing ? makes one optional)"
        )
    sync_every = spec.get("sync_every")
    sync_every = DEFAULT_SYNC_EVERY if sync_every is None else sync_every
    if isinstance(sync_every, bool) or not isinstance(sync_every, int | float) or not 0 < sync_every <= 86400:
        raise UserError(
            f"{toml}: sync_every must be a positive number of seconds (at most 86400), e.g. sync_every = 60; "
            f"got {sync_every!r}"
        )
    return Job(
        path=p,
        name=p.name,
        command=str(command),
        setup=spec["setup"],
        outputs=outputs,
        exclude=list(spec["exclude"]),
        env={k: _env_value(v) for k, v in spec["env"].items()},
        pass_env=list(pass_env),
        gpu=spec["gpu"],
        distributed=spec["distributed"],
        requirements=requirements,
        sync_every=float(sync_every),
        data=entries,
        tensorboard=tensorboard,
    )


def _read_job_file(toml: Path) -> dict[str, Any]:
    """job.toml through JobFile (all its keys, defaults filled in; every key when there is no file); an
    unknown key or a wrong type is one line naming the file and the key."""
    raw: dict[str, Any] = {}
    if toml.exists():
        try:
            raw = tomllib.loads(toml.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise UserError(f"{toml}:{_toml_line(exc, toml)}: not valid TOML ({str(exc).split(' (at')[0]})") from None
    for key in raw:
        if key not in JOB_KEYS:
            hint = did_you_mean(key, sorted(JOB_KEYS), f"known keys: {', '.join(sorted(JOB_KEYS))}")
            raise UserError(f"{toml}: unknown key {key!r}; {hint}")
    try:
        model = JobFile(**raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(x) for x in err["loc"])
        raise UserError(
            f"{toml}: {key} = {err.get('input')!r} has the wrong type ({err['msg'].lower()}); see jobs/resnet/job.toml "
            "for the format"
        ) from None
    spec = model.model_dump()
    if "tensorboard" not in raw:
        spec.pop("tensorboard")  # absent and `tensorboard = ...` differ: only a given one is checked
    return spec


def _env_value(v: object) -> str:
    """A job.toml [env] value as the job sees it (a number or a boolean as Python writes it)."""
    return str(v)


def passed_env(
    job: Job, cli: Sequence[str] = (), environ: dict[str, str] | None = None
) -> tuple[dict[str, str], list[str]]:
    """The variables forwarded to the job from this machine's environment: job.toml's pass_env plus
    `--env NAME` / `--env NAME=VALUE`. Returns (values, warnings). The values travel only on the start
    command's stdin into the runner's memory: never into a file (here or on the node), run.json or a log."""
    environ = dict(os.environ) if environ is None else environ
    values: dict[str, str] = {}
    warnings: list[str] = []
    for raw in job.pass_env:
        name, optional = raw.removesuffix("?"), raw.endswith("?")
        if name in environ:
            values[name] = environ[name]
        elif optional:
            warnings.append(f"warning: {name} (job.toml pass_env, optional) is not set here; the job runs without it")
        else:
            raise UserError(
                f"{name} (job.toml pass_env) is not set in this environment; export it, or write {name}? to make "
                "it optional"
            )
    for item in cli:
        name, eq, value = item.partition("=")
        if not ENV_NAME_RE.fullmatch(name):
            raise UserError(f"--env {item.split('=')[0]!r} is not a variable name; use --env NAME or --env NAME=VALUE")
        if eq:
            values[name] = value
        elif name in environ:
            values[name] = environ[name]
        else:
            raise UserError(
                f"--env {name}: {name} is not set in this environment; export it or pass --env {name}=VALUE"
            )
    reserved = sorted(n for n in values if n.startswith("REMOTEFIT_"))
    if reserved:
        raise UserError(f"{reserved[0]} is set by remotefit itself (see the README's job environment); rename it")
    return values, warnings


def inside_job(folder: Path, value: object, where: str) -> str:
    """`value` as a clean relative path inside the job folder, or a UserError naming `where`.

    job.toml paths become paths on the node (outputs is renamed and replaced with a symlink there),
    and on the sandbox or with --local the node is this machine: nothing may point outside."""
    fix = "use a relative path inside the job folder, e.g. outputs"
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{where} must be a non-empty string; {fix}")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise UserError(f"{where} = {value!r} has a control character; {fix}")
    pure = posixpath.normpath(value)
    if value.startswith(("/", "~")) or pure in (".", "") or pure == ".." or pure.startswith("../"):
        raise UserError(f"{where} = {value!r} is not inside the job folder; {fix}")
    # A symlink in the job folder must not lead the path out of it either.
    parent = (folder / pure).parent.resolve()
    if parent != folder and folder not in parent.parents:
        raise UserError(f"{where} = {value!r} leads out of the job folder through a symlink; {fix}")
    return pure


def _toml_line(exc: tomllib.TOMLDecodeError, toml: Path) -> int | str:
    """The line of a TOML error: .lineno from Python 3.14, parsed from the message before that."""
    if getattr(exc, "lineno", None):
        return int(exc.lineno)  # type: ignore[attr-defined]
    m = re.search(r"at line (\d+)", str(exc))
    if m:
        return int(m.group(1))
    if "end of document" in str(exc):
        return max(1, len(toml.read_text().splitlines()))
    return "?"

"""Data in, on the node: job.toml's `[data]` table, fetched into a per-node cache before a run starts.

    [data]
    "data/cifar" = "s3://my-bucket/datasets/cifar10/"                  # an S3 prefix (ends in /): synced
    "data/one.bin" = "s3://my-bucket/datasets/one.bin"                  # one S3 object
    "data/vocab.txt" = "https://example.org/vocab.txt"                  # one file over HTTP(S)
    "data/big.tar" = { url = "https://example.org/big.tar", sha256 = "<64 hex>" }   # checksum verified

Each node runs remotefit/node/fetch.py (sent on the command's stdin, like runner.py) with a Python that has
boto3: the tool venv the node's user data installs (/opt/remotefit-tools), or the one named by
REMOTEFIT_TOOLS_PYTHON in the node's ssh environment (the sandbox's). It fetches only what is missing or
changed into <workdir>/data-cache (shared by every job and run of that node) and links each target in the
job folder to the cached copy (a symlink; cached files are read-only). The targets never travel with the
job's rsync. Credentials: the node's instance profile on EC2, the node's own IMDS on the sandbox (with
moto's endpoint); never the laptop's own keys.
"""

from __future__ import annotations

import json
import posixpath
import re
import shlex
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from remotefit.errors import UserError
from remotefit.node import NODE_DIR, contract
from remotefit.proc import echo

if TYPE_CHECKING:
    from remotefit.transport import Transport
    from remotefit.workspace import Workspace

FETCHER = NODE_DIR / "fetch.py"
TOOLS_PYTHON = contract.TOOLS_PYTHON  # installed by templates/user_data.sh.tftpl
SCHEMES = ("s3://", "http://", "https://")
BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
FETCH_FAILED = 5  # fetch.py's exit status when something could not be fetched or verified


@dataclass(frozen=True)
class DataEntry:
    """One `[data]` line: where the job sees it (relative to its folder), and where it comes from."""

    target: str
    url: str
    sha256: str | None = None

    @property
    def bucket(self) -> str | None:
        return self.url[5:].split("/", 1)[0] if self.url.startswith("s3://") else None

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "url": self.url, "sha256": self.sha256}


def parse_data(folder: Path, raw: object, where: str, outputs: str) -> list[DataEntry]:
    """The `[data]` table of job.toml as entries; every problem is one line naming the entry and the fix."""
    from remotefit.jobs import inside_job

    if raw is None:
        return []
    example = '"data/cifar" = "s3://bucket/prefix/"'
    if not isinstance(raw, dict):
        raise UserError(f"{where}: data must be a table ([data] with lines like {example})")
    entries: list[DataEntry] = []
    for target, value in raw.items():
        name = f"{where}: [data] {target!r}"
        if isinstance(value, dict):
            extra = sorted(set(value) - {"url", "sha256"})
            if extra:
                raise UserError(f'{name} has unknown key {extra[0]!r}; use {{ url = "...", sha256 = "..." }}')
            url, sha = value.get("url"), value.get("sha256")
        else:
            url, sha = value, None
        if not isinstance(url, str) or not url:
            raise UserError(
                f'{name} needs a URL: "s3://bucket/prefix/", "https://host/file" or {{ url = "...", sha256 = "..." }}'
            )
        if not url.startswith(SCHEMES):
            scheme = url.split("://", 1)[0] + "://" if "://" in url else url
            raise UserError(f"{name}: unsupported URL scheme in {scheme!r}; use s3://, https:// or http://")
        if sha is not None:
            if not isinstance(sha, str) or not SHA256_RE.fullmatch(sha.lower()):
                raise UserError(f"{name}: sha256 must be 64 hex digits (`sha256sum FILE` prints it), not {sha!r}")
            if url.startswith("s3://"):
                raise UserError(f"{name}: sha256 is for http(s) files; S3 objects are checked by size and ETag")
            sha = sha.lower()
        if url.startswith("s3://"):
            bucket = url[5:].split("/", 1)[0]
            if not BUCKET_RE.fullmatch(bucket):
                raise UserError(f"{name}: {bucket!r} is not an S3 bucket name (s3://BUCKET/prefix/)")
        elif not url.split("://", 1)[1].split("/", 1)[0]:
            raise UserError(f"{name}: {url!r} has no host")
        rel = inside_job(folder, target, name.replace(" [data] ", " [data] target "))
        for other, what in [(outputs, "the outputs folder"), *[(e.target, f"[data] {e.target!r}") for e in entries]]:
            if _overlaps(rel, other):
                raise UserError(f"{name} overlaps {what} ({other}); give each its own path")
        entries.append(DataEntry(rel, url, sha))
    return entries


def _overlaps(a: str, b: str) -> bool:
    a, b = posixpath.normpath(a), posixpath.normpath(b)
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def excludes(entries: Sequence[DataEntry]) -> list[str]:
    """rsync excludes for the targets: anchored, so the laptop's own copy never travels (nor is deleted
    on the node, where the target is a link into the cache)."""
    return [f"/{e.target}" for e in entries]


def check_buckets(entries: Sequence[DataEntry], allowed: Sequence[str], where: str) -> None:
    """Refuse an S3 bucket the node role may not read (the role lists exactly the --data-bucket names)."""
    for e in entries:
        if e.bucket is not None and e.bucket not in allowed:
            have = ", ".join(allowed) or "none"
            raise UserError(
                f"{where}: [data] {e.target!r}: the nodes may not read bucket {e.bucket} (allowed: {have}); "
                f"run `inv apply --data-bucket {e.bucket}` (repeat the flag for each bucket)"
            )


def allowed_buckets(ws: Workspace) -> list[str]:
    """The buckets the applied node role may read (saved with the node variables by `inv apply`)."""
    from remotefit.nodes import load_node_vars

    return list((load_node_vars(ws) or {}).get("data_buckets") or [])


def valid_bucket(name: str) -> str:
    if not BUCKET_RE.fullmatch(name) or ".." in name:
        raise UserError(f"--data-bucket {name!r} is not an S3 bucket name (3-63 of a-z 0-9 . -)")
    return name


# -- running the fetcher on the nodes -------------------------------------------------------------
def fetch_command(t: Transport, job_name: str) -> str:
    """One shell line: install fetch.py from stdin (after the spec's JSON line) and run it with the tool
    Python, reading the spec on its stdin."""
    base = t.node.workdir
    rdir = f"{base}/.remotefit"
    q = shlex.quote
    python = t.tools_python()
    # --base: refused (exit 3) while a run is active, like the sync it runs beside: a running job's data is
    # never replaced under it.
    return (
        f"IFS= read -r RF_SPEC && mkdir -p {q(rdir)} && cat > {q(rdir)}/fetch.py.$$ && "
        f"mv -f {q(rdir)}/fetch.py.$$ {q(rdir)}/fetch.py && "
        f"printf '%s\\n' \"$RF_SPEC\" | {python} {q(rdir)}/fetch.py "
        f"--cache {q(base + '/data-cache')} --job-dir {q(base + '/jobs/' + job_name)} --base {q(base)}"
    )


def fetch_input(entries: Sequence[DataEntry], aws_env: dict[str, str]) -> str:
    spec = {"entries": [e.to_dict() for e in entries], "aws_env": aws_env}
    return json.dumps(spec) + "\n" + FETCHER.read_text()


NOT_FOR_NODES = ("AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def node_aws_env(ws: Workspace | None) -> dict[str, str]:
    """What node-side code (the fetcher, the uploader) needs to reach S3: the region, plus on the sandbox its
    moto endpoint (Workspace.aws_env). Never a profile or a key: the node's credentials come from its
    metadata service, the instance profile on EC2 and the sandbox node's own IMDS alike."""
    if ws is None:
        return {}
    return {k: v for k, v in ws.aws_env().items() if k not in NOT_FOR_NODES}


def fetch(ts: Sequence[Transport], entries: Sequence[DataEntry], job_name: str, aws_env: dict[str, str]) -> None:
    """Fetch the job's data on every node in parallel, printing their progress; a failure is one line."""
    if not entries:
        return
    stdin = fetch_input(entries, aws_env)
    lock = threading.Lock()
    prefix = len(ts) > 1

    def one(t: Transport) -> tuple[int, str]:
        proc = t.popen(fetch_command(t, job_name), stdin=True, text=True, merge_stderr=True)
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(stdin)
            proc.stdin.close()
        except BrokenPipeError:
            pass
        last_error = last_line = ""
        for line in proc.stdout:
            line = line.rstrip("\n")
            if line.startswith("fetch: error: "):
                last_error = line.removeprefix("fetch: error: ")
                continue
            last_line = line
            with lock:
                echo(f"{t.node.alias}: {line}" if prefix else line)
        code = proc.wait()
        if code and not last_error:
            last_error = last_line or f"the data fetcher exited with {code}"
        return code, last_error

    with ThreadPoolExecutor(max_workers=len(ts)) as pool:
        results = list(pool.map(one, ts))
    for t, (code, err) in zip(ts, results, strict=True):
        if code == 127:  # bash: the tool Python is not there
            raise UserError(
                f"{t.node.alias}: no tool Python for the data fetcher ({err}); the node's boot installs it in "
                f"{TOOLS_PYTHON}: see its boot log, or `inv apply` a fresh node"
            )
        if code:
            raise UserError(f"{t.node.alias}: data not fetched, the run was not started: {err}")

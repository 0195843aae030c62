"""Runs kept in the runs bucket: where each run's results live once its nodes are gone.

Layout under `<stage>/<job>/<run-id>/` (the node role may write only under its own `<stage>/`):
    record.json            what the laptop knew when it started the run (jobs.RunRecord), put at launch
    outputs/<path>         rank 0's outputs folder, uploaded while the run lives and once more at its end
    logs/node-<rank>.log   each node's log, the same way
    status/node-<rank>.json  each node's final status from the runner (exit code, start, end), last

A run folder pulled from here holds the same files as one pulled from the node (jobs.pull_run): the
outputs at the top, `log` (node 0's), `logs/node-N.log` for several nodes, and run.json written last.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path
from typing import Any

from remotefit.errors import UserError, aws_error_code
from remotefit.proc import atomic_write

RECORD = "record.json"


def run_prefix(stage: str, job: str, run_id: str) -> str:
    return f"{stage}/{job}/{run_id}"


def status_key(rank: int) -> str:
    return f"status/node-{rank}.json"


def log_key(rank: int) -> str:
    return f"logs/node-{rank}.log"


@dataclass(frozen=True)
class KeptRun:
    """One run as the runs bucket has it."""

    job: str
    run_id: str
    statuses: dict[int, dict[str, Any]]  # rank -> the runner's final status, for the nodes that sent one
    node_count: int | None  # from record.json, when the laptop put one

    @property
    def state(self) -> str:
        """finished (every node's final status is here), or partial (still running, or cut short)."""
        if self.node_count and len(self.statuses) >= self.node_count:
            return "finished"
        return "partial"


class RunsBucket:
    """The runs bucket of one stage, read (and the run record written) through a boto3 S3 client."""

    def __init__(self, s3: Any, bucket: str, stage: str) -> None:
        self.s3, self.bucket, self.stage = s3, bucket, stage

    def _error(self, exc: Exception, action: str) -> UserError:
        code = aws_error_code(exc)
        if code in ("NoSuchBucket", "404"):
            return UserError(f"the runs bucket {self.bucket} does not exist: run `inv backend` to create it")
        if code in ("AccessDenied", "403", "AllAccessDisabled"):
            return UserError(
                f"access denied: {action} on the runs bucket {self.bucket}; allow it in your IAM policy "
                "(docs/iam-policy.json, YOUR-RUNS-BUCKET)"
            )
        return UserError(f"cannot {action} in the runs bucket {self.bucket}: {' '.join(str(exc).split())[:300]}")

    def put_record(self, record: dict[str, Any]) -> None:
        """At launch: what the laptop knows of the run, so it can be pulled from anywhere later."""
        from botocore.exceptions import BotoCoreError, ClientError

        key = f"{run_prefix(self.stage, record['job'], record['run_id'])}/{RECORD}"
        try:
            self.s3.put_object(Bucket=self.bucket, Key=key, Body=json.dumps(record, indent=2).encode())
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, "s3:PutObject") from None

    def _list(self, prefix: str) -> list[dict[str, Any]]:
        from botocore.exceptions import BotoCoreError, ClientError

        out: list[dict[str, Any]] = []
        try:
            for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                out += page.get("Contents", [])
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, "s3:ListBucket") from None
        return out

    def _json(self, key: str) -> dict[str, Any] | None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            body = self.s3.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise self._error(exc, "s3:GetObject") from None
        except BotoCoreError as exc:
            raise self._error(exc, "s3:GetObject") from None
        try:
            value = json.loads(body)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None

    def runs(self) -> list[KeptRun]:
        """Every run of this stage the bucket holds anything of."""
        found: dict[tuple[str, str], dict[str, Any]] = {}
        for obj in self._list(f"{self.stage}/"):
            parts = obj["Key"].split("/")
            if len(parts) < 4:
                continue
            entry = found.setdefault((parts[1], parts[2]), {"statuses": {}, "record": False})
            rest = "/".join(parts[3:])
            if rest == RECORD:
                entry["record"] = True
            elif rest.startswith("status/node-") and rest.endswith(".json"):
                entry["statuses"][int(rest[len("status/node-") : -len(".json")])] = obj["Key"]
        kept = []
        for (job, run_id), entry in sorted(found.items()):
            record = self._json(f"{run_prefix(self.stage, job, run_id)}/{RECORD}") if entry["record"] else None
            statuses = {rank: self._json(key) or {} for rank, key in entry["statuses"].items()}
            count = len(record["nodes"]) if record and isinstance(record.get("nodes"), list) else None
            kept.append(KeptRun(job, run_id, statuses, count))
        return kept

    def find(self, run_id: str) -> KeptRun | None:
        return next((r for r in self.runs() if r.run_id == run_id), None)

    def record(self, job: str, run_id: str) -> dict[str, Any] | None:
        return self._json(f"{run_prefix(self.stage, job, run_id)}/{RECORD}")

    def last_upload(self, job: str, run_id: str) -> str | None:
        """When the run's newest object arrived (ISO 8601, UTC): the end of a run cut short, as far as
        anyone can know."""
        times = [
            o["LastModified"] for o in self._list(run_prefix(self.stage, job, run_id) + "/") if o.get("LastModified")
        ]
        return max(times).astimezone(UTC).isoformat() if times else None

    def log(self, job: str, run_id: str, rank: int = 0) -> bytes | None:
        from botocore.exceptions import ClientError

        key = f"{run_prefix(self.stage, job, run_id)}/{log_key(rank)}"
        try:
            return self.s3.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise self._error(exc, "s3:GetObject") from None

    def download(self, job: str, run_id: str, dest: Path, node_count: int) -> list[dict[str, Any]]:
        """Outputs and logs into `dest` laid out as a pull from the node would; return the nodes' statuses
        (empty dicts for nodes that sent none)."""
        from botocore.exceptions import BotoCoreError, ClientError

        prefix = run_prefix(self.stage, job, run_id) + "/"
        for obj in self._list(prefix):
            rest = obj["Key"][len(prefix) :]
            if rest.startswith("outputs/"):
                target = dest / rest[len("outputs/") :]
            elif rest == log_key(0):
                target = dest / "log"
            elif rest.startswith("logs/") and node_count > 1:
                target = dest / rest
            else:
                continue
            # A key is a name, not a path: nothing may land outside dest ("outputs/../../x").
            if ".." in Path(rest).parts or not target.resolve().is_relative_to(dest.resolve()):
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            part = target.with_name(f".{target.name}.part")
            try:
                self.s3.download_file(self.bucket, obj["Key"], str(part))
            except (ClientError, BotoCoreError) as exc:
                part.unlink(missing_ok=True)
                raise self._error(exc, "s3:GetObject") from None
            os.replace(part, target)
        if node_count > 1 and (dest / "log").exists():
            (dest / "logs").mkdir(exist_ok=True)
            shutil.copyfile(dest / "log", dest / "logs" / "node-0.log")
        return [self._json(f"{prefix}{status_key(rank)}") or {} for rank in range(node_count)]


def write_run_json(dest: Path, info: dict[str, Any]) -> None:
    atomic_write(dest / "run.json", json.dumps(info, indent=2))

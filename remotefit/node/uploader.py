#!/usr/bin/env python3
"""remotefit node uploader: keep a run's results in the runs bucket while it lives, and once more at its end.

Runs on the node beside a run (started by the runner's supervisor), under a Python that has boto3 (the
node's tool venv; on the sandbox, this checkout's). Every ``--every`` seconds it uploads the files of the
run's outputs folder and its log that are new or changed since the last pass (by size and mtime), so a
cost guard, a spot interruption or ``inv destroy`` never takes more than the last interval with it. When
``--stop-file`` appears (the job has ended) it makes one final pass, retrying for at most
``--final-timeout`` seconds, writes ``--done-file`` with what it uploaded, and exits.

Keys: ``<prefix>/outputs/<relative path>`` and ``<prefix>/<log key>``. Symlinks are never followed (a
link out of the outputs folder must not upload the node's files). Files are never deleted in the bucket:
a result a job removed stays. Credentials and endpoint come from boto3's usual chain: the instance
profile through IMDSv2 on EC2, ``AWS_ENDPOINT_URL`` and test keys on the sandbox. Upload errors are
logged and retried on the next pass; they never stop or slow the job (this is a separate process).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

MULTIPART_THRESHOLD = 8 * 1024 * 1024
# Errors that another try cannot mend (the bucket is missing, the role may not write there): the final
# pass stops at once rather than hold the run open for minutes, and says why.
PERMANENT = ("NoSuchBucket", "AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId", "InvalidBucketName")


def log(msg: str) -> None:
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} uploader: {msg}", flush=True)


def scan(
    outputs: Path | None, log_file: Path | None, log_key: str, also: dict[str, Path] | None = None
) -> dict[str, tuple[Path, int, int]]:
    """key (relative to the prefix) -> (path, size, mtime_ns) of every regular file to keep."""
    found: dict[str, tuple[Path, int, int]] = {}
    for key, path in (also or {}).items():
        if path.is_file() and not path.is_symlink():
            st = path.stat()
            found[key] = (path, st.st_size, st.st_mtime_ns)
    if outputs is not None and outputs.is_dir() and not outputs.is_symlink():
        for root, dirs, files in os.walk(outputs, followlinks=False):
            dirs[:] = sorted(d for d in dirs if not os.path.islink(os.path.join(root, d)))
            for name in sorted(files):
                path = Path(root, name)
                try:
                    st = path.lstat()
                except OSError:
                    continue  # removed while we looked
                if path.is_symlink() or not path.is_file():
                    continue
                rel = path.relative_to(outputs).as_posix()
                found[f"outputs/{rel}"] = (path, st.st_size, st.st_mtime_ns)
    if log_file is not None and log_file.is_file() and not log_file.is_symlink():
        st = log_file.stat()
        found[log_key] = (log_file, st.st_size, st.st_mtime_ns)
    return found


def why(exc: Exception) -> str:
    """S3's error code when there is one (boto3's upload errors wrap it in a long message), else the text."""
    # (a connection dropped mid-request, botocore's ConnectionClosedError, has `response = None`)
    code = (getattr(exc, "response", None) or {}).get("Error", {}).get("Code")
    found = re.search(r"An error occurred \((\w+)\)", str(exc))
    return str(code or (found.group(1) if found else " ".join(str(exc).split())[:200]))


class Uploader:
    """One run's uploads: remembers what it sent, so each pass sends only what changed."""

    def __init__(self, s3: object, bucket: str, prefix: str, transfer_config: object = None) -> None:
        self.s3, self.bucket, self.prefix = s3, bucket, prefix.strip("/")
        self.transfer_config = transfer_config
        self.sent: dict[str, tuple[int, int]] = {}
        self.files = 0
        self.bytes = 0

    def key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}"

    def upload_pass(
        self, outputs: Path | None, log_file: Path | None, log_key: str, also: dict[str, Path] | None = None
    ) -> tuple[int, int, list[str]]:
        """Upload what changed; return (files, bytes, errors). An error leaves that file for the next pass.
        `also` (key -> file) goes last: the run's status follows its results."""
        files = size = 0
        errors: list[str] = []
        found = scan(outputs, log_file, log_key)
        found |= scan(None, None, log_key, also)
        for rel, (path, st_size, mtime) in found.items():
            if self.sent.get(rel) == (st_size, mtime):
                continue
            try:
                self.s3.upload_file(str(path), self.bucket, self.key(rel), Config=self.transfer_config)  # type: ignore[attr-defined]
            except Exception as exc:  # noqa: BLE001 - any failure is retried next pass, never fatal
                errors.append(f"{rel}: {why(exc)}")
                continue
            self.sent[rel] = (st_size, mtime)
            files += 1
            size += st_size
        self.files += files
        self.bytes += size
        return files, size, errors

    def put_json(self, rel: str, obj: object) -> None:
        self.s3.put_object(Bucket=self.bucket, Key=self.key(rel), Body=json.dumps(obj, indent=2).encode())  # type: ignore[attr-defined]


def restore(
    s3: object, bucket: str, prefix: str, outputs: Path, staging: Path, transfer_config: object = None
) -> tuple[int, int]:
    """`--resume`: bring an earlier run's outputs (``<prefix>/outputs/...``) into this run's outputs folder,
    before its job starts. Each file is downloaded into ``staging`` and renamed into place, so the uploader
    beside the job never sees (or keeps) half a file. A key that would land outside the folder is skipped."""
    src = prefix.strip("/") + "/outputs/"
    files = size = 0
    staging.mkdir(parents=True, exist_ok=True)
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=src):  # type: ignore[attr-defined]
        for obj in page.get("Contents", []):
            rel = obj["Key"][len(src) :]
            parts = Path(rel).parts
            if not rel or rel.endswith("/") or rel.startswith("/") or ".." in parts:
                continue
            part = staging / f"{files}.part"
            s3.download_file(bucket, obj["Key"], str(part), Config=transfer_config)  # type: ignore[attr-defined]
            target = outputs.joinpath(*parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(part, target)
            files += 1
            size += int(obj.get("Size") or 0)
    return files, size


def make_client(region: str | None) -> tuple[object, object]:
    import boto3
    from boto3.s3.transfer import TransferConfig
    from botocore.config import Config

    # Standard retries with backoff inside each call; a call that still fails waits for the next pass.
    config = Config(
        retries={"max_attempts": 5, "mode": "standard"},
        connect_timeout=10,
        read_timeout=60,
        s3={"addressing_style": "path"} if os.environ.get("AWS_ENDPOINT_URL") else {},
    )
    s3 = boto3.client("s3", region_name=region, config=config)
    return s3, TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, max_concurrency=4)


def run(args: argparse.Namespace, s3: object = None, transfer_config: object = None) -> int:
    if s3 is None:
        s3, transfer_config = make_client(args.region)
    up = Uploader(s3, args.bucket, args.prefix, transfer_config)
    outputs = Path(args.outputs) if args.outputs else None
    log_file = Path(args.log) if args.log else None
    stop = Path(args.stop_file)
    also = {key: Path(path) for path, _, key in (a.rpartition("=") for a in args.also)}
    stopping = {"now": False}
    # SIGTERM (a spot notice, a shutdown) means: final pass now.
    if threading.current_thread() is threading.main_thread():  # (tests drive it from a thread)
        signal.signal(signal.SIGTERM, lambda *_: stopping.update(now=True))
    log(f"keeping s3://{args.bucket}/{up.prefix}/ every {args.every:g} s")
    # A job that ended before the client was ready (a short one) gets the final pass only, not two passes.
    while not (stop.exists() or stopping["now"]):
        files, size, errors = up.upload_pass(outputs, log_file, args.log_key, also)
        if files:
            log(f"uploaded {files} file(s), {size} bytes")
        for e in errors:
            log(f"will retry: {e}")
        deadline = time.monotonic() + args.every
        while time.monotonic() < deadline and not (stop.exists() or stopping["now"]):
            time.sleep(min(0.5, args.every))
    # The final pass: everything the run wrote, retried until it is all there or the time is up.
    deadline = time.monotonic() + args.final_timeout
    while True:
        files, size, errors = up.upload_pass(outputs, log_file, args.log_key, also)
        if not errors or time.monotonic() >= deadline or all(any(p in e for p in PERMANENT) for e in errors):
            break
        for e in errors:
            log(f"final pass, retrying: {e}")
        time.sleep(2)
    complete = not errors
    summary = {
        "files": up.files,
        "bytes": up.bytes,
        "complete": complete,
        "errors": errors[:5],
        "ended_at": time.time(),
    }
    if args.done_file:
        tmp = f"{args.done_file}.tmp"
        with open(tmp, "w") as fh:
            json.dump(summary, fh)
        os.replace(tmp, args.done_file)
    log(
        ("final upload complete" if complete else f"final upload INCOMPLETE ({len(errors)} file(s))")
        + f": {up.files} file(s), {up.bytes} bytes in all"
    )
    return 0 if complete else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="uploader.py", description="keep a run's results in the runs bucket")
    p.add_argument("--bucket", required=True, help="the runs bucket")
    p.add_argument("--prefix", default=None, help="<stage>/<job>/<run-id> (required unless --restore-from)")
    p.add_argument("--region", default=None, help="the bucket's region")
    p.add_argument("--outputs", default=None, help="the run's outputs folder")
    p.add_argument("--log", default=None, help="the run's log file")
    p.add_argument("--log-key", default="log", help="where the log goes under the prefix (logs/node-N.log)")
    p.add_argument("--also", action="append", default=[], help="PATH=KEY: one more file to keep (repeatable)")
    p.add_argument("--every", type=float, default=60.0, help="seconds between passes")
    p.add_argument("--stop-file", default=None, help="when this file exists: final pass, then exit")
    p.add_argument("--restore-from", default=None, help="PREFIX: download PREFIX/outputs/ into --outputs, then exit")
    p.add_argument("--done-file", default=None, help="written (JSON) after the final pass")
    p.add_argument("--final-timeout", type=float, default=180.0, help="seconds the final pass may retry")
    p.add_argument("--nice", type=int, default=10, help="lower this process's CPU priority by N (0: as is)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.restore_from:
        if not args.outputs:
            print("uploader: error: --restore-from needs --outputs", file=sys.stderr)
            return 2
        s3, transfer_config = make_client(args.region)
        outputs = Path(args.outputs)
        staging = outputs.parent / f".{outputs.name}.restoring"
        try:
            files, size = restore(s3, args.bucket, args.restore_from, outputs, staging, transfer_config)
        except Exception as exc:  # noqa: BLE001 - one line for the run's log, whatever boto3 raised
            print(
                f"uploader: error: cannot restore s3://{args.bucket}/{args.restore_from}/outputs/: {why(exc)}",
                file=sys.stderr,
            )
            return 1
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        log(f"restored {files} file(s), {size} bytes from s3://{args.bucket}/{args.restore_from.strip('/')}/outputs/")
        return 0
    if not (args.stop_file and args.prefix):
        print("uploader: error: --prefix and --stop-file are required", file=sys.stderr)
        return 2
    if args.every <= 0:
        print("uploader: error: --every must be a positive number of seconds", file=sys.stderr)
        return 2
    if args.nice:
        # Beside a training job the uploads take what CPU the job leaves: they must never slow it noticeably.
        # (Lowering one's own priority needs no privilege.)
        os.nice(args.nice)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())

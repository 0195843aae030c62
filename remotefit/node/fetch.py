#!/usr/bin/env python3
"""remotefit data fetcher: bring a job's `[data]` onto this node before its run starts.

Sent over ssh on stdin (like runner.py) and run with the node's tool Python (which has boto3). Reads one
JSON line on stdin: {"entries": [{"target", "url", "sha256"}], "aws_env": {...}}.

Cache (shared by every job and run of the node), under --cache:

    s3/<bucket>/<key>                   objects, read-only (0444)
    s3/<bucket>/.manifest.json          {key: {"size", "etag"}}: what is cached, as S3 listed it
    http/<sha256(url)[:24]>/<name>      one file per URL, with meta.json {url, etag, last_modified, size, sha256}

An S3 object is fetched when it is missing or its size or ETag changed (objects gone from a prefix are
removed); prefixes are fetched in parallel. An HTTP(S) file is fetched once and reused while its sha256
(when job.toml gives one) or the server's ETag/Last-Modified (a conditional request) says it is the same;
a broken download resumes with a Range request. Each target in the job folder becomes a symlink into the
cache. Progress goes to stdout; a failure is one `fetch: error: ...` line and exit 5.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor

EXIT_FAILED = 5
EXIT_BUSY = 3  # the runner's own code for "another run is active"
WORKERS = 16
CHUNK = 1 << 20
BIG = 64 << 20  # objects above this go through boto3's transfer manager (REMOTEFIT_FETCH_BIG overrides, for tests)
PROGRESS_EVERY = 2.0


class FetchError(Exception):
    pass


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def say(msg: str) -> None:
    print(msg, flush=True)


@contextlib.contextmanager
def locked(path: str):
    """One fetch at a time per cache (two jobs syncing the same prefix must not interleave)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_json(path: str, obj: object) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, sort_keys=True)
    os.replace(tmp, path)


def link(job_dir: str, target: str, source: str, cache: str) -> None:
    """<job_dir>/<target> -> source, replaced atomically; a real file or folder there is moved aside. The
    temporary link is made in the cache, not the job folder, where the sync running beside us may delete
    what it does not know."""
    path = os.path.join(job_dir, target)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.lexists(path) and not os.path.islink(path):
        os.rename(path, f"{path}.before-data-{int(time.time())}")
    if os.path.islink(path) and os.readlink(path) == source:
        return
    tmp = os.path.join(cache, f".link-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    os.symlink(source, tmp)
    os.replace(tmp, path)


class Meter:
    """Files and bytes fetched, printed every few seconds while it runs and once at the end."""

    def __init__(self, label: str, files: int, size: int) -> None:
        self.label, self.files, self.size = label, files, size
        self.done_files = self.done_bytes = 0
        self.start = self.last = time.monotonic()
        self.lock = threading.Lock()

    def add(self, nbytes: int, file_done: bool = False) -> None:
        with self.lock:
            self.done_bytes += nbytes
            self.done_files += int(file_done)
            now = time.monotonic()
            if now - self.last >= PROGRESS_EVERY:
                self.last = now
                rate = self.done_bytes / max(now - self.start, 1e-6)
                say(
                    f"fetch: {self.label}: {self.done_files}/{self.files} files, "
                    f"{human(self.done_bytes)}/{human(self.size)} ({human(rate)}/s)"
                )

    def summary(self, total_files: int, total_bytes: int) -> str:
        secs = time.monotonic() - self.start
        rate = self.done_bytes / max(secs, 1e-6)
        return (
            f"fetch: {self.label}: fetched {self.done_files} of {total_files} files, {self.done_bytes} bytes "
            f"({human(self.done_bytes)} of {human(total_bytes)}) in {secs:.1f} s ({human(rate)}/s)"
        )


# ------------------------------------------------------------------------------------------------ S3


def s3_client(workers: int):
    # botocore's session rather than boto3's: the same client, ~70 ms less to start (boto3's transfer
    # manager is imported only for a big object).
    try:
        import botocore.session
        from botocore.config import Config
    except ImportError:
        raise FetchError(
            f"boto3 is not installed for {sys.executable}; the node's boot installs it in /opt/remotefit-tools "
            "(see /var/log/remotefit-boot.log)"
        ) from None
    style = "path" if os.environ.get("AWS_ENDPOINT_URL") else "auto"
    cfg = Config(max_pool_connections=workers, retries={"max_attempts": 5}, s3={"addressing_style": style})
    return botocore.session.get_session().create_client("s3", config=cfg)


def fetch_s3(client, entry: dict, cache: str, job_dir: str) -> None:
    """Bring an object or a prefix into the node's cache (only what changed since the last fetch, by
    size and ETag; objects removed from a prefix leave it) and link it into the job folder."""
    url = entry["url"]
    bucket, _, key = url[5:].partition("/")
    root = os.path.join(cache, "s3", bucket)
    os.makedirs(root, exist_ok=True)
    manifest_path = os.path.join(root, ".manifest.json")
    manifest = read_json(manifest_path)
    is_prefix = key == "" or key.endswith("/")
    listed = list_s3(client, url, bucket, key, is_prefix)

    def path_of(k: str) -> str:
        full = os.path.normpath(os.path.join(root, k))
        if not full.startswith(root + os.sep):
            raise FetchError(f"{url}: object key {k!r} leads out of the cache")
        return full

    todo = []
    for k, info in sorted(listed.items()):
        p = path_of(k)
        have = manifest.get(k)
        if have != info or not os.path.isfile(p) or os.path.getsize(p) != info["size"]:
            todo.append((k, info, p))
    total = sum(i["size"] for i in listed.values())
    meter = Meter(entry["target"], len(todo), sum(i["size"] for _, i, _ in todo))
    if todo:
        say(f"fetch: {entry['target']}: {len(todo)} of {len(listed)} files to fetch ({human(meter.size)}) from {url}")
    mlock = threading.Lock()

    def get(item: tuple) -> None:
        k, info, p = item
        got, etag = download_s3_object(client, bucket, k, info, p, meter)
        with mlock:
            manifest[k] = {"size": got, "etag": etag}

    try:
        with ThreadPoolExecutor(max_workers=WORKERS) as pool:
            for _ in pool.map(get, todo):
                pass
    finally:
        if todo:
            write_json(manifest_path, manifest)  # what did arrive is not fetched again
    gone = [k for k in manifest if k.startswith(key) and k not in listed] if is_prefix else []
    for k in gone:  # a synced prefix: objects removed from S3 leave the cache too
        with contextlib.suppress(OSError):
            os.unlink(path_of(k))
        del manifest[k]
    if gone:
        write_json(manifest_path, manifest)
    say(meter.summary(len(listed), total))
    link(job_dir, entry["target"], path_of(key.rstrip("/")) if key.rstrip("/") else root, cache)


def list_s3(client, url: str, bucket: str, key: str, is_prefix: bool) -> dict:
    """{key: {size, etag}} of the object (or the prefix's objects), every S3 error as one line."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        listed = {}
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key)
        for page in pages:
            for obj in page.get("Contents", []):
                k = obj["Key"]
                if k.endswith("/") or (not is_prefix and k != key):
                    continue  # folder markers; another object that merely starts with the key
                listed[k] = {"size": int(obj["Size"]), "etag": obj["ETag"].strip('"')}
    except ClientError as exc:
        err = exc.response.get("Error", {})
        code = err.get("Code", "?")
        if code in ("AccessDenied", "403"):
            raise FetchError(
                f"{url}: access denied; the node role reads only the --data-bucket buckets: "
                f"`inv apply --data-bucket {bucket}`"
            ) from None
        if code == "NoSuchBucket":
            raise FetchError(f"{url}: no such bucket {bucket}") from None
        raise FetchError(f"{url}: listing failed ({code}: {err.get('Message', '')})") from None
    except BotoCoreError as exc:
        raise FetchError(f"{url}: {exc}") from None
    if not listed:
        raise FetchError(f"{url}: no objects there; check the bucket and prefix in job.toml [data]")
    return listed


def download_s3_object(client, bucket: str, k: str, info: dict, path: str, meter: Meter) -> tuple[int, str]:
    """One object into `path`, whole or not at all (read-only: the job reads the cache through a
    link and must not edit it); its (size, etag)."""
    from botocore.exceptions import BotoCoreError, ClientError

    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.part-{os.getpid()}-{threading.get_ident()}"
    try:
        if info["size"] > int(os.environ.get("REMOTEFIT_FETCH_BIG") or BIG):
            # ranged parts in parallel, retried: boto3's transfer manager
            from boto3.s3.transfer import S3Transfer

            S3Transfer(client).download_file(bucket, k, tmp, callback=meter.add)
            etag = info["etag"]
        else:
            resp = client.get_object(Bucket=bucket, Key=k)
            etag = resp["ETag"].strip('"')
            with open(tmp, "wb") as f:
                for chunk in resp["Body"].iter_chunks(CHUNK):
                    f.write(chunk)
                    meter.add(len(chunk))
        got = os.path.getsize(tmp)
        os.chmod(tmp, 0o444)
        os.replace(tmp, path)
    except (ClientError, BotoCoreError, OSError) as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise FetchError(f"s3://{bucket}/{k}: {exc}") from None
    meter.add(0, file_done=True)
    return got, etag


# ---------------------------------------------------------------------------------------------- HTTP


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_http(entry: dict, cache: str, job_dir: str) -> None:
    """Download a URL into the node's cache (revalidated with ETag/Last-Modified, resumed with Range,
    checked against job.toml's sha256) and link it into the job folder."""
    url, want = entry["url"], entry.get("sha256")
    folder = os.path.join(cache, "http", hashlib.sha256(url.encode()).hexdigest()[:24])
    name = os.path.basename(urllib.parse.urlparse(url).path) or "download"
    path, part = os.path.join(folder, name), os.path.join(folder, name + ".part")
    meta_path = os.path.join(folder, "meta.json")
    os.makedirs(folder, exist_ok=True)
    meta = read_json(meta_path)
    cached = os.path.isfile(path) and meta.get("url") == url
    meter = Meter(entry["target"], 1, 0)
    if cached and want and meta.get("sha256") == want:
        say(meter.summary(1, meta.get("size") or 0))  # the checksum pins the content: no request at all
        link(job_dir, entry["target"], path, cache)
        return
    offset = os.path.getsize(part) if os.path.isfile(part) else 0
    try:
        request = urllib.request.Request(url, headers=http_headers(meta, cached, offset))  # noqa: S310
        resp = urllib.request.urlopen(request, timeout=60)  # noqa: S310
    except urllib.error.HTTPError as exc:
        if exc.code == 304 and cached:
            if want and meta.get("sha256") != want:
                raise FetchError(
                    f"{entry['target']}: sha256 of {url} is {meta.get('sha256')}, job.toml says {want}; "
                    "fix the sha256 in job.toml (or the URL)"
                ) from None
            say(meter.summary(1, meta.get("size") or 0))
            link(job_dir, entry["target"], path, cache)
            return
        if exc.code == 416 and offset:
            os.unlink(part)
            return fetch_http(entry, cache, job_dir)
        raise FetchError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise FetchError(f"{url}: {getattr(exc, 'reason', exc)}") from None
    with resp:
        etag, modified = resp.headers.get("ETag"), resp.headers.get("Last-Modified")
        write_json(meta_path, {**meta, "url": meta.get("url", url), "partial_etag": etag})
        download_http(resp, entry, part, offset, meter)
    digest = sha256_of(part)
    if want and digest != want:
        os.unlink(part)
        raise FetchError(
            f"{entry['target']}: sha256 of {url} is {digest}, job.toml says {want}; fix the sha256 in job.toml "
            "(or the URL)"
        )
    size = os.path.getsize(part)
    os.chmod(part, 0o444)
    os.replace(part, path)
    write_json(meta_path, {"url": url, "etag": etag, "last_modified": modified, "size": size, "sha256": digest})
    meter.add(0, file_done=True)
    say(meter.summary(1, size))
    link(job_dir, entry["target"], path, cache)


def http_headers(meta: dict, cached: bool, offset: int) -> dict:
    """A revalidation of what the cache holds, or the resumption of a broken download."""
    headers = {"User-Agent": "remotefit-fetch"}
    if cached:
        if meta.get("etag"):
            headers["If-None-Match"] = meta["etag"]
        if meta.get("last_modified"):
            headers["If-Modified-Since"] = meta["last_modified"]
    if offset and not cached:
        headers["Range"] = f"bytes={offset}-"  # resume a broken download
        if meta.get("partial_etag"):
            headers["If-Range"] = meta["partial_etag"]
    return headers


def download_http(resp, entry: dict, part: str, offset: int, meter: Meter) -> None:
    """The response body into `part`: appended when the server resumed (206), else from the start."""
    resumed = resp.status == 206
    if not resumed:
        offset = 0
    length = resp.headers.get("Content-Length")
    meter.size = offset + (int(length) if length and length.isdigit() else 0)
    if resumed:
        say(f"fetch: {entry['target']}: resuming {entry['url']} at {offset} bytes")
    try:
        with open(part, "ab" if resumed else "wb") as f:
            while chunk := resp.read(CHUNK):
                f.write(chunk)
                meter.add(len(chunk))
    except OSError as exc:
        raise FetchError(f"{entry['url']}: download broke off ({exc}); the next run resumes it") from None


# ---------------------------------------------------------------------------------------------- main


def active_run(base: str | None) -> str | None:
    """The id of the run active on this node (the runner's own check, imported from beside this file, in
    this process: no second interpreter start), so a running job's data is never replaced under it."""
    runner_py = os.path.join(base or "", ".remotefit", "runner.py")
    if not base or not os.path.isfile(runner_py):
        return None
    sys.path.insert(0, os.path.dirname(runner_py))
    try:
        import runner
    except Exception:  # an older or broken runner copy: the sync beside us checks too
        return None
    finally:
        sys.path.pop(0)
    active = runner.current_active(runner.Layout(base), clean=False)
    return str(active.get("run_id")) if active else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fetch")
    p.add_argument("--cache", required=True)
    p.add_argument("--job-dir", required=True)
    p.add_argument("--base", help="the node's work directory: refuse while its runner has a run active")
    args = p.parse_args(argv)
    active = active_run(args.base)
    if active:
        print(f"fetch: error: run {active} is still active; cancel it or wait for it to finish", flush=True)
        return EXIT_BUSY
    try:
        spec = json.loads(sys.stdin.readline())
    except ValueError as exc:
        print(f"fetch: error: the spec on stdin is not JSON ({exc})", flush=True)
        return 2
    os.environ.update({str(k): str(v) for k, v in (spec.get("aws_env") or {}).items()})
    cache = os.path.abspath(os.path.expanduser(args.cache))
    job_dir = os.path.abspath(os.path.expanduser(args.job_dir))
    os.makedirs(cache, exist_ok=True)
    os.makedirs(job_dir, exist_ok=True)
    entries = spec.get("entries") or []
    start = time.monotonic()
    try:
        with locked(os.path.join(cache, ".lock")):
            client = None
            for entry in entries:
                if entry["url"].startswith("s3://"):
                    client = client or s3_client(WORKERS)
                    fetch_s3(client, entry, cache, job_dir)
                else:
                    fetch_http(entry, cache, job_dir)
    except FetchError as exc:
        print(f"fetch: error: {exc}", flush=True)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    say(f"fetch: data ready in {time.monotonic() - start:.1f} s (cache {cache})")
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)  # skips tearing down boto3's modules (~0.2 s): everything is written and closed

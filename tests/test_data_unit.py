"""job.toml [data] and tensorboard without nodes: parsing, bad inputs (one line each), rsync excludes, the
bucket check, the node role's policy variable, and the fetcher itself on this machine (moto in-process S3,
a local HTTP server)."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from remotefit import data, jobs, tensorboard
from remotefit.data import DataEntry
from remotefit.errors import UserError

SHA = "ab" * 32


def job(tmp_path: Path, toml: str, files: dict[str, str] | None = None) -> Path:
    folder = tmp_path / "j"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.py").write_text("print('hi')\n")
    (folder / "job.toml").write_text(toml)
    for rel, text in (files or {}).items():
        (folder / rel).write_text(text)
    return folder


def refused(tmp_path: Path, toml: str) -> str:
    with pytest.raises(UserError) as exc:
        jobs.load_job(job(tmp_path, toml))
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_data_entries_parse_plain_urls_and_inline_tables(tmp_path: Path) -> None:
    j = jobs.load_job(
        job(
            tmp_path,
            "[data]\n"
            '"data/cifar" = "s3://my-bucket/datasets/cifar10/"\n'
            '"./data/one.bin" = "s3://my-bucket/one.bin"\n'
            f'"data/vocab.txt" = {{ url = "https://example.org/vocab.txt", sha256 = "{SHA.upper()}" }}\n'
            '"extra/plain" = "http://example.org/x"\n',
        )
    )
    assert j.data == [
        DataEntry("data/cifar", "s3://my-bucket/datasets/cifar10/"),
        DataEntry("data/one.bin", "s3://my-bucket/one.bin"),
        DataEntry("data/vocab.txt", "https://example.org/vocab.txt", SHA),
        DataEntry("extra/plain", "http://example.org/x"),
    ]
    assert [e.bucket for e in j.data] == ["my-bucket", "my-bucket", None, None]
    assert jobs.load_job(job(tmp_path, 'command = "x"\n')).data == []


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ('[data]\n"../up" = "s3://b-1/x/"\n', "is not inside the job folder"),
        ('[data]\n"/abs" = "s3://b-1/x/"\n', "is not inside the job folder"),
        ('[data]\n"outputs/d" = "s3://b-1/x/"\n', "overlaps the outputs folder (outputs)"),
        ('outputs = "out"\n[data]\n"out" = "s3://b-1/x/"\n', "overlaps the outputs folder (out)"),
        ('[data]\n"d" = "s3://b-1/x/"\n"d/sub" = "s3://b-1/y/"\n', "overlaps [data] 'd'"),
        ('[data]\n"d" = "ftp://host/file"\n', "unsupported URL scheme in 'ftp://'; use s3://, https:// or http://"),
        ('[data]\n"d" = "/local/path"\n', "unsupported URL scheme"),
        ('[data]\n"d" = { url = "https://h/f", sha256 = "xyz" }\n', "sha256 must be 64 hex digits"),
        (f'[data]\n"d" = {{ url = "s3://b-1/f", sha256 = "{SHA}" }}\n', "sha256 is for http(s) files"),
        ('[data]\n"d" = { url = "https://h/f", md5 = "x" }\n', "unknown key 'md5'"),
        ('[data]\n"d" = 3\n', "needs a URL"),
        ('[data]\n"d" = "s3://Bad_Bucket/x/"\n', "is not an S3 bucket name"),
        ('[data]\n"d" = "https:///nohost"\n', "has no host"),
        ('data = "s3://b/x"\n', "data must be a table"),
        ('tensorboard = "../tb"\n', "tensorboard = '../tb' is not inside the job folder"),
        ("tensorboard = 3\n", "tensorboard must be a non-empty string"),
    ],
)
def test_bad_data_entries_are_one_line(tmp_path: Path, toml: str, expected: str) -> None:
    msg = refused(tmp_path, toml)
    assert expected in msg and "job.toml" in msg, msg


def test_data_targets_never_travel_with_the_job(tmp_path: Path) -> None:
    j = jobs.load_job(job(tmp_path, '[data]\n"data/cifar" = "s3://b-1/x/"\n"vocab.txt" = "https://h/v"\n'))
    (j.path / "data" / "cifar").mkdir(parents=True)
    (j.path / "data" / "cifar" / "big.bin").write_bytes(b"x" * 1000)
    (j.path / "data" / "keep.txt").write_text("synced\n")
    (j.path / "vocab.txt").write_text("local copy\n")
    _, excludes = jobs.filter_args(j)
    assert "/data/cifar" in excludes and "/vocab.txt" in excludes
    count, _, largest = jobs.plan_upload(j)
    names = {n for _, n in largest}
    assert "data/keep.txt" in names and "data/cifar/big.bin" not in names and "vocab.txt" not in names
    assert count == 3  # train.py, job.toml, data/keep.txt


def test_a_bucket_the_nodes_may_not_read_names_the_flag_to_add() -> None:
    entries = [DataEntry("d", "s3://allowed-b/x/"), DataEntry("e", "s3://other-b/y/"), DataEntry("f", "https://h/f")]
    data.check_buckets(entries[:1], ["allowed-b"], "job.toml")
    with pytest.raises(UserError) as exc:
        data.check_buckets(entries, ["allowed-b"], "j/job.toml")
    msg = str(exc.value)
    assert "j/job.toml: [data] 'e': the nodes may not read bucket other-b (allowed: allowed-b)" in msg
    assert "`inv apply --data-bucket other-b`" in msg
    with pytest.raises(UserError, match=r"allowed: none"):
        data.check_buckets(entries, [], "job.toml")


def test_data_bucket_flag_validation() -> None:
    assert data.valid_bucket("my.data-bucket1") == "my.data-bucket1"
    for bad in ("UPPER", "a", "-lead", "x" * 64, "a..b", "s3://b"):
        with pytest.raises(UserError, match="is not an S3 bucket name"):
            data.valid_bucket(bad)


def test_tensorboard_needs_it_in_the_requirements(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    j = jobs.load_job(job(tmp_path, 'tensorboard = "outputs/tb"\n', {"requirements.txt": "numpy\n"}))
    assert j.tensorboard == "outputs/tb"
    assert tensorboard.plan(j, False) is None
    line = capsys.readouterr().err.strip()
    assert line == (
        "tensorboard: not started: the job's requirements do not include it; add a line `tensorboard` to "
        "j/requirements.txt (its venv provides TensorBoard on the node)"
    )
    (j.path / "requirements.txt").write_text("numpy\ntensorboard>=2.10  # logs\n")
    assert tensorboard.plan(j, False) == tensorboard.Plan("outputs/tb")
    plain = jobs.load_job(job(tmp_path / "other", 'command = "python x.py"\n', {"requirements.txt": "tensorboard\n"}))
    assert tensorboard.plan(plain, False) is None  # neither the flag nor the key
    assert tensorboard.plan(plain, True) == tensorboard.Plan("outputs/tb")
    (plain.path / "requirements.txt").write_text("# tensorboard later\nnumpy\n")
    assert tensorboard.plan(plain, True) is None
    assert 10006 < tensorboard.remote_port("run-a") < 17006


# -- the node role's policy: through tfvars, never spliced ------------------------------------------
def test_data_buckets_reach_the_tfvars_sorted_and_deduplicated(tmp_path: Path) -> None:
    from remotefit.config import Defaults
    from remotefit.nodes import resolve_spec

    class Ws:
        defaults = Defaults(data_buckets=["b-two"])

    spec = resolve_spec(Ws(), data_bucket=["b-one", "b-two"])  # type: ignore[arg-type]
    assert spec.data_buckets == ("b-one", "b-two")
    with pytest.raises(UserError, match="--data-bucket 'Nope!' is not an S3 bucket name"):
        resolve_spec(Ws(), data_bucket=["Nope!"])  # type: ignore[arg-type]
    main = (Path(__file__).parent.parent / "templates" / "main.tf.j2").read_text()
    assert 'for b in var.data_buckets : "arn:${data.aws_partition.current.partition}:s3:::${b}/*"' in main
    data_policy = main[
        main.index('data "aws_iam_policy_document" "data"') : main.index('resource "aws_iam_role_policy" "data"')
    ]
    assert '"s3:GetObject"' in data_policy and "s3:PutObject" not in data_policy and '"s3:*"' not in main


# -- the fetcher on this machine ----------------------------------------------------------------------
@pytest.fixture
def moto_s3(monkeypatch: pytest.MonkeyPatch):
    from moto.server import ThreadedMotoServer

    srv = ThreadedMotoServer(port=0, verbose=False)
    srv.start()
    host, port = srv.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    yield env
    srv.stop()


@pytest.fixture
def web(tmp_path: Path):
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(root))
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def run_fetch(tmp_path: Path, entries: list[dict], aws_env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    spec = json.dumps({"entries": entries, "aws_env": aws_env}) + "\n"
    return subprocess.run(
        [sys.executable, str(data.FETCHER), "--cache", str(tmp_path / "cache"), "--job-dir", str(tmp_path / "job")],
        input=spec,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_fetcher_syncs_a_prefix_and_checks_http_files(tmp_path: Path, moto_s3: dict[str, str], web) -> None:
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=moto_s3["AWS_ENDPOINT_URL"],
        region_name="us-east-1",
        aws_access_key_id="t",
        aws_secret_access_key="t",
    )
    s3.create_bucket(Bucket="data-b")
    for i in range(12):
        s3.put_object(Bucket="data-b", Key=f"ds/sub/f{i:02d}.bin", Body=bytes([i]) * 1000)
    s3.put_object(Bucket="data-b", Key="ds-other/x", Body=b"not mine")
    root, url = web
    (root / "vocab.txt").write_text("a b c\n")
    good = hashlib.sha256(b"a b c\n").hexdigest()
    entries = [
        {"target": "data/ds", "url": "s3://data-b/ds/", "sha256": None},
        {"target": "data/vocab.txt", "url": f"{url}/vocab.txt", "sha256": good},
    ]
    first = run_fetch(tmp_path, entries, moto_s3)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "fetch: data/ds: fetched 12 of 12 files, 12000 bytes" in first.stdout
    assert "fetch: data/vocab.txt: fetched 1 of 1 files, 6 bytes" in first.stdout
    linked = tmp_path / "job" / "data" / "ds"
    assert linked.is_symlink() and sorted(p.name for p in (linked / "sub").iterdir())[:2] == ["f00.bin", "f01.bin"]
    assert (linked / "sub" / "f03.bin").read_bytes() == bytes([3]) * 1000
    assert (linked / "sub" / "f03.bin").stat().st_mode & 0o777 == 0o444  # the cache is read-only to the job
    assert (tmp_path / "job" / "data" / "vocab.txt").read_text() == "a b c\n"

    again = run_fetch(tmp_path, entries, moto_s3)
    assert "fetch: data/ds: fetched 0 of 12 files, 0 bytes" in again.stdout, again.stdout
    assert "fetch: data/vocab.txt: fetched 0 of 1 files, 0 bytes" in again.stdout

    s3.put_object(Bucket="data-b", Key="ds/sub/f05.bin", Body=b"changed")
    s3.delete_object(Bucket="data-b", Key="ds/sub/f06.bin")
    changed = run_fetch(tmp_path, entries, moto_s3)
    assert "fetch: data/ds: fetched 1 of 11 files, 7 bytes" in changed.stdout, changed.stdout
    assert (linked / "sub" / "f05.bin").read_bytes() == b"changed" and not (linked / "sub" / "f06.bin").exists()

    bad = run_fetch(tmp_path, [{**entries[1], "sha256": "0" * 64}], moto_s3)
    assert bad.returncode == data.FETCH_FAILED
    assert bad.stdout.strip().splitlines()[-1] == (
        f"fetch: error: data/vocab.txt: sha256 of {url}/vocab.txt is {good}, job.toml says {'0' * 64}; fix the "
        "sha256 in job.toml (or the URL)"
    )
    missing = run_fetch(tmp_path, [{"target": "m", "url": "s3://data-b/nothing-here/", "sha256": None}], moto_s3)
    assert missing.returncode == data.FETCH_FAILED and "no objects there" in missing.stdout
    gone = run_fetch(tmp_path, [{"target": "m", "url": f"{url}/nope.txt", "sha256": None}], moto_s3)
    assert gone.returncode == data.FETCH_FAILED and "HTTP 404" in gone.stdout


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves `body` with an ETag and byte ranges; records the Range headers it was asked for."""

    body = b""
    ranges: list[str | None] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        rng = self.headers.get("Range")
        type(self).ranges.append(rng)
        start = int(rng.split("=")[1].rstrip("-")) if rng else 0
        chunk = self.body[start:]
        self.send_response(206 if rng else 200)
        self.send_header("ETag", '"v1"')
        self.send_header("Content-Length", str(len(chunk)))
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{len(self.body) - 1}/{len(self.body)}")
        self.end_headers()
        self.wfile.write(chunk)

    def log_message(self, *args: object) -> None:
        pass


def test_a_broken_http_download_resumes_where_it_stopped(tmp_path: Path) -> None:
    body = bytes(range(256)) * 400  # 100 KB
    _RangeHandler.body, _RangeHandler.ranges = body, []
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RangeHandler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}/big.bin"
        folder = tmp_path / "cache" / "http" / hashlib.sha256(url.encode()).hexdigest()[:24]
        folder.mkdir(parents=True)
        (folder / "big.bin.part").write_bytes(body[:30000])  # what an interrupted run left
        (folder / "meta.json").write_text(json.dumps({"url": url, "partial_etag": '"v1"'}))
        sha = hashlib.sha256(body).hexdigest()
        res = run_fetch(tmp_path, [{"target": "d/big.bin", "url": url, "sha256": sha}], {})
        assert res.returncode == 0, res.stdout + res.stderr
        assert f"resuming {url} at 30000 bytes" in res.stdout
        assert "fetched 1 of 1 files, 72400 bytes" in res.stdout  # only the missing part came over the wire
        assert _RangeHandler.ranges == ["bytes=30000-"]
        assert (tmp_path / "job" / "d" / "big.bin").read_bytes() == body
    finally:
        srv.shutdown()


def test_the_fetcher_refuses_while_a_run_is_active(tmp_path: Path) -> None:
    """A running job's data is never replaced under it: fetch.py asks the node's runner (same check as the sync)."""
    import os
    import shutil

    base = tmp_path / "base"
    (base / ".remotefit").mkdir(parents=True)
    shutil.copy(Path(data.FETCHER).with_name("runner.py"), base / ".remotefit" / "runner.py")
    (base / "active.json").write_text(json.dumps({"run_id": "busy-run", "pid": os.getpid()}))
    spec = json.dumps({"entries": [{"target": "d", "url": "https://example.org/x", "sha256": None}]}) + "\n"
    argv = [sys.executable, str(data.FETCHER), "--cache", str(tmp_path / "c"), "--job-dir", str(tmp_path / "j")]
    res = subprocess.run([*argv, "--base", str(base)], input=spec, capture_output=True, text=True, timeout=60)
    assert res.returncode == 3
    assert res.stdout.strip() == "fetch: error: run busy-run is still active; cancel it or wait for it to finish"
    assert not (tmp_path / "c").exists()


def test_big_objects_go_through_the_transfer_manager(tmp_path: Path, moto_s3: dict[str, str]) -> None:
    import boto3

    s3 = boto3.client(
        "s3",
        region_name="us-east-1",
        endpoint_url=moto_s3["AWS_ENDPOINT_URL"],
        aws_access_key_id="t",
        aws_secret_access_key="t",
    )
    s3.create_bucket(Bucket="big-b")
    body = bytes(range(256)) * 12_000  # 3 MB, over the 1 MB threshold set below
    s3.put_object(Bucket="big-b", Key="one/model.bin", Body=body)
    s3.put_object(Bucket="big-b", Key="one/model.bin.extra", Body=b"another object that merely starts with the key")
    res = run_fetch(
        tmp_path,
        [{"target": "m.bin", "url": "s3://big-b/one/model.bin"}],
        {**moto_s3, "REMOTEFIT_FETCH_BIG": "1000000"},
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"fetch: m.bin: fetched 1 of 1 files, {len(body)} bytes" in res.stdout
    assert (tmp_path / "job" / "m.bin").read_bytes() == body

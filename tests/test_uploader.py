"""remotefit/node/uploader.py: a run's results kept in the runs bucket while it lives and at its end (moto)."""

from __future__ import annotations

import importlib.util
import json
import os
import threading
import time
from pathlib import Path

import boto3
import pytest
from moto import mock_aws

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("remotefit_node_uploader", ROOT / "remotefit" / "node" / "uploader.py")
uploader = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(uploader)

BUCKET, PREFIX = "runs-test", "dev/resnet/r1"


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        yield client


def keys(s3) -> dict[str, bytes]:
    out = {}
    for o in s3.list_objects_v2(Bucket=BUCKET).get("Contents", []):
        out[o["Key"]] = s3.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read()
    return out


def test_each_pass_sends_only_what_changed_and_never_follows_links(s3, tmp_path: Path):
    out, log = tmp_path / "outputs", tmp_path / "log"
    (out / "sub").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    (out / "sub" / "model.pt").write_bytes(os.urandom(1000))
    (out / "secret").symlink_to("/etc/passwd")
    (out / "linked").symlink_to(tmp_path)
    log.write_bytes(b"epoch 1\n\xff binary too\n")
    up = uploader.Uploader(s3, BUCKET, PREFIX)
    assert up.upload_pass(out, log, "log")[:2] == (3, 11 + 1000 + 22)
    assert up.upload_pass(out, log, "log")[:2] == (0, 0)  # nothing changed: nothing sent
    with log.open("ab") as fh:
        fh.write(b"epoch 2\n")
    files, _size, errors = up.upload_pass(out, log, "log")
    assert files == 1 and not errors
    got = keys(s3)
    assert set(got) == {f"{PREFIX}/outputs/metrics.jsonl", f"{PREFIX}/outputs/sub/model.pt", f"{PREFIX}/log"}
    assert got[f"{PREFIX}/log"] == log.read_bytes()  # byte for byte, invalid UTF-8 included
    assert got[f"{PREFIX}/outputs/sub/model.pt"] == (out / "sub" / "model.pt").read_bytes()


class Flaky:
    """An S3 client whose uploads fail `fails` times first (the endpoint unreachable for a while)."""

    def __init__(self, real, fails: int, error: Exception | None = None) -> None:
        self.real, self.fails = real, fails
        self.error = error or ConnectionError("Could not connect to the endpoint URL")

    def upload_file(self, *a, **kw):
        if self.fails > 0:
            self.fails -= 1
            raise self.error
        return self.real.upload_file(*a, **kw)


def test_errors_are_retried_and_never_lose_a_file(s3, tmp_path: Path):
    out = tmp_path / "outputs"
    out.mkdir()
    (out / "a.txt").write_text("a")
    up = uploader.Uploader(Flaky(s3, 1), BUCKET, PREFIX)
    files, _size, errors = up.upload_pass(out, None, "log")
    assert files == 0 and len(errors) == 1 and "Could not connect" in errors[0]
    assert up.upload_pass(out, None, "log")[0] == 1
    assert keys(s3) == {f"{PREFIX}/outputs/a.txt": b"a"}


def test_a_connection_dropped_mid_request_is_retried_too(s3, tmp_path: Path):
    """What a booted sandbox node saw with S3 gone: its endpoint accepted and closed (botocore's
    ConnectionClosedError, whose `response` is None); the uploader crashed reading its error code."""
    from botocore.exceptions import ConnectionClosedError

    out = tmp_path / "outputs"
    out.mkdir()
    (out / "a.txt").write_text("a")
    up = uploader.Uploader(Flaky(s3, 1, ConnectionClosedError(endpoint_url="http://127.0.0.1:9/b/k")), BUCKET, PREFIX)
    files, _size, errors = up.upload_pass(out, None, "log")
    assert files == 0 and len(errors) == 1 and "Connection was closed" in errors[0], errors
    assert up.upload_pass(out, None, "log")[0] == 1


def test_the_loop_uploads_while_running_then_a_final_pass_on_the_stop_file(s3, tmp_path: Path):
    out, log, stop, done = tmp_path / "outputs", tmp_path / "log", tmp_path / "stop", tmp_path / "done.json"
    out.mkdir()
    log.write_text("start\n")
    args = uploader.build_parser().parse_args(
        ["--bucket", BUCKET, "--prefix", PREFIX, "--outputs", str(out), "--log", str(log), "--every", "0.2",
         "--stop-file", str(stop), "--done-file", str(done), "--log-key", "logs/node-0.log"]
    )  # fmt: skip
    result: dict[str, int] = {}
    th = threading.Thread(target=lambda: result.update(code=uploader.run(args, Flaky(s3, 2), None)))
    th.start()
    try:
        deadline = time.monotonic() + 20
        while f"{PREFIX}/logs/node-0.log" not in keys(s3):  # two failed tries, then it is there
            assert time.monotonic() < deadline, "the running pass never uploaded the log"
            time.sleep(0.1)
        (out / "model.pt").write_bytes(b"weights")  # written at the very end of the job
        log.write_text("start\nend\n")
        stop.touch()
    finally:
        th.join(timeout=30)
    assert result["code"] == 0
    got = keys(s3)
    assert got[f"{PREFIX}/outputs/model.pt"] == b"weights" and got[f"{PREFIX}/logs/node-0.log"] == b"start\nend\n"
    summary = json.loads(done.read_text())
    assert summary["complete"] is True and summary["errors"] == []


def test_a_final_pass_that_cannot_finish_says_so(s3, tmp_path: Path):
    out, stop, done = tmp_path / "outputs", tmp_path / "stop", tmp_path / "done.json"
    out.mkdir()
    (out / "a").write_text("a")
    stop.touch()
    args = uploader.build_parser().parse_args(
        ["--bucket", BUCKET, "--prefix", PREFIX, "--outputs", str(out), "--stop-file", str(stop),
         "--done-file", str(done), "--final-timeout", "0"]
    )  # fmt: skip
    assert uploader.run(args, Flaky(s3, 99), None) == 1
    assert json.loads(done.read_text())["complete"] is False


def test_every_must_be_positive(capsys: pytest.CaptureFixture[str]):
    assert uploader.main(["--bucket", "b", "--prefix", "p", "--stop-file", "/x", "--every", "0"]) == 2
    assert capsys.readouterr().err.strip() == "uploader: error: --every must be a positive number of seconds"


def test_restore_brings_an_earlier_runs_outputs_back_whole_and_only_inside_the_folder(s3, tmp_path: Path):
    blob = os.urandom(9 * 1024 * 1024)  # above the multipart threshold
    s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/outputs/checkpoint.pt", Body=blob)
    s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/outputs/sub/metrics.jsonl", Body=b'{"step": 40}\n')
    s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/outputs/../../escape", Body=b"no")
    s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/logs/node-0.log", Body=b"not an output")
    s3.put_object(Bucket=BUCKET, Key="dev/resnet/r10/outputs/other-run", Body=b"not this run")
    out = tmp_path / "outputs" / "r2"
    out.mkdir(parents=True)
    staging = tmp_path / "outputs" / ".r2.restoring"
    files, size = uploader.restore(s3, BUCKET, PREFIX, out, staging)
    assert (files, size) == (2, len(blob) + 13)
    assert (out / "checkpoint.pt").read_bytes() == blob
    assert (out / "sub" / "metrics.jsonl").read_text() == '{"step": 40}\n'
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == [
        "outputs/r2/checkpoint.pt",
        "outputs/r2/sub/metrics.jsonl",
    ]


def test_restore_from_a_missing_bucket_is_one_line_and_exit_1(s3, tmp_path: Path, capsys, monkeypatch):
    monkeypatch.setattr(uploader, "make_client", lambda region: (s3, None))
    code = uploader.main(["--bucket", "no-such-bucket", "--restore-from", PREFIX, "--outputs", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "cannot restore s3://no-such-bucket/" in err[0] and "NoSuchBucket" in err[0]
    assert not list(tmp_path.glob(".*restoring"))


def test_the_uploader_yields_the_cpu_to_the_job(monkeypatch):
    """Beside a training job it runs at a lower priority (nice 10 unless told otherwise)."""
    niced: list[int] = []
    monkeypatch.setattr(uploader.os, "nice", niced.append)
    monkeypatch.setattr(uploader, "run", lambda args: 0)
    assert uploader.main(["--bucket", "b", "--prefix", "p", "--stop-file", "/x"]) == 0
    assert uploader.main(["--bucket", "b", "--prefix", "p", "--stop-file", "/x", "--nice", "0"]) == 0
    assert niced == [10]

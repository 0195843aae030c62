"""Everyday use on one node: `inv tunnel` to a server a job started (list, close, bad inputs), secrets
forwarded from this machine's environment (`pass_env`, `--env`) that are written down nowhere, job.toml
[data] fetched on the node (S3 in moto, HTTP from a local server) and `fit --tensorboard`."""

from __future__ import annotations

import json
import re
import socket
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import Project, booted, node_record, on_node, touch_on_node

pytestmark = pytest.mark.e2e
DATA_BUCKET = "rf-e2e-data"  # the node role may read it (`apply --data-bucket`)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 - our own loopback tunnel
        return resp.read().decode()


def one_error_line(res) -> str:
    assert res.returncode != 0, res.stdout
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    return lines[0]


@pytest.fixture(scope="module")
def node(module_project: Project):
    p = module_project
    p.inv("backend", timeout=300)
    p.inv("apply", "--yes", "--max-hours", "1", "--data-bucket", DATA_BUCKET, timeout=300)
    yield p
    p.inv("tunnel.close", check=False)
    p.inv("cancel", check=False)
    assert "verified: nothing tagged" in p.inv("destroy", "--yes", timeout=300).stdout


def test_a_tunnel_reaches_a_server_the_job_started_and_closes_cleanly(node: Project, tmp_path: Path) -> None:
    p = node
    job = tmp_path / "web"
    job.mkdir()
    (job / "index.html").write_text("hello through the tunnel\n")
    port = free_port()
    p.inv("fit", str(job), "--cmd", f"python3 -m http.server {port} --bind 127.0.0.1", "--detach")

    res = p.inv("tunnel", str(port), "--wait", "60")
    url = re.search(r"tunnel open: (http://127\.0\.0\.1:(\d+)/) -> rf-test-0:(\d+)", res.stdout)
    assert url and int(url[3]) == port, res.stdout
    if booted(p):  # the server listens on the node's own loopback: PORT is free here, and the tunnel takes it
        assert int(url[2]) == port, res.stdout
    else:
        # A loopback node shares this machine's loopback, so the server holds PORT here too: the tunnel must
        # take the next free port and say so — and the page must then come through the tunnel, not directly.
        assert f"local port {port} is in use; using" in res.stdout and int(url[2]) != port, res.stdout
    assert get(url[1]) == "hello through the tunnel\n"

    listed = p.inv("tunnel.list").stdout
    assert url[1] in listed and f"rf-test-0:{port}" in listed
    again = p.inv("tunnel", str(port)).stdout  # opening it twice reuses the open one
    assert "already open" in again and url[1] in again

    closed = p.inv("tunnel.close").stdout
    assert f"closed {url[1]}" in closed
    with pytest.raises(OSError):
        get(url[1])
    assert "no tunnels open" in p.inv("tunnel.list").stdout
    p.inv("cancel")  # the server: the node runs one run at a time


def test_bad_tunnel_inputs_are_one_line(node: Project) -> None:
    quiet = free_port()  # nothing listens there on the node
    line = one_error_line(node.inv("tunnel", str(quiet), "--wait", "2", check=False))
    assert f"nothing listens on port {quiet} of rf-test-0" in line
    assert "is not a TCP port" in one_error_line(node.inv("tunnel", "70000", check=False))
    assert "the stage has 1 node(s)" in one_error_line(node.inv("tunnel", str(quiet), "--node", "3", check=False))
    assert "no tunnel on local port" in one_error_line(node.inv("tunnel.close", "--port", str(quiet), check=False))
    assert not (node.generated / "tunnels.json").exists() or "[]" in (node.generated / "tunnels.json").read_text()


def test_no_nodes_no_tunnel(tmp_path: Path) -> None:
    from tests.conftest import make_project

    p = make_project(tmp_path / "empty")
    try:
        assert "inv apply" in one_error_line(p.inv("tunnel", "6006", check=False))
    finally:
        p.down()


# -- secrets forwarded from this machine's environment ------------------------------------------
def test_pass_env_reaches_the_job_and_is_written_down_nowhere(node: Project, tmp_path: Path) -> None:
    import hashlib
    import secrets

    p = node
    token = f"tok-{secrets.token_hex(16)}"
    job = tmp_path / "secretive"
    job.mkdir()
    (job / "job.toml").write_text('pass_env = ["MY_TOKEN", "NOT_SET_ANYWHERE?"]\ncommand = "python show.py"\n')
    (job / "show.py").write_text(
        "import hashlib, os\n"
        "v = os.environ.get('MY_TOKEN', '')\n"
        "os.makedirs('outputs', exist_ok=True)\n"
        "open('outputs/seen.txt', 'w').write(hashlib.sha256(v.encode()).hexdigest() + '\\n')\n"
        "print('optional set:', 'NOT_SET_ANYWHERE' in os.environ, '| other:', os.environ.get('OTHER'))\n"
        "print('spin:', os.environ.get('GOMP_SPINCOUNT'), '| threads:', os.environ.get('OMP_NUM_THREADS'))\n"
    )
    p.env["MY_TOKEN"] = token
    try:
        res = p.inv("fit", str(job), "--env", "OTHER=visible-by-choice")
    finally:
        del p.env["MY_TOKEN"]
    assert "NOT_SET_ANYWHERE (job.toml pass_env, optional) is not set here" in res.stderr
    assert "optional set: False | other: visible-by-choice" in res.stdout
    # The sandbox's defaults for every job (its nodes share this machine's cores): a short spin, and the
    # threads REMOTEFIT_SANDBOX_THREADS gives each job (conftest sets it when xdist runs several workers).
    assert f"spin: 10000 | threads: {p.env.get('REMOTEFIT_SANDBOX_THREADS')}\n" in res.stdout
    out = next((p.runs / "secretive").iterdir())
    assert (out / "seen.txt").read_text().strip() == hashlib.sha256(token.encode()).hexdigest()
    info = json.loads((out / "run.json").read_text())
    assert info["passed_env"] == ["MY_TOKEN", "OTHER"]
    # The value is nowhere: not in fit's output, runs/, generated/ (which also holds the sandbox node's disk),
    # the job folder, or any version of the Terraform state.
    assert token not in res.stdout + res.stderr
    for base in (p.runs, p.generated, job):
        for f in base.rglob("*"):
            if f.is_file() and not f.is_symlink():
                assert token.encode() not in f.read_bytes(), f
    ws = p.workspace()
    s3 = ws.client("s3")
    bucket = ws.settings.TF_STATE_BUCKET
    for v in s3.list_object_versions(Bucket=bucket).get("Versions", []):
        body = s3.get_object(Bucket=bucket, Key=v["Key"], VersionId=v["VersionId"])["Body"].read()
        assert token.encode() not in body, v["Key"]


def test_a_missing_pass_env_variable_stops_before_anything_starts(node: Project, tmp_path: Path) -> None:
    job = tmp_path / "needy"
    job.mkdir()
    (job / "job.toml").write_text('pass_env = ["SURELY_UNSET_VAR_123"]\ncommand = "python -c pass"\n')
    before = sorted((node.generated / "runs").glob("*.json")) if (node.generated / "runs").exists() else []
    line = one_error_line(node.inv("fit", str(job), check=False))
    assert "SURELY_UNSET_VAR_123 (job.toml pass_env) is not set" in line and "SURELY_UNSET_VAR_123?" in line
    after = sorted((node.generated / "runs").glob("*.json")) if (node.generated / "runs").exists() else []
    assert before == after and not (node.runs / "needy").exists()
    line = one_error_line(node.inv("fit", str(job), "--env", "SURELY_UNSET_VAR_456", check=False))
    assert "SURELY_UNSET_VAR_123" in line  # job.toml's list is checked first


# -- job.toml [data] -------------------------------------------------------------------------------
DATA_FILES, DATA_SIZE = 120, 40_000  # 4.8 MB in 120 objects: many files, seconds on 2 cores


@pytest.fixture(scope="module")
def s3_data(node: Project):
    """A bucket in the sandbox's moto S3 with a data set of many small objects (and one the node may not read)."""
    ws = node.workspace()
    s3 = ws.client("s3")
    s3.create_bucket(Bucket=DATA_BUCKET)
    s3.create_bucket(Bucket="rf-e2e-private")
    for i in range(DATA_FILES):
        s3.put_object(Bucket=DATA_BUCKET, Key=f"sets/many/part-{i:04d}.bin", Body=bytes([i % 251]) * DATA_SIZE)
    return s3


@pytest.fixture
def web(node: Project, tmp_path: Path):
    """A web server on this machine, at the address the node reaches it at (the SSH rule's source)."""
    import functools
    import http.server
    import threading

    from remotefit.sandbox import Sandbox

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    root = tmp_path / "www"
    root.mkdir()
    here = Sandbox(node.sandbox).caller_cidr().split("/")[0]
    srv = http.server.ThreadingHTTPServer((here, 0), functools.partial(Quiet, directory=str(root)))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield root, f"http://{here}:{srv.server_address[1]}"
    srv.shutdown()


def data_job(tmp_path: Path, name: str, data: str) -> Path:
    job = tmp_path / name
    job.mkdir()
    (job / "job.toml").write_text(f'command = "python read.py"\n[data]\n{data}')
    (job / "read.py").write_text(
        "import hashlib, os\n"
        "root = 'data/many'\n"
        "names = sorted(os.listdir(root))\n"
        "blob = b''.join(open(os.path.join(root, n), 'rb').read() for n in names)\n"
        "print('files', len(names), 'bytes', len(blob), 'sha', hashlib.sha256(blob).hexdigest()[:16])\n"
        "print('link', os.path.islink(root))\n"
    )
    (job / "data").mkdir()
    (job / "data" / "many").mkdir()
    (job / "data" / "many" / "laptop-copy.bin").write_bytes(b"x" * 5000)  # never synced: [data] owns the path
    return job


def test_s3_data_is_fetched_once_into_the_node_cache_and_again_when_changed(
    node: Project, s3_data, tmp_path: Path
) -> None:
    p = node
    job = data_job(tmp_path, "reader", f'"data/many" = "s3://{DATA_BUCKET}/sets/many/"\n')
    total = DATA_FILES * DATA_SIZE
    first = p.inv("fit", str(job))
    assert f"fetch: data/many: fetched {DATA_FILES} of {DATA_FILES} files, {total} bytes" in first.stderr, first.stderr
    assert f"files {DATA_FILES} bytes {total} sha" in first.stdout and "link True" in first.stdout
    assert "sync: reader: 2 files" in first.stderr  # job.toml and read.py: the laptop's data/many stays here

    second = p.inv("fit", str(job))
    assert f"fetch: data/many: fetched 0 of {DATA_FILES} files, 0 bytes" in second.stderr, second.stderr
    assert f"files {DATA_FILES} bytes {total} sha" in second.stdout

    s3_data.put_object(Bucket=DATA_BUCKET, Key="sets/many/part-0007.bin", Body=b"new" * 1000)
    third = p.inv("fit", str(job))
    assert f"fetch: data/many: fetched 1 of {DATA_FILES} files, 3000 bytes" in third.stderr, third.stderr
    assert f"bytes {total - DATA_SIZE + 3000} sha" in third.stdout
    # One cache for the node, outside the job and run folders: a pulled run carries no data.
    cache = on_node(p, Path(node_record(p)["workdir"]) / "data-cache")
    assert len(list((cache / "s3" / DATA_BUCKET / "sets" / "many").iterdir())) == DATA_FILES
    for run in (p.runs / "reader").iterdir():
        assert not any(f.suffix == ".bin" for f in run.rglob("*"))


def test_http_data_with_a_wrong_sha256_fails_before_the_job_starts(node: Project, web, tmp_path: Path) -> None:
    import hashlib

    root, url = web
    (root / "vocab.txt").write_text("alpha beta\n")
    good = hashlib.sha256(b"alpha beta\n").hexdigest()
    job = tmp_path / "vocab"
    job.mkdir()
    (job / "show.py").write_text("print('vocab:', open('data/vocab.txt').read().strip())\n")
    (job / "job.toml").write_text(
        f'command = "python show.py"\n[data]\n"data/vocab.txt" = {{ url = "{url}/vocab.txt", sha256 = "{"0" * 64}" }}\n'
    )
    before = sorted((node.generated / "runs").glob("*.json"))
    res = node.inv("fit", str(job), check=False)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: rf-test-0: data not fetched, the run was not started: data/vocab.txt: sha256 of {url}/vocab.txt is "
        f"{good}, job.toml says {'0' * 64}; fix the sha256 in job.toml (or the URL)"
    ]
    assert sorted((node.generated / "runs").glob("*.json")) == before and not (node.runs / "vocab").exists()
    (job / "job.toml").write_text(
        f'command = "python show.py"\n[data]\n"data/vocab.txt" = {{ url = "{url}/vocab.txt", sha256 = "{good}" }}\n'
    )
    ok = node.inv("fit", str(job))
    assert "vocab: alpha beta" in ok.stdout and "fetch: data/vocab.txt: fetched 1 of 1 files, 11 bytes" in ok.stderr


def test_bad_data_inputs_are_one_line_and_start_nothing(node: Project, s3_data, tmp_path: Path) -> None:
    cases = {
        "outside": ('"../elsewhere" = "s3://rf-e2e-data/sets/many/"\n', "is not inside the job folder"),
        "overlap": ('"outputs/data" = "s3://rf-e2e-data/sets/many/"\n', "overlaps the outputs folder (outputs)"),
        "scheme": ('"data/x" = "gs://bucket/x/"\n', "unsupported URL scheme in 'gs://'"),
        "sha": ('"data/x" = { url = "https://example.org/x", sha256 = "123" }\n', "sha256 must be 64 hex digits"),
        "private": (
            '"data/x" = "s3://rf-e2e-private/x/"\n',
            "the nodes may not read bucket rf-e2e-private (allowed: rf-e2e-data); run `inv apply --data-bucket "
            "rf-e2e-private`",
        ),
    }
    before = sorted((node.generated / "runs").glob("*.json"))
    for name, (entry, expected) in cases.items():
        job = tmp_path / name
        job.mkdir()
        (job / "job.toml").write_text(f'command = "python -c pass"\n[data]\n{entry}')
        line = one_error_line(node.inv("fit", str(job), check=False))
        assert expected in line, (name, line)
        assert not (node.runs / name).exists()
    assert sorted((node.generated / "runs").glob("*.json")) == before
    assert not any((node.generated).rglob("jobs/private"))  # refused before the sync


def test_local_fit_fetches_the_same_data_on_this_machine(node: Project, s3_data, tmp_path: Path) -> None:
    p = node
    job = data_job(tmp_path, "localreader", f'"data/many" = "s3://{DATA_BUCKET}/sets/many/"\n')
    ws = p.workspace()
    saved = dict(p.env)
    p.env.update(ws.aws_env())  # --local uses this machine's AWS setup: here `eval "$(inv env)"`
    try:
        res = p.inv("fit", str(job), "--local")
    finally:
        p.env.clear()
        p.env.update(saved)
    assert f"fetch: data/many: fetched {DATA_FILES} of {DATA_FILES} files" in res.stderr, res.stderr
    assert f"files {DATA_FILES} bytes" in res.stdout and "link True" in res.stdout


# -- fit --tensorboard -------------------------------------------------------------------------------
FAKE_TB = '''"""A stand-in for TensorBoard's entry point (tests only): serves the log dir's listing."""
import argparse, functools, http.server, os
p = argparse.ArgumentParser()
p.add_argument("--logdir"); p.add_argument("--host"); p.add_argument("--port", type=int)
a = p.parse_args()
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("fake tensorboard for " + os.path.basename(os.path.dirname(os.path.realpath(a.logdir)))).encode()
        self.send_response(200); self.end_headers(); self.wfile.write(body)
    def log_message(self, *args): pass
http.server.ThreadingHTTPServer((a.host, a.port), H).serve_forever()
'''


def fake_tensorboard_wheel(folder: Path) -> str:
    """A tiny offline wheel named tensorboard whose `python -m tensorboard.main` serves a page."""
    import zipfile

    name = "tensorboard-0.0.1-py3-none-any.whl"
    files = {
        "tensorboard/__init__.py": "",
        "tensorboard/main.py": FAKE_TB,
        "tensorboard-0.0.1.dist-info/METADATA": "Metadata-Version: 2.1\nName: tensorboard\nVersion: 0.0.1\n",
        "tensorboard-0.0.1.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    with zipfile.ZipFile(folder / name, "w") as z:
        for path, text in files.items():
            z.writestr(path, text)
        z.writestr(
            "tensorboard-0.0.1.dist-info/RECORD",
            "".join(f"{p},,\n" for p in [*files, "tensorboard-0.0.1.dist-info/RECORD"]),
        )
    return name


def port_open_on_node(p: Project, port: int) -> bool:
    """Whether something listens on the node's loopback port (asked on the node, its loopback or ours)."""
    probe = f"import socket; s = socket.socket(); s.settimeout(1); exit(s.connect_ex(('127.0.0.1', {port})))"
    res = p.ssh("rf-test-0", f'python3 -c "{probe}"')
    assert res.returncode != 255, res.stderr  # (ssh's own failure)
    return res.returncode == 0


def wait_for(check, what: str, timeout: float = 120) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"no {what} within {timeout:.0f} s"
        time.sleep(0.5)


def test_tensorboard_is_served_through_a_tunnel_and_stops_with_the_run_or_the_tunnel(
    node: Project, tmp_path: Path
) -> None:
    from remotefit.tensorboard import remote_port

    p = node
    job = tmp_path / "tb"
    job.mkdir()
    wheel = fake_tensorboard_wheel(job)
    (job / "requirements.txt").write_text(f"./{wheel}\n")
    stop = tmp_path / "stop"
    (job / "job.toml").write_text('command = "python wait.py"\ntensorboard = "outputs/tb"\n')
    (job / "wait.py").write_text(f"import os, time\nwhile not os.path.exists({str(stop)!r}): time.sleep(0.2)\n")

    res = p.inv("fit", str(job), "--detach")
    run_id = re.search(r"run (\S+) started on rf-test-0", res.stderr)[1]
    url = re.search(r"tensorboard: (http://127\.0\.0\.1:\d+/) \(serving outputs/tb", res.stderr)
    assert url, res.stderr
    wait_for(lambda: _answers(url[1]), "TensorBoard through the tunnel")
    assert get(url[1]) == f"fake tensorboard for {run_id}"  # the run's own outputs folder
    touch_on_node(p, stop)  # the run ends: TensorBoard on the node stops with it
    wait_for(lambda: not port_open_on_node(p, remote_port(run_id)), "TensorBoard stopping after the run", 30)
    p.inv("tunnel.close")

    assert p.ssh("rf-test-0", f"rm {stop}").returncode == 0
    res = p.inv("fit", str(job), "--detach", "--tensorboard")
    run_id = re.search(r"run (\S+) started on rf-test-0", res.stderr)[1]
    url = re.search(r"tensorboard: (http://127\.0\.0\.1:(\d+)/)", res.stderr)
    wait_for(lambda: _answers(url[1]), "TensorBoard through the tunnel")
    assert f"closed {url[1]}" in p.inv("tunnel.close", "--port", url[2]).stdout
    wait_for(lambda: not port_open_on_node(p, remote_port(run_id)), "TensorBoard stopping on tunnel.close", 30)
    touch_on_node(p, stop)
    p.inv("logs", "--run", run_id, "--follow")


def test_tensorboard_without_it_in_the_requirements_says_how_to_add_it(node: Project, tmp_path: Path) -> None:
    job = tmp_path / "notb"
    job.mkdir()
    (job / "job.toml").write_text('command = "python -c \\"print(42)\\""\n')
    res = node.inv("fit", str(job), "--tensorboard")
    assert (
        "tensorboard: not started: the job's requirements do not include it; add a line `tensorboard` to "
        "notb/requirements.txt (its venv provides TensorBoard on the node)"
    ) in res.stderr
    assert "42" in res.stdout


def _answers(url: str) -> bool:
    try:
        get(url)
    except OSError:
        return False
    return True

"""Hostile inputs refused at the door (laptop side and node side), without the sandbox: one line each,
nothing written, nothing outside the job folder touched."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from remotefit import jobs
from remotefit.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "remotefit" / "node" / "runner.py"


def _load_runner():
    spec = importlib.util.spec_from_file_location("remotefit_node_runner_faults", RUNNER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


runner = _load_runner()


def job_with(tmp_path: Path, toml: str, name: str = "job") -> Path:
    d = tmp_path / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "train.py").write_text("print('hi')\n")
    (d / "job.toml").write_text(toml)
    return d


# -- 4. every path from job.toml stays inside the job folder ----------------------------------
@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ('outputs = "../other"', "outputs"),
        ('outputs = "../../../../tmp/x"', "outputs"),
        ('outputs = "/tmp/x"', "outputs"),
        ('outputs = "a/../../b"', "outputs"),
        ('outputs = "."', "outputs"),
        ('outputs = "~/x"', "outputs"),
        ('outputs = "out\\nput"', "outputs"),
        ('requirements = "../requirements.txt"', "requirements"),
        ('requirements = "/etc/passwd"', "requirements"),
    ],
)
def test_job_toml_paths_must_stay_inside_the_job_folder(tmp_path: Path, toml: str, key: str):
    d = job_with(tmp_path, toml)
    with pytest.raises(UserError) as exc:
        jobs.load_job(d)
    msg = str(exc.value)
    assert "\n" not in msg and f"{d}/job.toml" in msg and key in msg and "inside the job folder" in msg, msg


def test_job_toml_path_through_a_symlink_out_of_the_folder_is_refused(tmp_path: Path):
    d = job_with(tmp_path, 'outputs = "link/out"')
    (tmp_path / "elsewhere").mkdir()
    (d / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UserError, match="inside the job folder"):
        jobs.load_job(d)


def test_job_toml_good_paths_are_kept(tmp_path: Path):
    d = job_with(tmp_path, 'outputs = "./results/run/"\nrequirements = "env/req.txt"')
    job = jobs.load_job(d)
    assert job.outputs == "results/run" and job.requirements == "env/req.txt"


def rf(base: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(RUNNER), "start", "--base", str(base), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("outputs", ["../other", "/tmp/x", "a/../../b", ".", ""])
def test_runner_refuses_outputs_outside_the_job_folder(tmp_path: Path, outputs: str):
    base = tmp_path / "base"
    job = base / "jobs" / "job"
    job.mkdir(parents=True)
    other = base / "jobs" / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    res = rf(
        base,
        "--run-id",
        "r1",
        "--job-dir",
        str(job),
        "--cmd",
        "true",
        "--outputs",
        outputs,
        "--outputs-dir",
        str(base / "outputs" / "r1"),
    )
    assert res.returncode == runner.EXIT_USAGE, res.stderr
    assert res.stderr.count("\n") == 1 and "runner: error:" in res.stderr and "outputs" in res.stderr, res.stderr
    assert (other / "keep.txt").read_text() == "mine" and sorted(p.name for p in (base / "jobs").iterdir()) == [
        "job",
        "other",
    ]
    assert not (base / "runs" / "r1").exists()


def test_runner_refuses_outputs_through_a_symlink_and_outputs_dir_outside_base(tmp_path: Path):
    base = tmp_path / "base"
    job = base / "jobs" / "job"
    job.mkdir(parents=True)
    (tmp_path / "victim").mkdir()
    (job / "link").symlink_to(tmp_path / "victim")
    common = ["--run-id", "r1", "--job-dir", str(job), "--cmd", "true"]
    res = rf(base, *common, "--outputs", "link/out", "--outputs-dir", str(base / "outputs" / "r1"))
    assert res.returncode == runner.EXIT_USAGE and "outputs" in res.stderr, res.stderr
    res = rf(base, *common, "--outputs", "outputs", "--outputs-dir", str(tmp_path / "victim"))
    assert res.returncode == runner.EXIT_USAGE and "outputs-dir" in res.stderr, res.stderr
    assert list((tmp_path / "victim").iterdir()) == []


def test_runner_refuses_requirements_outside_the_job_folder(tmp_path: Path):
    base = tmp_path / "base"
    job = base / "jobs" / "job"
    job.mkdir(parents=True)
    (base / "jobs" / "req.txt").write_text("")
    res = rf(base, "--run-id", "r1", "--job-dir", str(job), "--cmd", "true", "--requirements", "../req.txt")
    assert res.returncode == runner.EXIT_USAGE and "requirements" in res.stderr, res.stderr


def test_runner_links_outputs_and_keeps_a_real_folder_aside(tmp_path: Path):
    base = tmp_path / "base"
    job = base / "jobs" / "job"
    (job / "outputs").mkdir(parents=True)
    (job / "outputs" / "old.txt").write_text("old")
    target = base / "outputs" / "r1"
    res = rf(
        base,
        "--run-id",
        "r1",
        "--job-dir",
        str(job),
        "--cmd",
        "true",
        "--outputs",
        "outputs",
        "--outputs-dir",
        str(target),
    )
    assert res.returncode == 0, res.stderr
    assert (job / "outputs").is_symlink() and (job / "outputs").resolve() == target.resolve()
    assert (job / "outputs.before-r1" / "old.txt").read_text() == "old"


# -- 5. [env] secrets never in argv; the env file does not outlive the start ------------------
def _node(base: Path):
    from remotefit.ssh import Node

    return Node(0, "local", "local", "h", 0, "me", "", str(base), sys.executable, "local", "local", "local", "t")


def test_env_secrets_travel_on_stdin_never_in_the_command_line(tmp_path: Path):
    job = job_with(tmp_path, '[env]\nTOKEN = "s3cr3t-value"\n')
    base = tmp_path / "base"
    (base / "jobs" / "job").mkdir(parents=True)
    t = jobs.LocalTransport(_node(base))
    env = {"TOKEN": "s3cr3t-value", "QUOTE": 'it\'s "x"\n y'}
    loaded = jobs.load_job(job)
    line = jobs.start_command(t)
    assert "s3cr3t" not in line and "it's" not in line
    # The line really works: a fake runner prints its argv and the request it read on stdin, and lists
    # what the node's .remotefit folder holds then (no env file: the env never touches the disk).
    fake = (
        "import json, os, sys\nrequest = json.load(sys.stdin)\n"
        "print(json.dumps([sys.argv[1:], request['env'], sorted(os.listdir(os.path.dirname(__file__)))]))\n"
    )
    request = jobs.start_request(loaded, "j-1", "python train.py", False, env=env)
    res = subprocess.run(
        t.argv(line), input=jobs.start_input(request, fake), capture_output=True, text=True, check=True
    )
    import json

    args, got, files = json.loads(res.stdout)
    assert got == env and args[0] == "start" and "s3cr3t" not in " ".join(args)
    assert files == ["contract.py", "runner.py", "uploader.py"]
    assert (base / ".remotefit" / "runner.py").read_text() == fake


def test_runner_deletes_the_env_file_once_read(tmp_path: Path):
    import json

    base = tmp_path / "base"
    job = base / "jobs" / "job"
    job.mkdir(parents=True)
    env_file = base / ".remotefit" / "env-r1.json"
    env_file.parent.mkdir(parents=True)
    env_file.write_text(json.dumps({"TOKEN": "s3cr3t"}))
    res = rf(base, "--run-id", "r1", "--job-dir", str(job), "--cmd", 'echo "$TOKEN"', "--env-file", str(env_file))
    assert res.returncode == 0, res.stderr
    assert not env_file.exists()
    follow = subprocess.run(
        [sys.executable, str(RUNNER), "follow", "--base", str(base), "--run-id", "r1"], capture_output=True, timeout=60
    )
    assert follow.stdout.decode().strip() == "s3cr3t"
    # A start that fails still removes it.
    env_file.write_text(json.dumps({"TOKEN": "s3cr3t"}))
    res = rf(base, "--run-id", "r1", "--job-dir", str(job), "--cmd", "true", "--env-file", str(env_file))
    assert res.returncode == runner.EXIT_USAGE and not env_file.exists()


# -- 7. no tracebacks: binary bytes in aws_env_vars, run ids that are paths --------------------
@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"AWS_ACCOUNT=testacct\nAWS_REGION=us-east-1\xff\xfe\n", "aws_env_vars:2: not UTF-8"),
        (b"AWS_ACCOUNT=test\x00acct\n", "aws_env_vars:1: control character"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", "aws_env_vars:1:"),
    ],
)
def test_binary_bytes_in_aws_env_vars_are_one_line(tmp_path: Path, monkeypatch, content: bytes, needle: str):
    from remotefit.config import load_settings

    f = tmp_path / "aws_env_vars"
    f.write_bytes(content)
    monkeypatch.setenv("REMOTEFIT_ENV_FILE", str(f))
    with pytest.raises(UserError) as exc:
        load_settings(tmp_path)
    assert needle in str(exc.value) and "\n" not in str(exc.value), str(exc.value)


@pytest.mark.parametrize("run_id", ["../node_vars", "../../etc/passwd", "a/b", ".hidden", "x\ny", ""])
def test_run_ids_that_are_paths_are_refused(tmp_path: Path, run_id: str):
    from remotefit.config import Paths

    paths = Paths.at(tmp_path)
    (paths.generated / "runs").mkdir(parents=True)
    (paths.generated / "node_vars.json").write_text("{}")
    with pytest.raises(UserError) as exc:
        jobs.load_record(paths, run_id)
    assert "run id" in str(exc.value) and "\n" not in str(exc.value)


# -- 10. job folder names that cannot be carried safely ----------------------------------------
@pytest.mark.parametrize("name", ["evil\nresnet", "tab\there", "bell\x07", "del\x7f", "bad\udcffbyte"])
def test_unsafe_job_folder_names_are_refused(tmp_path: Path, name: str):
    d = tmp_path / name
    try:
        d.mkdir()
    except (UnicodeEncodeError, OSError):
        pytest.skip("this filesystem cannot hold the name")
    (d / "train.py").write_text("")
    with pytest.raises(UserError) as exc:
        jobs.load_job(d)
    msg = str(exc.value)
    assert "\n" not in msg and "job folder name" in msg and "rename" in msg, msg


def test_safe_unusual_job_folder_names_are_kept(tmp_path: Path):
    for name in ("my job", "ünïcødé", "a;b$(c)", "-dash"):
        d = tmp_path / name
        d.mkdir()
        (d / "train.py").write_text("")
        assert jobs.load_job(d).name == name


# -- 8. runs/ must be writable before a run starts ---------------------------------------------
def test_fit_checks_runs_is_writable_before_anything_runs(tmp_path: Path, monkeypatch):
    from remotefit.config import Paths

    job = job_with(tmp_path, "")
    (tmp_path / "runs").write_text("a file where the runs folder should be")
    monkeypatch.setenv("REMOTEFIT_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("REMOTEFIT_GENERATED", str(tmp_path / "generated"))
    paths = Paths.at(tmp_path)
    with pytest.raises(UserError) as exc:
        jobs.fit(None, jobs.load_job(job), local=True, paths=paths)
    assert "runs" in str(exc.value) and "\n" not in str(exc.value)
    assert not (tmp_path / "generated" / "local").exists() and not (tmp_path / "generated" / "runs").exists()


def test_unreachable_node_is_explained_by_its_ec2_state():
    from remotefit import nodes
    from remotefit.ssh import Node

    n = Node(
        0, "rf-x-0", "i-0abc", "1.2.3.4", 22, "ubuntu", "10.0.0.1", "/w", "python3", "t3.micro", "on-demand", "a", "t"
    )
    hints = {state: nodes.unreachable_hint(n, state) for state in ("stopped", "terminated", "running", None)}
    assert "rf-x-0" in hints["stopped"] and "i-0abc" in hints["stopped"] and "inv start" in hints["stopped"]
    assert "terminated" in hints["terminated"] and "inv apply" in hints["terminated"]
    assert "running" in hints["running"] and "1.2.3.4:22" in hints["running"] and "inv status" in hints["running"]
    assert "inv apply" in hints[None] and "no longer exists" in hints[None]


# -- 6. the sandbox's moto state survives a restart (real moto server processes, no terraform) ----
def test_moto_restart_replays_the_same_ids_states_and_bytes(tmp_path: Path):
    import os
    import signal
    import time
    from concurrent.futures import ThreadPoolExecutor

    import boto3

    from remotefit.sandbox import Sandbox

    sb = Sandbox(tmp_path / "sandbox")
    try:
        srv = sb.up()

        def clients(endpoint: str):
            kw = {"endpoint_url": endpoint, "region_name": "us-east-1"}
            kw |= {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
            return boto3.client("ec2", **kw), boto3.client("s3", **kw)

        ec2, s3 = clients(srv.endpoint)
        ami = "ami-12c6146b"
        with ThreadPoolExecutor(6) as pool:  # concurrent, as Terraform's requests are
            ids = list(
                pool.map(
                    lambda _: ec2.run_instances(ImageId=ami, MinCount=1, MaxCount=1)["Instances"][0]["InstanceId"],
                    range(6),
                )
            )
        s3.create_bucket(Bucket="state-bucket")
        s3.put_bucket_versioning(Bucket="state-bucket", VersioningConfiguration={"Status": "Enabled"})
        version = s3.put_object(Bucket="state-bucket", Key="k", Body=b"\x00\xff state")["VersionId"]
        ec2.stop_instances(InstanceIds=[ids[0]])

        def instances(client) -> list[tuple[str, str]]:
            res = client.describe_instances()["Reservations"]
            return sorted((i["InstanceId"], i["State"]["Name"]) for r in res for i in r["Instances"])

        before = instances(ec2)
        os.kill(srv.pid, signal.SIGKILL)
        while Path(f"/proc/{srv.pid}").exists() and sb.server() is not None:
            time.sleep(0.05)
        assert sb.server() is None and (tmp_path / "sandbox" / "moto.json").exists()  # read-only: kept
        srv2 = sb.up()
        assert srv2.pid != srv.pid
        ec2, s3 = clients(srv2.endpoint)
        assert instances(ec2) == before and sorted(ids) == sorted(i for i, _ in before)
        obj = s3.get_object(Bucket="state-bucket", Key="k")
        assert obj["VersionId"] == version and obj["Body"].read() == b"\x00\xff state"
        assert s3.get_bucket_versioning(Bucket="state-bucket")["Status"] == "Enabled"
    finally:
        sb.down()
    assert not (tmp_path / "sandbox" / "moto-recording.jsonl").exists()  # a deliberate down starts afresh

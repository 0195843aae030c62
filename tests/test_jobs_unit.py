"""remotefit.jobs without nodes: the job contract, commands, environment, rsync filters and summaries."""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path

import pytest

from remotefit import jobs
from remotefit.errors import UserError
from remotefit.ssh import Node


def node(i: int, ip: str = "") -> Node:
    return Node(
        i,
        f"rf-t-{i}",
        f"i-{i}",
        "1.2.3.4",
        22,
        "ubuntu",
        ip,
        "/home/ubuntu/remotefit",
        "python3",
        "c7i.xlarge",
        "on-demand",
        "az",
        "t",
    )


def write(folder: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# -- load_job -----------------------------------------------------------------------------------
def test_load_job_defaults_to_train_py(tmp_path: Path):
    job = jobs.load_job(write(tmp_path / "j", {"train.py": ""}))
    assert job.command == "python train.py" and job.name == "j" and job.outputs == "outputs"
    assert job.requirements is None and not job.gpu and not job.distributed


def test_load_job_reads_job_toml_and_cmd_wins(tmp_path: Path):
    d = write(
        tmp_path / "j",
        {
            "job.toml": textwrap_toml(),
            "requirements.txt": "numpy\n",
        },
    )
    job = jobs.load_job(d)
    assert job.command == "python main.py --fast"
    assert job.setup == "echo hi" and job.outputs == "out" and job.exclude == ["data/"]
    assert job.env == {"A": "1", "B": "x"} and job.gpu and job.distributed
    assert job.requirements == "requirements.txt"
    assert jobs.load_job(d, cmd="python other.py").command == "python other.py"


def textwrap_toml() -> str:
    return (
        'command = "python main.py --fast"\nsetup = "echo hi"\noutputs = "out/"\nexclude = ["data/"]\n'
        'env = { A = 1, B = "x" }\ngpu = true\ndistributed = true\n'
    )


@pytest.mark.parametrize(
    ("files", "target", "needles"),
    [
        ({}, "missing", ["does not exist"]),
        ({"j/train.py": ""}, "j/train.py", ["is a file"]),
        ({"j/notes.txt": ""}, "j", ["no train.py", "--cmd"]),
        ({"j/job.toml": 'command = "x"\n\nsetup = [\n'}, "j", ["job.toml:3:", "not valid TOML"]),
        ({"j/job.toml": "a = 1\nb = \nc = 2\n"}, "j", ["job.toml:2:"]),
        ({"j/job.toml": 'comand = "x"\n'}, "j", ["unknown key 'comand'", "did you mean command?"]),
        ({"j/job.toml": 'command = "x"\nzzz = 1\n'}, "j", ["unknown key 'zzz'", "known keys:"]),
        ({"j/job.toml": 'command = "x"\nenv = 3\n'}, "j", ["wrong type"]),
    ],
)
def test_load_job_errors_are_one_clear_line(tmp_path: Path, files: dict[str, str], target: str, needles: list[str]):
    write(tmp_path, files)
    with pytest.raises(UserError) as err:
        jobs.load_job(tmp_path / target)
    msg = err.value.message
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, msg


# -- launch_command and job_env ------------------------------------------------------------------
def make(tmp_path: Path, toml: str = "") -> jobs.Job:
    return jobs.load_job(write(tmp_path / "j", {"train.py": "", "job.toml": toml}))


def test_launch_command_plain_quotes_extra_args(tmp_path: Path):
    job = make(tmp_path)
    cmd = jobs.launch_command(job, ["--name", "a b", "it's"], [node(0)], 0, 0)
    assert shlex.split(cmd) == ["python", "train.py", "--name", "a b", "it's"]


def test_launch_command_distributed_single_process_is_not_rewritten(tmp_path: Path):
    job = make(tmp_path, "distributed = true\n")
    assert jobs.launch_command(job, [], [node(0)], 0, 0) == "python train.py"


def test_launch_command_torchrun_over_nodes(tmp_path: Path):
    job = make(tmp_path, 'distributed = true\ncommand = "python train.py --epochs 2"\n')
    ns = [node(0, "10.0.0.5"), node(1, "10.0.0.6")]
    words = shlex.split(jobs.launch_command(job, ["--lr", "0.1"], ns, 1, 4, master_port=29777))
    assert words[:3] == ["python", "-m", "torch.distributed.run"]
    assert "--nnodes=2" in words and "--node_rank=1" in words and "--nproc_per_node=4" in words
    assert "--master_addr=10.0.0.5" in words and "--master_port=29777" in words
    assert words[-5:] == ["train.py", "--epochs", "2", "--lr", "0.1"]


def test_launch_command_torchrun_on_one_multi_gpu_node(tmp_path: Path):
    job = make(tmp_path, "distributed = true\n")
    words = shlex.split(jobs.launch_command(job, [], [node(0)], 0, 8))
    assert "--nproc_per_node=8" in words and "--nnodes=1" in words


def test_launch_command_non_python_is_left_alone(tmp_path: Path):
    job = make(tmp_path, 'distributed = true\ncommand = "bash run.sh"\n')
    assert jobs.launch_command(job, ["x"], [node(0), node(1)], 0, 0) == "bash run.sh x"


def test_job_env(tmp_path: Path):
    job = make(tmp_path, 'env = { OMP_NUM_THREADS = "2" }\n')
    ns = [node(0, "10.0.0.5"), node(1, "10.0.0.6")]
    env = jobs.job_env(job, "j-1", ns, 1, 4, "/w/outputs/j-1", master_port=29600)
    assert env["OMP_NUM_THREADS"] == "2"
    assert env["REMOTEFIT_RUN_ID"] == "j-1" and env["REMOTEFIT_JOB"] == "j"
    assert env["REMOTEFIT_NODE_RANK"] == "1" and env["REMOTEFIT_NUM_NODES"] == "2"
    assert env["REMOTEFIT_NODE_IPS"] == "10.0.0.5,10.0.0.6" and env["REMOTEFIT_MASTER_ADDR"] == "10.0.0.5"
    assert env["REMOTEFIT_MASTER_PORT"] == "29600" and env["REMOTEFIT_GPUS_PER_NODE"] == "4"
    assert env["REMOTEFIT_OUTPUTS"] == "/w/outputs/j-1"
    assert jobs.job_env(job, "j-1", [node(0)], 0, 0, "o")["REMOTEFIT_MASTER_ADDR"] == "127.0.0.1"


def test_master_port_is_per_run_and_in_range():
    ports = {jobs.master_port_for(f"job-{i}") for i in range(200)}
    assert all(29500 <= p < 30000 for p in ports) and len(ports) > 100
    assert jobs.master_port_for("a") == jobs.master_port_for("a")


# -- rsync filters and summaries ----------------------------------------------------------------
def test_filter_args(tmp_path: Path):
    job = make(tmp_path, 'outputs = "results"\nexclude = ["data/", "*.ckpt"]\n')
    filters, excludes = jobs.filter_args(job)
    assert filters == ["--filter=:- .gitignore", "--filter=:- .remotefitignore"]
    for e in (".git/", ".venv/", "__pycache__/", "/results/", "data/", "*.ckpt"):
        assert e in excludes


def test_filters_in_a_real_local_rsync(tmp_path: Path):
    job = jobs.load_job(
        write(
            tmp_path / "j",
            {
                "train.py": "",
                ".gitignore": "*.log\n",
                ".remotefitignore": "data/\n",
                "a.log": "",
                "data/x": "",
                "keep/y": "",
                ".git/HEAD": "",
                "__pycache__/t.pyc": "",
                "outputs/old.txt": "",
            },
        )
    )
    count, size, largest = jobs.plan_upload(job)
    names = {n for _, n in largest}
    assert names == {"train.py", ".gitignore", ".remotefitignore", "keep/y"} and count == 4, largest


def test_sync_argv_and_summary(tmp_path: Path):
    job = make(tmp_path)
    t = jobs.SshTransport(node(0), Path("/cfg"))
    argv = jobs.sync_argv(t, job)
    assert "--safe-links" in argv and "--delete" in argv and "--stats" in argv
    assert "--no-human-readable" in argv and "--human-readable" not in argv  # exact --stats numbers
    rp = next(a for a in argv if a.startswith("--rsync-path="))
    assert " idle --base " in rp and "[ $? -ne 3 ]" in rp and "mkdir -p /home/ubuntu/remotefit/jobs/j" in rp
    assert argv[-1] == "rf-t-0:/home/ubuntu/remotefit/jobs/j/"
    stats = (
        "Number of files: 2,002 (reg: 2,001, dir: 1)\nNumber of regular files transferred: 1\n"
        "Total bytes sent: 105,337\n"
    )
    assert jobs.sync_summary(stats) == (1, 2001, 105337)
    assert jobs.sync_summary("") == (0, 0, 0)


def test_start_command_ships_runner_and_request(tmp_path: Path):
    job = make(tmp_path)
    t = jobs.SshTransport(node(0), Path("/cfg"))
    line = jobs.start_command(t)
    assert "cat > /home/ubuntu/remotefit/.remotefit/runner.py.$$" in line
    assert line.endswith(
        "printf '%s' \"$RF_REQUEST\" | python3 -S /home/ubuntu/remotefit/.remotefit/runner.py start "
        "--base /home/ubuntu/remotefit --request -"
    )
    request = jobs.start_request(job, "j-1", "python train.py", False, env={"A": "it's"}, then_follow=True)
    assert request == {
        "run_id": "j-1",
        "job": "j",
        "cmd": "python train.py",
        "env": {"A": "it's"},
        "outputs": "outputs",  # the runner links it to outputs/j-1 beside runs/
        "requirements": None,
        "setup": None,
        "check_cuda": False,
        "follow": True,
    }
    from remotefit.node import contract

    assert contract.start_request_problem(request) is None
    assert jobs.start_request(job, "j-1", "x", True)["check_cuda"] is True


def test_start_command_runs_in_a_shell(tmp_path: Path):
    """The line really works: run it locally with a fake runner that prints its argv and the request it
    read on stdin (the env never in a command line, never in a file)."""
    job = make(tmp_path)
    base = tmp_path / "base"
    (base / "jobs" / "j").mkdir(parents=True)
    n = Node(0, "local", "local", "h", 0, "me", "", str(base), "python3", "local", "local", "local", "t")
    t = jobs.LocalTransport(n)
    fake = "import json, sys\nprint(json.dumps([sys.argv[1:], json.load(sys.stdin)]))\n"
    request = jobs.start_request(job, "j-1", "python train.py", False, env={"Q": "a 'b' c\nd"})
    line = jobs.start_command(t)
    assert "a 'b'" not in line
    res = subprocess.run(
        t.argv(line), input=jobs.start_input(request, fake), capture_output=True, text=True, check=True
    )
    args, got = json.loads(res.stdout)
    assert args == ["start", "--base", str(base), "--request", "-"]
    assert got == request
    # contract.py and uploader.py (read by byte count before runner.py) land whole beside the runner
    assert (base / ".remotefit" / "contract.py").read_text() == (jobs.CONTRACT).read_text()
    assert (base / ".remotefit" / "uploader.py").read_text() == (jobs.UPLOADER).read_text()
    assert (base / ".remotefit" / "runner.py").read_text() == fake
    assert sorted(p.name for p in (base / ".remotefit").iterdir()) == ["contract.py", "runner.py", "uploader.py"]


def test_run_json_cost_and_duration():
    rec = jobs.RunRecord("r", "j", "/j", "python train.py", ["--x"], [node(0).to_dict()], "t")
    st = {"started_at": "2026-01-01T00:00:00Z", "ended_at": "2026-01-01T01:00:00Z", "exit_code": 0}
    info = jobs._run_json(rec, [st], None)
    assert info["duration_s"] == 3600 and info["estimated_cost_usd"] > 0 and info["exit_code"] == 0
    zero = jobs._run_json(rec, [{**st, "ended_at": st["started_at"]}], [0])
    assert zero["duration_s"] == 0 and zero["estimated_cost_usd"] == 0
    assert jobs._run_json(rec, [st, {"exit_code": 5}], None)["exit_code"] == 5


def test_run_id_is_safe_for_any_folder_name(tmp_path):
    import re as _re

    for name in ("my job", "ünïcødé", ".hidden", "_x", "a/b".replace("/", "_")):
        d = tmp_path / name
        d.mkdir()
        (d / "train.py").write_text("")
        rid = jobs.new_run_id(jobs.load_job(d))
        assert _re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", rid), rid


def test_pass_env_and_env_flags_resolve_from_this_environment(tmp_path):
    job = tmp_path / "j"
    job.mkdir()
    (job / "train.py").write_text("")
    (job / "job.toml").write_text('pass_env = ["A", "B?"]\n')
    spec = jobs.load_job(job)
    assert spec.pass_env == ["A", "B?"]
    values, warnings = jobs.passed_env(spec, ["C=3", "D"], {"A": "1", "D": "4"})
    assert values == {"A": "1", "C": "3", "D": "4"}
    assert len(warnings) == 1 and "B (job.toml pass_env, optional)" in warnings[0]
    with pytest.raises(UserError, match=r"A \(job.toml pass_env\) is not set"):
        jobs.passed_env(spec, [], {})
    with pytest.raises(UserError, match="--env E: E is not set"):
        jobs.passed_env(spec, ["E"], {"A": "1"})
    with pytest.raises(UserError, match="is not a variable name"):
        jobs.passed_env(spec, ["1BAD=x"], {"A": "1"})
    with pytest.raises(UserError, match="set by remotefit itself"):
        jobs.passed_env(spec, ["REMOTEFIT_RUN_ID=x"], {"A": "1"})
    (job / "job.toml").write_text('pass_env = "A"\n')
    with pytest.raises(UserError, match="pass_env must be a list of variable names"):
        jobs.load_job(job)


# -- what a destroy would take ----------------------------------------------------------------
def _st(run_id: str, state: str, kept: object = None) -> dict:
    return {"run_id": run_id, "state": state, "exit_code": None if state == "running" else 0, "kept": kept}


def test_before_destroy_sorts_active_kept_unkept_and_silent_nodes() -> None:
    ok, cut = {"complete": True, "errors": []}, {"complete": False, "errors": ["AccessDenied: PutObject"]}
    answers = {
        "rf-s-0": [_st("r-active", "running"), _st("r-kept", "finished", ok), _st("r-pulled", "finished", ok)],
        "rf-s-1": [_st("r-active", "running"), _st("r-cut", "finished", cut), _st("r-none", "lost")],
        "rf-s-2": None,
    }
    got = jobs.before_destroy_of(answers, pulled={"r-pulled"})
    assert got.active == {"r-active": ["rf-s-0", "rf-s-1"]}
    assert got.kept == ["r-kept"]
    assert got.unkept == {
        "r-cut": "its final upload was incomplete: AccessDenied: PutObject",
        "r-none": "its node recorded no upload",
    }
    assert got.unanswered == ["rf-s-2"]
    lines = got.lines("my-runs")
    assert lines[0].startswith("run r-active is still running on rf-s-0, rf-s-1: destroy stops it first")
    assert "safe in the runs bucket my-runs" in lines[1] and "`inv pull --run r-kept`" in lines[1]
    assert "its results go with the node; pull them first with `inv pull --run r-cut`" in lines[2]
    assert lines[-1].startswith("rf-s-2 did not answer")


def test_a_run_kept_by_one_node_only_is_not_safe() -> None:
    """Several nodes: every node's log must be in the bucket for the run to be safe."""
    answers = {"a": [_st("r", "finished", {"complete": True})], "b": [_st("r", "finished", None)]}
    got = jobs.before_destroy_of(answers, pulled=set())
    assert got.kept == [] and list(got.unkept) == ["r"]


def test_nothing_to_say_before_destroying_idle_nodes() -> None:
    assert jobs.before_destroy_of({"a": [], "b": []}, pulled=set()).lines("b") == []


def test_run_json_lists_every_attempt_and_adds_up_their_cost():
    first = {"run_id": "r1", "nodes": ["rf-s-0"], "market": "spot", "exit_code": None, "estimated_cost_usd": 0.25}
    rec = jobs.RunRecord(
        "r2", "j", "/j", "python train.py", [], [node(0).to_dict()], "t", resumed_from="r1", attempts=[first]
    )
    st = {"started_at": "2026-01-01T00:00:00Z", "ended_at": "2026-01-01T01:00:00Z", "exit_code": 0}
    info = jobs._run_json(rec, [st], None)
    assert info["resumed_from"] == "r1"
    assert [a["run_id"] for a in info["attempts"]] == ["r1", "r2"]
    this = info["attempts"][1]
    assert this["start"] == st["started_at"] and this["end"] == st["ended_at"] and this["exit_code"] == 0
    assert this["estimated_cost_usd"] == info["estimated_cost_usd"] > 0
    assert info["total_estimated_cost_usd"] == round(0.25 + info["estimated_cost_usd"], 4)
    alone = jobs._run_json(jobs.RunRecord("r", "j", "/j", "c", [], [node(0).to_dict()], "t"), [st], None)
    assert alone["resumed_from"] is None and len(alone["attempts"]) == 1
    assert alone["total_estimated_cost_usd"] == alone["estimated_cost_usd"]


def test_local_fingerprint_sees_what_a_sync_could_send_and_only_that(tmp_path: Path):
    """The unchanged-sync shortcut trusts this digest: every edit rsync would send changes it; what rsync
    never sends (caches, outputs) does not."""
    import os

    from remotefit.jobs.syncing import local_fingerprint

    job_dir = write(tmp_path, {"j/train.py": "print(1)\n", "j/data/a.txt": "a", "j/.gitignore": "*.log\n"})
    job = jobs.load_job(job_dir / "j")
    fp = local_fingerprint(job)
    assert local_fingerprint(job) == fp  # stable
    # Not sent by rsync: no change.
    (job.path / "__pycache__").mkdir()
    (job.path / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"x")
    (job.path / "outputs").mkdir()
    (job.path / "outputs" / "model.pt").write_bytes(b"w")
    (job.path / ".git").mkdir()
    (job.path / ".git" / "HEAD").write_text("ref")
    assert local_fingerprint(job) == fp
    # Every kind of change rsync would act on changes it.
    changes = [
        lambda: (job.path / "train.py").write_text("print(2)\n"),  # content and size
        lambda: os.utime(job.path / "data" / "a.txt", ns=(1, 1)),  # mtime only
        lambda: (job.path / "data" / "a.txt").chmod(0o600),  # mode
        lambda: (job.path / "new.py").write_text(""),  # a new file
        lambda: (job.path / "data" / "a.txt").unlink(),  # a deleted one
        lambda: (job.path / "empty").mkdir(),  # a new folder
        lambda: (job.path / "link").symlink_to("train.py"),  # a link
        lambda: (job.path / ".gitignore").write_text("*.txt\n"),  # the filters themselves
    ]
    for change in changes:
        change()
        now = local_fingerprint(job)
        assert now != fp
        fp = now


def test_remote_fingerprint_changes_with_the_nodes_copy_not_with_a_run(tmp_path: Path):
    """The node-side digest (GNU find, run here through bash as on a node): a stray or edited file changes
    it; what a run leaves in the job folder (the outputs link, __pycache__, the folder's own mtime) does not."""
    from remotefit.jobs.syncing import remote_fingerprint

    dest = write(tmp_path, {"job/train.py": "print(1)\n", "job/sub/a.txt": "a"}) / "job"

    def digest() -> str:
        res = subprocess.run(["bash", "-c", remote_fingerprint(str(dest), "outputs")], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        return res.stdout.split()[0]

    fp = digest()
    (dest / "outputs").symlink_to(tmp_path)  # the runner links outputs/ to the run's own folder
    (dest / "__pycache__").mkdir()
    (dest / "__pycache__" / "m.pyc").write_bytes(b"x")
    (dest / "sub" / "b.pyc").write_bytes(b"x")
    assert digest() == fp
    (dest / "stray.txt").write_text("left by a job")
    assert digest() != fp
    (dest / "stray.txt").unlink()
    assert digest() == fp
    (dest / "sub" / "a.txt").write_text("b")  # same size, new mtime
    assert digest() != fp

"""Jobs end to end: the real `inv` tasks against two sandbox nodes (real sshd, ssh and rsync on loopback).

One module-scoped project with two nodes serves every test (one apply, destroyed at the end); each test
writes its own small throwaway job folder.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import INV, ROOT, Project, containers, make_project

pytestmark = pytest.mark.e2e

RUN_JSON_KEYS = {
    "job",
    "command",
    "arguments",
    "git_commit",
    "node_type",
    "node_count",
    "market",
    "start",
    "end",
    "duration_s",
    "exit_code",
    "estimated_cost_usd",
}

TRAIN = """\
import json, os, sys
os.makedirs("outputs", exist_ok=True)
with open("outputs/result.txt", "w") as f:
    f.write("hello from " + os.environ["REMOTEFIT_RUN_ID"])
print("args", sys.argv[1:])
print("env", json.dumps({k: v for k, v in os.environ.items() if k.startswith("REMOTEFIT_")}))
sys.exit(int(os.environ.get("CODE", "0")))
"""

TICKS = """\
import sys, time
for i in range({n}):
    print("tick", i, flush=True)
    time.sleep({pause})
print("done", flush=True)
sys.exit({code})
"""

# A job that runs until the test lets it finish: it says it is waiting, then waits for the file
# `release` in its folder on the node (the test creates it over ssh), so no clock decides the race.
GATED = """\
import os, sys, time
print("waiting for release", flush=True)
while not os.path.exists("release"):
    time.sleep(0.1)
print("done", flush=True)
sys.exit({code})
"""


BUCKET = "remotefit-test-state-runs"  # conftest's state bucket + "-runs"


@pytest.fixture(scope="module")
def cluster(module_project: Project):
    p = module_project
    p.inv("backend", timeout=300)
    p.inv("apply", "--yes", "--nodes", "2", timeout=300)
    yield p
    # Destroy after real jobs ran (one may still be active) must succeed and verify.
    assert "verified: nothing tagged" in p.inv("destroy", "--yes", timeout=300).stdout


def make_job(base: Path, name: str, files: dict[str, str]) -> Path:
    job = base / name
    for rel, text in files.items():
        f = job / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    job.mkdir(parents=True, exist_ok=True)
    return job


def results_dir(res: subprocess.CompletedProcess[str]) -> Path:
    m = re.search(r"results in (\S+)", res.stderr)
    assert m, res.stderr
    return Path(m.group(1))


def run_id_of(text: str) -> str:
    m = re.search(r"run (\S+) started", text)
    assert m, text
    return m.group(1)


def ssh(p: Project, alias: str, command: str) -> subprocess.CompletedProcess[str]:
    return p.ssh(alias, command)


def workdir(p: Project, index: int = 0) -> str:
    return inventory_node(p, index)["workdir"]


def inventory_node(p: Project, index: int) -> dict:
    """Node `index` as the inventory (generated/nodes.json) records it."""
    return json.loads((p.generated / "nodes.json").read_text())["nodes"][index]


def release(p: Project, job: str, index: int = 0) -> None:
    """Let a GATED job on node `index` finish."""
    res = ssh(p, f"rf-test-{index}", f"touch {workdir(p, index)}/jobs/{job}/release")
    assert res.returncode == 0, res.stderr


def job_env_of(log: str, expected: dict[str, str]) -> dict[str, str]:
    """The variables of `expected` as the job printed them (`env {json}` of its REMOTEFIT_* variables;
    it has more, e.g. the runner's REMOTEFIT_RUN_DIR and the sandbox sshd's REMOTEFIT_NODE)."""
    (line,) = [ln for ln in log.splitlines() if ln.startswith("env {")]
    env = json.loads(line[len("env ") :])
    return {k: env.get(k) for k in expected}


def expected_env(p: Project, job: str, run_id: str, rank: int, nodes: int) -> dict[str, str]:
    """What the README promises each job process, from the inventory: node 0's private address is the
    master's, every run has its own port, and outputs/ is that run's folder in the node's workdir."""
    from remotefit.jobs import master_port_for

    ips = [inventory_node(p, i)["private_ip"] for i in range(nodes)]
    assert all(ips), ips
    return {
        "REMOTEFIT_RUN_ID": run_id,
        "REMOTEFIT_JOB": job,
        "REMOTEFIT_NODE_RANK": str(rank),
        "REMOTEFIT_NUM_NODES": str(nodes),
        "REMOTEFIT_NODE_IPS": ",".join(ips),
        "REMOTEFIT_MASTER_ADDR": ips[0],
        "REMOTEFIT_MASTER_PORT": str(master_port_for(run_id)),
        "REMOTEFIT_GPUS_PER_NODE": "0",  # c7i.xlarge
        "REMOTEFIT_OUTPUTS": f"{workdir(p, rank)}/outputs/{run_id}",
    }


def one_error_line(res: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert res.returncode != 0, res.stdout + res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    lines = [x for x in res.stderr.strip().splitlines() if x.startswith("error:")]
    assert len(lines) == 1, res.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def start_bg(p: Project, *args: str, out: Path) -> subprocess.Popen[bytes]:
    """`inv ARGS` in its own process group, stdout/stderr to files (read while it runs)."""
    return subprocess.Popen(
        [INV, *args],
        cwd=ROOT,
        env=p.env,
        stdin=subprocess.DEVNULL,
        stdout=(out.with_suffix(".out")).open("wb"),
        stderr=(out.with_suffix(".err")).open("wb"),
        start_new_session=True,
    )


def wait_for(path: Path, needle: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace") if path.exists() else ""
        if needle in text:
            return text
        time.sleep(0.1)
    raise AssertionError(f"{needle!r} not in {path} after {timeout}s:\n{text}")


# -- fit, outputs, exit codes ---------------------------------------------------------------
def test_fit_pulls_outputs_log_and_run_json(cluster: Project, tmp_path: Path):
    job = make_job(tmp_path, "hello", {"train.py": TRAIN})
    res = cluster.inv("fit", str(job), "--nodes", "1", "--", "--lr", "0.1", "--name", "a-b")
    d = results_dir(res)
    assert d.parent == cluster.runs / "hello" and d.name.startswith("hello-")
    assert (d / "result.txt").read_text() == f"hello from {d.name}"
    log = (d / "log").read_text()
    assert "args ['--lr', '0.1', '--name', 'a-b']" in log
    expected = expected_env(cluster, "hello", d.name, rank=0, nodes=1)
    env = job_env_of(log, expected)
    assert env == expected
    assert 29500 <= int(env["REMOTEFIT_MASTER_PORT"]) < 30000
    # REMOTEFIT_OUTPUTS is where the job's ./outputs really went on the node.
    on_node = ssh(cluster, "rf-test-0", f"cat {env['REMOTEFIT_OUTPUTS']}/result.txt")
    assert on_node.stdout == f"hello from {d.name}", on_node.stderr
    info = json.loads((d / "run.json").read_text())
    assert set(info) >= RUN_JSON_KEYS, RUN_JSON_KEYS - set(info)
    assert info["job"] == "hello" and info["command"] == "python train.py"
    assert info["arguments"] == ["--lr", "0.1", "--name", "a-b"]
    assert info["git_commit"] is None  # tmp_path is outside any git repository
    assert info["node_type"] == "c7i.xlarge" and info["node_count"] == 1 and info["market"] == "on-demand"
    assert info["exit_code"] == 0 and info["start"] and info["end"] and info["duration_s"] is not None
    assert isinstance(info["estimated_cost_usd"], float)
    # outputs/ on the node is a link to this run's own outputs folder.
    link = ssh(cluster, "rf-test-0", f"readlink {workdir(cluster)}/jobs/hello/outputs").stdout.strip()
    assert link.endswith(f"/outputs/{d.name}"), link

    # A run folder that exists locally is never overwritten; its content stays as it is.
    (d / "mine.txt").write_text("do not touch")
    before = {f.name: f.read_bytes() for f in d.iterdir()}
    again = cluster.inv("pull", "--run", d.name, check=False)
    one_error_line(again, "already exists", "never overwritten")
    assert {f.name: f.read_bytes() for f in d.iterdir()} == before


def test_exit_code_is_passed_on_and_outputs_still_pulled(cluster: Project, tmp_path: Path):
    job = make_job(tmp_path, "fails", {"train.py": TRAIN})
    res = cluster.inv("fit", str(job), "--nodes", "1", "--cmd", "CODE=3 python train.py", check=False)
    assert res.returncode == 3, res.stderr
    d = results_dir(res)
    assert (d / "result.txt").exists() and (d / "log").exists()
    assert json.loads((d / "run.json").read_text())["exit_code"] == 3


def test_a_job_exiting_255_is_not_mistaken_for_a_dropped_connection(cluster: Project, tmp_path: Path):
    job = make_job(tmp_path, "minus-one", {"train.py": "import sys; sys.exit(-1)\n"})
    res = cluster.inv("fit", str(job), "--nodes", "1", check=False, timeout=60)
    assert res.returncode == 255, res.stderr
    assert "reconnecting" not in res.stderr
    assert json.loads((results_dir(res) / "run.json").read_text())["exit_code"] == 255


def test_local_gives_the_same_layout(cluster: Project, tmp_path: Path):
    job = make_job(tmp_path, "here", {"train.py": TRAIN})
    res = cluster.inv("fit", str(job), "--local", "--", "--x", "1", "--name", "a b")
    d = results_dir(res)
    assert d.parent == cluster.runs / "here"
    assert (d / "result.txt").read_text() == f"hello from {d.name}"
    assert "args ['--x', '1', '--name', 'a b']" in (d / "log").read_text()  # quoting survives `--`
    info = json.loads((d / "run.json").read_text())
    assert set(info) >= RUN_JSON_KEYS and info["exit_code"] == 0 and info["local"] is True


# -- what a sync sends ------------------------------------------------------------------------
def test_sync_names_symlinks_and_ignores(cluster: Project, tmp_path: Path):
    outside = tmp_path / "secret.txt"
    outside.write_text("outside the job")
    job = make_job(
        tmp_path,
        "files",
        {
            "train.py": "print('hi')\n",
            "my data/ünïcødé file.txt": "unicode",
            "with space.txt": "space",
            "data.txt": "data",
            ".gitignore": "*.log\nbig/\n",
            ".remotefitignore": "private/\n",
            "run.log": "ignored by .gitignore",
            "big/blob.bin": "ignored by .gitignore",
            "private/key.txt": "ignored by .remotefitignore",
            "sub/.gitignore": "local-only.txt\n",
            "sub/local-only.txt": "ignored by sub/.gitignore",
            "sub/kept.txt": "kept",
            ".git/HEAD": "ref: refs/heads/main\n",
            "__pycache__/train.cpython-311.pyc": "x",
            "pkg/__pycache__/m.cpython-311.pyc": "x",
            ".venv/bin/python": "x",
        },
    )
    (job / "link_out").symlink_to(outside)
    (job / "link_in").symlink_to("data.txt")
    res = cluster.inv("sync", str(job), "--nodes", "1")
    assert "rf-test-0:" in res.stderr and "rf-test-1:" not in res.stderr
    listing = ssh(cluster, "rf-test-0", f"cd {workdir(cluster)}/jobs/files && find . -mindepth 1 | sort")
    names = set(listing.stdout.splitlines())
    assert "./my data/ünïcødé file.txt" in names and "./with space.txt" in names, names
    cat = ssh(cluster, "rf-test-0", f"cat '{workdir(cluster)}/jobs/files/my data/ünïcødé file.txt'")
    assert cat.stdout == "unicode"
    assert "./link_out" not in names  # --safe-links: points outside the folder
    assert "./link_in" in names
    assert "./sub/kept.txt" in names and "./sub/local-only.txt" not in names
    for gone in ("./run.log", "./big", "./private", "./.git", "./__pycache__", "./pkg/__pycache__", "./.venv"):
        assert gone not in names, gone


def test_resync_sends_only_the_changed_file(cluster: Project, tmp_path: Path):
    job = tmp_path / "many"
    for i in range(2000):
        d = job / f"d{i // 100:02d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i:04d}.txt").write_bytes(os.urandom(64))
    (job / "train.py").write_text("print('hi')\n")
    first = cluster.inv("sync", str(job), "--nodes", "1")
    assert "rf-test-0: 2001 of 2001 files transferred" in first.stderr, first.stderr
    same = cluster.inv("sync", str(job), "--nodes", "1")
    assert "rf-test-0: 0 of 2001 files transferred, 0 bytes sent" in same.stderr, same.stderr
    assert "unchanged since the last sync, rsync not needed" in same.stderr, same.stderr
    # Something changed the node's copy (a job wrote into its folder, a hand edit): the next sync is a real
    # rsync again, which puts the copy back as the laptop has it (--delete).
    there = f"{workdir(cluster)}/jobs/many"
    ssh(cluster, "rf-test-0", f"echo stray > '{there}/stray.txt' && echo edit >> '{there}/d00/f0000.txt'")
    healed = cluster.inv("sync", str(job), "--nodes", "1")
    assert "rf-test-0: 1 of 2001 files transferred" in healed.stderr, healed.stderr
    assert "unchanged" not in healed.stderr
    names = ssh(cluster, "rf-test-0", f"ls '{there}'; cat '{there}/d00/f0000.txt' | wc -c").stdout
    assert "stray.txt" not in names and names.split()[-1] == "64", names
    (job / "d07" / "f0700.txt").write_bytes(os.urandom(50_000))
    second = cluster.inv("sync", str(job), "--nodes", "1")
    m = re.search(r"rf-test-0: (\d+) of 2001 files transferred, (\d+) bytes sent", second.stderr)
    assert m, second.stderr
    assert int(m.group(1)) == 1
    assert 50_000 <= int(m.group(2)) < 50_000 * 1.1 + 60_000  # the file, plus the file list of 2,000 names


# -- detached runs: dropped connections, Ctrl-C, one run at a time ---------------------------
def test_dropped_connection_and_killed_client(cluster: Project, tmp_path: Path):
    job = make_job(tmp_path, "ticks", {"train.py": TICKS.format(n=12, pause=0.4, code=7)})
    proc = start_bg(cluster, "fit", str(job), "--nodes", "1", out=tmp_path / "a")
    wait_for(tmp_path / "a.out", "tick 1")
    # Kill the shared ssh connection under the running follow: it reconnects, nothing is repeated.
    subprocess.run(["ssh", "-F", str(cluster.generated / "ssh_config"), "-O", "exit", "rf-test-0"], check=False)
    assert proc.wait(timeout=90) == 7
    out = (tmp_path / "a.out").read_text()
    assert out.count("tick 1\n") == 1 and "done" in out, out
    assert (results_dir_from(tmp_path / "a.err") / "log").exists()

    # Kill the `inv fit` client itself: the job goes on and `inv logs --follow` gets the rest and its code.
    proc = start_bg(cluster, "fit", str(job), "--nodes", "1", out=tmp_path / "b")
    err = wait_for(tmp_path / "b.err", "started")
    wait_for(tmp_path / "b.out", "tick 1")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    run_id = run_id_of(err)
    res = cluster.inv("logs", "--run", run_id, "--follow", check=False, timeout=90)
    assert res.returncode == 7, res.stderr
    assert "tick 11" in res.stdout and "done" in res.stdout
    assert "exit code 7" in res.stderr


def results_dir_from(err_file: Path) -> Path:
    m = re.search(r"results in (\S+)", err_file.read_text())
    assert m, err_file.read_text()
    return Path(m.group(1))


def test_ctrl_c_detaches_and_the_run_completes(cluster: Project, tmp_path: Path):
    job = make_job(tmp_path, "ctrlc", {"train.py": GATED.format(code=0)})
    proc = start_bg(cluster, "fit", str(job), "--nodes", "1", out=tmp_path / "c")
    try:
        wait_for(tmp_path / "c.err", "started")
        wait_for(tmp_path / "c.out", "waiting for release")  # the job runs and cannot end before we say
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
        assert proc.wait(timeout=60) == 130
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    err = (tmp_path / "c.err").read_text()
    run_id = run_id_of(err)
    assert "Traceback" not in err
    assert f"detached from run {run_id}; it keeps running on the node" in err, err
    assert f"inv logs --run {run_id} --follow" in err and f"inv cancel --run {run_id}" in err, err
    assert "done" not in (tmp_path / "c.out").read_text()
    # Detached, not stopped: the run is still the node's active run until we release it.
    active = ssh(cluster, "rf-test-0", f"cat {workdir(cluster)}/active.json")
    assert json.loads(active.stdout)["run_id"] == run_id, active.stdout + active.stderr
    release(cluster, "ctrlc")
    res = cluster.inv("logs", "--run", run_id, "--follow", timeout=90)
    assert "done" in res.stdout and "exit code 0" in res.stderr
    pulled = cluster.inv("pull", "--run", run_id)
    assert json.loads((Path(pulled.stdout.strip()) / "run.json").read_text())["exit_code"] == 0


def test_second_fit_is_refused_while_one_is_active(cluster: Project, tmp_path: Path):
    code = GATED.format(code=0)
    job = make_job(tmp_path, "gated", {"train.py": code})
    first = cluster.inv("fit", str(job), "--nodes", "1", "--detach")
    run_id = run_id_of(first.stderr)
    assert f"inv logs --run {run_id} --follow" in first.stderr
    # The first run is active until this test releases it, however slow the machine.
    log = f"{workdir(cluster)}/runs/{run_id}/log"  # the runner's layout on the node
    deadline = time.monotonic() + 60
    while "waiting for release" not in ssh(cluster, "rf-test-0", f"cat {log}").stdout:
        assert time.monotonic() < deadline, "the first run never started"
        time.sleep(0.2)
    link = f"{workdir(cluster)}/jobs/gated/outputs"
    before = ssh(cluster, "rf-test-0", f"readlink {link}").stdout
    assert before.strip().endswith(f"/outputs/{run_id}"), before
    (job / "train.py").write_text("print('changed')\n")
    second = cluster.inv("fit", str(job), "--nodes", "1", check=False)
    line = one_error_line(second, run_id, "still active")
    assert second.returncode == 3, line
    # Nothing of the active run was touched: not its code, not its outputs link.
    assert ssh(cluster, "rf-test-0", f"readlink {link}").stdout == before
    assert ssh(cluster, "rf-test-0", f"cat {workdir(cluster)}/jobs/gated/train.py").stdout == code
    # Released, the first run finishes on its own, untouched by the refused one.
    release(cluster, "gated")
    res = cluster.inv("logs", "--run", run_id, "--follow", timeout=90)
    assert "done" in res.stdout and "exit code 0" in res.stderr, res.stderr


# -- two nodes, torch.distributed ---------------------------------------------------------------
DIST_TRAIN = """\
import json, os
import torch
import torch.distributed as dist

print("env", json.dumps({k: v for k, v in os.environ.items() if k.startswith("REMOTEFIT_")}), flush=True)
print("torch", os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"], flush=True)
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
t = torch.tensor([float(rank + 1)])
dist.all_reduce(t)
print(f"rank {rank}/{world} node {os.environ['REMOTEFIT_NODE_RANK']} all_reduce {t.item()}", flush=True)
os.makedirs("outputs", exist_ok=True)
with open(f"outputs/rank{rank}.json", "w") as f:
    json.dump({"rank": rank, "world": world, "sum": t.item()}, f)
dist.barrier()
dist.destroy_process_group()
"""


def test_torch_distributed_on_two_nodes(cluster: Project, tmp_path: Path):
    job = make_job(
        tmp_path,
        "dist",
        # torch from its requirements, as a stock node has none (loopback nodes have this checkout's already).
        {
            "train.py": DIST_TRAIN,
            "requirements.txt": "torch>=2.1\n",
            "job.toml": 'distributed = true\nenv = { OMP_NUM_THREADS = "1" }\n',
        },
    )
    res = cluster.inv("fit", str(job), "--nodes", "2", timeout=240)
    d = results_dir(res)
    assert json.loads((d / "rank0.json").read_text()) == {"rank": 0, "world": 2, "sum": 3.0}
    node0, node1 = (d / "logs" / "node-0.log").read_text(), (d / "logs" / "node-1.log").read_text()
    assert "rank 0/2 node 0 all_reduce 3.0" in node0, node0
    assert "rank 1/2 node 1 all_reduce 3.0" in node1, node1
    # Each node's job got its own rank and the same rendezvous: node 0's private address and the
    # run's port, which torchrun was given too.
    for rank, log in enumerate((node0, node1)):
        expected = expected_env(cluster, "dist", d.name, rank=rank, nodes=2)
        env = job_env_of(log, expected)
        assert env == expected, rank
        assert f"torch {env['REMOTEFIT_MASTER_ADDR']} {env['REMOTEFIT_MASTER_PORT']}" in log, log
    info = json.loads((d / "run.json").read_text())
    assert info["node_count"] == 2 and info["exit_code"] == 0 and info["exit_codes"] == [0, 0]
    # Kept in the runs bucket too: every node's log and final status, rank 0's outputs (issue 9).
    s3 = cluster.workspace().client("s3")
    prefix = f"test/dist/{d.name}/"
    kept = {o["Key"][len(prefix) :] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])}
    assert {"logs/node-0.log", "logs/node-1.log", "status/node-0.json", "status/node-1.json"} <= kept, kept
    assert "outputs/rank0.json" in kept and not any("rank1" in k for k in kept), kept
    body = s3.get_object(Bucket=BUCKET, Key=prefix + "logs/node-1.log")["Body"].read()
    assert body == (d / "logs" / "node-1.log").read_bytes()


# -- the job's PATH and a failed boot (issue 11) -------------------------------------------------
def test_sandbox_job_gets_a_stock_path_and_python_from_the_shim(cluster: Project, tmp_path: Path):
    """As on a stock Ubuntu node: this checkout's venv is not on the job's PATH; `python` (which must
    have torch) comes from the runner's shim."""
    booted = containers(cluster)  # a booted node's Python is the image's, with no torch (a stock image's)
    imports = "sys" if booted else "sys, torch"
    job = make_job(tmp_path, "where", {"where.py": f"import {imports}\nprint('EXE', sys.executable)\n"})
    cmd = 'echo "PATH=$PATH"; echo "WHICH=$(command -v python)"; python where.py'
    res = cluster.inv("fit", str(job), "--nodes", "1", "--cmd", cmd)
    log = (results_dir(res) / "log").read_text()
    path = re.search(r"^PATH=(.*)$", log, re.M).group(1).split(":")
    assert os.path.dirname(INV) not in path, path  # this checkout's venv (where `inv` and torch live)
    assert path[0] == f"{workdir(cluster)}/.remotefit/bin", path
    assert re.search(r"^WHICH=(.*)$", log, re.M).group(1) == f"{workdir(cluster)}/.remotefit/bin/python"
    assert "EXE " in log  # the shim's python ran (and on a loopback node imported torch)
    if booted:
        assert "EXE /usr/bin/python3" in log, log


def test_failed_boot_is_one_line_naming_the_node(cluster: Project):
    """apply's readiness check over real ssh: node 0's markers are found through its sshd's SetEnv (no
    /var/lib/remotefit on this machine), node 1's failed boot is one line with its boot log's tail. (The
    module's teardown then destroys and verifies nothing is left.)"""
    from remotefit import nodes as nd
    from remotefit.errors import UserError

    ws = cluster.workspace()
    live = nd.inventory(ws)
    failed = "step 'installing python3-venv python3-pip' failed (exit 100) at T\n"
    log = "E: Could not get lock /var/lib/dpkg/lock-frontend\nremotefit-boot: FAILED\n"
    if containers(cluster):  # a booted node: the markers where the boot script writes them, as root
        mark = f"printf %s {shlex.quote(failed)} | sudo tee /var/lib/remotefit/boot-failed >/dev/null && "
        mark += f"printf %s {shlex.quote(log)} | sudo tee -a /var/log/remotefit-boot.log >/dev/null"
        assert cluster.ssh("rf-test-1", mark).returncode == 0

        def unmark() -> None:
            assert cluster.ssh("rf-test-1", "sudo rm /var/lib/remotefit/boot-failed").returncode == 0
    else:
        boot = cluster.sandbox / "nodes" / live[1].instance_id / "boot"
        (boot / "boot-failed").write_text(failed)
        (boot / "boot.log").write_text(log)

        def unmark() -> None:
            (boot / "boot-failed").unlink()

    try:
        with pytest.raises(UserError) as exc:
            nd.wait_ready(ws, live, timeout=120)
    finally:
        unmark()
    msg = exc.value.message
    assert "\n" not in msg and exc.value.code != 0
    assert msg.startswith(f"rf-test-1 ({live[1].instance_id}): the node's boot failed: step 'installing python3-venv")
    assert "E: Could not get lock /var/lib/dpkg/lock-frontend | remotefit-boot: FAILED" in msg
    assert "`inv destroy`" in msg
    assert nd.wait_ready(ws, live, timeout=120) >= 0  # both ready again


# -- bad inputs: one line, non-zero, no traceback ----------------------------------------------
def test_bad_inputs(cluster: Project, tmp_path: Path):
    ok = make_job(tmp_path, "ok", {"train.py": TRAIN})
    empty = make_job(tmp_path, "empty", {"notes.txt": "no train.py"})
    broken = make_job(tmp_path, "broken", {"job.toml": 'command = "python x.py"\nsetup = [\n', "x.py": ""})
    typo = make_job(tmp_path, "typo", {"job.toml": 'comand = "python x.py"\n', "x.py": ""})
    cases = [
        (("fit", str(tmp_path / "missing")), ("does not exist",)),
        (("fit", str(ok / "train.py")), ("is a file",)),
        (("fit", str(empty)), ("no train.py", "--cmd")),
        (("fit", str(broken)), (f"{broken}/job.toml:2", "not valid TOML")),
        (("fit", str(typo)), ("unknown key 'comand'", "did you mean command")),
        (("fit", str(ok), "--gpu"), ("--gpu", "CPU", "inv apply --gpu")),
        (("fit", str(ok), "--nodes", "3"), ("--nodes 3", "only 2", "inv apply --nodes 3")),
        (("pull", "--run", "no-such-run"), ("unknown run id no-such-run",)),
        (("logs", "--run", "no-such-run"), ("unknown run id no-such-run",)),
    ]
    for args, needles in cases:
        one_error_line(cluster.inv(*args, check=False), *needles)
    assert not (cluster.runs / "ok").exists()  # nothing ran


def test_fit_with_no_nodes_says_to_apply(tmp_path: Path):
    p = make_project(tmp_path / "bare")
    job = make_job(tmp_path, "j", {"train.py": TRAIN})
    one_error_line(p.inv("fit", str(job), check=False), "no nodes", "inv apply")
    one_error_line(p.inv("sync", str(job), check=False), "no nodes", "inv apply")


def test_the_fit_loop_imports_no_aws_sdk(cluster: Project, tmp_path: Path):
    """`inv sync` and `inv fit` on ready nodes make no AWS call, so they must not pay for importing
    boto3/botocore (as `python -X importtime` shows them: PYTHONPROFILEIMPORTTIME is the same switch)."""
    job = make_job(tmp_path, "noboto", {"train.py": "print('ok')\n"})
    traced = Project(cluster.dir, {**cluster.env, "PYTHONPROFILEIMPORTTIME": "1"})
    for args in (("sync", str(job)), ("fit", str(job))):
        res = traced.inv(*args)
        imported = [ln.rsplit("|", 1)[1].strip() for ln in res.stderr.splitlines() if ln.startswith("import time:")]
        assert "remotefit.jobs" in imported, res.stderr[-2000:]
        aws = [m for m in imported if m.split(".")[0] in ("boto3", "botocore", "s3transfer")]
        assert not aws, f"inv {args[0]} imported {aws[:5]}"

"""Faults and hostile inputs, end to end on the sandbox: nothing lost, nothing hidden, nothing escapes.

One module-scoped project with one node serves every test (one apply, destroyed at the end). Each test
injects one fault (a killed ssh client, a killed `inv`, a hostile job.toml …) into the real chain and
checks that the run, its results and the cloud state survive it, with one clear line for bad input.
Jobs wait for a gate file, made on the node over ssh (`touch_on_node`), never for a sleep.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import INV, ROOT, Project, node_record, on_node, touch_on_node

pytestmark = [pytest.mark.e2e, pytest.mark.fault]  # counted as `N faults ran` in the closing line

# Prints a line, waits for the gate file named by GATE, prints more, exits with CODE.
GATED = """\
import os, sys, time
os.makedirs("outputs", exist_ok=True)
print("waiting", flush=True)
while not os.path.exists(os.environ["GATE"]):
    time.sleep(0.05)
with open("outputs/result.txt", "w") as f:
    f.write("done")
print("after the gate", flush=True)
sys.exit(int(os.environ.get("CODE", "0")))
"""


@pytest.fixture(scope="module")
def cluster(module_project: Project):
    p = module_project
    p.inv("backend", timeout=300)
    p.inv("apply", "--yes", timeout=300)
    yield p
    p.inv("destroy", "--yes", check=False, timeout=300)


def make_job(base: Path, name: str, files: dict[str, str]) -> Path:
    job = base / name
    job.mkdir(parents=True, exist_ok=True)
    for rel, text in files.items():
        f = job / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    return job


def gated_job(base: Path, name: str, gate: Path, code: int = 0, extra_toml: str = "") -> Path:
    toml = f'[env]\nGATE = "{gate}"\nCODE = "{code}"\n{extra_toml}'
    return make_job(base, name, {"train.py": GATED, "job.toml": toml})


def start_bg(p: Project, *args: str, out: Path) -> subprocess.Popen[bytes]:
    """`inv ARGS` in its own process group, stdout/stderr to files (read while it runs)."""
    return subprocess.Popen(
        [INV, *args],
        cwd=ROOT,
        env=p.env,
        stdin=subprocess.DEVNULL,
        stdout=out.with_suffix(".out").open("wb"),
        stderr=out.with_suffix(".err").open("wb"),
        start_new_session=True,
    )


def wait_for(path: Path, needle: str, timeout: float = 90) -> str:
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace") if path.exists() else ""
        if needle in text:
            return text
        time.sleep(0.05)
    raise AssertionError(f"{needle!r} not in {path} after {timeout}s:\n{text}")


def children(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of pid's direct children."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            ppid = int(stat[stat.rfind(")") + 2 :].split()[1])
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid:
            out.append((int(d.name), cmd))
    return out


def run_id_of(text: str) -> str:
    m = re.search(r"run (\S+) started", text)
    assert m, text
    return m.group(1)


def one_error_line(res: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert res.returncode != 0, res.stdout + res.stderr
    assert "Traceback" not in res.stderr + res.stdout, res.stderr
    lines = [x for x in res.stderr.strip().splitlines() if x.startswith("error:")]
    assert len(lines) == 1, res.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def workdir(p: Project) -> str:
    return node_record(p)["workdir"]


# -- 1. a killed ssh client is a lost connection, never the job's exit code --------------------
def kill_ssh_clients(proc: subprocess.Popen[bytes]) -> None:
    ssh_children = [pid for pid, cmd in children(proc.pid) if cmd.startswith("ssh ")]
    assert ssh_children, children(proc.pid)
    for pid in ssh_children:
        os.kill(pid, signal.SIGKILL)  # what an OOM killer or a closed terminal does to the client


def test_killed_ssh_client_is_not_the_exit_code(cluster: Project, tmp_path: Path):
    for case in ("client", "client-and-master"):
        gate = tmp_path / f"gate-{case}"
        job = gated_job(tmp_path, f"kill-{case}", gate, code=7)
        out = tmp_path / case
        proc = start_bg(cluster, "fit", str(job), out=out)
        wait_for(out.with_suffix(".out"), "waiting")
        kill_ssh_clients(proc)
        if case == "client-and-master":
            # The shared connection goes too: the stream ends and fit must reconnect, not report -9.
            subprocess.run(["ssh", "-F", str(cluster.generated / "ssh_config"), "-O", "exit", "rf-test-0"], check=False)
            wait_for(out.with_suffix(".err"), "reconnecting")
        touch_on_node(cluster, gate)
        assert proc.wait(timeout=120) == 7, out.with_suffix(".err").read_text()
        text, err = out.with_suffix(".out").read_text(), out.with_suffix(".err").read_text()
        assert text.count("waiting\n") == 1 and "after the gate" in text, text
        assert "exit code 7" in err and "exit code -9" not in err, err  # (a run id may hold "-9")
        run_dir = Path(re.search(r"results in (\S+)", err).group(1))  # type: ignore[union-attr]
        info = json.loads((run_dir / "run.json").read_text())
        assert info["exit_code"] == 7 and info["final"] is True, info
        assert (run_dir / "result.txt").read_text() == "done"


def test_killed_inv_fit_then_logs_follow_and_pull_recover_the_run(cluster: Project, tmp_path: Path):
    gate = tmp_path / "gate"
    job = gated_job(tmp_path, "killinv", gate, code=4)
    proc = start_bg(cluster, "fit", str(job), out=tmp_path / "a")
    wait_for(tmp_path / "a.out", "waiting")
    run_id = run_id_of((tmp_path / "a.err").read_text())
    os.killpg(proc.pid, signal.SIGKILL)  # inv and its ssh children, all at once
    proc.wait(timeout=30)
    touch_on_node(cluster, gate)
    res = cluster.inv("logs", "--run", run_id, "--follow", check=False, timeout=120)
    assert res.returncode == 4 and "waiting\nafter the gate\n" in res.stdout, res.stderr
    cluster.inv("pull", "--run", run_id, timeout=120)
    run_dir = cluster.runs / "killinv" / run_id
    info = json.loads((run_dir / "run.json").read_text())
    assert info["exit_code"] == 4 and info["final"] is True and (run_dir / "result.txt").read_text() == "done"
    assert "after the gate" in (run_dir / "log").read_text()


def test_pull_completes_an_incomplete_local_folder(cluster: Project, tmp_path: Path):
    gate = tmp_path / "gate"
    touch_on_node(cluster, gate)
    job = gated_job(tmp_path, "incomplete", gate, code=3)
    res = cluster.inv("fit", str(job), check=False, timeout=120)
    assert res.returncode == 3, res.stderr
    run_id = run_id_of(res.stderr)
    run_dir = cluster.runs / "incomplete" / run_id
    # What an older remotefit left after a killed client: a folder with a wrong, non-final run.json.
    info = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps({**info, "exit_code": -9, "exit_codes": [-9], "final": False}))
    (run_dir / "result.txt").unlink()
    (run_dir / "notes.txt").write_text("mine")  # the user's own file in it is kept
    cluster.inv("pull", "--run", run_id, timeout=120)
    info = json.loads((run_dir / "run.json").read_text())
    assert info["exit_code"] == 3 and info["final"] is True, info
    assert (run_dir / "result.txt").read_text() == "done"
    assert (run_dir / "notes.txt").read_text() == "mine"
    # A complete folder is still never overwritten.
    one_error_line(cluster.inv("pull", "--run", run_id, check=False), "never overwritten")


# -- 5. [env] secrets never in a command line; the env file does not outlive the start ----------
def test_env_secrets_not_in_ps_and_no_env_file_left(cluster: Project, tmp_path: Path):
    gate = tmp_path / "gate"
    secret = "tok-" + os.urandom(6).hex()
    job = gated_job(tmp_path, "secret", gate, extra_toml=f'TOKEN = "{secret}"\n')
    (job / "train.py").write_text(
        GATED.replace(
            'print("waiting"', 'print("token ok" if os.environ["TOKEN"] else "", flush=True)\nprint("waiting"'
        )
    )
    proc = start_bg(cluster, "fit", str(job), out=tmp_path / "a")
    wait_for(tmp_path / "a.out", "waiting")
    # A sandbox node's processes (a loopback sshd's, or a container's) are this machine's too: one `ps`
    # sees both sides' command lines.
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    assert secret not in ps
    rdir = on_node(cluster, Path(workdir(cluster)) / ".remotefit")
    assert not list(rdir.glob("env-*.json")), list(rdir.iterdir())
    touch_on_node(cluster, gate)
    assert proc.wait(timeout=120) == 0, (tmp_path / "a.err").read_text()
    assert "token ok" in (tmp_path / "a.out").read_text()
    assert secret not in (tmp_path / "a.err").read_text()


# -- 7. no tracebacks --------------------------------------------------------------------------
def test_logs_of_a_running_job_with_invalid_utf8(cluster: Project, tmp_path: Path):
    gate = tmp_path / "gate"
    job = gated_job(tmp_path, "binary", gate)
    (job / "train.py").write_text(
        GATED.replace('print("waiting"', 'sys.stdout.buffer.write(b"bad \\xff\\xfe bytes\\n")\nprint("waiting"')
    )
    proc = start_bg(cluster, "fit", str(job), "--detach", out=tmp_path / "a")
    assert proc.wait(timeout=120) == 0, (tmp_path / "a.err").read_text()
    run_id = run_id_of((tmp_path / "a.err").read_text())
    deadline = time.monotonic() + 60
    while True:
        res = subprocess.run([INV, "logs", "--run", run_id], cwd=ROOT, env=cluster.env, capture_output=True, timeout=60)
        if b"waiting" in res.stdout or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert res.returncode == 0 and b"Traceback" not in res.stderr, res.stderr
    assert b"bad \xff\xfe bytes\nwaiting\n" in res.stdout and b"still running" in res.stderr
    touch_on_node(cluster, gate)
    res = subprocess.run(
        [INV, "logs", "--run", run_id, "--follow"], cwd=ROOT, env=cluster.env, capture_output=True, timeout=120
    )
    assert res.returncode == 0 and b"bad \xff\xfe bytes\n" in res.stdout and b"after the gate" in res.stdout


# -- hostile inputs: one line, non-zero, nothing written or touched ----------------------------
def test_hostile_inputs_are_one_line_and_change_nothing(cluster: Project, tmp_path: Path):
    base = workdir(cluster)
    # Another job's folder on the node, made there as its user would.
    mine = cluster.ssh("rf-test-0", f"mkdir -p {base}/jobs/victim && printf mine > {base}/jobs/victim/keep.txt")
    assert mine.returncode == 0, mine.stderr
    other = on_node(cluster, Path(base) / "jobs" / "victim")
    outside = tmp_path / "outside"
    outside.mkdir()
    cases = [
        # 4. job.toml paths out of the job folder
        (make_job(tmp_path, "esc1", {"train.py": "", "job.toml": 'outputs = "../victim"'}), "outputs"),
        (make_job(tmp_path, "esc2", {"train.py": "", "job.toml": f'outputs = "../../../../..{outside}"'}), "outputs"),
        (make_job(tmp_path, "esc3", {"train.py": "", "job.toml": 'requirements = "../../x.txt"'}), "requirements"),
    ]
    for job, needle in cases:
        one_error_line(cluster.inv("fit", str(job), check=False), str(job / "job.toml"), needle)
    # 10. a job folder name that cannot be carried safely
    evil = make_job(tmp_path, "evil\nvictim", {"train.py": ""})
    one_error_line(cluster.inv("fit", str(evil), check=False), "job folder name", "rename")
    one_error_line(cluster.inv("sync", str(evil), check=False), "job folder name", "rename")
    assert not [n for n in os.listdir(on_node(cluster, Path(base) / "jobs")) if "evil" in n or "\n" in n]
    # 7. run ids that are paths, binary bytes in aws_env_vars
    for task in ("logs", "pull", "cancel"):
        one_error_line(cluster.inv(task, "--run", "../node_vars", check=False), "--run '../node_vars'", "not a run id")
    bad_env = tmp_path / "aws_env_vars"
    bad_env.write_bytes(cluster.env_file.read_bytes() + b"STAGE=\xff\x00\n")
    res = subprocess.run(
        [INV, "status"],
        cwd=ROOT,
        env={**cluster.env, "REMOTEFIT_ENV_FILE": str(bad_env)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    one_error_line(res, "aws_env_vars:6", "not UTF-8")
    assert (other / "keep.txt").read_text() == "mine" and sorted(os.listdir(other)) == ["keep.txt"]
    assert list(outside.iterdir()) == []
    assert not cluster.runs.exists() or not any(cluster.runs.glob("esc*"))


# -- 8. transport errors name the node, its EC2 state and the fix -----------------------------
def test_stopped_node_is_named_with_its_state_and_the_fix(cluster: Project, tmp_path: Path):
    job = make_job(tmp_path, "stopped", {"train.py": "print('ok')"})
    cluster.inv("stop", timeout=120)
    try:
        for task in ("fit", "sync"):
            one_error_line(cluster.inv(task, str(job), check=False, timeout=120), "rf-test-0", "stopped", "inv start")
        assert not (cluster.runs / "stopped").exists()
    finally:
        cluster.inv("start", timeout=300)
    assert cluster.inv("fit", str(job), timeout=120).returncode == 0


# -- 6. moto killed and restarted mid-session: state and nodes come back -----------------------
def test_moto_killed_mid_session_state_and_nodes_come_back(cluster: Project, tmp_path: Path):
    gate = tmp_path / "gate"
    job = gated_job(tmp_path, "motokill", gate, code=5)
    res = cluster.inv("fit", str(job), "--detach", timeout=120)
    run_id = run_id_of(res.stderr)
    instance = node_record(cluster)["instance_id"]
    moto = json.loads((cluster.sandbox / "moto.json").read_text())
    os.kill(moto["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{moto['pid']}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    # A read-only command changes nothing: the node and its job live on.
    st = cluster.inv("sandbox.status", timeout=60)
    node_line = next(x for x in st.stdout.splitlines() if x.startswith(f"{instance} "))
    assert "moto server: not running" in st.stdout and " up " in node_line, st.stdout
    assert on_node(cluster, Path(workdir(cluster)) / "active.json").exists()  # the job still runs
    up = cluster.inv("sandbox.up", timeout=300)
    assert "restored the previous server's state" in up.stderr and instance in up.stderr, up.stderr
    # Back at its old address, as AWS's endpoints never move: what the node was told still reaches it.
    assert json.loads((cluster.sandbox / "moto.json").read_text())["port"] == moto["port"]
    status = cluster.inv("status", timeout=120).stdout
    assert instance in status and "running" in status, status
    touch_on_node(cluster, gate)
    res = cluster.inv("logs", "--run", run_id, "--follow", check=False, timeout=120)
    assert res.returncode == 5 and "after the gate" in res.stdout, res.stderr
    assert "ok" in cluster.inv("fit", str(make_job(tmp_path, "after", {"train.py": "print('ok')"})), timeout=120).stdout


# -- 2. status (and fit) from the state when the local records are lost -------------------------
def test_status_and_fit_rebuilt_from_the_state(cluster: Project, tmp_path: Path):
    job = make_job(tmp_path, "fromstate", {"train.py": "print('ok from state')"})
    g = cluster.generated
    for lost in ("missing", "empty"):
        for f in (g / "nodes.json", g / "ssh_config", g / "node_vars.json", *g.glob("*.tfvars")):
            f.unlink(missing_ok=True)
        if lost == "empty":
            (g / "nodes.json").write_text("")
        res = cluster.inv("status", timeout=120)
        assert "rf-test-0" in res.stdout and "running" in res.stdout, res.stdout + res.stderr
    assert "ok from state" in cluster.inv("fit", str(job), timeout=120).stdout
    # Older than the state (an interrupted apply wrote the state after it): rebuilt too.
    nodes = json.loads((g / "nodes.json").read_text())
    real_port = nodes["nodes"][0]["port"]
    nodes["nodes"][0]["port"] = 1
    (g / "nodes.json").write_text(json.dumps(nodes))
    os.utime(g / "nodes.json", (0, 0))
    cluster.inv("status", timeout=120)
    assert json.loads((g / "nodes.json").read_text())["nodes"][0]["port"] == real_port


# -- 3. `rm -rf generated/`: status, fit and destroy work from aws_env_vars and the state bucket alone ----
def test_lost_generated_status_fit_destroy(cluster: Project, tmp_path: Path):
    config = str(cluster.generated / "ssh_config")
    subprocess.run(["ssh", "-F", config, "-O", "exit", "rf-test-0"], capture_output=True, check=False)
    shutil.rmtree(cluster.generated)  # what a user does to "start clean"; the key and sandbox are kept apart
    status = cluster.inv("status", timeout=120).stdout
    assert "rf-test-0" in status and "running" in status, status
    job = make_job(tmp_path, "nogen", {"train.py": "print('ok without generated')"})
    assert "ok without generated" in cluster.inv("fit", str(job), timeout=120).stdout
    # The key itself lost (a new laptop): the node trusts only the old one, and fit says so in one line.
    subprocess.run(["ssh", "-F", config, "-O", "exit", "rf-test-0"], capture_output=True, check=False)
    for f in (cluster.kept / "keys").iterdir():
        f.unlink()
    one_error_line(
        cluster.inv("fit", str(job), check=False, timeout=120), "refuses this stage's ssh key", "inv destroy"
    )
    shutil.rmtree(cluster.generated)
    res = cluster.inv("destroy", "--yes", timeout=300)
    assert "verified: nothing tagged" in res.stdout, res.stdout + res.stderr
    assert "no nodes" in cluster.inv("status", timeout=120).stdout


def test_sigint_during_apply_then_status_and_destroy(cluster: Project, tmp_path: Path):
    out = tmp_path / "apply"
    proc = start_bg(cluster, "apply", "--yes", out=out)
    wait_for(out.with_suffix(".err"), "Creation complete", timeout=240)
    os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C: inv and terraform alike
    assert proc.wait(timeout=240) != 0
    err = out.with_suffix(".err").read_text()
    assert "may exist" in err and "inv destroy" in err and "Traceback" not in err, err
    status = cluster.inv("status", timeout=120).stdout
    assert "rf-test-0" in status or "state holds" in status, status
    res = cluster.inv("destroy", "--yes", timeout=300)
    assert "verified: nothing tagged" in res.stdout, res.stdout + res.stderr


def test_sandbox_down_closes_our_ssh_masters(cluster: Project, tmp_path: Path):
    cluster.inv("apply", "--yes", timeout=300)
    cluster.inv("fit", str(make_job(tmp_path, "master", {"train.py": "print('ok')"})), timeout=120)
    config = str(cluster.generated / "ssh_config")
    check = ["ssh", "-F", config, "-O", "check", "rf-test-0"]
    assert subprocess.run(check, capture_output=True, check=False).returncode == 0  # a master is open
    res = cluster.inv("sandbox.down", timeout=120)
    assert "ssh connection to rf-test-0" in res.stdout, res.stdout
    assert subprocess.run(check, capture_output=True, check=False).returncode != 0

"""README promises, each checked end to end through the real `inv` tasks on the sandbox.

One module-scoped project, a copy of this checkout in a folder whose name has a space ("my project"), with
no REMOTEFIT_* overrides: tasks.py, generated/ (known_hosts, ssh and sshd configs) and runs/ all live
under the spaced path; the kept records (keys, the sandbox) under $XDG_DATA_HOME/remotefit, as for a user. It is applied once, as a spot node with a non-default disk, and reused by every test.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, Project, machine_wide, make_project, requires

pytestmark = pytest.mark.e2e

INV = str(Path(sys.executable).parent / "inv")
ITYPE = "c7i.8xlarge"  # the priciest CPU type in prices.json: its cost lines show real cents
DISK_GB = 60  # not the CPU default (50)
STAGE, ACCOUNT, BUCKET = "test", "testacct", "remotefit-test-state"
COPIED = ("tasks.py", "invoke.yaml", "remotefit", "templates", "scripts", ".tflint.hcl")


@dataclass
class SpacedProject(Project):
    """A whole checkout under a path with a space: `inv` runs from it, nothing is redirected elsewhere."""

    @property
    def cwd(self) -> Path:
        return self.dir

    def workspace(self):  # noqa: ANN201
        from remotefit.config import remotefit_home
        from remotefit.workspace import Workspace

        ws = Workspace(root=self.dir, defaults={"terraform_mirror": "/opt/tf-plugins"})
        ws.paths = dataclasses.replace(ws.paths, home=remotefit_home(self.env))  # the user's, as inv sees it
        return ws

    def node(self, index: int = 0) -> dict[str, Any]:
        return json.loads((self.generated / "nodes.json").read_text())["nodes"][index]


@pytest.fixture(scope="module")
def proj(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("promises") / "my project"
    base.mkdir()
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, base / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy2(src, base / name)
    (base / "aws_env_vars").write_text(
        f"AWS_ACCOUNT={ACCOUNT}\nAWS_REGION=us-east-1\nSTAGE={STAGE}\nTF_STATE_BUCKET={BUCKET}\nTARGET=sandbox\n"
    )
    # like make_project's environment, but nothing redirected: everything lives under the spaced folder
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "REMOTEFIT_", "TARGET", "STAGE", "TF_STATE"))
    }
    env["PATH"] = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"
    env.update(machine_wide())  # the kind of sandbox node this run chose (CI: REMOTEFIT_SANDBOX_NODES)
    env["XDG_DATA_HOME"] = str(base.parent / "xdg data")  # a user's setting, spaced too; not the tester's home
    p = SpacedProject(base, env)
    yield p
    p.down()


@pytest.fixture(scope="module")
def applied(proj: SpacedProject) -> dict[str, Any]:
    proj.inv("backend")
    before = datetime.now(UTC)
    res = proj.inv("apply", "--yes", "--spot", "--disk-gb", str(DISK_GB), "--instance-type", ITYPE, "--max-hours", "1")
    return {"res": res, "before": before, "after": datetime.now(UTC)}


# -- helpers ------------------------------------------------------------------------------
def prices() -> dict[str, Any]:
    return json.loads((ROOT / "remotefit" / "prices.json").read_text())


def usd(x: float, decimals: int = 2) -> str:
    """The README's money format, written out independently of remotefit.cost."""
    if 0 < x < 10**-decimals / 2:
        return f"<${10**-decimals:.{decimals}f}"
    return f"${x:,.{decimals}f}"


def assert_cost_between(shown: str, low: float, high: float) -> None:
    """`shown` is what was spent between two instants, as printed (whole cents, "<$0.01" under half a cent)."""
    if shown.startswith("<$"):
        assert low < 0.005, (shown, low, high)
        return
    value = float(shown.lstrip("$").replace(",", ""))
    assert round(low, 2) <= value <= round(high, 2), (shown, low, high)


def error_line(res: subprocess.CompletedProcess[str]) -> str:
    assert res.returncode != 0, res.stdout + res.stderr
    out = res.stdout + res.stderr
    assert "Traceback" not in out, out
    (line,) = [ln for ln in out.splitlines() if ln.startswith("error:")]
    return line


def make_job(base: Path, name: str, files: dict[str, str | bytes]) -> Path:
    job = base / name
    job.mkdir(parents=True, exist_ok=True)
    for rel, content in files.items():
        f = job / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(content) if isinstance(content, bytes) else f.write_text(content)
    return job


def wait_for(path: Path, needle: str, timeout: float = 90) -> str:
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace") if path.exists() else ""
        if needle in text:
            return text
        time.sleep(0.1)
    raise AssertionError(f"{needle!r} not in {path} after {timeout}s:\n{text}")


def runner_status(p: SpacedProject, run_id: str) -> dict[str, Any]:
    n = p.node()
    runner = f"{n['workdir']}/.remotefit/runner.py"
    cmd = shlex.join([n["python"], "-S", runner, "status", "--base", n["workdir"], "--run-id", run_id])
    res = p.ssh(n["alias"], cmd)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def row_of(lines: list[str], first: str) -> list[str]:
    return next(ln for ln in lines if ln.startswith(first)).split()


# -- inv check -----------------------------------------------------------------------------
def tool_versions() -> dict[str, str]:
    """What each required tool says its version is, asked directly."""
    tf = json.loads(subprocess.run(["terraform", "version", "-json"], capture_output=True, text=True).stdout)
    ssh = subprocess.run(["ssh", "-V"], capture_output=True, text=True).stderr
    rsync = subprocess.run(["rsync", "--version"], capture_output=True, text=True).stdout
    return {
        "terraform": tf["terraform_version"],
        "ssh": ".".join(re.search(r"OpenSSH_(\d+)\.(\d+)", ssh).groups()),
        "rsync": re.search(r"version (\d+\.\d+\.\d+)", rsync).group(1),
        "python3": ".".join(map(str, sys.version_info[:3])),
    }


def test_check_prints_the_table_and_the_sandbox_identity(proj: SpacedProject) -> None:
    res = proj.inv("check")
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["tool", "needed", "found", "minimum", "status", "how", "to", "install"]
    for tool, version in tool_versions().items():
        assert row_of(lines, tool + " ")[:3] == [tool, "required", version], res.stdout
        assert row_of(lines, tool + " ")[4] == "ok", res.stdout
    for optional in ("tflint", "checkov", "aws"):
        assert row_of(lines, optional + " ")[1] == "optional"
    endpoint = f"http://127.0.0.1:{json.loads((proj.sandbox / 'moto.json').read_text())['port']}"
    ident = proj.workspace().client("sts").get_caller_identity()
    assert f"credentials: account {ident['Account']} as {ident['Arn']} (sandbox at {endpoint})" in lines


def test_check_offline_needs_no_credentials(tmp_path: Path) -> None:
    p = make_project(tmp_path / "offline")
    p.env_file.write_text(p.env_file.read_text().replace("TARGET=sandbox", "TARGET=aws"))
    p.env |= {
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    # without --offline this fails with "no AWS credentials found" (tests/test_tasks.py)
    res = p.inv("check", "--offline", timeout=120)
    assert res.stdout.splitlines()[0].startswith("tool")
    assert "credentials:" not in res.stdout + res.stderr
    assert not (p.sandbox).exists()  # nothing was started


# -- inv env, used by the real aws CLI --------------------------------------------------------
@requires("aws")
def test_inv_env_exports_drive_the_aws_cli(proj: SpacedProject, applied) -> None:
    script = (
        'eval "$(inv env)" && aws sts get-caller-identity --query Account --output text'
        " && aws ec2 describe-instances --filters Name=tag:stage,Values=test Name=instance-state-name,Values=running"
        ' --query "Reservations[].Instances[].InstanceId" --output text'
        f" && aws s3api get-bucket-versioning --bucket {BUCKET} --query Status --output text"
    )
    # No AWS_* in the environment and no ~/.aws: everything the CLI needs comes from `inv env`.
    env = {**proj.env, "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}
    res = subprocess.run(["bash", "-c", script], cwd=proj.dir, env=env, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr
    account, instances, versioning = res.stdout.split()
    ws = proj.workspace()
    assert account == ws.client("sts").get_caller_identity()["Account"]
    assert instances == proj.node()["instance_id"]
    assert versioning == "Enabled"


# -- apply --spot --disk-gb, read back; cost lines -----------------------------------------------
def test_apply_spot_and_disk_are_read_back(proj: SpacedProject, applied) -> None:
    ec2 = proj.workspace().client("ec2")
    iid = proj.node()["instance_id"]
    (inst,) = [i for r in ec2.describe_instances(InstanceIds=[iid])["Reservations"] for i in r["Instances"]]
    assert inst["InstanceType"] == ITYPE
    assert inst.get("InstanceLifecycle") == "spot", inst.get("InstanceLifecycle")
    vols = ec2.describe_volumes(VolumeIds=[m["Ebs"]["VolumeId"] for m in inst["BlockDeviceMappings"]])["Volumes"]
    assert [v["Size"] for v in vols] == [DISK_GB]
    assert proj.node()["market"] == "spot"


def extras(disk_gb: float) -> float:
    """$/h per node beyond the instance, from prices.json: the gp3 root volume and the public IPv4 address."""
    p = prices()
    return p["ebs_gp3_usd_per_gb_month"] * disk_gb / p["hours_per_month"] + p["public_ipv4_usd_per_hour"]


def test_apply_prints_the_spot_price_from_ec2(proj: SpacedProject, applied) -> None:
    ec2 = proj.workspace().client("ec2")
    quotes = ec2.describe_spot_price_history(
        InstanceTypes=[ITYPE], ProductDescriptions=["Linux/UNIX"], StartTime=applied["before"]
    )["SpotPriceHistory"]
    azs = {q["AvailabilityZone"] for q in quotes}
    price = min(float(q["SpotPrice"]) for q in quotes)
    node = price + extras(DISK_GB)
    expected = (
        f"{ITYPE} spot: {usd(node, 3)}/h (1 node), of which {DISK_GB} GB gp3 disk and public IPv4 address "
        f"{usd(extras(DISK_GB), 3)}/h per node; the 1 h hard deadline caps this run at {usd(node)} "
        f"(current spot price in us-east-1, lowest of {len(azs)} AZs)"
    )
    assert expected in applied["res"].stderr.splitlines(), applied["res"].stderr[-3000:]


@pytest.fixture(scope="module")
def world_plan(proj: SpacedProject, applied) -> subprocess.CompletedProcess[str]:
    """One `inv plan` with a price worth reading, two nodes, and SSH opened to the world with --i-know."""
    args = ("--instance-type", ITYPE, "--nodes", "2", "--max-hours", "2.5", "--allow-cidr", "0.0.0.0/0", "--i-know")
    return proj.inv("plan", *args)


def test_plan_prints_list_price_and_deadline_cap(world_plan) -> None:
    p = prices()
    disk = 50  # the CPU profile's default root disk
    rate = p["instance_types"][ITYPE]["usd_per_hour"] + extras(disk)
    expected = (
        f"{ITYPE} on-demand: {usd(rate, 3)}/h per node × 2 nodes = {usd(2 * rate, 3)}/h, of which {disk} GB gp3 "
        f"disk and public IPv4 address {usd(extras(disk), 3)}/h per node; the 2.5 h hard deadline "
        f"caps this run at {usd(2 * rate * 2.5)} (us-east-1 list price as of {p['as_of']})"
    )
    assert expected in world_plan.stderr.splitlines(), world_plan.stderr[-3000:]


def test_status_shows_cost_so_far_and_deadline(proj: SpacedProject, applied) -> None:
    ec2 = proj.workspace().client("ec2")
    launched = datetime.fromisoformat(proj.node()["launch_time"])
    t0 = datetime.now(UTC)
    lines = proj.inv("status").stdout.splitlines()
    t1 = datetime.now(UTC)
    head = re.split(r"\s{2,}", lines[0])
    row = dict(zip(head, re.split(r"\s{2,}", next(ln for ln in lines if ln.startswith("rf-test-0"))), strict=True))
    assert (row["state"], row["type"], row["market"]) == ("running", ITYPE, "spot")
    # A spot node costs the spot price (DescribeSpotPriceHistory), per second with a 60 s minimum.
    quotes = ec2.describe_spot_price_history(InstanceTypes=[ITYPE], ProductDescriptions=["Linux/UNIX"], StartTime=t0)
    price = min(float(q["SpotPrice"]) for q in quotes["SpotPriceHistory"]) + extras(DISK_GB)  # + disk and IPv4
    low, high = (price * max((t - launched).total_seconds(), 60) / 3600 for t in (t0, t1))
    assert_cost_between(row["cost so far"], low, high)
    left_low, left_high = (1 - (t - launched).total_seconds() / 3600 for t in (t1, t0))
    assert round(left_low, 1) <= float(row["deadline in"].removesuffix(" h")) <= round(left_high, 1), row


# -- spot nodes refuse stop; inv ssh --------------------------------------------------------
def test_stop_is_refused_for_spot_nodes(proj: SpacedProject, applied) -> None:
    line = error_line(proj.inv("stop", check=False))
    assert "spot nodes cannot be stopped" in line and "inv destroy" in line, line
    ec2 = proj.workspace().client("ec2")
    res = ec2.describe_instances(InstanceIds=[proj.node()["instance_id"]])
    assert res["Reservations"][0]["Instances"][0]["State"]["Name"] == "running"
    assert proj.ssh("rf-test-0", "true").returncode == 0


def test_inv_ssh_runs_what_it_is_given(proj: SpacedProject, applied) -> None:
    res = proj.inv(
        "ssh",
        check=False,
        input='echo "node=${REMOTEFIT_NODE:-$(cat /var/lib/cloud/data/instance-id 2>/dev/null)}"\nexit 7\n',
        timeout=60,
    )
    assert res.returncode == 7, res.stdout + res.stderr
    assert f"node={proj.node()['instance_id']}" in res.stdout.splitlines()
    line = error_line(proj.inv("ssh", "--node", "1", check=False))
    assert "--node 1 does not exist: stage test has nodes 0..0" in line


# -- host keys: accept-new into our own known_hosts; a changed key is refused --------------------
def test_host_key_is_learned_and_a_changed_one_refused(proj: SpacedProject, applied, tmp_path: Path) -> None:
    n = proj.node()
    cfg = proj.generated / "ssh_config"
    text = cfg.read_text()
    block = text[text.index(f"Host {n['alias']}") :]
    assert "StrictHostKeyChecking accept-new" in block
    assert f'UserKnownHostsFile "{proj.generated / "known_hosts"}"' in block  # quoted: the path has a space
    known = proj.generated / "known_hosts"
    host_pub = proj.sandbox / "nodes" / n["instance_id"] / "ssh_host_ed25519_key.pub"
    key_type, key = host_pub.read_text().split()[:2]
    # apply's readiness check made the first contact and recorded the node's real host key, by instance id
    assert f"{n['instance_id']} {key_type} {key}" in known.read_text().splitlines()
    original = known.read_text()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "other")], check=True)
    other = (tmp_path / "other.pub").read_text().split()[1]
    try:
        known.write_text(original.replace(key, other))
        subprocess.run(["ssh", "-F", str(cfg), "-O", "exit", n["alias"]], capture_output=True, timeout=30)
        res = proj.ssh(n["alias"], "echo reached")
        assert res.returncode == 255 and "reached" not in res.stdout, res.stdout + res.stderr
        assert "Host key verification failed" in res.stderr, res.stderr
    finally:
        known.write_text(original)
    assert proj.ssh(n["alias"], "echo reached").stdout.strip() == "reached"


# -- jobs: job.toml outputs/exclude/setup, inv runs, sync_warn_mb, --cancel-on-interrupt ---------------
JOB_TOML = """\
command = "python train.py"
setup = "echo setup-ran > made-by-setup.txt"
outputs = "results"
exclude = ["data/"]
[env]
GREETING = "hello"
"""
TRAIN = """\
import os, pathlib
os.makedirs("results", exist_ok=True)
seen = pathlib.Path("made-by-setup.txt").read_text().strip()
pathlib.Path("results/out.txt").write_text(f"{seen} {os.environ['GREETING']} {os.path.isdir('data')}")
"""


def test_job_toml_outputs_exclude_and_setup(proj: SpacedProject, applied, tmp_path: Path) -> None:
    job = make_job(tmp_path, "tomljob", {"job.toml": JOB_TOML, "train.py": TRAIN, "data/big.txt": "x" * 1000})
    res = proj.inv("fit", str(job))
    d = Path(re.search(r"results in (.+)$", res.stderr, re.M).group(1))
    assert d.parent == proj.runs / "tomljob"
    # setup ran first, [env] reached the job, data/ stayed home; the `results` folder came back
    assert (d / "out.txt").read_text() == "setup-ran hello False"
    n = proj.node()
    listing = proj.ssh(n["alias"], f"ls -A '{n['workdir']}/jobs/tomljob'").stdout.split()
    assert "data" not in listing and {"train.py", "job.toml", "made-by-setup.txt", "results"} <= set(listing)
    assert json.loads((d / "run.json").read_text())["exit_code"] == 0
    table = proj.inv("runs").stdout.splitlines()
    assert table[0].split() == ["run", "where", "exit", "duration", "node"]
    assert row_of(table, d.name)[1:3] == ["pulled", "0"] and row_of(table, d.name)[-1] == ITYPE


def test_sync_warns_above_sync_warn_mb(proj: SpacedProject, applied, tmp_path: Path) -> None:
    big = os.urandom(1536 * 1024)
    job = make_job(tmp_path, "bigjob", {"train.py": "print(1)\n", "weights.bin": big, "small.txt": "s" * 10})
    quiet = proj.inv("sync", str(job))  # the default threshold (200 MB): no warning
    assert "warning" not in quiet.stderr and "sync: bigjob: 3 files, 1.5 MB" in quiet.stderr
    cfg = tmp_path / "warn.yaml"
    cfg.write_text("remotefit:\n  sync_warn_mb: 1\n")
    res = proj.inv("-f", str(cfg), "sync", str(job))
    expected = (
        "warning: the job is 1.5 MB, over sync_warn_mb=1; largest: weights.bin (1.5 MB), small.txt (10 B), "
        "train.py (9 B). Add big data to .remotefitignore and download it on the node instead"
    )
    assert expected in res.stderr.splitlines(), res.stderr
    n = proj.node()
    size = proj.ssh(n["alias"], f"stat -c %s '{n['workdir']}/jobs/bigjob/weights.bin'").stdout.strip()
    assert size == str(len(big))  # a warning, not a refusal


TICKS = """\
import time
for i in range(600):
    print("tick", i, flush=True)
    time.sleep(0.2)
print("done", flush=True)
"""


def test_cancel_on_interrupt_cancels_the_run(proj: SpacedProject, applied, tmp_path: Path) -> None:
    job = make_job(tmp_path, "ticker", {"train.py": TICKS})
    out, err = tmp_path / "fit.out", tmp_path / "fit.err"
    with out.open("wb") as o, err.open("wb") as e:
        proc = subprocess.Popen(
            [INV, "fit", str(job), "--cancel-on-interrupt"],
            cwd=proj.dir,
            env=proj.env,
            stdin=subprocess.DEVNULL,
            stdout=o,
            stderr=e,
            start_new_session=True,
        )
    try:
        wait_for(out, "tick 1")
        run_id = re.search(r"run (\S+) started", wait_for(err, "started")).group(1)
        live = proj.inv("runs").stdout.splitlines()
        assert row_of(live, run_id)[1:4] == ["running", "on", "rf-test-0"], live
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
        assert proc.wait(timeout=60) == 130
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = err.read_text()
    assert f"cancelled run {run_id}" in text and "reattach" not in text and "Traceback" not in text, text
    st = runner_status(proj, run_id)
    assert st["state"] == "finished" and st["exit_code"] not in (0, None), st
    assert "done" not in proj.ssh("rf-test-0", f"cat {shlex.quote(st['log'])}").stdout
    after = proj.inv("runs").stdout.splitlines()
    assert row_of(after, run_id)[1:4] == ["finished", "on", "rf-test-0"], after


# -- render / validate through the tasks; --i-know and checkov ----------------------------------------
def test_render_through_the_task(proj: SpacedProject) -> None:
    import hcl2

    res = proj.inv("render")
    written = sorted(Path(ln.removeprefix("rendered ")) for ln in res.stdout.splitlines())
    tfdir = proj.generated / "terraform"
    assert written and all(f.parent == tfdir and f.exists() for f in written)
    names = {f.name for f in written}
    assert {"main.tf", "variables.tf", "outputs.tf", "providers.tf", "versions.tf", "user_data.sh.tftpl"} <= names
    for f in written:
        if f.suffix == ".tf":
            hcl2.loads(f.read_text())


@requires("checkov")
def test_validate_through_the_task(proj: SpacedProject) -> None:
    res = proj.inv("validate", timeout=600)
    lines = res.stdout.splitlines()
    assert lines[0].startswith("rendered and parsed with python-hcl2 in ")
    assert lines[1] == "terraform fmt -check: ok"
    assert re.fullmatch(r"terraform validate: ok \(\d+\.\d s\)", lines[2]), lines
    assert lines[-1] == "checkov: 0 failed checks"


@requires("checkov")
def test_i_know_renders_world_ssh_and_checkov_flags_it(proj: SpacedProject, world_plan, tmp_path: Path) -> None:
    import hcl2

    tfvars = hcl2.loads((proj.generated / f"{ACCOUNT}.tfvars").read_text())
    assert tfvars["allow_world_ssh"] is True and tfvars["allow_cidr"].strip('"') == "0.0.0.0/0"
    # the applied rule (where the sandbox's nodes see this machine: 127.0.0.1, or the bridge's gateway for
    # booted nodes) would be opened to the world
    applied_source = proj.workspace().sandbox.caller_cidr()
    out = world_plan.stdout + world_plan.stderr
    assert re.search(rf'cidr_ipv4\s+= "{re.escape(applied_source)}" -> "0\.0\.0\.0/0"', out), out[-3000:]
    # the same flags without --i-know are refused before anything is written
    assert "would open SSH to the whole internet" in error_line(
        proj.inv("plan", "--allow-cidr", "0.0.0.0/0", check=False)
    )
    # checkov on exactly what Terraform got: the world-open SSH rule is the one thing it flags
    scan = tmp_path / "tf"
    shutil.copytree(proj.generated / "terraform", scan, ignore=shutil.ignore_patterns(".terraform*", "*.log"))
    from remotefit.tools import find_binary

    out = subprocess.run(
        [find_binary("checkov"), "-d", str(scan), "--framework", "terraform", "--skip-download", "-o", "json"]
        + ["--var-file", str(proj.generated / f"{ACCOUNT}.tfvars")],
        env={**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false", "LOG_LEVEL": "ERROR"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    report = json.loads(out.stdout)
    report = report[0] if isinstance(report, list) else report
    failed = sorted((c["check_id"], c["resource"]) for c in report["results"]["failed_checks"])
    assert failed and {r for _, r in failed} == {"aws_vpc_security_group_ingress_rule.ssh"}, failed
    assert out.returncode == 1


# -- destroy prints the total ------------------------------------------------------------------------
def test_destroy_prints_what_the_nodes_cost(proj: SpacedProject, applied) -> None:
    ec2 = proj.workspace().client("ec2")
    launched = datetime.fromisoformat(proj.node()["launch_time"])
    t0 = datetime.now(UTC)
    quotes = ec2.describe_spot_price_history(InstanceTypes=[ITYPE], ProductDescriptions=["Linux/UNIX"], StartTime=t0)
    price = min(float(q["SpotPrice"]) for q in quotes["SpotPriceHistory"]) + extras(DISK_GB)  # + disk and IPv4
    res = proj.inv("destroy", "--yes")
    t1 = datetime.now(UTC)
    m = re.search(r"^this stage's nodes cost about (\S+) in total$", res.stdout, re.M)
    assert m, res.stdout
    low, high = (price * max((t - launched).total_seconds(), 60) / 3600 for t in (t0, t1))
    assert_cost_between(m.group(1), low, high)
    assert "verified: nothing tagged stage=test is left in us-east-1" in res.stdout

"""Container sandbox nodes (REMOTEFIT_SANDBOX_NODES=container): each instance boots the node image as a
systemd-nspawn container, with its own disk, its private IP on the sandbox's bridge, cloud-init running the
real user data from moto, and its metadata service at 169.254.169.254 inside its own network namespace.

What a loopback node cannot show, shown here through the real `inv` tasks: the boot script's guards armed
by systemd, a job on the image's own Python, power-off as termination (shutdown, idle), stop/start keeping
the disk, and the bad inputs (an image that cannot build, a bridge range in use, a node that does not boot).
Needs root, systemd-nspawn and debootstrap; the image is built once per machine (~1.5 min) and cached.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Project, make_project, require_root, requires
from tests.test_e2e_nodes import error_line

pytestmark = [pytest.mark.e2e, requires("terraform", "systemd-nspawn", "debootstrap", "ssh", "rsync")]


@pytest.fixture(autouse=True)
def _needs_root(request: pytest.FixtureRequest) -> None:
    require_root(request, "container nodes need root")


def container_project(base: Path, **env: str) -> Project:
    p = make_project(base)
    p.env["REMOTEFIT_SANDBOX_NODES"] = "container"
    p.env.update(env)
    return p


@contextlib.contextmanager
def cleaned_up(p: Project) -> Iterator[None]:
    """Stop the project's sandbox afterwards, also when its apply failed: a booted node left behind would hold
    its address on the bridge that every sandbox on this machine shares. `sandbox.down` powers off every
    machine of the project, recorded or not; the tests that check destroy run it themselves."""
    try:
        yield
    finally:
        p.down()


def instances(p: Project) -> dict[str, dict[str, Any]]:
    ec2 = p.workspace().client("ec2")
    res = ec2.describe_instances(Filters=[{"Name": "tag:stage", "Values": ["test"]}])
    return {i["InstanceId"]: i for r in res["Reservations"] for i in r["Instances"]}


def node_record(p: Project, index: int = 0) -> dict[str, Any]:
    return json.loads((p.generated / "nodes.json").read_text())["nodes"][index]


def node_dir(p: Project, instance_id: str) -> Path:
    return p.sandbox / "nodes" / instance_id


def wait_for(predicate, timeout: float, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"no {what} within {timeout:.0f} s"
        time.sleep(1)


def nothing_left(p: Project) -> None:
    """After `inv destroy`: no live instance in moto, no running container, no disk."""
    assert all(i["State"]["Name"] == "terminated" for i in instances(p).values())
    for d in (p.sandbox / "nodes").glob("i-*"):
        assert not (d / "disk").exists(), f"{d.name}'s disk outlived its instance"
        assert not (d / "root").is_mount()


def refused_before_anything_was_created(p: Project, line: str) -> None:
    """A sandbox machine problem found by apply's pre-flight: no instance launched, so nothing to destroy."""
    assert "some resources may have been created" not in line, line
    assert instances(p) == {}
    res = p.inv("destroy", "--yes", timeout=600)
    assert "nothing to destroy: stage test has no resources in its state" in res.stdout, res.stdout
    nothing_left(p)


@pytest.fixture(scope="class")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Project, dict[str, Any]]]:
    p = container_project(tmp_path_factory.mktemp("container"))
    with cleaned_up(p):
        p.inv("backend")
        applied = p.inv("apply", "--yes", timeout=900)
        assert "ready: rf-test-0" in applied.stdout + applied.stderr
        yield p, node_record(p)


class TestContainerNode:
    def test_node_has_its_own_address_and_disk(self, node) -> None:
        p, rec = node
        inst = instances(p)[rec["instance_id"]]
        # The node is reached at the private IP moto gave the instance, on port 22, not on loopback.
        assert rec["host"] == inst["PrivateIpAddress"] == rec["private_ip"] and rec["port"] == 22
        assert not rec["host"].startswith("127.")
        # From this sandbox's own slice of the subnet, so another project's nodes on the bridge never clash.
        slot = int((p.sandbox / "ip-slot").read_text())
        assert slot >= 1 and rec["host"].startswith(f"172.31.{slot}."), (slot, rec["host"])
        res = p.ssh("rf-test-0", "hostname; ip -4 -o addr show dev host0; findmnt -n -o FSTYPE /")
        assert res.returncode == 0, res.stderr
        assert res.stdout.split()[0] == "ip-" + rec["host"].replace(".", "-")
        assert f"inet {rec['host']}/" in res.stdout
        assert (node_dir(p, rec["instance_id"]) / "disk" / "upper").is_dir()
        # sandbox.status lists it; sandbox.console shows its boot.
        status = p.inv("sandbox.status").stdout
        assert "new nodes: container" in status
        assert any(rec["instance_id"] in ln and " container " in ln and " up " in ln for ln in status.splitlines())
        console = p.inv("sandbox.console", rec["instance_id"]).stdout
        assert "cloud-init" in console.lower() or "Reached target" in console, console

    def test_user_data_really_ran(self, node) -> None:
        p, _ = node
        res = p.ssh(
            "rf-test-0",
            "cloud-init status; sudo shutdown --show 2>&1; systemctl is-active remotefit-watchdog.timer "
            "remotefit-spot.service; cat /var/lib/remotefit/boot-done; grep -c 'deadline armed' /var/log/remotefit-boot.log",
        )
        assert res.returncode == 0, res.stdout + res.stderr
        out = res.stdout
        assert "status: done" in out
        assert "Shutdown scheduled" in out  # the hard deadline, armed by the user data through logind
        assert out.count("active") >= 2 and "inactive" not in out
        assert "remotefit node 0 ready at " in out
        # The boot script installed what a stock image lacks, from the image's local repository.
        py = p.ssh(
            "rf-test-0",
            "command -v python; /opt/remotefit-tools/bin/python -c 'import boto3; print(boto3.__version__)'",
        )
        assert py.returncode == 0 and py.stdout.split() == ["/usr/bin/python", "1.44.8"], py.stdout + py.stderr

    def test_metadata_service_inside_the_node_only(self, node) -> None:
        p, rec = node
        script = (
            "import urllib.request as u\n"
            "t=u.urlopen(u.Request('http://169.254.169.254/latest/api/token',method='PUT',"
            "headers={'X-aws-ec2-metadata-token-ttl-seconds':'60'}),timeout=2).read().decode()\n"
            "g=lambda k:u.urlopen(u.Request('http://169.254.169.254/latest/meta-data/'+k,"
            "headers={'X-aws-ec2-metadata-token':t}),timeout=2).read().decode()\n"
            "print(g('instance-id'), g('local-ipv4'))\n"
        )
        res = p.ssh("rf-test-0", f'python3 -c "{script}"')
        assert res.returncode == 0, res.stderr
        assert res.stdout.split() == [rec["instance_id"], rec["host"]]
        # Never on this machine's own interfaces (on EC2 it would shadow the real IMDS).
        host = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True, check=True).stdout
        assert "169.254.169.254" not in host

    def test_job_runs_on_the_images_python(self, node, tmp_path: Path) -> None:
        p, rec = node
        job = tmp_path / "where"
        job.mkdir()
        (job / "job.toml").write_text('command = "python train.py"\n')
        (job / "train.py").write_text(
            "import os, socket, sys\n"
            "print('python', sys.executable, 'host', socket.gethostname())\n"
            "os.makedirs('outputs', exist_ok=True)\n"
            "open('outputs/where.txt', 'w').write(sys.executable)\n"
        )
        res = p.inv("fit", str(job), timeout=600)
        out = res.stdout + res.stderr
        line = next(ln for ln in out.splitlines() if "python " in ln and " host " in ln)
        exe = line.split("python ", 1)[1].split()[0]
        # Not this machine's venv: the node's own Python (a job venv over it, or /usr/bin/python).
        assert not exe.startswith(str(Path(__file__).resolve().parent.parent)), line
        assert "ip-" + rec["host"].replace(".", "-") in line
        pulled = list(p.runs.glob("where/*/where.txt"))
        assert pulled and pulled[0].read_text() == exe
        # The node's uploader reached moto (through the node's own forward) with the instance role's keys.
        s3 = p.workspace().client("s3")
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="remotefit-test-state-runs").get("Contents", [])]
        assert any(k.endswith("outputs/where.txt") for k in keys), keys

    def test_stop_and_start_keep_the_disk(self, node) -> None:
        p, rec = node
        iid = rec["instance_id"]
        assert p.ssh("rf-test-0", "echo kept > ~/marker && sync").returncode == 0
        p.inv("stop", timeout=300)
        assert instances(p)[iid]["State"]["Name"] == "stopped"
        d = node_dir(p, iid)
        assert (d / "disk" / "upper").is_dir() and not (d / "root").is_mount()
        assert not (d / "node.json").exists()
        p.inv("start", timeout=600)
        assert instances(p)[iid]["State"]["Name"] == "running"
        res = p.ssh("rf-test-0", "cat ~/marker; grep -c 'deadline armed' /var/log/remotefit-boot.log")
        # The same disk; the user data ran once per instance, as cloud-init does on EC2.
        assert res.returncode == 0 and res.stdout.split() == ["kept", "1"], res.stdout + res.stderr

    def test_shutdown_now_terminates_the_instance(self, node) -> None:
        p, rec = node
        iid = rec["instance_id"]
        p.ssh("rf-test-0", "sudo shutdown -h now", timeout=30)
        wait_for(lambda: instances(p)[iid]["State"]["Name"] == "terminated", 60, "terminated instance")
        d = node_dir(p, iid)
        wait_for(lambda: not (d / "disk").exists(), 30, "deleted disk")
        exit_record = json.loads((d / "exit.json").read_text())
        assert exit_record["cause"] == "powered off from inside" and exit_record["instance"] == "terminated"
        p.inv("destroy", "--yes", timeout=600)
        nothing_left(p)


DIST_TRAIN = """\
import json, os, socket
import torch
import torch.distributed as dist

print("rendezvous", os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"], "on", socket.gethostname(), flush=True)
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
t = torch.tensor([float(rank + 1)])
dist.all_reduce(t)
print(f"rank {rank}/{world} all_reduce {t.item()}", flush=True)
os.makedirs("outputs", exist_ok=True)
with open(f"outputs/rank{rank}.json", "w") as f:
    json.dump({"rank": rank, "world": world, "sum": t.item()}, f)
dist.barrier()
dist.destroy_process_group()
"""


@pytest.fixture(scope="class")
def gpu_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Project]:
    """Two GPU-profile nodes: they boot the dl image (the Deep Learning AMI's layout, PyTorch CPU build)."""
    p = container_project(tmp_path_factory.mktemp("gpu"))
    with cleaned_up(p):
        p.inv("backend")
        p.inv("apply", "--yes", "--gpu", "--nodes", "2", timeout=1500)
        yield p


class TestGpuProfileNodes:
    def test_pytorch_where_the_deep_learning_ami_keeps_it(self, gpu_nodes: Project) -> None:
        p = gpu_nodes
        rec = node_record(p)
        assert rec["python"] == "/opt/pytorch/bin/python3", rec
        res = p.ssh(
            "rf-test-0",
            "/opt/pytorch/bin/python3 -c 'import torch; print(torch.__version__, torch.cuda.is_available())'",
        )
        assert res.returncode == 0, res.stderr
        version, cuda = res.stdout.split()
        assert version.startswith("2.") and cuda == "False"  # CUDA is absent, and said so below

    def test_each_node_runs_in_a_cgroup_of_its_own(self, gpu_nodes: Project) -> None:
        # Two systemds sharing one cgroup tree removed each other's unit cgroups mid-boot (219/CGROUP: a
        # failed systemd-user-sessions left /run/nologin, and no ssh login ever got in).
        p = gpu_nodes
        seen = []
        for i in (0, 1):
            iid = node_record(p, i)["instance_id"]
            leader = (node_dir(p, iid) / "leader").read_text().strip()
            cgroups = Path(f"/proc/{leader}/cgroup").read_text().splitlines()
            named = [c.split(":", 2)[2] for c in cgroups if c.split(":")[1] in ("name=systemd", "")]
            assert named and all(f"/remotefit-{iid}/payload" in c for c in named), cgroups
            seen.append(named)
        assert seen[0] != seen[1]
        for i in (0, 1):  # and every unit of their boot started (none failed to attach to its cgroup)
            failed = p.ssh(f"rf-test-{i}", "systemctl --failed --no-legend --plain")
            assert "CGROUP" not in failed.stdout and "user-sessions" not in failed.stdout, failed.stdout

    def test_gloo_torchrun_across_two_nodes_over_the_bridge(self, gpu_nodes: Project, tmp_path: Path) -> None:
        p = gpu_nodes
        job = tmp_path / "dist"
        job.mkdir()
        (job / "train.py").write_text(DIST_TRAIN)
        (job / "job.toml").write_text('distributed = true\nenv = { OMP_NUM_THREADS = "1" }\n')
        res = p.inv("fit", str(job), "--nodes", "2", timeout=600)
        out = res.stdout + res.stderr
        (d,) = [x for x in p.runs.glob("dist/*") if x.is_dir()]
        assert json.loads((d / "rank0.json").read_text()) == {"rank": 0, "world": 2, "sum": 3.0}, out
        node0, node1 = (d / "logs" / "node-0.log").read_text(), (d / "logs" / "node-1.log").read_text()
        addr0, addr1 = node_record(p, 0)["private_ip"], node_record(p, 1)["private_ip"]
        assert addr0 != addr1 and not addr0.startswith("127.")
        # Rendezvous at node 0's private IP, from both machines (each its own hostname).
        assert f"rendezvous {addr0} " in node0 and "on ip-" + addr0.replace(".", "-") in node0, node0
        assert f"rendezvous {addr0} " in node1 and "on ip-" + addr1.replace(".", "-") in node1, node1
        assert "rank 1/2 all_reduce 3.0" in node1, node1

    def test_fit_gpu_says_cuda_is_absent(self, gpu_nodes: Project, tmp_path: Path) -> None:
        p = gpu_nodes
        job = tmp_path / "cuda"
        job.mkdir()
        (job / "train.py").write_text("print('never runs')\n")
        res = p.inv("fit", str(job), "--gpu", check=False, timeout=300)
        out = res.stdout + res.stderr
        assert res.returncode != 0 and "Traceback" not in out, out
        assert "cuda" in out.lower() and "never runs" not in out, out


def test_an_idle_node_terminates_itself(tmp_path: Path) -> None:
    """The real watchdog under its real systemd timer: idle for a minute, the node shuts down, and the
    instance (shutdown behaviour terminate) is terminated in moto, its disk gone."""
    p = container_project(tmp_path / "idle")
    try:
        p.inv("backend")
        p.inv("apply", "--yes", "--idle-minutes", "1", timeout=900)
        iid = node_record(p)["instance_id"]
        subprocess.run(["ssh", "-F", str(p.generated / "ssh_config"), "-O", "exit", "rf-test-0"], capture_output=True)
        wait_for(lambda: instances(p)[iid]["State"]["Name"] == "terminated", 300, "idle termination")
        d = node_dir(p, iid)
        wait_for(lambda: not (d / "disk").exists(), 30, "deleted disk")
        console = (d / "console.log").read_text(errors="replace")
        assert "Power-Off" in console or "Powering off" in console or "Halting" in console, console[-2000:]
        p.inv("destroy", "--yes", timeout=600)
        nothing_left(p)
    finally:
        p.down()


def test_a_node_that_does_not_boot_in_time(tmp_path: Path) -> None:
    p = container_project(tmp_path / "slow", REMOTEFIT_SANDBOX_BOOT_TIMEOUT="0.5")
    try:
        p.inv("backend")
        res = p.inv("apply", "--yes", check=False, timeout=900)
        line = error_line(res)
        assert "did not boot to SSH within 0.5 s" in line and "inv destroy" in line, line
        assert "its console's last lines" in res.stderr
        p.inv("destroy", "--yes", timeout=600)
        nothing_left(p)
    finally:
        p.down()


def test_a_bridge_range_in_use_is_refused(tmp_path: Path) -> None:
    dummy = "rftest0"
    subprocess.run(["ip", "link", "add", dummy, "type", "bridge"], check=True)
    try:
        subprocess.run(["ip", "addr", "add", "10.251.7.1/24", "dev", dummy], check=True)
        p = container_project(tmp_path / "clash", REMOTEFIT_SANDBOX_BRIDGE_CIDR="10.251.0.0/16")
        try:
            p.inv("backend")
            res = p.inv("apply", "--yes", check=False, timeout=900)
            line = error_line(res)
            assert "10.251.0.0/16 is already in use on this machine (10.251.7.1/24 on rftest0)" in line, line
            assert "REMOTEFIT_SANDBOX_BRIDGE_CIDR" in line
            refused_before_anything_was_created(p, line)
        finally:
            p.down()
    finally:
        subprocess.run(["ip", "link", "del", dummy], check=False)


def test_an_image_that_cannot_build(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    p = container_project(
        tmp_path / "noimage", REMOTEFIT_CACHE=str(cache), REMOTEFIT_DEBIAN_MIRROR="http://127.0.0.1:9/debian"
    )
    try:
        p.inv("backend")
        res = p.inv("apply", "--yes", check=False, timeout=900)
        line = error_line(res)
        assert "the sandbox node image failed to build at 'debootstrap'" in line, line
        assert str(cache / "images") in line and "REMOTEFIT_SANDBOX_NODES=loopback" in line
        assert not [d for d in (cache / "images").iterdir() if d.is_dir()]  # nothing half-built is kept
        refused_before_anything_was_created(p, line)
    finally:
        p.down()

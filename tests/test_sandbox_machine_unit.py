"""Container sandbox nodes, the pure parts: addresses, the bridge range check, argv, the seed, the mode."""

from __future__ import annotations

import ipaddress
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from remotefit import sandbox_image, sandbox_machine
from remotefit.errors import UserError
from remotefit.sandbox import Sandbox

NET = ipaddress.IPv4Network("172.31.0.0/16")


def test_node_ip_is_motos_private_ip_when_the_bridge_holds_it() -> None:
    assert sandbox_machine.node_ip("172.31.0.4", NET) == "172.31.0.4"
    assert sandbox_machine.gateway(NET) == "172.31.0.1"


def test_node_ip_keeps_the_host_part_in_another_range() -> None:
    other = ipaddress.IPv4Network("10.213.0.0/16")
    assert sandbox_machine.node_ip("172.31.5.17", other) == "10.213.5.17"
    # Never the network, the gateway (the VPC router) or the broadcast address.
    assert sandbox_machine.node_ip("172.31.0.0", other) == "10.213.0.2"
    assert sandbox_machine.node_ip("172.31.255.255", other) == "10.213.255.254"


def test_overlap_names_the_interface_and_ignores_our_bridge() -> None:
    addrs = [("lo", "127.0.0.1/8"), ("eth0", "172.31.16.5/20"), (sandbox_machine.bridge_name(NET), "172.31.0.1/16")]
    assert sandbox_machine.overlap(NET, addrs) == "172.31.16.5/20 on eth0"
    assert sandbox_machine.overlap(NET, addrs[:1] + addrs[2:]) is None


@pytest.mark.parametrize(
    ("value", "why"),
    [("nonsense", "is not an IPv4 range"), ("8.8.0.0/16", "private range"), ("10.1.2.0/28", "/24 or larger")],
)
def test_bad_bridge_ranges_are_one_line(monkeypatch: pytest.MonkeyPatch, value: str, why: str) -> None:
    monkeypatch.setenv(sandbox_machine.BRIDGE_CIDR_ENV, value)
    with pytest.raises(UserError, match=why) as exc:
        sandbox_machine.bridge_network()
    assert sandbox_machine.BRIDGE_CIDR_ENV in str(exc.value) and "\n" not in str(exc.value)


def test_nspawn_boots_the_overlay_on_the_bridge_with_the_wheelhouse_read_only() -> None:
    cfg = {"root": "/n/root", "instance_id": "i-1", "wheelhouse": "/c/wheels", "wheels_mount": "/opt/remotefit-wheels"}
    cfg["bridge"] = "rfsb-0123abcd"
    argv = sandbox_machine.nspawn_argv(cfg)
    assert argv[:4] == ["systemd-nspawn", "--boot", "--register=no", "--keep-unit"]
    assert "--directory=/n/root" in argv and "--machine=i-1" in argv
    assert "--network-bridge=rfsb-0123abcd" in argv
    assert len(sandbox_machine.bridge_name(NET)) <= 15 and sandbox_machine.bridge_name(NET).startswith("rfsb-")
    assert "--bind-ro=/c/wheels:/opt/remotefit-wheels" in argv
    assert sandbox_machine.overlay_argv("/img", Path("/n/disk"), Path("/n/root")) == [
        "mount", "-t", "overlay", "overlay", "-o",
        "lowerdir=/img,upperdir=/n/disk/upper,workdir=/n/disk/work", "/n/root",
    ]  # fmt: skip


def test_seed_is_what_ec2_metadata_gives_cloud_init() -> None:
    seed = sandbox_machine.seed_files("i-1", "ip-172-31-0-4", "ssh-ed25519 AAAA k\n", "#!/bin/bash\n")
    assert (
        seed["meta-data"] == "instance-id: i-1\nlocal-hostname: ip-172-31-0-4\npublic-keys:\n  - ssh-ed25519 AAAA k\n"
    )
    assert seed["user-data"] == "#!/bin/bash\n"


def test_the_image_recipe_names_its_folder() -> None:
    key = sandbox_image.recipe_key()
    assert sandbox_image.image_dir(Path("/c")) == Path(f"/c/images/debian-bookworm-cpu-{key}")
    assert "rsync" in sandbox_image.BASE_PACKAGES  # the laptop's sync needs it on the node
    assert sandbox_image.debootstrap_argv(Path("/t"), "http://m")[-3:] == ["bookworm", "/t", "http://m"]


def test_bootstraps_prebuild_of_the_image_says_one_line_and_fails_only_on_a_failed_build(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`python -m remotefit.sandbox_image` (scripts/bootstrap, beside its pip installs): builds where container
    nodes will boot, says why not elsewhere, and exits non-zero only when a build failed."""
    monkeypatch.setenv("REMOTEFIT_CACHE", str(tmp_path))
    built: list[str] = []
    monkeypatch.setattr(sandbox_image, "ensure_image", lambda echo: built.append("cpu") or tmp_path / "img")
    monkeypatch.setenv("REMOTEFIT_SANDBOX_NODES", "loopback")
    assert sandbox_image.prebuild() == (0, "node image: not built (REMOTEFIT_SANDBOX_NODES=loopback)")
    monkeypatch.delenv("REMOTEFIT_SANDBOX_NODES")
    monkeypatch.setattr(sandbox_machine, "available", lambda: "container nodes need root")
    assert sandbox_image.prebuild() == (
        0,
        "node image: not built (container nodes need root; the sandbox uses loopback nodes)",
    )
    monkeypatch.setattr(sandbox_machine, "available", lambda: None)
    assert sandbox_image.prebuild() == (0, f"node image: built ({tmp_path / 'img'})") and built == ["cpu"]
    marker = sandbox_image.image_dir() / ".remotefit-image"
    marker.parent.mkdir(parents=True)
    marker.write_text("{}")
    assert sandbox_image.prebuild() == (0, f"node image: ready ({marker.parent})") and built == ["cpu"]
    marker.unlink()

    def fails(echo: bool) -> Path:
        raise UserError("the sandbox node image failed to build at 'debootstrap' (exit 1); see /x.log")

    monkeypatch.setattr(sandbox_image, "ensure_image", fails)
    code, line = sandbox_image.prebuild()
    assert code == 1 and line.startswith("node image: the sandbox node image failed to build") and "\n" not in line


def test_node_mode(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    sb = Sandbox(tmp_path)
    monkeypatch.setenv("REMOTEFIT_SANDBOX_NODES", "loopback")
    assert sb.node_mode() == ("loopback", "REMOTEFIT_SANDBOX_NODES=loopback")
    monkeypatch.setenv("REMOTEFIT_SANDBOX_NODES", "vm")
    with pytest.raises(UserError, match="is not one of loopback, container, auto"):
        sb.node_mode()
    monkeypatch.setattr(sandbox_machine, "available", lambda: "container nodes need root")
    monkeypatch.delenv("REMOTEFIT_SANDBOX_NODES")  # auto, the default: said out loud where it falls back
    assert sb.node_mode() == ("loopback", "fallback: container nodes need root")
    monkeypatch.setenv("REMOTEFIT_SANDBOX_NODES", "container")
    with pytest.raises(UserError, match="container nodes need root; or set REMOTEFIT_SANDBOX_NODES=loopback"):
        sb.node_mode()
    monkeypatch.setattr(sandbox_machine, "available", lambda: None)
    assert sb.node_mode()[0] == "container"
    assert sb.caller_cidr() == "172.31.0.1/32"  # the bridge's gateway: where a node sees our ssh from


def test_apply_prepares_the_bridge_and_each_image_its_types_boot(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Before Terraform creates anything: the bridge once, each image variant once; loopback needs neither."""
    made: list[str] = []
    monkeypatch.setattr(sandbox_machine, "ensure_bridge", lambda net: made.append(f"bridge {net}") or "br")
    monkeypatch.setattr(sandbox_image, "ensure_image", lambda variant: made.append(f"image {variant}") or tmp_path)
    monkeypatch.setattr(sandbox_machine, "available", lambda: None)
    monkeypatch.delenv("REMOTEFIT_SANDBOX_BRIDGE_CIDR", raising=False)
    sb = Sandbox(tmp_path)
    monkeypatch.setenv("REMOTEFIT_SANDBOX_NODES", "loopback")
    sb.prepare_machines(["g6.xlarge"])
    assert made == []
    monkeypatch.setenv("REMOTEFIT_SANDBOX_NODES", "container")
    sb.prepare_machines(["g6.xlarge", "g5.xlarge", "c7i.xlarge"])
    assert made == ["bridge 172.31.0.0/16", "image cpu", "image dl"]


def test_sandboxes_on_one_machine_claim_different_address_slices(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REMOTEFIT_SANDBOX_SLOTS", str(tmp_path / "slots"))
    in_use: set[int] = set()  # slices whose first address answers on the bridge (a machine left behind)
    monkeypatch.setattr(sandbox_machine, "_slice_in_use", lambda n: n in in_use)
    a, b, c = (tmp_path / n for n in "abc")
    for d in (a, b, c):
        d.mkdir()
    assert [sandbox_machine.claim_slot(a), sandbox_machine.claim_slot(b)] == [1, 2]
    assert sandbox_machine.claim_slot(a) == 1  # its own again (a restarted server replays the same addresses)
    sandbox_machine.release_slot(a)
    assert sandbox_machine.claim_slot(c) == 1  # freed by `sandbox.down`
    # A claim whose sandbox folder is gone (a deleted project) is taken over, never held for ever.
    import shutil

    shutil.rmtree(b)
    assert sandbox_machine.claim_slot(a) == 2
    for n in range(3, sandbox_machine.SLOTS + 1):
        d = tmp_path / f"s{n}"
        d.mkdir()
        assert sandbox_machine.claim_slot(d) == n
    full = tmp_path / "one-too-many"
    full.mkdir()
    with pytest.raises(UserError, match="sandbox.down") as exc:
        sandbox_machine.claim_slot(full)
    assert "\n" not in str(exc.value)
    # A claim past its grace whose sandbox runs no moto server (a killed run's) is taken over.
    import os
    import time

    old = time.time() - sandbox_machine.SLOT_GRACE_S - 1
    os.utime(tmp_path / "slots" / "7", (old, old))
    os.utime(tmp_path / "slots" / "8", (old, old))
    in_use.add(7)  # ...unless a machine still answers at its first address: then the next such claim
    assert sandbox_machine.claim_slot(full) == 8


def test_a_sliced_moto_gives_private_ips_from_its_slice() -> None:
    import boto3
    from moto import mock_aws
    from moto.ec2.models.subnets import Subnet

    from remotefit import sandbox_moto

    original = Subnet.get_available_subnet_ip
    try:
        sandbox_moto.slice_private_ips(2 * sandbox_machine.SLOT_SIZE)
        with mock_aws():
            ec2 = boto3.client("ec2", region_name="us-east-1")
            subnet = ec2.describe_subnets(Filters=[{"Name": "availability-zone", "Values": ["us-east-1a"]}])
            sid = subnet["Subnets"][0]["SubnetId"]
            image = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
            out = ec2.run_instances(ImageId=image, MinCount=2, MaxCount=2, SubnetId=sid)
            ips = sorted(i["PrivateIpAddress"] for i in out["Instances"])
    finally:
        Subnet.get_available_subnet_ip = original  # type: ignore[method-assign]
    assert ips == ["172.31.2.4", "172.31.2.5"]


def test_superseded_images_are_pruned_unless_a_node_sits_on_one(tmp_path: Path) -> None:
    images = tmp_path / "images"
    current, old, other_variant = (
        images / n for n in ("debian-bookworm-cpu-new", "debian-bookworm-cpu-old", "debian-bookworm-dl-x")
    )
    for d in (current, old, other_variant):
        d.mkdir(parents=True)
        d.with_name(d.name + ".log").write_text("log")
    assert sandbox_image.prune_images(current) == [old]
    assert not old.exists() and not old.with_name(old.name + ".log").exists()
    assert current.exists() and other_variant.exists()
    mounts = f"overlay /n/root overlay rw,lowerdir={old},upperdir=/n/disk/upper,workdir=/n/disk/work 0 0\n"
    assert sandbox_image.in_use(old, mounts) and not sandbox_image.in_use(current, mounts)


def test_a_jobs_requirements_are_fetched_once_and_a_bad_one_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hashlib

    req = tmp_path / "job" / "requirements.txt"
    req.parent.mkdir()
    req.write_text("remotefit-no-such-package-anywhere==9.9\n")
    with pytest.raises(UserError) as exc:
        sandbox_image.wheels_for(req, tmp_path / "cache")
    msg = str(exc.value)
    assert "\n" not in msg and str(req) in msg and "REMOTEFIT_SANDBOX_NODES=loopback" in msg, msg
    # Fetched once per content of the file: with its stamp there, no pip runs at all.
    house = tmp_path / "cache" / "wheelhouse"
    monkeypatch.setattr(sandbox_image, "torch_requirement", lambda: None)  # (no PyTorch here: no pin)
    (house / (".downloaded-req-" + hashlib.sha256(req.read_bytes()).hexdigest()[:12])).write_text("")
    assert sandbox_image.wheels_for(req, tmp_path / "cache") == house


def test_a_jobs_torch_is_this_machines_build_in_the_wheelhouse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`torch>=2.1` from PyPI is a multi-GB CUDA build; a CPU node gets this machine's CPU build instead."""
    req = tmp_path / "job" / "requirements.txt"
    req.parent.mkdir()
    req.write_text("torch>=2.1\nnumpy\n")
    monkeypatch.setattr(sandbox_image, "torch_requirement", lambda: "torch==2.13.0+cpu")
    ran: list[list[str]] = []

    def pip(argv: list[str], **_: object) -> subprocess.CompletedProcess[str]:
        ran.append(argv)
        return subprocess.CompletedProcess(argv, 0, "", "")

    monkeypatch.setattr(sandbox_image.subprocess, "run", pip)
    house = sandbox_image.wheels_for(req, tmp_path / "cache")
    (argv,) = ran
    constraints = Path(argv[argv.index("-c") + 1])
    assert constraints.parent == house and constraints.read_text() == "torch==2.13.0+cpu\n"
    assert argv[argv.index("-r") + 1] == str(req)
    # Another PyTorch on this machine is another download (the stamp's key holds the pin).
    monkeypatch.setattr(sandbox_image, "torch_requirement", lambda: "torch==2.14.1")
    sandbox_image.wheels_for(req, tmp_path / "cache")
    assert len(ran) == 2


def test_supervisors_are_found_by_their_node_folder_not_a_record(tmp_path: Path) -> None:
    """`inv sandbox.down` powers off machines whose node.json is gone (a start that failed half-way)."""
    nodes = tmp_path / "sb" / "nodes"
    proc = tmp_path / "proc"

    def fake(pid: int, *argv: str) -> None:
        (proc / str(pid)).mkdir(parents=True)
        (proc / str(pid) / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")

    fake(11, "/venv/bin/python", "-m", "remotefit.sandbox_machine", "--dir", str(nodes / "i-1"))
    fake(12, "/venv/bin/python", "-m", "remotefit.sandbox_machine", "--dir", str(tmp_path / "other" / "nodes" / "i-2"))
    fake(13, "/usr/sbin/sshd", "-D", "-f", str(nodes / "i-3" / "sshd_config"))
    fake(14, "/venv/bin/python", "-m", "remotefit.sandbox_machine", "--dir")  # no folder given
    (proc / "self").mkdir()
    assert sandbox_machine.supervisors(nodes, proc) == {nodes / "i-1": 11}


@pytest.mark.parametrize("fault", [KeyboardInterrupt, OSError, UserError])
@pytest.mark.parametrize("kept", [False, True])
def test_a_start_that_fails_after_the_spawn_powers_the_machine_off(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fault: type[BaseException], kept: bool
) -> None:
    """Whatever stops `start` once the machine is spawned (no boot in time, an interrupt, an error while
    waiting for its sshd), the machine is powered off before the error goes on: none is left holding its
    address unrecorded. A stopped instance started again keeps its disk (the user's files) even then."""
    from remotefit import proc as proc_mod

    sb = Sandbox(tmp_path)
    if kept:
        (sb.nodes_dir / "i-0abc" / "disk" / "upper").mkdir(parents=True)
    monkeypatch.setattr(sandbox_machine, "bridge_network", lambda: NET)
    monkeypatch.setattr(sandbox_machine, "ensure_bridge", lambda net: "br")
    monkeypatch.setattr(sandbox_machine, "describe", lambda *a: ("172.31.0.12", "c7i.xlarge", b"#!/bin/sh\n"))
    monkeypatch.setattr(sandbox_image, "ensure_image", lambda variant: tmp_path / "image")
    monkeypatch.setattr(sandbox_image, "wheelhouse", lambda: tmp_path / "wheels")
    monkeypatch.setattr(sandbox_machine, "_answers", lambda host: False)
    monkeypatch.setattr(sandbox_machine, "_write_seed", lambda *a: None)
    monkeypatch.setattr(Sandbox, "_start_imds", lambda self, *a, **k: (0, 8080, None))
    monkeypatch.setattr(proc_mod, "spawn_daemon", lambda *a, **k: type("P", (), {"pid": 4242})())

    def wait(*_a: object) -> None:
        raise fault("stopped while waiting")

    monkeypatch.setattr(sandbox_machine, "_wait_booted", wait)
    stopped: list[tuple[str, bool]] = []
    monkeypatch.setattr(
        Sandbox, "stop_node", lambda self, node, keep_disk=False: stopped.append((node.instance_id, keep_disk))
    )
    with pytest.raises(fault):
        sandbox_machine.start(sb, "i-0abc", "ssh-ed25519 AAAA", "http://127.0.0.1:5000", "us-east-1", "ubuntu")
    assert stopped == [("i-0abc", kept)]


def test_a_container_nodes_record_goes_only_with_its_machine(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """stop_node forgets a node (its node.json) only once no supervisor of it runs: a machine a power-off
    did not stop stays known to destroy and `sandbox.down`."""
    import json

    from remotefit.sandbox import SandboxNode

    sb = Sandbox(tmp_path)
    node = SandboxNode("i-0abc", 22, 4242, "ubuntu", "/home/ubuntu/remotefit", mode="container", host="172.31.0.12")
    d = sb.nodes_dir / node.instance_id
    d.mkdir(parents=True)
    (d / "node.json").write_text(json.dumps({"instance_id": node.instance_id}))
    monkeypatch.setattr(sandbox_machine, "power_off", lambda *a, **kw: None)
    monkeypatch.setattr(Sandbox, "_stop_helpers", lambda self, n: None)
    running = {d: 4242}
    monkeypatch.setattr(sandbox_machine, "supervisors", lambda nodes_dir, proc=None: dict(running))
    sb.stop_node(node)
    assert (d / "node.json").exists()  # still up: still recorded
    running.clear()
    sb.stop_node(node)
    assert not (d / "node.json").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root (CI runs as root)")
def test_a_half_built_image_with_debootstraps_mounts_is_removed_without_walking_into_them(tmp_path: Path) -> None:
    """A build killed mid-way leaves debootstrap's /proc mounted in the image's .tmp folder."""
    tmp = tmp_path / "debian-bookworm-cpu-x.tmp"
    (tmp / "proc").mkdir(parents=True)
    subprocess.run(["mount", "-t", "proc", "proc", str(tmp / "proc")], check=True)
    sandbox_image.discard(tmp)
    assert f"{tmp}/" not in Path("/proc/self/mounts").read_text() and not tmp.exists()


MOUNTINFO = """\
30 25 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
32 30 0:28 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
33 30 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
"""


def test_each_node_gets_a_cgroup_of_its_own_in_the_hierarchies_its_systemd_writes() -> None:
    # Hybrid (this CI machine): the name=systemd v1 hierarchy and the unified one; not cpu & co (read-only in
    # the container). Nested under wherever we run, as nspawn nests its own payload.
    homes = sandbox_machine.cgroup_homes("3:cpu:/\n1:name=systemd:/ci/job\n0::/ci/job\n", MOUNTINFO)
    assert homes == [Path("/sys/fs/cgroup/unified/ci/job"), Path("/sys/fs/cgroup/systemd/ci/job")]
    # cgroup v2 only (a current laptop): one hierarchy at /sys/fs/cgroup.
    v2 = "25 20 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"
    assert sandbox_machine.cgroup_homes("0::/user.slice/session-1.scope\n", v2) == [
        Path("/sys/fs/cgroup/user.slice/session-1.scope")
    ]
    assert sandbox_machine.node_cgroups(homes[:1], "i-1") == [Path("/sys/fs/cgroup/unified/ci/job/remotefit-i-1")]


def test_the_container_starts_inside_its_cgroups_and_they_go_with_it(tmp_path: Path) -> None:
    # A stand-in cgroupfs: the shell writes its own pid into each cgroup.procs, then execs the command (same pid).
    cgs = sandbox_machine._make_cgroups([tmp_path / "a" / "remotefit-i-1", tmp_path / "b" / "remotefit-i-1"])
    assert cgs == []  # parents missing: left out, not an error
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    cgs = sandbox_machine._make_cgroups([tmp_path / "a" / "remotefit-i-1", tmp_path / "b" / "remotefit-i-1"])
    argv = sandbox_machine.in_cgroups_argv(cgs, ["sh", "-c", "echo $$"])
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout.strip()
    assert [(cg / "cgroup.procs").read_text().strip() for cg in cgs] == [out, out]
    for cg in cgs:
        (cg / "cgroup.procs").unlink()  # cgroupfs has no files to delete; rmdir removes the directory
        (cg / "payload" / "system.slice").mkdir(parents=True)
    sandbox_machine._remove_cgroups(cgs)
    assert not any(cg.exists() for cg in cgs)


def test_a_cgroup_that_cannot_be_entered_is_a_console_line_and_the_node_still_boots(tmp_path: Path) -> None:
    cg = tmp_path / "remotefit-i-1"
    (cg / "cgroup.procs").mkdir(parents=True)  # not writable as a file: the shell's redirection fails
    res = subprocess.run(sandbox_machine.in_cgroups_argv([cg], ["echo", "booted"]), capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout == "booted\n"
    assert f"could not enter {cg}/cgroup.procs; the node shares its cgroup" in res.stderr


def test_a_machine_that_ends_before_its_sshd_is_named_as_stopped_with_its_supervisors_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A supervisor that dies before the container starts (a failed mount, a traceback) leaves no console:
    the error must say the machine stopped, at once, and show the supervisor's log, not a boot timeout."""
    from remotefit.sandbox import SandboxNode

    d = tmp_path / "i-dead"
    d.mkdir()
    (d / "console.log").write_text("")
    (d / "machine.log").write_text("Traceback (most recent call last):\nCalledProcessError: mount exited 32\n")
    # A process whose command line names the supervisor, and which exits at once, as a crashed one does.
    # Left a zombie until the end (a zombie counts as ended): its pid cannot be another process's meanwhile.
    proc = subprocess.Popen(["sh", "-c", "exit 1", "remotefit.sandbox_machine"])  # noqa: S603, S607
    while Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        time.sleep(0.01)
    node = SandboxNode("i-dead", 22, proc.pid, "ubuntu", "/w", mode="container", host="127.0.0.9")
    monkeypatch.setenv(sandbox_machine.BOOT_TIMEOUT_ENV, "60")
    t0 = time.monotonic()
    with pytest.raises(UserError) as err:
        sandbox_machine._wait_booted(node, d, t0, kept=False)
    assert time.monotonic() - t0 < 10  # not the 60 s timeout: a dead machine is not waited for
    msg = str(err.value)
    assert re.search(r"stopped \d+ s after it was started, before its sshd answered", msg), msg
    assert "inv destroy" in msg, msg
    assert "within 60 s" not in msg
    cap = capsys.readouterr()
    out = cap.out + cap.err
    assert "its supervisor: CalledProcessError: mount exited 32" in out, out
    proc.wait()


def test_only_the_nodes_own_init_is_killed_by_its_leader_pid(tmp_path: Path) -> None:
    """A leader pid recorded for one node may name another node's init once pids wrap: each init sits in
    its node's own cgroup, so only that one matches."""

    def proc(pid: int | str, comm: str, cgroup: str, pidns: str = "pid:[4026532001]") -> None:
        (tmp_path / str(pid) / "ns").mkdir(parents=True)
        (tmp_path / str(pid) / "comm").write_text(comm + "\n")
        (tmp_path / str(pid) / "cgroup").write_text(cgroup)
        (tmp_path / str(pid) / "ns" / "pid").symlink_to(pidns)

    proc("self", "python3", "0::/\n", "pid:[4026531836]")
    proc(15, "systemd", "0::/init.scope\n", "pid:[4026531836]")  # this machine's own systemd (our namespace)
    proc(10, "systemd", "1:name=systemd:/remotefit-i-a/payload\n0::/remotefit-i-a/payload\n")
    proc(11, "systemd", "1:name=systemd:/remotefit-i-b/payload\n0::/remotefit-i-b/payload\n")
    proc(12, "systemd", "1:name=systemd:/payload\n0::/payload\n")  # a node that could not get a cgroup
    proc(13, "python3", "0::/remotefit-i-a/payload/system.slice/x.service\n")
    assert sandbox_machine.is_machine_init(10, "i-a", tmp_path)
    assert not sandbox_machine.is_machine_init(11, "i-a", tmp_path)  # another node's init
    assert sandbox_machine.is_machine_init(12, "i-a", tmp_path)  # no cgroup to tell by: an init is all we know
    assert not sandbox_machine.is_machine_init(13, "i-a", tmp_path)  # not an init
    assert not sandbox_machine.is_machine_init(14, "i-a", tmp_path)  # gone
    assert not sandbox_machine.is_machine_init(15, "i-a", tmp_path)  # an init, but not in a container


def test_a_machine_that_powers_off_while_moto_fails_still_finishes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """moto answering the shutdown behaviour but failing the stop (a restart's 503 gate, a crash) must not
    crash the supervisor's finish: that would leave node.json naming a dead supervisor, the disk, and the
    node's metadata service running."""
    import boto3

    class Ec2:
        def describe_instance_attribute(self, **_kw: object) -> dict[str, object]:
            return {"InstanceInitiatedShutdownBehavior": {"Value": "terminate"}}

        def terminate_instances(self, **_kw: object) -> None:
            raise RuntimeError("503 Service Unavailable")

    monkeypatch.setattr(boto3, "client", lambda *a, **k: Ec2())
    d = tmp_path / "nodes" / "i-0abc"
    (d / "disk" / "upper").mkdir(parents=True)
    (d / "node.json").write_text('{"instance_id": "i-0abc", "port": 22, "pid": 1, "user": "u", "workdir": "/w"}')
    cfg = {"instance_id": "i-0abc", "dir": str(d), "root": str(d / "root"), "disk": str(d / "disk")}
    cfg |= {"sandbox_dir": str(tmp_path), "endpoint": "http://127.0.0.1:9", "region": "us-east-1"}
    monkeypatch.setattr(Sandbox, "_stop_helpers", lambda self, node: None)
    sandbox_machine._finish(cfg, 0)
    assert '"instance": "terminated"' in (d / sandbox_machine.EXIT).read_text()
    assert not (d / "disk").exists() and not (d / "node.json").exists()
    assert "could not mark i-0abc terminated in moto: 503 Service Unavailable" in capsys.readouterr().out

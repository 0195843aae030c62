"""Container sandbox nodes: each EC2 instance Terraform creates boots as a systemd-nspawn container.

Its root disk is a copy-on-write overlay of the node image (sandbox_image.py) kept in the node's folder,
deleted when the instance terminates (EBS with delete-on-termination) and kept when it stops. It gets the
private IP moto gave the instance on a bridge the sandbox makes (the VPC's range, gateway at .1 as the
VPC router), boots systemd, and cloud-init's NoCloud datasource runs the instance's real user data from
moto, with our public key authorised for `ubuntu`, as on EC2.

Inside the node's own network namespace (never on this machine's interfaces) 169.254.169.254:80 is the
node's metadata service (sandbox_imds, IMDSv2), and 127.0.0.1:<moto port> reaches the moto server, so the
uploader's endpoint works unchanged. A supervisor process per node (``python -m remotefit.sandbox_machine
--dir D``) runs the container, holds those forwards, and when the container powers off (deadline, idle,
`shutdown -h now`) does what EC2 does: the instance's shutdown behaviour (terminate: instance terminated
in moto and disk deleted; stop: stopped, disk kept). `inv stop` / `inv destroy` power it off from outside
and say which of the two it is (the stop-reason file).

Needs root, systemd-nspawn and overlayfs; `available()` says why not, and the sandbox then uses loopback
nodes and says so.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ipaddress
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from remotefit.errors import UserError
from remotefit.node.contract import start_ticks

if TYPE_CHECKING:
    from remotefit.sandbox import Sandbox, SandboxNode

NSPAWN = "systemd-nspawn"
BRIDGE_PREFIX = "rfsb-"  # + a hash of its range: sandboxes on different ranges get different bridges
BRIDGE_CIDR_ENV = "REMOTEFIT_SANDBOX_BRIDGE_CIDR"
DEFAULT_BRIDGE_CIDR = "172.31.0.0/16"  # moto's default VPC: the node's IP is the private IP moto reports
BOOT_TIMEOUT_ENV = "REMOTEFIT_SANDBOX_BOOT_TIMEOUT"
DEFAULT_BOOT_TIMEOUT = 60.0
IMDS_ADDR = "169.254.169.254"
MACHINE = "machine.json"
STOP_REASON = "stop-reason"  # written by the sandbox before it powers a node off: "stop" keeps the disk
EXIT = "exit.json"
CLONE_NEWNET = 0x40000000
REBOOT_RC = 133  # systemd-nspawn's exit status when the container rebooted


def available() -> str | None:
    """None when container nodes can run here, else why not (one line)."""
    if os.geteuid() != 0:
        return "container nodes need root (systemd-nspawn, overlayfs, a bridge)"
    if shutil.which(NSPAWN) is None:
        return f"{NSPAWN} not found (apt-get install systemd-container)"
    if shutil.which("debootstrap") is None:
        return "debootstrap not found (apt-get install debootstrap)"
    try:
        if "overlay" not in Path("/proc/filesystems").read_text():
            return "this kernel has no overlayfs"
    except OSError:
        return "no /proc/filesystems"
    return None


# -- pure builders ---------------------------------------------------------------------------
def bridge_network() -> ipaddress.IPv4Network:
    raw = os.environ.get(BRIDGE_CIDR_ENV) or DEFAULT_BRIDGE_CIDR
    try:
        net = ipaddress.IPv4Network(raw, strict=False)
    except ValueError:
        raise UserError(f"{BRIDGE_CIDR_ENV}={raw!r} is not an IPv4 range; use e.g. 10.213.0.0/16") from None
    if not net.is_private or net.prefixlen > 24:
        raise UserError(f"{BRIDGE_CIDR_ENV}={raw}: use a private range of /24 or larger, e.g. 10.213.0.0/16")
    return net


def bridge_name(net: ipaddress.IPv4Network) -> str:
    import hashlib

    return BRIDGE_PREFIX + hashlib.sha256(str(net).encode()).hexdigest()[:8]  # 13 characters: IFNAMSIZ is 16


def gateway(net: ipaddress.IPv4Network) -> str:
    return str(net.network_address + 1)  # the VPC router's address


def node_ip(private_ip: str, net: ipaddress.IPv4Network) -> str:
    """The node's address on the bridge: moto's private IP when the bridge holds it (the default), else
    the same host part in the bridge's range."""
    ip = ipaddress.IPv4Address(private_ip)
    if ip in net and ip not in (net.network_address, net.broadcast_address, net.network_address + 1):
        return str(ip)
    host = int(ip) & int(net.hostmask)
    host = min(max(host, 2), net.num_addresses - 2)
    return str(net.network_address + host)


def overlap(net: ipaddress.IPv4Network, addresses: Sequence[tuple[str, str]]) -> str | None:
    """The first (interface, cidr) of this machine that overlaps the bridge range, other than the bridge's own."""
    for ifname, cidr in addresses:
        if ifname == bridge_name(net):
            continue
        try:
            other = ipaddress.IPv4Network(cidr, strict=False)
        except ValueError:
            continue
        if other.overlaps(net):
            return f"{cidr} on {ifname}"
    return None


def nspawn_argv(cfg: dict[str, Any]) -> list[str]:
    return [
        NSPAWN,
        "--boot",
        "--register=no",  # this machine may have no systemd to register with
        "--keep-unit",
        f"--directory={cfg['root']}",
        f"--machine={cfg['instance_id']}",
        f"--network-bridge={cfg['bridge']}",
        "--console=read-only",  # its output drains into console.log (passive connects it nowhere: a full pty blocks)
        f"--bind-ro={cfg['wheelhouse']}:{cfg['wheels_mount']}",
        "--",
        "systemd.show_status=true",
        # The journal on the console too, as an EC2 console shows the boot: a node whose disk went with its
        # instance still leaves what it did (the watchdog's decisions included) in console.log.
        "systemd.journald.forward_to_console=1",
    ]


def cgroup_homes(proc_cgroup: str, mountinfo: str) -> list[Path]:
    """Where this process sits in the cgroup hierarchies a container's systemd writes to: the named v1
    `name=systemd` one and the unified (v2) one, as directories of this machine. Pure: reads the texts of
    /proc/self/cgroup and /proc/self/mountinfo."""
    mine = {}
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            mine[parts[1]] = parts[2]
    homes = []
    for line in mountinfo.splitlines():
        pre, sep, post = line.partition(" - ")
        fields, rest = pre.split(), post.split()
        if not sep or len(fields) < 5 or len(rest) < 3:
            continue
        if rest[0] == "cgroup2":
            key = ""
        elif rest[0] == "cgroup" and "name=systemd" in rest[2].split(","):
            key = "name=systemd"
        else:
            continue
        if key in mine:
            homes.append(Path(fields[4]) / mine[key].lstrip("/"))
    return homes


def node_cgroups(homes: Sequence[Path], instance_id: str) -> list[Path]:
    """The node's own cgroup in each hierarchy. nspawn (--keep-unit, no machined to ask) roots the container
    in `<its own cgroup>/payload`: started where we are, every container shared one `payload`, so their
    systemds managed the same `system.slice/*` cgroups, one removing another's between its mkdir and its
    attach (a unit failing with 219/CGROUP: systemd-user-sessions, then /run/nologin kept every ssh login
    out). On EC2 each instance has a kernel of its own; here each node gets a cgroup subtree of its own."""
    return [home / f"remotefit-{instance_id}" for home in homes]


def in_cgroups_argv(cgroups: Sequence[Path], argv: Sequence[str]) -> list[str]:
    """`argv`, started inside `cgroups` (a shell that moves itself, then execs it)."""
    procs = " ".join(shlex.quote(str(cg / "cgroup.procs")) for cg in cgroups)
    enter = 'echo $$ > "$f" || echo "sandbox_machine: could not enter $f; the node shares its cgroup" >&2'
    return ["sh", "-c", f'for f in {procs}; do {enter}; done; exec "$@"', "sh", *argv]


def _make_cgroups(cgroups: Sequence[Path]) -> list[Path]:
    """Create the node's cgroups where this machine lets us (those it does not are left out)."""
    made = []
    for cg in cgroups:
        with contextlib.suppress(OSError):
            cg.mkdir(exist_ok=True)
            made.append(cg)
    return made


def _remove_cgroups(cgroups: Sequence[Path]) -> None:
    """Remove a node's cgroup trees, deepest first (cgroupfs removes a directory that has no processes)."""
    for cg in cgroups:
        if not cg.is_dir():
            continue
        dirs = sorted((p for p, _d, _f in os.walk(cg)), key=lambda p: p.count(os.sep), reverse=True)
        for d in dirs:
            with contextlib.suppress(OSError):
                os.rmdir(d)


def overlay_argv(image: str, disk: Path, root: Path) -> list[str]:
    opts = f"lowerdir={image},upperdir={disk / 'upper'},workdir={disk / 'work'}"
    return ["mount", "-t", "overlay", "overlay", "-o", opts, str(root)]


def netns_argv(leader: int, *ip_args: str) -> list[str]:
    return ["nsenter", "-t", str(leader), "-n", "ip", *ip_args]


def seed_files(instance_id: str, hostname: str, public_key: str, user_data: str) -> dict[str, str]:
    """The NoCloud seed: what EC2's metadata gives cloud-init (instance id, hostname, key pair, user data)."""
    meta = f"instance-id: {instance_id}\nlocal-hostname: {hostname}\npublic-keys:\n  - {public_key.strip()}\n"
    return {"meta-data": meta, "user-data": user_data}


# -- on the laptop side: start, stop, look at ---------------------------------------------------
def host_addresses() -> list[tuple[str, str]]:
    from remotefit.proc import run

    out = run(["ip", "-j", "-4", "addr"], capture=True).stdout
    rows = [(i["ifname"], f"{a['local']}/{a['prefixlen']}") for i in json.loads(out) for a in i.get("addr_info", [])]
    routes = json.loads(run(["ip", "-j", "-4", "route"], capture=True).stdout)
    rows += [(r.get("dev", "?"), r["dst"]) for r in routes if r.get("dst") not in (None, "default")]
    return rows


def ensure_bridge(net: ipaddress.IPv4Network) -> str:
    """The sandbox's bridge with the VPC router's address (made once; a range in use here is refused)."""
    from remotefit.proc import run

    gw = f"{gateway(net)}/{net.prefixlen}"
    name = bridge_name(net)
    addrs = host_addresses()
    if (name, gw) in addrs:
        return name
    clash = overlap(net, addrs)
    if clash:
        raise UserError(
            f"the sandbox's node network {net} is already in use on this machine ({clash}); set "
            f"{BRIDGE_CIDR_ENV} to a free private range, e.g. 10.213.0.0/16"
        )
    if (
        not any(ifname == name for ifname, _ in addrs)
        and run(["ip", "link", "show", name], capture=True, check=False).returncode
    ):
        run(["ip", "link", "add", name, "type", "bridge"])
    run(["ip", "addr", "flush", "dev", name])
    run(["ip", "addr", "add", gw, "dev", name])
    run(["ip", "link", "set", name, "up"])
    return name


# -- address slices: sandboxes on one machine share the bridge, so their nodes need different addresses --
# moto hands out a subnet's addresses in order from .4, so every project's first node would be 172.31.0.4.
# Each sandbox with container nodes claims a slice of 256 addresses in the subnet (slot N starts at .N*256+4)
# and its moto server gives addresses from there (sandbox_moto.slice_private_ips); AWS too hands out any
# free address of the subnet, so no code may count on .4 anyway. The claim is kept in the sandbox folder,
# so a restarted server (which replays its requests) gives the same addresses again.
SLOT_SIZE = 256
SLOTS = 15  # a default subnet is a /20: 16 slices of 256; slot 0 is moto's own order (loopback nodes)
SLOT_FILE = "ip-slot"
SLOT_GRACE_S = 300  # a claim this young holds even before its moto server answers (it is starting)


def slot_registry() -> Path:
    """Host-wide, as the bridge is: which sandbox folder holds which slice."""
    return Path(os.environ.get("REMOTEFIT_SANDBOX_SLOTS") or "/run/remotefit/sandbox-slots")


def _slot_of(owner: Path) -> int | None:
    try:
        return int((owner / SLOT_FILE).read_text().strip())
    except (OSError, ValueError):
        return None


def slot_first_ip(n: int) -> str:
    """The first address moto hands out in slice n of the first default subnet, on the bridge."""
    first = ipaddress.IPv4Address(DEFAULT_BRIDGE_CIDR.split("/")[0]) + n * SLOT_SIZE + 4
    return node_ip(str(first), bridge_network())


def _slice_in_use(n: int) -> bool:
    """Whether a machine on the bridge holds slice n's first address. Asked only when the bridge exists:
    without it no machine is on it, and a connect would go out by the default route (where a proxy may
    answer anything)."""
    if not Path("/sys/class/net", bridge_name(bridge_network())).exists():
        return False
    return _answers(slot_first_ip(n))


def _serving(sandbox_dir: Path) -> bool:
    """Whether that sandbox's moto server still runs (its record's pid, a moto process)."""
    from remotefit.sandbox import pid_alive

    try:
        rec = json.loads((sandbox_dir / "moto.json").read_text())
        return pid_alive(int(rec["pid"]), "moto", rec.get("pid_start"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def claim_slot(owner: Path) -> int:
    """This sandbox's address slice: the one it held before if it is still free, else the first free one."""
    from remotefit.proc import atomic_write, locked

    reg = slot_registry()
    reg.mkdir(parents=True, exist_ok=True)
    with locked(reg / ".lock"):  # two sandboxes starting at once must not take the same slice
        had = _slot_of(owner)
        for n in ([had] if had else []) + list(range(1, SLOTS + 1)):
            try:
                holder = Path((reg / str(n)).read_text().strip())
                fresh = time.time() - (reg / str(n)).stat().st_mtime < SLOT_GRACE_S
            except OSError:
                holder, fresh = None, False
            if holder and holder != owner and _slot_of(holder) == n and (fresh or _serving(holder)):
                continue  # another sandbox's: running, or starting (one left by a killed run is taken over)
            if n != had and _slice_in_use(n):
                continue  # a machine of a sandbox whose folder is gone still holds the slice's first address
            atomic_write(reg / str(n), str(owner))
            atomic_write(owner / SLOT_FILE, str(n))
            return n
    raise UserError(
        f"all {SLOTS} sandbox address slices of this machine are held by other projects' sandboxes (listed in "
        f"{reg}): `inv sandbox.down` in one of them"
    )


def release_slot(owner: Path) -> None:
    n = _slot_of(owner)
    (owner / SLOT_FILE).unlink(missing_ok=True)
    if n is None:
        return
    f = slot_registry() / str(n)
    with contextlib.suppress(OSError):
        if Path(f.read_text().strip()) == owner:
            f.unlink()


def describe(endpoint: str, region: str, instance_id: str) -> tuple[str, str, bytes]:
    """(private IP, instance type, user data) of the instance as moto holds them."""
    import base64

    import boto3

    from remotefit.sandbox import SANDBOX_REGION_CREDENTIALS

    ec2 = boto3.client("ec2", endpoint_url=endpoint, region_name=region, **_creds(SANDBOX_REGION_CREDENTIALS))
    inst = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]
    attr = ec2.describe_instance_attribute(InstanceId=instance_id, Attribute="userData")
    raw = attr.get("UserData", {}).get("Value", "")
    return inst.get("PrivateIpAddress", ""), inst.get("InstanceType", ""), base64.b64decode(raw) if raw else b""


def console_tail(d: Path, lines: int = 15) -> str:
    """The node's console (nspawn's output: the spawn and the power-off), then what cloud-init printed on it
    (/var/log/cloud-init-output.log on the node's disk), the last `lines` of each; then the supervisor's own
    log, which is empty unless the machine could not be started (a traceback, a failed mount)."""
    out = []
    for path, label in (
        (d / "console.log", ""),
        (d / "disk/upper/var/log/cloud-init-output.log", ""),
        (d / "machine.log", "its supervisor: "),
    ):
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        out += [label + ln for ln in text.splitlines() if ln.strip()][-lines:]
    return "\n".join(out) or "(no console output)"


def _answers(host: str) -> bool:
    try:
        with socket.create_connection((host, 22), timeout=0.3):
            return True
    except OSError:
        return False


def wait_ssh(host: str, pid: int, timeout: float, started: int | None = None) -> bool:
    """Whether the node's sshd answers within `timeout` while its supervisor `pid` runs."""
    from remotefit.sandbox import pid_alive

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and pid_alive(pid, "sandbox_machine", started):
        try:
            with socket.create_connection((host, 22), timeout=0.5) as s:
                if s.recv(4).startswith(b"SSH-"):
                    return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


def _children(pid: int) -> list[int]:
    try:
        return [int(k) for k in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (OSError, ValueError):
        return []


def _inits(supervisor: int) -> list[int]:
    """The container inits under a supervisor (its nspawn's children in another network namespace), found
    from /proc: a machine killed before its supervisor wrote its leader file is still found."""
    own = os.readlink("/proc/self/ns/net")
    found = []
    for nspawn in _children(supervisor):
        for kid in _children(nspawn):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{kid}/ns/net") != own:
                    found.append(kid)
    return found


def _kill_machine(d: Path, inits: Sequence[int] = ()) -> None:
    """SIGKILL the container's init (its pid namespace's PID 1): every process of the machine goes with it.
    `inits`: those found under its supervisor before the supervisor was killed."""
    leaders = set(inits)
    with contextlib.suppress(OSError, ValueError):
        leaders.add(int((d / "leader").read_text()))
    for leader in leaders:
        if is_machine_init(leader, d.name):
            with contextlib.suppress(OSError):
                os.kill(leader, signal.SIGKILL)


def is_machine_init(pid: int, instance_id: str, proc: Path = Path("/proc")) -> bool:
    """Whether `pid` is still this node's container init, not a recycled pid: an init in a pid namespace
    other than ours, and in the node's own cgroup where it has one (another node's init sits in its own
    `remotefit-<id>`)."""
    try:
        comm = (proc / str(pid) / "comm").read_text().strip()
        cgroups = (proc / str(pid) / "cgroup").read_text()
        own_ns = os.readlink(proc / str(pid) / "ns/pid") == os.readlink(proc / "self/ns/pid")
    except OSError:
        return False
    if comm not in ("systemd", "init") or own_ns:
        return False
    return f"/remotefit-{instance_id}/" in cgroups or "/remotefit-i-" not in cgroups


def supervisors(nodes_dir: Path, proc: Path = Path("/proc")) -> dict[Path, int]:
    """{node folder: pid} of every running supervisor of a node under `nodes_dir`, found by its command line,
    not by a record: a machine whose node.json is gone (a start that failed half-way) is still found here."""
    found: dict[Path, int] = {}
    for entry in proc.glob("[0-9]*"):
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        words = [a.decode(errors="replace") for a in argv]
        if "remotefit.sandbox_machine" in words and "--dir" in words[:-1]:
            d = Path(words[words.index("--dir") + 1])
            if d.parent == nodes_dir:
                found[d] = int(entry.name)
    return found


def power_off(d: Path, pid: int, reason: str, grace: float = 30, started: int | None = None) -> None:
    """Power a node off from outside; `reason` "stop" keeps its disk, anything else deletes it. `started`:
    the supervisor's start time as its record kept it (a pid alone may now name another node's)."""
    from remotefit.sandbox import pid_alive

    _write(d / STOP_REASON, reason)
    if started is None or not pid_alive(pid, "sandbox_machine", started):
        # A stale record, or one without a start time: the machine's own supervisor, found now by its --dir
        # (this node's, no other's), and its start time with it, for the wait below.
        pid = supervisors(d.parent).get(d, 0)
        started = start_ticks(pid) if pid else None
    if pid and pid_alive(pid, "sandbox_machine", started):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while pid_alive(pid, "sandbox_machine", started) and time.monotonic() < deadline:
            time.sleep(0.1)
        if pid_alive(pid, "sandbox_machine", started):
            inits = _inits(pid)  # before the kill: an orphaned init is no longer anyone's child
            os.killpg(pid, signal.SIGKILL)
            _kill_machine(d, inits)  # nspawn killed outright leaves the container's init running, orphaned
    if (d / STOP_REASON).exists():  # the supervisor did not finish: do its part
        root = d / "root"
        if os.path.ismount(root):
            subprocess.run(["umount", "-l", str(root)], check=False)  # noqa: S603, S607
        if reason != "stop":
            shutil.rmtree(d / "disk", ignore_errors=True)
        (d / STOP_REASON).unlink(missing_ok=True)


def machine_config(
    d: Path,
    sandbox_dir: Path,
    instance_id: str,
    ip: str,
    net: ipaddress.IPv4Network,
    bridge: str,
    image: str,
    wheelhouse: str,
    endpoint: str,
    region: str,
) -> dict[str, Any]:
    """machine.json: all the supervisor needs (forwards[0]'s target port is the node's IMDS, set once it runs)."""
    from urllib.parse import urlparse

    from remotefit import sandbox_image

    moto_port = urlparse(endpoint).port or 80
    return {
        "instance_id": instance_id,
        "dir": str(d),
        "sandbox_dir": str(sandbox_dir),
        "image": image,
        "disk": str(d / "disk"),
        "root": str(d / "root"),
        "ip": ip,
        "prefix": net.prefixlen,
        "bridge": bridge,
        "host_key": str(d / "ssh_host_ed25519_key"),
        "wheelhouse": wheelhouse,
        "wheels_mount": sandbox_image.WHEELS_MOUNT,
        # Inside the node: its metadata service at the link-local address, and moto at the endpoint the
        # laptop hands to node-side tools (AWS_ENDPOINT_URL).
        "forwards": [[IMDS_ADDR, 80, "127.0.0.1", 0], ["127.0.0.1", moto_port, "127.0.0.1", moto_port]],
        "endpoint": endpoint,
        "region": region,
    }


def _write_seed(d: Path, instance_id: str, ip: str, public_key: str, user_data: bytes) -> None:
    """The node's host key (kept per instance) and its NoCloud seed, with the user data as moto holds it
    (gzip and all: cloud-init unpacks it)."""
    from remotefit.proc import atomic_write, run

    (d / "seed").mkdir(parents=True, exist_ok=True)
    host_key = d / "ssh_host_ed25519_key"
    if not host_key.exists():
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"sandbox-{instance_id}", "-f", str(host_key)])
    meta = seed_files(instance_id, "ip-" + ip.replace(".", "-"), public_key, "")
    atomic_write(d / "seed" / "meta-data", meta["meta-data"])
    (d / "seed" / "user-data").write_bytes(user_data)


def start(sb: Sandbox, instance_id: str, public_key: str, endpoint: str, region: str, ssh_user: str) -> SandboxNode:
    """Boot the instance as a container (its kept disk, if it was stopped) and wait for its sshd; a node
    that does not boot in time is powered off (its disk deleted, unless it was kept) and the error shows its
    console."""
    from remotefit import sandbox_image
    from remotefit.proc import atomic_write, spawn_daemon
    from remotefit.sandbox import SandboxNode, pid_alive

    old = sb.node(instance_id)
    was = old.started(old.pid) if old else None
    if (
        old
        and old.mode == "container"
        and pid_alive(old.pid, "sandbox_machine", was)
        and wait_ssh(old.host, old.pid, 30, was)
    ):
        return old  # still booted (a slow answer made it look down): never a second machine for one instance
    net = bridge_network()
    bridge = ensure_bridge(net)
    private_ip, instance_type, user_data = describe(endpoint, region, instance_id)
    # GPU instance types boot the Deep Learning AMI's stand-in (PyTorch in /opt/pytorch, no CUDA).
    image = sandbox_image.ensure_image(variant=sandbox_image.variant_for(instance_type))
    house = sandbox_image.wheelhouse()
    ip = node_ip(private_ip or str(net.network_address + 10), net)
    if _answers(ip):  # each sandbox has its own slice (claim_slot); a stray machine on the bridge may not
        raise UserError(
            f"address {ip} for {instance_id} is already taken by another machine on this one's sandbox bridge "
            f"(another project's sandbox?): `inv sandbox.down` there, or give this project its own range with "
            f"{BRIDGE_CIDR_ENV}"
        )
    d = sb.nodes_dir / instance_id
    kept = (d / "disk").exists()  # a stopped instance started again: its disk holds the user's files
    _write_seed(d, instance_id, ip, public_key, user_data)
    imds_pid, imds_port, imds_start = sb._start_imds(d, instance_id, endpoint, region, local_ipv4=ip)
    cfg = machine_config(d, sb.dir, instance_id, ip, net, bridge, str(image), str(house), endpoint, region)
    cfg["forwards"][0][3] = imds_port
    atomic_write(d / MACHINE, json.dumps(cfg))
    for stale in (EXIT, STOP_REASON, "leader"):
        (d / stale).unlink(missing_ok=True)
    (d / "console.log").unlink(missing_ok=True)
    t0 = time.monotonic()
    proc = spawn_daemon(
        [sys.executable, "-m", "remotefit.sandbox_machine", "--dir", str(d)],
        d / "machine.log",
        env={"PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )
    node = SandboxNode(
        instance_id=instance_id,
        port=22,
        pid=proc.pid,
        user=ssh_user,
        workdir=f"/home/{ssh_user}/remotefit",
        imds_pid=imds_pid,
        imds_port=imds_port,
        mode="container",
        host=ip,
    )
    node.note(proc.pid)
    node.note(imds_pid, imds_start)
    atomic_write(d / "node.json", json.dumps(asdict(node)))
    try:
        _wait_booted(node, d, t0, kept)
    except BaseException:  # no boot in time, an interrupt, any error: no machine is left up unrecorded
        sb.stop_node(node, keep_disk=kept)  # ... and a stopped instance's disk is never deleted for it
        raise
    return node


def _wait_booted(node: SandboxNode, d: Path, t0: float, kept: bool) -> None:
    """Wait for the node's sshd; for one that does not answer in time, show its console's last lines and
    raise (the caller powers it off: its disk deleted, unless `kept`, a stopped instance's)."""
    from remotefit.proc import echo
    from remotefit.sandbox import pid_alive

    timeout = float(os.environ.get(BOOT_TIMEOUT_ENV) or DEFAULT_BOOT_TIMEOUT)
    if wait_ssh(node.host, node.pid, timeout, node.started(node.pid)):
        echo(f"sandbox: {node.instance_id} booted to SSH at {node.host} in {time.monotonic() - t0:.1f} s (container)")
        return
    waited = time.monotonic() - t0
    tail = console_tail(d)  # before the power-off: cloud-init's log is on the disk it may delete
    echo(
        f"sandbox node {node.instance_id}: its console's last lines:\n"
        + "\n".join(f"  | {x}" for x in tail.splitlines())
    )
    rest = "its disk is kept (a stopped instance's)" if kept else "`inv destroy` removes the rest"
    # Not slow: the machine ended (or never started).
    if not pid_alive(node.pid, "sandbox_machine", node.started(node.pid)):
        raise UserError(
            f"sandbox node {node.instance_id} ({node.host}) stopped {waited:.0f} s after it was started, before "
            f"its sshd answered (its console and supervisor log are above; its folder is {d}); {rest}"
        )
    raise UserError(
        f"sandbox node {node.instance_id} ({node.host}) did not boot to SSH within {timeout:g} s (its console is "
        f"above; {BOOT_TIMEOUT_ENV} sets the limit); it was powered off, and {rest}"
    )


# -- the supervisor (runs as its own daemon per node) ----------------------------------------
def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _pipe(a: socket.socket, b: socket.socket) -> None:
    try:
        while chunk := a.recv(65536):
            b.sendall(chunk)
    except OSError:
        pass
    finally:
        for s in (a, b):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


def _serve(listener: socket.socket, to: tuple[str, int]) -> None:
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        try:
            up = socket.create_connection(to, timeout=10)
            up.settimeout(None)
        except OSError:
            conn.close()
            continue
        threading.Thread(target=_pipe, args=(conn, up), daemon=True).start()
        threading.Thread(target=_pipe, args=(up, conn), daemon=True).start()


def _bind_in(leader: int, forwards: Sequence[Sequence[Any]]) -> list[socket.socket]:
    """Listeners inside the node's network namespace; the connections they forward leave from this
    machine's (a socket keeps the namespace it was made in)."""
    own = os.open("/proc/self/ns/net", os.O_RDONLY)
    node = os.open(f"/proc/{leader}/ns/net", os.O_RDONLY)
    listeners = []
    try:
        _setns(node)
        for host, port, *_ in forwards:
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, int(port)))
            s.listen(64)
            listeners.append(s)
    finally:
        _setns(own)
        os.close(own)
        os.close(node)
    return listeners


def _leader(nspawn_pid: int, timeout: float = 20) -> int:
    """The container's PID 1 as this machine sees it: nspawn's child in another network namespace."""
    own = os.readlink("/proc/self/ns/net")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for kid in _children(nspawn_pid):
            try:
                if os.readlink(f"/proc/{kid}/ns/net") != own:
                    return kid
            except OSError:
                continue
        time.sleep(0.02)
    raise RuntimeError("the container's init did not start")


def _prepare_disk(cfg: dict[str, Any]) -> None:
    root, disk = Path(cfg["root"]), Path(cfg["disk"])
    for sub in ("upper", "work"):
        (disk / sub).mkdir(parents=True, exist_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    if not os.path.ismount(root):
        subprocess.run(overlay_argv(cfg["image"], disk, root), check=True)  # noqa: S603
    seed = root / "var/lib/cloud/seed/nocloud"
    seed.mkdir(parents=True, exist_ok=True)
    for name in ("meta-data", "user-data"):
        shutil.copyfile(Path(cfg["dir"]) / "seed" / name, seed / name)
    # The node's name resolves to its private IP, as the VPC's DNS answers on EC2.
    hostname = "ip-" + cfg["ip"].replace(".", "-")
    (root / "etc/hosts").write_text(
        f"127.0.0.1 localhost\n{cfg['ip']} {hostname}\n::1 localhost ip6-localhost ip6-loopback\n"
    )
    key = Path(cfg["host_key"])
    for src, dst in ((key, "ssh_host_ed25519_key"), (key.with_suffix(".pub"), "ssh_host_ed25519_key.pub")):
        shutil.copyfile(src, root / "etc/ssh" / dst)
    os.chmod(root / "etc/ssh/ssh_host_ed25519_key", 0o600)


def _configure_net(leader: int, cfg: dict[str, Any]) -> None:
    for args in (
        ("link", "set", "lo", "up"),
        ("addr", "add", f"{IMDS_ADDR}/32", "dev", "lo"),  # the metadata address, in the node's namespace only
        ("addr", "add", f"{cfg['ip']}/{cfg['prefix']}", "dev", "host0"),
        ("link", "set", "host0", "up"),
    ):
        subprocess.run(netns_argv(leader, *args), check=True, capture_output=True)  # noqa: S603


def _boot_once(cfg: dict[str, Any], console: Any, stopping: threading.Event, holder: dict[str, Any]) -> int:
    _prepare_disk(cfg)
    homes = cgroup_homes(Path("/proc/self/cgroup").read_text(), Path("/proc/self/mountinfo").read_text())
    cgroups = node_cgroups(homes, cfg["instance_id"])
    _remove_cgroups(cgroups)  # a previous boot's (a reboot, a killed container)
    argv = in_cgroups_argv(_make_cgroups(cgroups), nspawn_argv(cfg))
    proc = subprocess.Popen(argv, stdout=console, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)  # noqa: S603
    holder["proc"] = proc
    listeners: list[socket.socket] = []
    try:
        leader = _leader(proc.pid)
        _write(Path(cfg["dir"]) / "leader", str(leader))  # at once: a power-off from outside may need it
        _configure_net(leader, cfg)
        listeners = _bind_in(leader, cfg["forwards"])
        for s, (_h, _p, to_host, to_port) in zip(listeners, cfg["forwards"], strict=True):
            threading.Thread(target=_serve, args=(s, (to_host, int(to_port))), daemon=True).start()
    except Exception as exc:  # noqa: BLE001 - a node that cannot be wired is powered off, not left half-up
        console.write(f"sandbox_machine: {exc}\n".encode())
        console.flush()
        proc.terminate()
    if stopping.is_set():
        proc.terminate()
    rc = proc.wait()
    for s in listeners:
        s.close()
    _remove_cgroups(cgroups)
    return rc


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _finish(cfg: dict[str, Any], rc: int) -> None:
    """The machine is off: unmount its disk, then what EC2 does for the cause (see the module docstring)."""
    d = Path(cfg["dir"])
    root = Path(cfg["root"])
    if os.path.ismount(root):
        subprocess.run(["umount", "-l", str(root)], check=False)  # noqa: S603, S607
    reason = (d / STOP_REASON).read_text().strip() if (d / STOP_REASON).exists() else ""
    (d / STOP_REASON).unlink(missing_ok=True)
    outcome = "stopped" if reason == "stop" else "terminated"
    note = reason or "powered off from inside"
    if not reason:
        outcome = _apply_shutdown_behaviour(cfg)
    if outcome == "terminated":
        shutil.rmtree(cfg["disk"], ignore_errors=True)  # delete on termination
    _write(d / EXIT, json.dumps({"at": time.time(), "rc": rc, "cause": note, "instance": outcome}))
    from remotefit.sandbox import Sandbox  # the node's helpers (metadata service) go with the machine

    sb = Sandbox(Path(cfg["sandbox_dir"]))
    node = sb.node(cfg["instance_id"])
    if node is not None:
        sb._stop_helpers(node)
        (d / "node.json").unlink(missing_ok=True)


def _apply_shutdown_behaviour(cfg: dict[str, Any]) -> str:
    """A node that powered itself off: its instance's shutdown behaviour decides, as on EC2."""
    import boto3

    from remotefit.sandbox import SANDBOX_REGION_CREDENTIALS

    ec2 = boto3.client(
        "ec2", endpoint_url=cfg["endpoint"], region_name=cfg["region"], **_creds(SANDBOX_REGION_CREDENTIALS)
    )
    iid = cfg["instance_id"]
    try:
        attr = ec2.describe_instance_attribute(InstanceId=iid, Attribute="instanceInitiatedShutdownBehavior")
        behaviour = attr.get("InstanceInitiatedShutdownBehavior", {}).get("Value", "stop")
    except Exception:  # noqa: BLE001 - moto gone: the sandbox is going down, the disk with it
        return "terminated"
    outcome = "terminated" if behaviour == "terminate" else "stopped"
    try:
        if outcome == "terminated":
            ec2.terminate_instances(InstanceIds=[iid])
        else:
            ec2.stop_instances(InstanceIds=[iid])
    except Exception as exc:  # noqa: BLE001 - the machine is off all the same: finish (no record left naming it)
        print(f"sandbox_machine: could not mark {iid} {outcome} in moto: {exc}", flush=True)
    return outcome


def _creds(c: dict[str, str]) -> dict[str, str]:
    return {"aws_access_key_id": c["AWS_ACCESS_KEY_ID"], "aws_secret_access_key": c["AWS_SECRET_ACCESS_KEY"]}


def supervise(d: Path) -> int:
    cfg = json.loads((d / MACHINE).read_text())
    stopping = threading.Event()
    holder: dict[str, Any] = {}

    def on_term(_sig: int, _frame: object) -> None:
        stopping.set()
        proc = holder.get("proc")
        if proc is not None and proc.poll() is None:
            proc.terminate()  # nspawn turns SIGTERM into the container's orderly shutdown

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    with (d / "console.log").open("ab") as console:
        while True:
            rc = _boot_once(cfg, console, stopping, holder)
            if rc == REBOOT_RC and not stopping.is_set():
                continue  # a reboot: the same disk boots again
            break
    _finish(cfg, rc)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m remotefit.sandbox_machine", description="Run one container node.")
    p.add_argument("--dir", required=True, help="the node's folder (holds machine.json)")
    args = p.parse_args(argv)
    return supervise(Path(args.dir))


if __name__ == "__main__":
    sys.exit(main())

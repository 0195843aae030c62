"""The embedded sandbox: a moto server standing in for AWS, and local sshd "nodes" on loopback.

Real Terraform with the real AWS provider talks to the moto server; each EC2 instance Terraform
creates gets an unprivileged-port sshd on 127.0.0.1 with its own host key, reached by real ssh and
rsync. Only reachability differs from AWS: the same tasks, templates and code paths run.

Known moto gaps (so the sandbox is honest about them): EC2 placement groups are not implemented
(the provider would wait forever), and a spot instance's market options are not read back.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from remotefit import sandbox_moto
from remotefit.errors import UserError
from remotefit.node import NODE_DIR, contract
from remotefit.proc import atomic_write, echo, run, spawn_daemon
from remotefit.ssh import ssh_close_argv

SANDBOX_REGION_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
SSHD = "/usr/sbin/sshd"
MOTO_SEED = 20260101  # any fixed number: the same seed and requests give the same IDs
NODES_ENV = "REMOTEFIT_SANDBOX_NODES"  # auto (default) | container | loopback
NODE_MODES = ("loopback", "container", "auto")
# Threads each sandbox job gets (its OMP_NUM_THREADS), for when several sandboxes share this machine's cores.
THREADS_ENV = "REMOTEFIT_SANDBOX_THREADS"


def job_threads() -> int | None:
    """$REMOTEFIT_SANDBOX_THREADS: how many threads each sandbox job runs (OMP_NUM_THREADS, which PyTorch
    follows), or None: the job's own choice, all of this machine's cores. A real instance's vCPUs are its
    own; sandbox nodes share this machine's. Where several sandboxes train at once (the test suite's workers),
    threads of each job fight the others' for the same cores: 3 trainings at once on 2 cores took 37 CPU-s
    each with 2 threads and 26 with 1 (and 30% less wall time)."""
    raw = os.environ.get(THREADS_ENV, "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise UserError(f"{THREADS_ENV}={raw!r} is not a whole number of threads >= 1; set e.g. 1, or unset it")
    return int(raw)


def free_port(prefer: int | None = None) -> int:
    """A free loopback port: `prefer` when it is free (a restarted AWS keeps its address), else any."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: TIME_WAIT is no obstacle
        try:
            s.bind(("127.0.0.1", prefer or 0))
        except OSError:
            s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pid_alive(pid: int, marker: str, started: int | None = None) -> bool:
    """True when `pid` runs (not a zombie), its command line holds `marker`, and, where its record kept
    it, it started at `started` (contract.start_ticks). The marker tells the kinds of daemon apart, the
    start time one daemon from another of its kind: this machine's pids wrap (pid_max 32768; the test
    suite starts ~33,000 processes and more threads), so a dead node's pid soon names another node's."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return marker in cmdline and contract.pid_alive(pid, started)


def stop_pid(pid: int, marker: str, grace: float = 5.0, started: int | None = None) -> bool:
    """SIGTERM the process group of `pid`, then SIGKILL after `grace`; True if something was stopped.
    Nothing is signalled unless `pid` is still the process its record names (pid_alive)."""
    if not pid_alive(pid, marker, started):
        return False
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return True
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if not pid_alive(pid, marker, started):
                _reap(pid)
                return True
            time.sleep(0.05)
    return True


def descendants(pid: int) -> list[int]:
    """Every process below `pid` in the process tree, read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # exited meanwhile
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def stop_sshd(pid: int, grace: float = 3.0, started: int | None = None) -> bool:
    """Stop a node's sshd listener AND its open connections with what they run. Each connection's sshd
    calls setsid(), so stopping the listener's process group spares them: a client's ControlMaster
    (ControlPersist 10m) would keep a "terminated" node's session running. True if the listener ran."""
    found = descendants(pid) if pid_alive(pid, "sshd", started) else []
    sessions = [(s, contract.start_ticks(s)) for s in found]  # each one process, however long the wait below
    stopped = stop_pid(pid, "sshd", grace=grace, started=started)
    for s, t in sessions:
        if pid_alive(s, "", t):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(s, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while any(pid_alive(s, "", t) for s, t in sessions) and time.monotonic() < deadline:
        time.sleep(0.05)
    for s, t in sessions:
        if pid_alive(s, "", t):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(s, signal.SIGKILL)
        _reap(s)
    return stopped


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


@dataclass
class Server:
    pid: int
    port: int
    started_at: float
    pid_start: int | None = None  # contract.start_ticks: with the pid, it names this server (pids wrap)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class Sandbox:
    """Start, find and stop the sandbox processes recorded in the project's kept folder (config.Paths.sandbox_dir)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.record = directory / "moto.json"

    def node_mode(self) -> tuple[str, str]:
        """(mode, why) for new nodes: "container" (sandbox_machine: booted Debian nodes) or "loopback"
        (an sshd on this machine). $REMOTEFIT_SANDBOX_NODES picks; `auto`, the default, takes containers
        where they can run and says why not where they cannot."""
        from remotefit import sandbox_machine

        wanted = os.environ.get(NODES_ENV, "auto").strip() or "auto"
        if wanted not in NODE_MODES:
            raise UserError(f"{NODES_ENV}={wanted!r} is not one of {', '.join(NODE_MODES)}")
        if wanted == "loopback":
            return "loopback", f"{NODES_ENV}=loopback"
        why_not = sandbox_machine.available()
        if why_not is None:
            return "container", "booted containers (systemd-nspawn)"
        if wanted == "container":
            raise UserError(f"{NODES_ENV}=container, but {why_not}; or set {NODES_ENV}=loopback")
        return "loopback", f"fallback: {why_not}"

    def caller_cidr(self) -> str:
        """Where the laptop's ssh comes from, as a node sees it (the SSH rule's source)."""
        if self.node_mode()[0] == "container":
            from remotefit import sandbox_machine

            return f"{sandbox_machine.gateway(sandbox_machine.bridge_network())}/32"
        return "127.0.0.1/32"

    # -- the moto server ---------------------------------------------------------------
    def server(self) -> Server | None:
        """The running server, or None. Read-only: a dead server's record, its nodes and their jobs
        are left alone (`up` restores the state and re-adopts the nodes)."""
        try:
            srv = Server(**json.loads(self.record.read_text()))
        except (OSError, ValueError, TypeError):
            return None
        # Three tries: a loaded server may answer late.
        if pid_alive(srv.pid, "moto", srv.pid_start) and any(_answers(srv.endpoint) for _ in range(3)):
            return srv
        return None

    @property
    def recording(self) -> Path:
        """Every request moto served, in order (moto's recorder): replayed into a restarted server."""
        return self.dir / "moto-recording.jsonl"

    def up(self) -> Server:
        """Start the moto server if it is not running (twice is harmless) and return it."""
        srv = self.server()
        if srv:
            return srv
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            stale = Server(**json.loads(self.record.read_text()))
        except (OSError, ValueError, TypeError):
            stale = None
        if stale and pid_alive(stale.pid, "moto", stale.pid_start):
            # Running but deaf: stop it rather than leave a second server behind.
            stop_pid(stale.pid, "moto", started=stale.pid_start)
        # Decided before the new server answers anything (its own start-up probes are recorded too).
        fresh = not self.recording.exists() or self.recording.stat().st_size == 0
        slot = self._ip_slot()
        last = "no output"
        log = self.dir / "moto.log"
        for attempt in range(3):  # a free port can be taken by another process before moto binds it
            # The old port first: what the nodes were told (the uploader's endpoint) keeps working.
            port = free_port(stale.port if stale and attempt == 0 else None)
            start = log.stat().st_size if log.exists() else 0
            # Its own session: it survives the invoke process; `sandbox.down` stops it.
            proc = spawn_daemon(
                [sys.executable, "-m", "remotefit.sandbox", "moto", "--port", str(port), "--ip-slot", str(slot)]
                + ([] if fresh else ["--hold"]),
                log,
                env={
                    "MOTO_IAM_LOAD_MANAGED_POLICIES": "true",
                    "MOTO_ENABLE_RECORDING": "true",
                    "MOTO_RECORDER_FILEPATH": str(self.recording),
                    "PYTHONPATH": str(Path(__file__).resolve().parent.parent),  # this remotefit, whatever the cwd
                    **SANDBOX_REGION_CREDENTIALS,
                },
            )
            srv = Server(pid=proc.pid, port=port, started_at=time.time(), pid_start=contract.start_ticks(proc.pid))
            deadline = time.monotonic() + 60
            answered = False
            while proc.poll() is None and time.monotonic() < deadline:
                answered = _answers(srv.endpoint)
                if answered:
                    break
                time.sleep(0.1)
            # Ours answers, not a stranger on the port: our process still runs and says it bound the
            # port (a second request is no proof: moto's second answer takes ~2 s on a loaded machine).
            with log.open("rb") as fh:
                fh.seek(start)
                bound = f"Running on {srv.endpoint}".encode() in fh.read()
            if answered and bound and proc.poll() is None:
                break
            stop_pid(proc.pid, "moto")
            tail = log.read_text(errors="replace").strip().splitlines()[-1:]
            last = tail[0] if tail else "no output"
        else:
            raise UserError(
                f"the sandbox moto server did not start ({last}); run scripts/bootstrap to install moto[server]"
            )
        restored = self._restore(srv, fresh, slot)
        atomic_write(self.record, json.dumps(asdict(srv)))
        echo(f"sandbox: moto server up at {srv.endpoint} (pid {srv.pid}){restored}")
        return srv

    def _ip_slot(self) -> int:
        """The address slice of this sandbox's private IPs: one of its own where nodes are containers
        (they share one bridge with other sandboxes' nodes), moto's own order (0) for loopback nodes."""
        from remotefit import sandbox_machine

        if self.node_mode()[0] != "container":
            return 0
        return sandbox_machine.claim_slot(self.dir)

    def _restore(self, srv: Server, fresh: bool, slot: int = 0) -> str:
        """Make a new server hold what the last one held: moto's IDs come from a seeded generator, so
        replaying every recorded request (the seed first) rebuilds the same instances, buckets and
        state versions. Then live sandbox nodes are re-adopted (their watchdogs pointed here)."""
        if fresh:
            # Recorded: the replay starts with it. Each address slice its own seed, so sandboxes sharing this
            # machine's bridge also have different instance IDs (a container's machine and veth names).
            _post(f"{srv.endpoint}/moto-api/seed?a={MOTO_SEED + slot}")
            return ""
        lines = replay(self.recording, srv.endpoint)
        _post(f"{srv.endpoint}{sandbox_moto.READY_PATH}")  # the replay is whole: serve the nodes' clients again
        adopted = [n.instance_id for n in self.nodes() if n.alive() and self._repoint_watchdog(n, srv.endpoint)]
        return f"; restored the previous server's state ({lines} recorded requests)" + (
            f", re-adopted node(s) {', '.join(adopted)}" if adopted else ""
        )

    def _repoint_watchdog(self, node: SandboxNode, endpoint: str) -> bool:
        """Restart a live node's watchdog against the new endpoint, with its original deadline."""
        d = self.nodes_dir / node.instance_id
        try:
            config = json.loads((d / "watchdog.json").read_text())
        except (OSError, ValueError):
            return True
        cmd = config.get("shutdown_cmd", [])
        if "--endpoint" in cmd:
            cmd[cmd.index("--endpoint") + 1] = endpoint
        atomic_write(d / "watchdog.json", json.dumps(config))
        if node.watchdog_pid:
            stop_pid(node.watchdog_pid, "watchdog", grace=3, started=node.started(node.watchdog_pid))
        node.watchdog_pid = node.note(self._spawn_watchdog(d, node))
        atomic_write(d / "node.json", json.dumps(asdict(node)))
        return True

    def down(self, ssh_config: Path | None = None) -> list[str]:
        """Stop every sandbox process (our ssh ControlMaster connections to its nodes included) and
        forget its state; return what was stopped. Leaves no process behind."""
        stopped = []
        if ssh_config is not None and ssh_config.exists() and self.nodes():
            for host in re.findall(r"^Host (\S+)", ssh_config.read_text(), flags=re.M):
                res = run(ssh_close_argv(ssh_config, host), capture=True, check=False)
                if res.returncode == 0:
                    stopped.append(f"ssh connection to {host}")
        stopped += [f"sshd node {n.instance_id} (port {n.port})" for n in self.nodes() if self.stop_node(n)]
        from remotefit import sandbox_machine

        for d, pid in sandbox_machine.supervisors(self.nodes_dir).items():  # machines no record knows (a failed start)
            sandbox_machine.power_off(d, pid, "terminate")
            stopped.append(f"unrecorded container node {d.name} (pid {pid})")
        try:
            srv = Server(**json.loads(self.record.read_text()))
        except (OSError, ValueError, TypeError):
            srv = None
        if srv and stop_pid(srv.pid, "moto", started=srv.pid_start):
            stopped.append(f"moto server (pid {srv.pid}, port {srv.port})")
        from remotefit import sandbox_provider

        provider = sandbox_provider.stop(self.dir)
        if provider:
            stopped.append(f"AWS provider (pid {provider})")
        self.record.unlink(missing_ok=True)
        self.recording.unlink(missing_ok=True)  # a deliberate down starts afresh
        self._forget_nodes()
        sandbox_machine.release_slot(self.dir)
        return stopped

    # -- sshd nodes ------------------------------------------------------------------
    @property
    def nodes_dir(self) -> Path:
        return self.dir / "nodes"

    def nodes(self) -> list[SandboxNode]:
        out = []
        for f in sorted(self.nodes_dir.glob("*/node.json")):
            try:
                out.append(SandboxNode(**json.loads(f.read_text())))
            except (OSError, ValueError, TypeError):
                continue
        return out

    def node(self, instance_id: str) -> SandboxNode | None:
        f = self.nodes_dir / instance_id / "node.json"
        try:
            return SandboxNode(**json.loads(f.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def prepare_machines(self, instance_types: list[str]) -> None:
        """What booting these instance types as containers needs, made before apply creates anything: the
        bridge (a range in use on this machine is refused) and each node image they boot (built once per
        machine). A failure here is one line, with nothing in the cloud to clean up. Loopback: nothing."""
        if self.node_mode()[0] != "container":
            return
        from remotefit import sandbox_image, sandbox_machine

        sandbox_machine.ensure_bridge(sandbox_machine.bridge_network())
        for variant in sorted({sandbox_image.variant_for(t) for t in instance_types}):
            sandbox_image.ensure_image(variant=variant)

    def start_node(
        self,
        instance_id: str,
        public_key: str,
        endpoint: str | None = None,
        region: str = "us-east-1",
        max_hours: float = 8.0,
        idle_minutes: int = 30,
        ssh_user: str = "ubuntu",
    ) -> SandboxNode:
        """Give an instance a reachable sshd on loopback (idempotent for a live node), and start the
        same watchdog user_data installs on AWS, with "shut down" meaning terminate this sandbox node.
        In container mode the instance boots instead (sandbox_machine.start)."""
        existing = self.node(instance_id)
        if existing and existing.alive():
            return existing
        if endpoint and self.node_mode()[0] == "container":
            from remotefit import sandbox_machine

            return sandbox_machine.start(self, instance_id, public_key, endpoint, region, ssh_user)
        if not Path(SSHD).exists():
            raise UserError(f"{SSHD} not found; the sandbox nodes need openssh-server: run scripts/bootstrap")
        d = self.nodes_dir / instance_id
        home = d / "home"
        home.mkdir(parents=True, exist_ok=True)
        host_key = d / "ssh_host_ed25519_key"
        if not host_key.exists():
            run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"sandbox-{instance_id}", "-f", str(host_key)])
        atomic_write(d / "authorized_keys", public_key.strip() + "\n", mode=0o600)
        boot = self.boot(d)
        # The metadata service first: the node's sessions are told where it is (sshd's SetEnv), as EC2's is
        # simply there; on the sandbox the node's AWS credentials come from it, as from an instance profile.
        imds = self._start_imds(d, instance_id, endpoint, region) if endpoint else None
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
        user = _user()
        try:
            port, pid = self._spawn_sshd(d, host_key, instance_id, user, boot, imds[1] if imds else None)
        except UserError:
            if imds:
                stop_pid(imds[0], "sandbox_imds", started=imds[2])
            raise
        node = SandboxNode(instance_id=instance_id, port=port, pid=pid, user=user, workdir=str(home / "remotefit"))
        node.note(pid)
        if imds:
            node.imds_pid, node.imds_port = node.note(imds[0], imds[2]), imds[1]
        if endpoint:  # only once the node is reachable: a failed start leaves no watchdog looping
            node.watchdog_pid = node.note(self._start_watchdog(d, node, endpoint, region, max_hours, idle_minutes))
            node.spot_pid = node.note(self._spawn_spot_poll(d, node))
        atomic_write(d / "node.json", json.dumps(asdict(node)))
        return node

    @staticmethod
    def _spawn_sshd(
        d: Path, host_key: Path, instance_id: str, user: str, boot: Path, imds_port: int | None
    ) -> tuple[int, int]:
        """A loopback node's sshd on a free port: (port, pid) once it listens."""
        last = "no output"
        for _attempt in range(3):  # a free port can be taken by another process before sshd binds it
            port = free_port()
            config = sshd_config_text(
                port, host_key=host_key, authorized=d / "authorized_keys",
                pidfile=d / "sshd.pid", user=user, node=instance_id, boot=boot, imds_port=imds_port,
            )  # fmt: skip
            atomic_write(d / "sshd_config", config, mode=0o600)
            proc = spawn_daemon([SSHD, "-D", "-e", "-f", str(d / "sshd_config")], d / "sshd.log")
            deadline = time.monotonic() + 30
            while proc.poll() is None and not _port_open(port) and time.monotonic() < deadline:
                time.sleep(0.05)
            if proc.poll() is None and _port_open(port):
                return port, proc.pid
            stop_pid(proc.pid, "sshd")
            tail = (d / "sshd.log").read_text(errors="replace").strip().splitlines()[-1:]
            last = tail[0] if tail else "no output"
        raise UserError(f"sandbox sshd for {instance_id} did not start: {last}")

    @staticmethod
    def boot(d: Path) -> Path:
        """What user data leaves on an AWS node, for the same readiness check: a boot log and the
        ready marker (the sandbox has no boot script to fail; the watchdog starts separately)."""
        boot = d / "boot"
        boot.mkdir(exist_ok=True)
        (boot / "boot-failed").unlink(missing_ok=True)
        atomic_write(boot / "boot.log", "remotefit-boot: sandbox node: nothing to install\n")
        atomic_write(boot / "boot-done", "sandbox node ready\n")
        return boot

    def _start_watchdog(
        self, d: Path, node: SandboxNode, endpoint: str, region: str, max_hours: float, idle: int
    ) -> int:
        now = time.time()
        config = contract.watchdog_config(
            deadline_epoch=now + max_hours * 3600,
            idle_minutes=idle,
            started_epoch=now,
            base=node.workdir,
            # The node's own metadata service (sandbox_imds), where `inv sandbox.interrupt` posts spot notices;
            # the spot poller watches it every 5 s, as remotefit-spot.service does on EC2.
            imds=f"http://127.0.0.1:{node.imds_port}" if node.imds_port else "http://127.0.0.1:9",
            spot_service=bool(node.imds_port),
            state=str(d / "watchdog-state.json"),
            journal=False,  # a loopback node's journal would be this machine's
            shutdown_cmd=[
                sys.executable,
                "-m",
                "remotefit.sandbox",
                "self-terminate",
                "--dir",
                str(self.dir),
                "--endpoint",
                endpoint,
                "--region",
                region,
                node.instance_id,
            ],
        )
        atomic_write(d / "watchdog.json", json.dumps(config))
        return self._spawn_watchdog(d, node)

    def _spawn_watchdog(self, d: Path, node: SandboxNode) -> int:
        script = NODE_DIR / "watchdog.py"
        argv = [
            sys.executable,
            str(script),
            "--config",
            str(d / "watchdog.json"),
            "--loop",
            "15",
            "--imds-timeout",
            "0.2",
            "--sshd-pid",  # the host's other ssh sessions are not this node's
            str(node.pid),
        ]
        proc = spawn_daemon(argv, d / "watchdog.log")
        return proc.pid

    def _spawn_spot_poll(self, d: Path, node: SandboxNode) -> int | None:
        if not node.imds_port:
            return None
        argv = [sys.executable, str(NODE_DIR / "watchdog.py"), "--config", str(d / "watchdog.json")]
        argv += ["--spot-poll", "5", "--imds-timeout", "0.5"]
        return spawn_daemon(argv, d / "spot.log").pid

    def _start_imds(
        self, d: Path, instance_id: str, endpoint: str, region: str, local_ipv4: str = "127.0.0.1"
    ) -> tuple[int, int, int | None]:
        """The node's metadata service (remotefit.sandbox_imds), with what EC2 says of the instance: (pid,
        port, start time), the start time read while this holds the process (a later spawn reaps it)."""
        import boto3

        from remotefit.sandbox_imds import FACTS, PORT_FILE

        facts = {"instance_id": instance_id, "region": region, "local_ipv4": local_ipv4}
        # The role's temporary keys: the sandbox's own (moto checks no signature; the account stays the same).
        facts |= {
            "access_key_id": SANDBOX_REGION_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            "secret_access_key": SANDBOX_REGION_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        }
        try:
            ec2 = boto3.client("ec2", endpoint_url=endpoint, region_name=region, **_boto_creds())
            inst = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]
            facts["instance_type"] = inst.get("InstanceType", "")
            facts["availability_zone"] = inst.get("Placement", {}).get("AvailabilityZone", "")
            profile = inst.get("IamInstanceProfile", {}).get("Arn", "").rsplit("/", 1)[-1]
            if profile:
                iam = boto3.client("iam", endpoint_url=endpoint, region_name=region, **_boto_creds())
                roles = iam.get_instance_profile(InstanceProfileName=profile)["InstanceProfile"]["Roles"]
                facts["role"] = roles[0]["RoleName"] if roles else ""
        except Exception as exc:  # noqa: BLE001 - the node still boots; its metadata says less
            facts["note"] = f"instance not described: {exc}"
        atomic_write(d / FACTS, json.dumps(facts))
        (d / PORT_FILE).unlink(missing_ok=True)
        proc = spawn_daemon([sys.executable, "-m", "remotefit.sandbox_imds", "--dir", str(d)], d / "imds.log")
        deadline = time.monotonic() + 30
        while proc.poll() is None and not (d / PORT_FILE).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        try:
            return proc.pid, int((d / PORT_FILE).read_text()), contract.start_ticks(proc.pid)
        except (OSError, ValueError):
            stop_pid(proc.pid, "sandbox_imds")
            tail = (d / "imds.log").read_text(errors="replace").strip().splitlines()[-1:]
            raise UserError(
                f"sandbox metadata service for {instance_id} did not start: {tail or 'no output'}"
            ) from None

    def _stop_helpers(self, node: SandboxNode) -> None:
        """The node's metadata service and spot poller: off with the machine."""
        if node.spot_pid:
            stop_pid(node.spot_pid, "--spot-poll", grace=3, started=node.started(node.spot_pid))
        if node.imds_pid:
            stop_pid(node.imds_pid, "sandbox_imds", grace=3, started=node.started(node.imds_pid))

    def interrupt(self, instance_id: str, seconds: float, endpoint: str, region: str) -> str:
        """What AWS does to a spot instance it reclaims: the notice on the node's IMDS now (action terminate
        at now + seconds), then the instance terminated at that time, its disk with it (a detached
        `interrupt-at` process does that part, so the caller need not wait)."""
        from remotefit.sandbox_imds import NOTICE

        node = self.node(instance_id)
        if node is None or not node.alive():
            raise UserError(f"sandbox node {instance_id} is not running; `inv status` shows the nodes")
        if not node.imds_port:
            raise UserError(
                f"sandbox node {instance_id} has no metadata service (started by an older remotefit): `inv apply` again"
            )
        d = self.nodes_dir / instance_id
        at = time.time() + seconds
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))
        atomic_write(d / NOTICE, json.dumps({"action": "terminate", "time": when}))
        argv = [sys.executable, "-m", "remotefit.sandbox", "interrupt-at", "--dir", str(self.dir)]
        argv += ["--endpoint", endpoint, "--region", region, "--at", str(at), instance_id]
        spawn_daemon(argv, d / "interrupt.log")
        return when

    def reclaim(self, instance_id: str, endpoint: str, region: str) -> None:
        """The end of a spot interruption: the instance terminated and its root volume (the working
        folder) gone."""
        node = self.node(instance_id)
        self.self_terminate(instance_id, endpoint, region)
        if node is not None and node.mode != "container":  # a container's workdir is inside its own disk
            shutil.rmtree(node.workdir, ignore_errors=True)

    def self_terminate(self, instance_id: str, endpoint: str, region: str) -> None:
        """What `shutdown -h now` does to an instance whose shutdown behaviour is terminate."""
        import boto3

        ec2 = boto3.client("ec2", endpoint_url=endpoint, region_name=region, **_boto_creds())
        ec2.terminate_instances(InstanceIds=[instance_id])
        node = self.node(instance_id)
        if node and node.mode == "container":
            self.stop_node(node)  # the machine powers off; its disk goes with the terminated instance
        elif node:
            _stop_active_run(Path(node.workdir))
            stop_sshd(node.pid, started=node.started(node.pid))
            (self.nodes_dir / instance_id / "node.json").unlink(missing_ok=True)
            self._stop_helpers(node)
            if node.watchdog_pid and pid_alive(node.watchdog_pid, "watchdog", node.started(node.watchdog_pid)):
                os.kill(node.watchdog_pid, signal.SIGTERM)  # the machine is "off": its watchdog too

    def stop_node(self, node: SandboxNode, keep_disk: bool = False) -> bool:
        """Power a node off: with keep_disk (a stopped instance) its container's disk stays for a start."""
        if node.mode == "container":
            from remotefit import sandbox_machine

            was, d = node.alive(), self.nodes_dir / node.instance_id
            sandbox_machine.power_off(d, node.pid, "stop" if keep_disk else "terminate", started=node.started(node.pid))
            self._stop_helpers(node)
            if d not in sandbox_machine.supervisors(self.nodes_dir):  # the record goes only with the machine
                (d / "node.json").unlink(missing_ok=True)
            return was
        if node.watchdog_pid:
            stop_pid(node.watchdog_pid, "watchdog", grace=3, started=node.started(node.watchdog_pid))
        self._stop_helpers(node)
        _stop_active_run(Path(node.workdir))  # a terminated machine runs no jobs
        stopped = stop_sshd(node.pid, started=node.started(node.pid))
        f = self.nodes_dir / node.instance_id / "node.json"
        f.unlink(missing_ok=True)
        return stopped

    def status_lines(self) -> list[str]:
        """`inv sandbox.status`: the server, the node mode, and each node (instance, address, state, uptime)."""
        srv = self.server()
        lines = [
            f"moto server: {srv.endpoint} (pid {srv.pid})"
            if srv
            else "moto server: not running (`inv sandbox.up` restores its state and re-adopts live nodes)"
        ]
        from remotefit import sandbox_provider

        provider = sandbox_provider.read(self.dir)
        if provider:
            lines.append(f"AWS provider: pid {provider.get('pid')}, reattached by each Terraform command")
        try:
            mode, why = self.node_mode()
            lines.append(f"new nodes: {mode} ({why})")
        except UserError as exc:
            lines.append(f"new nodes: {exc.args[0]}")
        try:
            threads = job_threads()
            lines.append(f"job threads: {threads} ({THREADS_ENV})" if threads else "job threads: the job's own choice")
        except UserError as exc:
            lines.append(f"job threads: {exc.args[0]}")
        rows = []
        for n in self.nodes():
            f = self.nodes_dir / n.instance_id / "node.json"
            up = time.time() - f.stat().st_mtime if f.exists() else 0.0
            state = "up" if n.alive() else "dead"
            rows.append([n.instance_id, n.mode, f"{n.host}:{n.port}", state, f"{up / 60:.0f} min", str(n.pid)])
        if rows:
            from remotefit.table import table

            lines += table(rows, ["instance", "mode", "ssh", "state", "uptime", "pid"])
        else:
            lines.append("no sandbox nodes running")
        return lines

    def console(self, instance_id: str, lines: int = 40) -> str:
        """A node's boot log: a container's console (or its cloud-init log), a loopback node's boot log."""
        d = self.nodes_dir / instance_id
        if not d.is_dir():
            known = ", ".join(p.name for p in sorted(self.nodes_dir.glob("i-*"))) or "none"
            raise UserError(f"no sandbox node {instance_id!r}; known: {known}")
        if (d / "machine.json").exists():
            from remotefit.sandbox_machine import console_tail

            return console_tail(d, lines)
        log = d / "boot" / "boot.log"
        return log.read_text(errors="replace") if log.exists() else "(no boot log)"

    def _forget_nodes(self) -> None:
        for n in self.nodes():
            self.stop_node(n)


@dataclass
class SandboxNode:
    instance_id: str
    port: int
    pid: int
    user: str
    workdir: str
    watchdog_pid: int | None = None
    imds_pid: int | None = None  # its metadata service (sandbox_imds)
    imds_port: int | None = None
    spot_pid: int | None = None  # its spot-notice poller (watchdog.py --spot-poll)
    mode: str = "loopback"  # or "container": pid is its sandbox_machine supervisor, host its bridge IP
    host: str = "127.0.0.1"
    # {pid: start time} of the processes above, noted as each was spawned (see pid_alive: pids wrap). A
    # record from before this field has none, and is checked by marker alone.
    starts: dict[str, int] = field(default_factory=dict)

    def note(self, pid: int | None, ticks: int | None = None) -> int | None:
        """Keep the start time of `pid`, a process just spawned for this node (or `ticks`, read when it was);
        returns the pid."""
        ticks = ticks if ticks is not None else contract.start_ticks(pid) if pid else None
        if pid and ticks is not None:
            self.starts[str(pid)] = ticks
        return pid

    def started(self, pid: int | None) -> int | None:
        return self.starts.get(str(pid)) if pid else None

    def alive(self) -> bool:
        if self.mode == "container":
            return pid_alive(self.pid, "sandbox_machine", self.started(self.pid)) and _port_open(self.port, self.host)
        return pid_alive(self.pid, "sshd", self.started(self.pid)) and _port_open(self.port)


def sshd_config_text(
    port: int,
    host_key: Path,
    authorized: Path,
    pidfile: Path,
    user: str,
    node: str,
    boot: Path,
    imds_port: int | None = None,
) -> str:
    """An sshd that accepts only the stage's key, only on loopback, only for this user. Its sessions
    find the node's boot markers and log (see nodes.ready_command) through REMOTEFIT_BOOT_*, and the
    data fetcher's Python through REMOTEFIT_TOOLS_PYTHON."""
    return "\n".join(
        [
            f"# sandbox node {node}: written by remotefit",
            f"ListenAddress 127.0.0.1:{port}",
            f'HostKey "{host_key}"',
            f'PidFile "{pidfile}"',
            f'AuthorizedKeysFile "{authorized}"',
            f"AllowUsers {user}",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PermitRootLogin prohibit-password",
            "UsePAM no",
            "StrictModes no",  # generated/ may be group-writable in a checkout
            "PrintMotd no",
            "MaxSessions 32",  # ControlMaster multiplexes many sessions over one connection
            "MaxStartups 64",
            "ClientAliveInterval 15",
            "ClientAliveCountMax 4",
            "Subsystem sftp internal-sftp",
            # REMOTEFIT_TOOLS_PYTHON: the node-side tools' Python (the uploader's, the data fetcher's); a real
            # node's is /opt/remotefit-tools, made by its user data; here the dev venv's, which has boto3.
            f'SetEnv REMOTEFIT_NODE={node} "REMOTEFIT_BOOT_DIR={boot}" "REMOTEFIT_BOOT_LOG={boot / "boot.log"}" '
            f'"REMOTEFIT_TOOLS_PYTHON={sys.executable}"'
            + (
                # AWS credentials as on EC2: from the node's metadata service (the instance profile), never
                # from this machine's ~/.aws (a fresh node has none).
                f" AWS_EC2_METADATA_SERVICE_ENDPOINT=http://127.0.0.1:{imds_port}"
                f' "AWS_CONFIG_FILE={pidfile.parent / "no-aws-config"}"'
                f' "AWS_SHARED_CREDENTIALS_FILE={pidfile.parent / "no-aws-credentials"}"'
                if imds_port
                else ""
            ),
            "",
        ]
    )


def _user() -> str:
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name


def _port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def replay(recording: Path, endpoint: str) -> int:
    """Send every recorded request to a fresh server, in order, unrecorded (what moto's own
    replay-recording does, from here: our server handles one request at a time, so it could not
    call itself); return how many."""
    import base64
    from urllib.parse import urlsplit

    import requests  # moto's own dependency: present wherever the sandbox runs

    _post(f"{endpoint}/moto-api/recorder/stop-recording")
    count = 0
    try:
        for raw in recording.read_text().splitlines():
            entry = json.loads(raw)
            body = entry.get("body") or b""
            if entry.get("body_encoded"):
                body = base64.b64decode(body)
            parts = urlsplit(entry["url"])
            url = f"{endpoint}{parts.path}" + (f"?{parts.query}" if parts.query else "")
            headers = {
                k: v
                for k, v in entry.get("headers", {}).items()
                if k.lower() not in ("transfer-encoding", "host", "expect")
            }
            headers[sandbox_moto.RESTORE_HEADER] = "restore"  # through the held server's gate
            # requests, as moto's own replay uses: urllib would add a form Content-Type to bodies that
            # have none, and the server would then read them as a form (seen: lost S3 bodies).
            requests.request(entry["method"], url, headers=headers, data=body, timeout=60)
            count += 1
    finally:
        _post(f"{endpoint}/moto-api/recorder/start-recording")
    return count


def _post(url: str, timeout: float = 30) -> None:
    with urllib.request.urlopen(urllib.request.Request(url, method="POST"), timeout=timeout):  # noqa: S310
        pass


def _answers(endpoint: str) -> bool:
    """Any HTTP answer from the server counts: an error status still means it is up."""
    try:
        with urllib.request.urlopen(f"{endpoint}/", timeout=1):  # noqa: S310 - loopback
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


def _stop_active_run(workdir: Path) -> None:
    """Kill the job the node's runner recorded as active (its own session, so sshd's exit spares it);
    only while that record names the live job (a recycled pid is someone else's)."""
    active = contract.live_active(str(workdir))
    try:
        pgid = int(active["pgid"])  # type: ignore[index]
    except (ValueError, KeyError, TypeError):
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _boto_creds() -> dict[str, str]:
    return {
        "aws_access_key_id": SANDBOX_REGION_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": SANDBOX_REGION_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    }


def serve_moto(port: int, hold: bool = False, ip_slot: int = 0) -> None:
    """moto's own server, with its fixes, answering one request at a time (sandbox_moto.Serial: a replay
    of its recorder's log rebuilds the same IDs), and with `hold` gated until a restore's replay is done
    (sandbox_moto.RestoreGate)."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import run_simple

    from remotefit.sandbox_machine import SLOT_SIZE
    from remotefit.sandbox_moto import RestoreGate, Serial, apply_fixes, slice_private_ips

    apply_fixes()  # moto bugs that make it answer unlike AWS (see sandbox_moto.py)
    if ip_slot:
        slice_private_ips(ip_slot * SLOT_SIZE)
    app = RestoreGate(Serial(DomainDispatcherApplication(create_backend_app)), hold=hold)
    run_simple("127.0.0.1", port, app, threaded=True, request_handler=MotoRequestHandler)


def main(argv: list[str] | None = None) -> int:
    """`python -m remotefit.sandbox self-terminate ...`: the sandbox node watchdog's shutdown command."""
    import argparse

    p = argparse.ArgumentParser(prog="remotefit.sandbox")
    sub = p.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("self-terminate", help="terminate a sandbox node as its own shutdown would")
    st.add_argument("--dir", required=True, help="the sandbox directory (Paths.sandbox_dir)")
    st.add_argument("--endpoint", required=True, help="the moto server endpoint")
    st.add_argument("--region", required=True, help="the region of the instance")
    st.add_argument("instance_id", help="the instance that shuts itself down")
    ia = sub.add_parser("interrupt-at", help="reclaim a spot node at a time, as AWS does after its notice")
    ia.add_argument("--dir", required=True, help="the sandbox directory (Paths.sandbox_dir)")
    ia.add_argument("--endpoint", required=True, help="the moto server endpoint")
    ia.add_argument("--region", required=True, help="the region of the instance")
    ia.add_argument("--at", type=float, required=True, help="when (epoch seconds)")
    ia.add_argument("instance_id", help="the instance to reclaim")
    mo = sub.add_parser("moto", help="serve moto on loopback, one request at a time (a replayable order)")
    mo.add_argument("--port", type=int, required=True, help="the loopback port to listen on")
    mo.add_argument("--hold", action="store_true", help="answer 503 to all but the replay until it is done")
    mo.add_argument("--ip-slot", type=int, default=0, help="the address slice its private IPs come from")
    args = p.parse_args(argv)
    if args.cmd == "moto":
        serve_moto(args.port, hold=args.hold, ip_slot=args.ip_slot)
        return 0
    if args.cmd == "interrupt-at":
        time.sleep(max(0.0, args.at - time.time()))
        Sandbox(Path(args.dir)).reclaim(args.instance_id, args.endpoint, args.region)
        print(f"sandbox: {args.instance_id} reclaimed (spot interruption)")
        return 0
    Sandbox(Path(args.dir)).self_terminate(args.instance_id, args.endpoint, args.region)
    print(f"sandbox: {args.instance_id} terminated itself")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

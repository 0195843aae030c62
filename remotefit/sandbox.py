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
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from remotefit.errors import UserError
from remotefit.proc import atomic_write, echo, spawn_daemon

SANDBOX_REGION_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
SSHD = "/usr/sbin/sshd"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pid_alive(pid: int, marker: str) -> bool:
    """True when `pid` runs and its command line holds `marker` (a recycled pid is not ours)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    state = stat.rsplit(")", 1)[-1].split()[0]
    return marker in cmdline and state != "Z"


def stop_pid(pid: int, marker: str, grace: float = 5.0) -> bool:
    """SIGTERM the process group of `pid`, then SIGKILL after `grace`; True if something was stopped."""
    if not pid_alive(pid, marker):
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
            if not pid_alive(pid, marker):
                _reap(pid)
                return True
            time.sleep(0.05)
    return True


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


@dataclass
class Server:
    pid: int
    port: int
    started_at: float

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class Sandbox:
    """Start, find and stop the sandbox processes recorded under `generated/sandbox/`."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.record = directory / "moto.json"

    # -- the moto server ---------------------------------------------------------------
    def server(self) -> Server | None:
        """The running server, or None. A stale record of a dead server is removed, not trusted."""
        try:
            srv = Server(**json.loads(self.record.read_text()))
        except (OSError, ValueError, TypeError):
            return None
        alive = pid_alive(srv.pid, "moto")
        if alive and any(_answers(srv.endpoint) for _ in range(3)):  # a loaded machine may answer late
            return srv
        if alive:
            stop_pid(srv.pid, "moto")  # running but deaf: stop it rather than leave a second server behind
        echo(f"sandbox: removing the stale record of a moto server that is gone (pid {srv.pid})")
        self.record.unlink(missing_ok=True)
        self._forget_nodes()
        return None

    def up(self) -> Server:
        """Start the moto server if it is not running (twice is harmless) and return it."""
        srv = self.server()
        if srv:
            return srv
        self.dir.mkdir(parents=True, exist_ok=True)
        last = "no output"
        for _attempt in range(3):  # a free port can be taken by another process before moto binds it
            port = free_port()
            # Its own session: it survives the invoke process; `sandbox.down` stops it.
            proc = spawn_daemon(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                self.dir / "moto.log",
                env={"MOTO_IAM_LOAD_MANAGED_POLICIES": "true", **SANDBOX_REGION_CREDENTIALS},
            )
            srv = Server(pid=proc.pid, port=port, started_at=time.time())
            deadline = time.monotonic() + 60
            while proc.poll() is None and not _answers(srv.endpoint) and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(0.1)
            if proc.poll() is None and _answers(srv.endpoint):  # ours answers, not a stranger on the port
                break
            stop_pid(proc.pid, "moto")
            tail = (self.dir / "moto.log").read_text(errors="replace").strip().splitlines()[-1:]
            last = tail[0] if tail else "no output"
        else:
            raise UserError(
                f"the sandbox moto server did not start ({last}); run scripts/bootstrap to install moto[server]"
            )
        atomic_write(self.record, json.dumps(asdict(srv)))
        echo(f"sandbox: moto server up at {srv.endpoint} (pid {srv.pid})")
        return srv

    def down(self) -> list[str]:
        """Stop every sandbox process; return what was stopped. Leaves no process behind."""
        stopped = [f"sshd node {n.instance_id} (port {n.port})" for n in self.nodes() if self.stop_node(n)]
        try:
            srv = Server(**json.loads(self.record.read_text()))
        except (OSError, ValueError, TypeError):
            srv = None
        if srv and stop_pid(srv.pid, "moto"):
            stopped.append(f"moto server (pid {srv.pid}, port {srv.port})")
        self.record.unlink(missing_ok=True)
        self._forget_nodes()
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

    def start_node(
        self,
        instance_id: str,
        public_key: str,
        endpoint: str | None = None,
        region: str = "us-east-1",
        max_hours: float = 8.0,
        idle_minutes: int = 30,
    ) -> SandboxNode:
        """Give an instance a reachable sshd on loopback (idempotent for a live node), and start the
        same watchdog user_data installs on AWS, with "shut down" meaning terminate this sandbox node."""
        existing = self.node(instance_id)
        if existing and existing.alive():
            return existing
        if not Path(SSHD).exists():
            raise UserError(f"{SSHD} not found; the sandbox nodes need openssh-server: run scripts/bootstrap")
        d = self.nodes_dir / instance_id
        home = d / "home"
        home.mkdir(parents=True, exist_ok=True)
        host_key = d / "ssh_host_ed25519_key"
        if not host_key.exists():
            subprocess.run(  # noqa: S603
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"sandbox-{instance_id}", "-f", str(host_key)],
                check=True,
            )
        atomic_write(d / "authorized_keys", public_key.strip() + "\n", mode=0o600)
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
        user = _user()
        last = "no output"
        for _attempt in range(3):  # a free port can be taken by another process before sshd binds it
            port = free_port()
            config = sshd_config_text(port, host_key, d / "authorized_keys", d / "sshd.pid", user, instance_id)
            atomic_write(d / "sshd_config", config, mode=0o600)
            proc = spawn_daemon([SSHD, "-D", "-e", "-f", str(d / "sshd_config")], d / "sshd.log")
            deadline = time.monotonic() + 30
            while proc.poll() is None and not _port_open(port) and time.monotonic() < deadline:
                time.sleep(0.05)
            if proc.poll() is None and _port_open(port):
                break
            stop_pid(proc.pid, "sshd")
            tail = (d / "sshd.log").read_text(errors="replace").strip().splitlines()[-1:]
            last = tail[0] if tail else "no output"
        else:
            raise UserError(f"sandbox sshd for {instance_id} did not start: {last}")
        node = SandboxNode(instance_id=instance_id, port=port, pid=proc.pid, user=user, workdir=str(home / "remotefit"))
        if endpoint:  # only once the node is reachable: a failed start leaves no watchdog looping
            node.watchdog_pid = self._start_watchdog(d, node, endpoint, region, max_hours, idle_minutes)
        atomic_write(d / "node.json", json.dumps(asdict(node)))
        return node

    def _start_watchdog(
        self, d: Path, node: SandboxNode, endpoint: str, region: str, max_hours: float, idle: int
    ) -> int:
        now = time.time()
        config = {
            "deadline_epoch": now + max_hours * 3600,
            "idle_minutes": idle,
            "started_epoch": now,
            "base": node.workdir,
            "imds": "http://127.0.0.1:9",  # no metadata service on loopback: spot checks are no-ops here
            "state": str(d / "watchdog-state.json"),
            "shutdown_cmd": [
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
        }
        atomic_write(d / "watchdog.json", json.dumps(config))
        script = Path(__file__).resolve().parent.parent / "scripts" / "node" / "watchdog.py"
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

    def self_terminate(self, instance_id: str, endpoint: str, region: str) -> None:
        """What `shutdown -h now` does to an instance whose shutdown behaviour is terminate."""
        import boto3

        ec2 = boto3.client("ec2", endpoint_url=endpoint, region_name=region, **_boto_creds())
        ec2.terminate_instances(InstanceIds=[instance_id])
        node = self.node(instance_id)
        if node:
            _stop_active_run(Path(node.workdir))
            stop_pid(node.pid, "sshd", grace=3)
            (self.nodes_dir / instance_id / "node.json").unlink(missing_ok=True)
            if node.watchdog_pid and pid_alive(node.watchdog_pid, "watchdog"):
                os.kill(node.watchdog_pid, signal.SIGTERM)  # the machine is "off": its watchdog too

    def stop_node(self, node: SandboxNode) -> bool:
        if node.watchdog_pid:
            stop_pid(node.watchdog_pid, "watchdog", grace=3)
        _stop_active_run(Path(node.workdir))  # a terminated machine runs no jobs
        stopped = stop_pid(node.pid, "sshd", grace=3)
        f = self.nodes_dir / node.instance_id / "node.json"
        f.unlink(missing_ok=True)
        return stopped

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

    def alive(self) -> bool:
        return pid_alive(self.pid, "sshd") and _port_open(self.port)


def sshd_config_text(port: int, host_key: Path, authorized: Path, pidfile: Path, user: str, node: str) -> str:
    """An sshd that accepts only the stage's key, only on loopback, only for this user."""
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
            f"SetEnv REMOTEFIT_NODE={node}",
            "",
        ]
    )


def _user() -> str:
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


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
    """Kill the job the node's runner recorded as active (its own session, so sshd's exit spares it)."""
    try:
        active = json.loads((workdir / "active.json").read_text())
        pgid = int(active["pgid"])
    except (OSError, ValueError, KeyError, TypeError):
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _boto_creds() -> dict[str, str]:
    return {
        "aws_access_key_id": SANDBOX_REGION_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": SANDBOX_REGION_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    }


def main(argv: list[str] | None = None) -> int:
    """`python -m remotefit.sandbox self-terminate ...`: the sandbox node watchdog's shutdown command."""
    import argparse

    p = argparse.ArgumentParser(prog="remotefit.sandbox")
    sub = p.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("self-terminate", help="terminate a sandbox node as its own shutdown would")
    st.add_argument("--dir", required=True, help="the sandbox directory (generated/sandbox)")
    st.add_argument("--endpoint", required=True, help="the moto server endpoint")
    st.add_argument("--region", required=True, help="the region of the instance")
    st.add_argument("instance_id", help="the instance that shuts itself down")
    args = p.parse_args(argv)
    Sandbox(Path(args.dir)).self_terminate(args.instance_id, args.endpoint, args.region)
    print(f"sandbox: {args.instance_id} terminated itself")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

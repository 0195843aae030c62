"""SSH and rsync: our own ssh config (always used with -F) and argv builders. Pure functions only.

We never touch ~/.ssh/config: a user's `Host *` rules cannot break us, and `ssh -F generated/ssh_config
<alias>` works by hand. Host keys are learned on first contact (accept-new) into our own known_hosts,
never ignored.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Node:
    """How to reach one node and where things live on it."""

    index: int
    alias: str
    instance_id: str
    host: str
    port: int
    user: str
    private_ip: str
    workdir: str
    python: str
    instance_type: str
    market: str
    availability_zone: str
    launch_time: str

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def alias(stage: str, index: int) -> str:
    return f"rf-{stage}-{index}"


def ssh_config_text(nodes: Sequence[Node], identity: Path, known_hosts: Path) -> str:
    """One Host block per node; everything our ssh and rsync calls rely on is here, nowhere else."""
    blocks = ["# Written by remotefit (`inv apply`). Use: ssh -F generated/ssh_config <alias>\n"]
    for n in nodes:
        blocks.append(
            "\n".join(
                [
                    f"Host {n.alias}",
                    f"  HostName {n.host}",
                    f"  Port {n.port}",
                    f"  User {n.user}",
                    f'  IdentityFile "{identity}"',  # quoted: the checkout may live under a path with spaces
                    "  IdentitiesOnly yes",
                    f'  UserKnownHostsFile "{known_hosts}"',
                    "  StrictHostKeyChecking accept-new",
                    "  HostKeyAlias " + n.instance_id,  # an IP reused by another node is not trusted blindly
                    "  ControlMaster auto",
                    "  ControlPath /tmp/remotefit-%C",  # short: unix socket paths are limited to ~104 bytes
                    "  ControlPersist 10m",
                    "  ServerAliveInterval 15",
                    "  ServerAliveCountMax 4",
                    "  ConnectTimeout 10",
                    "  BatchMode yes",
                    "  LogLevel ERROR",
                    "",
                ]
            )
        )
    return "\n".join(blocks)


def ssh_argv(config: Path, node_alias: str, command: str | None = None, tty: bool = False) -> list[str]:
    argv = ["ssh", "-F", str(config)]
    if tty:
        argv.append("-t")
    argv.append(node_alias)
    if command is not None:
        argv += ["--", command]
    return argv


def remote(args: Sequence[str]) -> str:
    """Quote an argv for the remote shell (ssh joins its arguments into one shell line)."""
    return shlex.join([str(a) for a in args])


def ssh_close_argv(config: Path, node_alias: str) -> list[str]:
    """Close the shared ControlMaster connection (fresh connections after a node changes)."""
    return ["ssh", "-F", str(config), "-O", "exit", node_alias]


def rsync_argv(
    config: Path | None,
    src: str | Sequence[str],
    dest: str,
    *,
    excludes: Sequence[str] = (),
    filters: Sequence[str] = (),
    filter_files: Sequence[Path] = (),
    delete: bool = False,
    stats: bool = True,
    human: bool = True,
    safe_links: bool = False,
    rsync_path: str | None = None,
    dry_run: bool = False,
) -> list[str]:
    """rsync over our ssh config (`config` None: both ends on this machine, no ssh), in its final
    form. -a keeps symlinks as links (never follows them out of the folder); --safe-links also
    leaves out the links that point outside; `rsync_path` is the remote command that starts rsync
    (a check or a mkdir first, in the same connection); `human` False gives exact --stats numbers."""
    # --modify-window=-1: compare mtimes to the nanosecond, so a same-size edit made within the second of
    # the last sync is still sent (rsync >= 3.1.3 on both ends; `inv check` asks for it).
    argv = ["rsync", "-a", "--partial", "--modify-window=-1", "--human-readable" if human else "--no-human-readable"]
    if config is not None:
        argv += ["-e", f"ssh -F {shlex.quote(str(config))}"]
    if rsync_path is not None:
        argv.append(f"--rsync-path={rsync_path}")
    if safe_links:
        argv.append("--safe-links")
    argv += list(filters)
    if stats:
        argv.append("--stats")
    if delete:
        argv.append("--delete")
    if dry_run:
        argv.append("--dry-run")
    for f in filter_files:
        argv.append(f"--filter=merge {f}")
    for pattern in excludes:
        argv.append(f"--exclude={pattern}")
    return argv + ([src] if isinstance(src, str) else list(src)) + [dest]

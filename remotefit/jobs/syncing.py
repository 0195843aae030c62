"""Sync: the job folder to every node with rsync, filtered and checked (no run active) in the same connection."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from remotefit.data import excludes as data_excludes
from remotefit.errors import UserError
from remotefit.jobs.spec import (
    DEFAULT_EXCLUDES,
    Job,
)
from remotefit.node import contract
from remotefit.proc import atomic_write, echo, run
from remotefit.transport import AFTER_MARK, Transport, transports
from remotefit.workspace import Workspace


# -- sync ---------------------------------------------------------------------------------
def filter_args(job: Job) -> tuple[list[str], list[str]]:
    """(rsync --filter rules, excludes): .gitignore and .remotefitignore per directory, defaults, outputs."""
    filters = ["--filter=:- .gitignore", "--filter=:- .remotefitignore"]
    excludes = [*DEFAULT_EXCLUDES, f"/{job.outputs}/", *job.exclude, *data_excludes(job.data)]
    return filters, excludes


def plan_upload(job: Job) -> tuple[int, int, list[tuple[int, str]]]:
    """Files, bytes and the largest paths that a sync would send (a local rsync dry run, same filters)."""
    filters, excludes = filter_args(job)
    argv = [
        "rsync",
        "-a",
        "--safe-links",
        "--dry-run",
        "--out-format=%l %n",
        *filters,
        *[f"--exclude={e}" for e in excludes],
        f"{job.path}/",
        "/nonexistent-remotefit-dry-run/",
    ]
    out = run(argv, capture=True).stdout
    files = []
    for line in out.splitlines():
        size, _, name = line.partition(" ")
        if size.isdigit() and not name.endswith("/"):
            files.append((int(size), name))
    files.sort(reverse=True)
    return len(files), sum(s for s, _ in files), files[:5]


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def sync_argv(t: Transport, job: Job, after: str | None = None) -> list[str]:
    """The sync's rsync argv for one node; `after` runs there once rsync has succeeded (sync_rsync_path)."""
    filters, excludes = filter_args(job)
    dest = contract.job_dir(t.node.workdir, job.name)
    # --safe-links: a symlink pointing outside the job folder is not sent; exact numbers in --stats
    # (human=False): the summary parses them.
    return t.rsync_argv(
        f"{job.path}/",
        t.target(dest) + "/",
        excludes=excludes,
        filters=filters,
        delete=True,
        human=False,
        safe_links=True,
        rsync_path=t.sync_rsync_path(dest, after),
    )


def sync_summary(stats: str) -> tuple[int, int, int]:
    """(regular files transferred, regular files in the job, bytes sent) from rsync --stats."""

    def num(pattern: str) -> int:
        m = re.search(pattern, stats)
        return int(m.group(1).replace(",", "")) if m else 0

    return (
        num(r"Number of regular files transferred: ([\d,]+)"),
        num(r"Number of files: [\d,]+ \(reg: ([\d,]+)"),
        num(r"Total bytes sent: ([\d,]+)"),
    )


@dataclass(frozen=True)
class Synced:
    """What one node's sync did."""

    alias: str
    moved: int  # regular files transferred
    total: int  # regular files in the job
    sent: int  # bytes sent
    unchanged: bool = False  # neither side changed since the last sync: rsync was not needed


# -- unchanged since the last sync: no rsync at all ---------------------------------------------
# A sync with nothing to send still costs rsync its file lists on both ends. After each sync we keep a
# digest of the job folder here and one of the node's copy (taken there right after rsync); when both
# still match, the node's copy is what rsync would make of it. The digests cover more than rsync sends
# (never less), so a doubt always ends in a real rsync.
SKIP_DIRS = frozenset(e.rstrip("/") for e in DEFAULT_EXCLUDES if e.endswith("/"))


def local_fingerprint(job: Job) -> str:
    """A digest of every entry of the job folder a sync might send (path, type, mode, size, mtime in ns,
    link target) and of the sync's filters; only the folders rsync never sends are left out."""
    h = hashlib.sha256(json.dumps(filter_args(job)).encode())
    root = str(job.path)
    for top, dirs, files in os.walk(root):
        rel = os.path.relpath(top, root)
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and _rel(rel, d) != job.outputs)
        for name in sorted([*dirs, *files]):
            path = _rel(rel, name)
            if path == job.outputs or name.endswith(".pyc"):
                continue
            try:
                st = os.lstat(os.path.join(top, name))
            except FileNotFoundError:  # deleted while we walk: the next sync sees it
                continue
            link = os.readlink(os.path.join(top, name)) if stat.S_ISLNK(st.st_mode) else ""
            size, mtime = (0, 0) if stat.S_ISDIR(st.st_mode) else (st.st_size, st.st_mtime_ns)
            h.update(f"{path}\0{st.st_mode}\0{size}\0{mtime}\0{link}\n".encode(errors="surrogateescape"))
    return h.hexdigest()


def _rel(parent: str, name: str) -> str:
    return name if parent == "." else f"{parent}/{name}"


def remote_fingerprint(dest: str, outputs: str) -> str:
    """A shell line printing a digest of the node's copy of the job (GNU find, as on the nodes): files by
    path, type, size, mtime, mode and link target, folders by path and mode (their mtimes change when a
    run links outputs/ there); __pycache__ and the like and the outputs link are left out, as rsync leaves
    them."""
    q = shlex.quote
    names = " -o ".join(f"-name {q(d)}" for d in sorted(SKIP_DIRS))
    return (
        f"cd {q(dest)} && find . \\( -type d \\( {names} \\) -o -path {q('./' + outputs)} \\) -prune -o -name '*.pyc' "
        "-o -type d -printf 'D\\t%P\\t%m\\n' -o -printf 'F\\t%P\\t%y\\t%s\\t%T@\\t%m\\t%l\\n' | LC_ALL=C sort | sha256sum"
    )


def _state_path(ws: Workspace, t: Transport, job: Job) -> Path:
    key = hashlib.sha256(f"{t.node.instance_id}\0{t.node.workdir}\0{job.path}".encode()).hexdigest()[:16]
    return ws.paths.generated / "sync" / f"{job.name[:40]}-{key}.json"


def _load_state(ws: Workspace | None, t: Transport, job: Job) -> dict[str, Any] | None:
    if ws is None:
        return None
    try:
        state = json.loads(_state_path(ws, t, job).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def _unchanged_there(t: Transport, job: Job, state: dict[str, Any]) -> bool:
    """Ask the node (idle check first, as the rsync would) whether its copy is still the one we left."""
    dest = contract.job_dir(t.node.workdir, job.name)
    res = t.run(f"{t.idle_check()} && {remote_fingerprint(dest, job.outputs)}")
    if res.returncode != 0:
        if contract.is_refusal(res.stderr):
            raise UserError(f"{t.node.alias}: {contract.runner_error(res.stderr, '')}", code=contract.EXIT_BUSY)
        return False  # unreachable or no copy there: the rsync says what is wrong, or makes the copy
    return res.stdout.split(" ")[0].strip() == state.get("remote")


def _remember(ws: Workspace | None, t: Transport, job: Job, local: str, stderr: str, total: int) -> None:
    """Keep both digests after a sync (the node's from its stderr, after AFTER_MARK)."""
    found = [ln for ln in stderr.splitlines() if ln.startswith(AFTER_MARK)]
    if ws is None or not found:
        return
    remote = found[-1].removeprefix(AFTER_MARK).split(" ")[0].strip()
    atomic_write(_state_path(ws, t, job), json.dumps({"local": local, "remote": remote, "total": total}))


def _plan(ws: Workspace | None, job: Job, local: str) -> tuple[int, int, list[tuple[int, str]]]:
    """plan_upload's answer, kept beside the sync state while the job folder does not change."""
    if ws is None:
        return plan_upload(job)
    path = ws.paths.generated / "sync" / f"{job.name[:40]}-plan.json"
    try:
        kept = json.loads(path.read_text())
        if kept.get("local") == local and kept.get("path") == str(job.path):
            return kept["count"], kept["size"], [(int(s), str(n)) for s, n in kept["largest"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    count, size, largest = plan_upload(job)
    atomic_write(
        path, json.dumps({"local": local, "path": str(job.path), "count": count, "size": size, "largest": largest})
    )
    return count, size, largest


def sync(
    ws: Workspace | None, job: Job, nodes: int | None = None, quiet: bool = False, ts: list[Transport] | None = None
) -> list[Synced]:
    """Upload the job to every node in parallel (nothing at all to a node whose copy is unchanged since
    the last sync and the job folder too); say per node what was sent."""
    if ts is None:
        from remotefit.inventory import require_nodes

        assert ws is not None
        all_nodes = require_nodes(ws)
        ts = transports(ws, all_nodes[: nodes or len(all_nodes)])
    for t in ts:
        t.before_sync(contract.job_dir(t.node.workdir, job.name))
    if ws is not None and job.requirements:
        ws.provide_requirements(job.path / job.requirements)
    local = local_fingerprint(job)

    def one(t: Transport) -> Synced:
        state = _load_state(ws, t, job)
        if state and state.get("local") == local and _unchanged_there(t, job, state):
            return Synced(t.node.alias, 0, int(state.get("total") or 0), 0, unchanged=True)
        after = remote_fingerprint(contract.job_dir(t.node.workdir, job.name), job.outputs)
        res = run(sync_argv(t, job, after), capture=True, check=False)
        if res.returncode != 0:
            if contract.is_refusal(res.stderr):
                raise UserError(f"{t.node.alias}: {contract.runner_error(res.stderr, '')}", code=contract.EXIT_BUSY)
            if t.connection_failed(res.returncode) and ws is not None:
                raise UserError(
                    t.key_refused(ws, res.stderr or "") or f"sync to {t.node.alias} failed: {t.unreachable(ws)}"
                )
            last = [ln for ln in (res.stderr or res.stdout).strip().splitlines() if not ln.startswith(AFTER_MARK)][-1:]
            raise UserError(f"sync to {t.node.alias} failed: {last[0] if last else f'rsync exit {res.returncode}'}")
        moved, total, sent = sync_summary(res.stdout)
        _remember(ws, t, job, local, res.stderr or "", total)
        return Synced(t.node.alias, moved, total, sent)

    # The local listing (for the size warning) runs beside the transfers, not before them: it is
    # done long before any transfer big enough to warn about, and costs no wall time otherwise.
    with ThreadPoolExecutor(max_workers=len(ts) + 1) as pool:
        planned = pool.submit(_plan, ws, job, local)
        sent = [pool.submit(one, t) for t in ts]
        count, size, largest = planned.result()
        if not quiet:
            echo(f"sync: {job.name}: {count} files, {_human(size)}")
        warn_mb = ws.defaults.sync_warn_mb if ws else 200
        if size > warn_mb * 1024 * 1024:
            names = ", ".join(f"{n} ({_human(s)})" for s, n in largest)
            echo(
                f"warning: the job is {_human(size)}, over sync_warn_mb={warn_mb}; largest: {names}. "
                "Add big data to .remotefitignore and download it on the node instead"
            )
        done = [f.result() for f in sent]
    if not quiet:
        for d in done:
            note = "; unchanged since the last sync, rsync not needed" if d.unchanged else ""
            echo(
                f"sync: {d.alias}: {d.moved} of {d.total} files transferred, {d.sent} bytes sent ({_human(d.sent)}{note})"
            )
    return done

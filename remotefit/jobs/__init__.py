"""Fitting jobs: a folder synced to the nodes, run there detached from SSH, outputs brought home.

On the node, remotefit/node/runner.py (uploaded with contract.py to <workdir>/.remotefit/) starts the job in its own
session, writes its log and exit code, and streams the log back on request; so a dropped connection
or a closed laptop never kills a run. `--local` drives the same runner on this machine through a
local transport, so a job behaves the same before anyone pays for a node.

One module per step: spec (job.toml), sync, launch (the start command), stream (follow), fitting (`inv fit`),
records (what this laptop knows of a run), runs (pull, logs, cancel, resume), destroy (runs before a destroy).
"""

from __future__ import annotations

import importlib
from typing import Any

# Each name and the module it lives in. Loaded on first use (PEP 562), so `inv sync` does not import
# what only `inv pull` or `inv destroy` need.
_WHERE = {
    "SSH_FAILED": "remotefit.transport",
    "Transport": "remotefit.transport",
    "SshTransport": "remotefit.transport",
    "LocalTransport": "remotefit.transport",
    "local_node": "remotefit.transport",
    "transports": "remotefit.transport",
    "TRANSPORT_FAILED": "remotefit.transport",
    "DEFAULT_EXCLUDES": "remotefit.jobs.spec",
    "JOB_KEYS": "remotefit.jobs.spec",
    "DEFAULT_SYNC_EVERY": "remotefit.jobs.spec",
    "ENV_NAME_RE": "remotefit.jobs.spec",
    "Job": "remotefit.jobs.spec",
    "load_job": "remotefit.jobs.spec",
    "passed_env": "remotefit.jobs.spec",
    "inside_job": "remotefit.jobs.spec",
    "_toml_line": "remotefit.jobs.spec",
    "filter_args": "remotefit.jobs.syncing",
    "plan_upload": "remotefit.jobs.syncing",
    "_human": "remotefit.jobs.syncing",
    "sync_argv": "remotefit.jobs.syncing",
    "sync_summary": "remotefit.jobs.syncing",
    "sync": "remotefit.jobs.syncing",
    "RUNNER": "remotefit.jobs.launch",
    "CONTRACT": "remotefit.jobs.launch",
    "UPLOADER": "remotefit.jobs.launch",
    "MASTER_PORT": "remotefit.jobs.launch",
    "new_run_id": "remotefit.jobs.launch",
    "master_port_for": "remotefit.jobs.launch",
    "job_env": "remotefit.jobs.launch",
    "launch_command": "remotefit.jobs.launch",
    "run_outputs": "remotefit.jobs.launch",
    "node_sources": "remotefit.jobs.launch",
    "_SOURCES": "remotefit.jobs.launch",
    "keep_spec": "remotefit.jobs.launch",
    "start_command": "remotefit.jobs.launch",
    "start_input": "remotefit.jobs.launch",
    "start_request": "remotefit.jobs.launch",
    "git_commit": "remotefit.jobs.launch",
    "_check_local_cuda": "remotefit.jobs.launch",
    "RunRecord": "remotefit.jobs.records",
    "_records_dir": "remotefit.jobs.records",
    "RUN_ID_RE": "remotefit.jobs.records",
    "check_run_id": "remotefit.jobs.records",
    "load_record": "remotefit.jobs.records",
    "local_run_dir": "remotefit.jobs.records",
    "is_final": "remotefit.jobs.records",
    "_run_json": "remotefit.jobs.records",
    "attempt_of": "remotefit.jobs.records",
    "_seconds": "remotefit.jobs.records",
    "_StartFailed": "remotefit.jobs.stream",
    "_stream": "remotefit.jobs.stream",
    "_read_stderr": "remotefit.jobs.stream",
    "run_status": "remotefit.jobs.stream",
    "_exit_of": "remotefit.jobs.stream",
    "wait_status": "remotefit.jobs.stream",
    "pull_run": "remotefit.jobs.runs",
    "_landing": "remotefit.jobs.runs",
    "_landed": "remotefit.jobs.runs",
    "runs_bucket": "remotefit.jobs.runs",
    "pull_kept": "remotefit.jobs.runs",
    "ResumeFrom": "remotefit.jobs.runs",
    "resume_source": "remotefit.jobs.runs",
    "_transports_for": "remotefit.jobs.runs",
    "load_any_record": "remotefit.jobs.runs",
    "pull": "remotefit.jobs.runs",
    "_why_no_status": "remotefit.jobs.runs",
    "logs": "remotefit.jobs.runs",
    "cancel": "remotefit.jobs.runs",
    "runs_table": "remotefit.jobs.runs",
    "BeforeDestroy": "remotefit.jobs.destroy",
    "before_destroy_of": "remotefit.jobs.destroy",
    "pulled_runs": "remotefit.jobs.destroy",
    "before_destroy": "remotefit.jobs.destroy",
    "stop_for_destroy": "remotefit.jobs.destroy",
    "fit": "remotefit.jobs.fitting",
    "said_interrupted": "remotefit.jobs.fitting",
    "kept_warning": "remotefit.jobs.records",
}

__all__ = list(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])

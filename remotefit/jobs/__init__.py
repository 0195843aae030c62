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

# Each module and the names it gives. Loaded on first use (PEP 562), so `inv sync` does not import
# what only `inv pull` or `inv destroy` need.
_EXPORTS: dict[str, tuple[str, ...]] = {
    "remotefit.transport": (
        "SSH_FAILED",
        "Transport",
        "SshTransport",
        "LocalTransport",
        "local_node",
        "transports",
        "TRANSPORT_FAILED",
    ),
    "remotefit.jobs.spec": (
        "DEFAULT_EXCLUDES",
        "JOB_KEYS",
        "DEFAULT_SYNC_EVERY",
        "ENV_NAME_RE",
        "Job",
        "load_job",
        "passed_env",
        "inside_job",
        "_toml_line",
    ),
    "remotefit.jobs.syncing": (
        "filter_args",
        "plan_upload",
        "_human",
        "sync_argv",
        "sync_summary",
        "sync",
    ),
    "remotefit.jobs.launch": (
        "RUNNER",
        "CONTRACT",
        "UPLOADER",
        "MASTER_PORT",
        "new_run_id",
        "master_port_for",
        "job_env",
        "launch_command",
        "run_outputs",
        "node_sources",
        "_SOURCES",
        "keep_spec",
        "start_command",
        "start_input",
        "start_request",
        "git_commit",
        "_check_local_cuda",
    ),
    "remotefit.jobs.records": (
        "RunRecord",
        "_records_dir",
        "RUN_ID_RE",
        "check_run_id",
        "load_record",
        "local_run_dir",
        "is_final",
        "_run_json",
        "attempt_of",
        "_seconds",
        "kept_warning",
    ),
    "remotefit.jobs.stream": (
        "_StartFailed",
        "_stream",
        "_read_stderr",
        "run_status",
        "_exit_of",
        "wait_status",
    ),
    "remotefit.jobs.runs": (
        "pull_run",
        "_landing",
        "_landed",
        "runs_bucket",
        "pull_kept",
        "ResumeFrom",
        "resume_source",
        "_transports_for",
        "load_any_record",
        "pull",
        "_why_no_status",
        "logs",
        "cancel",
        "runs_table",
    ),
    "remotefit.jobs.destroy": (
        "BeforeDestroy",
        "before_destroy_of",
        "pulled_runs",
        "before_destroy",
        "stop_for_destroy",
    ),
    "remotefit.jobs.fitting": (
        "fit",
        "said_interrupted",
    ),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = list(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])

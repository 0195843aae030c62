"""The sandbox's AWS provider: one process per sandbox that every Terraform command reattaches to.

Terraform starts its provider afresh for each walk of a command (apply and destroy: 4 starts, plan: 2), and
each start builds the provider's whole schema: ~0.65 CPU-s here, ~2.6 CPU-s of every apply and destroy. On the
sandbox, where applies and destroys are most of what happens, the same binary is started once, in
terraform-plugin-go's managed debug mode (`-debug`: it prints its reattach configuration and serves until it
is stopped), and each Terraform command gets it through TF_REATTACH_PROVIDERS, Terraform's own mechanism for a
provider it did not start. The calls a command makes are the same; only the process is reused.

Real AWS keeps Terraform's own way (a provider per walk, nothing left running). Terraform starts its own
provider here too whenever the daemon cannot serve: before `terraform init` installed the provider, under
TF_LOG (a reattached provider logs to its own output, not TF_LOG_PATH), or when the daemon did not start.
The daemon gets no AWS_CA_BUNDLE: moto is plain http on loopback, and the provider refuses to add the same CA
twice, which a second configure of one process would. `inv sandbox.down` stops it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

from remotefit.node.contract import start_ticks
from remotefit.proc import atomic_write, locked

RECORD = "provider.json"
MARKER = "terraform-provider-aws"
DAEMON_ENV = "REMOTEFIT_SANDBOX_PROVIDER_DAEMON"  # "0": Terraform starts its own provider on the sandbox too
START_TIMEOUT_S = 20.0
_REATTACH = re.compile(r"TF_REATTACH_PROVIDERS='(\{.*\})'")


def provider_binary(tfdir: Path) -> Path | None:
    """The AWS provider `terraform init` installed into tfdir, or None before that."""
    found = sorted((tfdir / ".terraform" / "providers").glob(f"*/hashicorp/aws/*/*/{MARKER}*"))
    return found[-1] if found else None


def daemon_key(binary: Path, env: Mapping[str, str]) -> str:
    """What the daemon's configuration depends on: the binary, and the environment it read at start (the
    endpoint, credentials and GOGC); a change in either starts a new one."""
    st = binary.stat()
    seen = sorted((k, v) for k, v in env.items() if k.startswith(("AWS_", "GOGC", "TF_")))
    return hashlib.sha256(json.dumps([str(binary), st.st_size, st.st_mtime_ns, seen]).encode()).hexdigest()[:16]


def usable(env: Mapping[str, str]) -> bool:
    return not (env.get("TF_LOG") or env.get(DAEMON_ENV, "").strip() == "0")


def _serving(rec: dict[str, object]) -> bool:
    from remotefit.sandbox import pid_alive

    try:
        addr = json.loads(str(rec["reattach"]))["registry.terraform.io/hashicorp/aws"]["Addr"]["String"]
        return pid_alive(int(str(rec["pid"])), MARKER, _started(rec)) and Path(addr).exists()
    except (KeyError, TypeError, ValueError):
        return False


def reattach_env(sandbox_dir: Path, tfdir: Path, env: Mapping[str, str]) -> dict[str, str]:
    """{"TF_REATTACH_PROVIDERS": ...} naming this sandbox's provider daemon (started if needed), or {} where
    Terraform should start its own provider (see the module's docstring)."""
    full = {k: v for k, v in {**os.environ, **env}.items() if k != "AWS_CA_BUNDLE"}
    binary = provider_binary(tfdir)
    if binary is None or not usable(full):
        return {}
    key = daemon_key(binary, full)
    sandbox_dir.mkdir(parents=True, exist_ok=True)
    with locked(sandbox_dir / "provider.lock"):
        rec = read(sandbox_dir)
        if rec and rec.get("key") == key and _serving(rec):
            return {"TF_REATTACH_PROVIDERS": str(rec["reattach"])}
        stop(sandbox_dir)
        log = sandbox_dir / "provider.log"
        log.unlink(missing_ok=True)
        with open(log, "ab") as fh:  # as proc.spawn_daemon, with `full` as the whole environment
            proc = subprocess.Popen(  # noqa: S603
                [str(binary), "-debug"],
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=full,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and proc.poll() is None:
            m = _REATTACH.search(log.read_text(errors="replace"))
            if m:
                rec = {"pid": proc.pid, "start": start_ticks(proc.pid), "key": key, "reattach": m[1]}
                atomic_write(sandbox_dir / RECORD, json.dumps(rec))
                return {"TF_REATTACH_PROVIDERS": m[1]}
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):  # did not come up: Terraform starts its own, as elsewhere
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return {}


def _started(rec: dict[str, object]) -> int | None:
    """The daemon's start time as its record kept it (none in a record written before it was kept)."""
    started = rec.get("start")
    return started if isinstance(started, int) else None


def read(sandbox_dir: Path) -> dict[str, object] | None:
    try:
        rec = json.loads((sandbox_dir / RECORD).read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def stop(sandbox_dir: Path) -> int | None:
    """Stop the sandbox's provider daemon; its pid when one ran."""
    from remotefit.sandbox import stop_pid

    rec = read(sandbox_dir)
    (sandbox_dir / RECORD).unlink(missing_ok=True)
    if not rec:
        return None
    with contextlib.suppress(TypeError, ValueError):
        pid = int(str(rec.get("pid")))
        if stop_pid(pid, MARKER, started=_started(rec)):
            return pid
    return None

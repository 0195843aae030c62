"""Is a node ready? The boot script's markers read over ssh (`ready_command`), a failed boot in one line
(`boot_failure`), and apply's bounded wait for every node (`wait_ready`)."""

from __future__ import annotations

import shlex
import time

from remotefit.errors import UserError
from remotefit.proc import echo, run
from remotefit.ssh import Node, ssh_argv
from remotefit.workspace import Workspace

# The boot script (templates/user_data.sh.tftpl) ends with one of these markers and logs to BOOT_LOG; a
# sandbox node says where its own are through REMOTEFIT_BOOT_DIR/REMOTEFIT_BOOT_LOG (sshd SetEnv).
BOOT_DIR = "/var/lib/remotefit"
BOOT_LOG = "/var/log/remotefit-boot.log"
BOOT_FAILED_RC = 97
BOOTING_RC = 98
BOOT_TAIL_LINES = 8


def ready_command(workdir: str) -> str:
    """The readiness check run over ssh: exit 0 once the boot script finished, BOOT_FAILED_RC with the
    failure marker and the boot log's tail when it failed, BOOTING_RC while it still runs."""
    return (
        # cloud-init finishing means the boot script ran to its end (or died): a marker must be there.
        "if command -v cloud-init >/dev/null 2>&1; then cloud-init status --wait >/dev/null 2>&1; done=1; "
        "else done=0; fi; "
        f'b="${{REMOTEFIT_BOOT_DIR:-{BOOT_DIR}}}"; log="${{REMOTEFIT_BOOT_LOG:-{BOOT_LOG}}}"; '
        'if [ -f "$b/boot-failed" ]; then printf "%s\\n" "$(head -n 1 "$b/boot-failed" | cut -c 1-300)"; '
        f'tail -n {BOOT_TAIL_LINES} "$log" 2>&1; exit {BOOT_FAILED_RC}; fi; '
        'if [ ! -f "$b/boot-done" ]; then '
        'if [ "$done" = 1 ]; then echo "the boot script ended without its ready marker"; '
        f'tail -n {BOOT_TAIL_LINES} "$log" 2>&1; exit {BOOT_FAILED_RC}; fi; '
        f'echo "still booting: $(tail -n 1 "$log" 2>/dev/null)"; exit {BOOTING_RC}; fi; '
        f"mkdir -p {shlex.quote(workdir)}"
    )


def boot_failure(node: Node, output: str) -> str:
    """One line for a node whose boot failed: which node, why, and the boot log's last lines."""
    lines = [ln.strip()[:200] for ln in output.strip().splitlines() if ln.strip()]
    why = lines[0] if lines else "no failure marker text"
    tail = " | ".join(lines[1:]) or "(the boot log is empty)"
    return (
        f"{node.alias} ({node.instance_id}): the node's boot failed: {why}; last lines of {BOOT_LOG}: {tail}; "
        f"the whole log: `inv ssh --node {node.index}` then `cat {BOOT_LOG}`; remove the nodes with "
        "`inv destroy` (they also stop themselves at the deadline), or fix the cause and run `inv apply` again"
    )


def wait_ready(ws: Workspace, nodes: list[Node], gpu: bool = False, timeout: float | None = None) -> float:
    """Wait (bounded) until every node answers over SSH and has finished booting; return seconds."""
    timeout = timeout or ws.defaults.ssh_ready_timeout_s
    t0 = time.monotonic()
    pending = list(nodes)
    last = ""
    while pending:
        for n in list(pending):
            try:
                res = run(
                    ssh_argv(ws.paths.ssh_config, n.alias, ready_command(n.workdir)),
                    capture=True,
                    check=False,
                    timeout=120,
                )
            except UserError:  # cloud-init still busy after 120 s (e.g. apt on stock Ubuntu): ask again
                last = "still booting"
                continue
            if res.returncode == 0:
                pending.remove(n)
                echo(f"ready: {n.alias} ({n.instance_id}) after {time.monotonic() - t0:.1f} s")
            elif res.returncode == BOOT_FAILED_RC:
                # Nodes, state and inventory are all recorded by now: `inv destroy` removes everything.
                raise UserError(boot_failure(n, res.stdout))
            elif res.returncode == BOOTING_RC:
                last = res.stdout.strip()[:300]
            else:
                tail = (res.stderr or res.stdout).strip().splitlines()
                last = tail[-1] if tail else f"ssh exit {res.returncode}"
        if pending and time.monotonic() - t0 > timeout:
            raise UserError(
                f"{', '.join(n.alias for n in pending)} did not answer over SSH within {timeout:.0f} s ({last}); "
                "check `inv status`, then `inv destroy` or retry `inv apply`"
            )
        if pending:
            time.sleep(1.0)
    if gpu:
        _check_gpus(ws, nodes)
    return time.monotonic() - t0


def _check_gpus(ws: Workspace, nodes: list[Node]) -> None:
    """nvidia-smi answers on every GPU node (the image's driver works), and says which GPU it has."""
    if not ws.supports("gpu_driver"):
        for n in nodes:  # the sandbox's dl image is the Deep Learning AMI's layout with a CPU build of PyTorch
            echo(f"gpu: {n.alias}: no NVIDIA driver on a sandbox node (CUDA is absent; `inv fit --gpu` refuses)")
        return
    for n in nodes:
        res = run(
            ssh_argv(ws.paths.ssh_config, n.alias, "nvidia-smi --query-gpu=name,driver_version --format=csv,noheader"),
            capture=True,
            check=False,
        )
        if res.returncode != 0:
            raise UserError(
                f"{n.alias}: nvidia-smi failed on a GPU node ({(res.stderr or res.stdout).strip()[:200]}); the image has no working driver"
            )
        echo(f"gpu: {n.alias}: {res.stdout.strip()}")

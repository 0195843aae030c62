"""remotefit tasks: `inv --list` is the manual. Each task parses flags and calls the library."""

from __future__ import annotations

import functools
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from invoke import Collection, Exit, task

# The project root is where this file is, wherever `inv` is run from (invoke searches upwards for it).
ROOT = Path(__file__).resolve().parent

NODE_FLAGS_HELP = {
    "gpu": "Use a GPU node (default type g5.xlarge, Deep Learning AMI with drivers and PyTorch).",
    "cpu": "Use a CPU node (default type c7i.xlarge, Ubuntu LTS). The default when neither is given.",
    "instance_type": "Override the instance type, e.g. g6.xlarge or c7i.2xlarge.",
    "spot": "Use spot capacity (cheaper, may be interrupted; jobs checkpoint and resume).",
    "nodes": "How many nodes (default 1; several nodes share a cluster placement group).",
    "disk_gb": "Root disk size in GiB (default 150 for GPU, 50 for CPU).",
    "max_hours": "Hard deadline: nodes terminate themselves this many hours after boot (default 8).",
    "idle_minutes": "Nodes terminate themselves after this many idle minutes (default 30).",
    "allow_cidr": "The only CIDR allowed to SSH in (default: this machine's public IP /32).",
    "i_know": "Allow --allow-cidr 0.0.0.0/0 (SSH open to the whole internet). Not recommended.",
    "data_bucket": "An S3 bucket the nodes may read for job.toml [data]; repeatable (adds to invoke.yaml's "
    "data_buckets). The node role reads these and nothing else.",
}


def _guard(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the library's UserError into one line on stderr and a non-zero exit, never a traceback."""

    @functools.wraps(fn)
    def wrapper(c: Any, *args: Any, **kwargs: Any) -> Any:
        from remotefit.errors import UserError

        try:
            return fn(c, *args, **kwargs)
        except UserError as exc:
            raise Exit(f"error: {exc.message}", code=exc.code) from None
        except KeyboardInterrupt:
            raise Exit("interrupted", code=130) from None
        except OSError as exc:  # a file or folder we could not read or write
            raise Exit(f"error: {exc}", code=1) from None
        except Exception as exc:
            # An AWS error we did not translate: still one line, with the code AWS gave.
            if type(exc).__module__.startswith(("botocore", "boto3")):
                raise Exit(f"error: AWS said: {str(exc).splitlines()[0]} (check `inv check`)", code=1) from None
            raise

    return wrapper


def _ws(c: Any) -> Any:
    from remotefit.workspace import Workspace

    return Workspace(root=ROOT, defaults=dict(c.config.get("remotefit", {}) or {}))


def _number(value: Any, flag: str, kind: type) -> Any:
    """invoke passes flags whose default is None as strings: convert with a one-line error."""
    from remotefit.errors import UserError

    if value is None:
        return None
    try:
        return kind(value)
    except ValueError:
        raise UserError(f"--{flag} {value!r} is not a {'whole number' if kind is int else 'number'}") from None


def _spec(ws: Any, task_locals: dict[str, Any]) -> Any:
    """The NodeSpec from a plan/apply task's node flags (the same flags on both)."""
    from remotefit.nodes import resolve_spec

    flags = {k: task_locals[k] for k in NODE_FLAGS_HELP}
    flags["disk_gb"] = _number(flags.get("disk_gb"), "disk-gb", int)
    flags["max_hours"] = _number(flags.get("max_hours"), "max-hours", float)
    flags["idle_minutes"] = _number(flags.get("idle_minutes"), "idle-minutes", int)
    return resolve_spec(ws, **flags)


def _after_dashes(c: Any) -> list[str]:
    """Arguments after `--`, quoting intact: invoke joins its remainder into one string, so read argv."""
    if "--" in sys.argv:
        return sys.argv[sys.argv.index("--") + 1 :]
    return shlex.split(getattr(c, "remainder", "") or "")


def _say(lines: list[str]) -> None:
    for line in lines:
        print(line)


# -- the seed README's steps ------------------------------------------------------------
@task(help={"offline": "Skip the credentials check (STS GetCallerIdentity)."})
@_guard
def check(c, offline=False):
    """Check the CLI tools (and credentials) remotefit needs."""
    from remotefit import stack
    from remotefit.config import load_defaults

    defaults = load_defaults(dict(c.config.get("remotefit", {}) or {}))
    ws = None if offline else _ws(c)
    if not stack.check(ws, offline, defaults.terraform_binary):
        raise Exit("error: required tools are missing or too old (see the table above)", code=1)


@task
@_guard
def env(c):
    """Print `export` lines for aws_env_vars: use as eval "$(inv env)"."""
    from remotefit import stack

    _say(stack.env_lines(_ws(c)))


@task
@_guard
def tfvars(c):
    """Write generated/<AWS_ACCOUNT>.tfvars (name, region, environment and the node variables)."""
    from remotefit import nodes, stack

    ws = _ws(c)
    print(f"wrote {stack.write_tfvars(ws, nodes.planned_node_variables(ws))}")


@task
@_guard
def backend(c):
    """Create (or repair) the hardened S3 state bucket and write generated/backend.hcl."""
    from remotefit import stack

    _say(stack.backend(_ws(c)))


@task
@_guard
def render(c):
    """Render templates/ into generated/terraform/ (checked with python-hcl2)."""
    from remotefit import stack

    for path in stack.render(_ws(c)):
        print(f"rendered {path}")


@task
@_guard
def validate(c):
    """Check the rendered Terraform: hcl2 parse, fmt, validate, tflint and checkov."""
    from remotefit import stack

    _say(stack.validate(_ws(c)))


# -- nodes --------------------------------------------------------------------------------
@task(help=NODE_FLAGS_HELP, iterable=["data_bucket"])
@_guard
def plan(
    c,
    gpu=False,
    cpu=False,
    instance_type=None,
    spot=False,
    nodes=1,
    disk_gb=None,
    max_hours=None,
    idle_minutes=None,
    allow_cidr=None,
    i_know=False,
    data_bucket=None,
):
    """Show what apply would create and what it would cost."""
    from remotefit import nodes as nd

    ws = _ws(c)
    spec = _spec(ws, locals())
    nd.plan(ws, spec)


@task(
    help={
        **NODE_FLAGS_HELP,
        "yes": "Do not ask for confirmation.",
        "refresh_ami": "Re-resolve the AMI (replaces nodes).",
    },
    iterable=["data_bucket"],
)
@_guard
def apply(
    c,
    gpu=False,
    cpu=False,
    instance_type=None,
    spot=False,
    nodes=1,
    disk_gb=None,
    max_hours=None,
    idle_minutes=None,
    allow_cidr=None,
    i_know=False,
    yes=False,
    refresh_ami=False,
    data_bucket=None,
):
    """Provision the nodes, wait until they answer over SSH, and write generated/ssh_config."""
    from remotefit import nodes as nd

    ws = _ws(c)
    spec = _spec(ws, locals())
    if not yes:
        _confirm(f"Apply {spec.nodes} × {spec.instance_type} ({spec.market}) for stage {ws.stage}?")
    # With nodes running, apply plans first and asks again if that plan replaces or resizes any of them.
    nd.apply(ws, spec, refresh_ami=refresh_ami, confirm=None if yes else _confirm)
    _say(nd.status_table(nd.status_rows(ws)))
    print(f"ssh: ssh -F {ws.paths.ssh_config} {nd.inventory(ws)[0].alias}")


def _confirm(question: str) -> None:
    if not sys.stdin.isatty():
        raise Exit("error: not a terminal, so no confirmation possible: pass --yes", code=2)
    if input(f"{question} [y/N] ").strip().lower() not in ("y", "yes"):
        raise Exit("cancelled", code=1)


@task
@_guard
def status(c):
    """Show the nodes: state, addresses, uptime, cost so far and time to the deadline."""
    from remotefit import nodes as nd

    _say(nd.status_lines(_ws(c)))


@task(help={"node": "Which node (index, default 0)."})
@_guard
def ssh(c, node=0):
    """Open an interactive shell on a node (same as ssh -F generated/ssh_config <alias>)."""
    from remotefit import nodes as nd

    raise Exit(code=nd.ssh_interactive(_ws(c), node))


@task
@_guard
def stop(c):
    """Stop the nodes but keep their disks (and say what that still costs)."""
    from remotefit import nodes as nd

    _say(nd.stop(_ws(c)))


@task
@_guard
def start(c):
    """Start stopped nodes again and refresh generated/ssh_config."""
    from remotefit import nodes as nd

    nd.start(_ws(c))


@task(help={"yes": "Do not ask for confirmation (an active run is stopped after its final upload)."})
@_guard
def destroy(c, yes=False):
    """Destroy every node of the stage and verify nothing tagged is left."""
    from remotefit import jobs
    from remotefit import nodes as nd

    ws = _ws(c)
    before = jobs.before_destroy(ws)
    _say(before.lines(ws.settings.runs_bucket))
    if not yes:
        stop = f"Stop run(s) {', '.join(before.active)} and destroy" if before.active else "Destroy"
        _confirm(f"{stop} every node of stage {ws.stage}?")
    _say(jobs.stop_for_destroy(ws, before))
    _say(nd.destroy(ws))


@task(
    help={
        "yes": "Terminate the orphans found (default: only list them).",
        "min_age_minutes": "Ignore instances younger than this (an apply in progress; default 10).",
    }
)
@_guard
def gc(c, yes=False, min_age_minutes=10.0):
    """Find (and with --yes terminate) remotefit instances that no state knows about."""
    from remotefit import nodes as nd

    _say(nd.gc(_ws(c), yes=yes, min_age_minutes=float(min_age_minutes)))


# -- jobs ---------------------------------------------------------------------------------
@task(help={"job": "The job folder, e.g. jobs/resnet.", "nodes": "Sync to the first N nodes (default all)."})
@_guard
def sync(c, job, nodes=0):
    """Upload a job folder to the nodes (rsync, honouring .gitignore and .remotefitignore)."""
    from remotefit import jobs

    jobs.sync(_ws(c), jobs.load_job(job), nodes=nodes or None)


@task(
    help={
        "job": "The job folder, e.g. jobs/resnet.",
        "gpu": "Require a GPU node and check CUDA on it before starting.",
        "cpu": "Run on CPU (the default unless job.toml says gpu = true).",
        "cmd": 'Command to run instead of job.toml\'s (e.g. "python main.py --epochs 1").',
        "args": "Extra arguments for the job's command (or put them after --).",
        "detach": "Start the run and return at once (reattach with `inv logs --follow`).",
        "nodes": "Run on the first N nodes (default: all provisioned nodes).",
        "local": "Run on this machine with the same contract, to try a job before paying.",
        "cancel_on_interrupt": "Ctrl-C cancels the run instead of detaching from it.",
        "env": "Forward a variable to the job: NAME (its value here) or NAME=VALUE; repeatable. "
        "Never written to a file here; prefer NAME (a VALUE shows in this machine's ps and shell history).",
        "tensorboard": "Serve TensorBoard for the run (job.toml tensorboard, default <outputs>/tb) through a tunnel.",
        "resume": "Start from an earlier run's outputs in the runs bucket (its checkpoint): RUN_ID or latest.",
        "max_recoveries": "On a spot interruption while attached: re-apply and resume at most N times (default 3; 0: never).",
    },
    iterable=["env"],
)
@_guard
def fit(
    c,
    job,
    gpu=False,
    cpu=False,
    cmd=None,
    args="",
    detach=False,
    nodes=0,
    local=False,
    cancel_on_interrupt=False,
    env=None,
    tensorboard=False,
    resume=None,
    max_recoveries=3,
):
    """Sync a job, run it on the nodes, stream its log and pull its outputs home."""
    from remotefit import jobs
    from remotefit.config import Paths

    extra = shlex.split(args) + _after_dashes(c)
    spec = jobs.load_job(job, cmd=cmd)
    secrets, warnings = jobs.passed_env(spec, env or [])
    for line in warnings:
        print(line, file=sys.stderr)
    ws = None if local else _ws(c)
    code = jobs.fit(
        ws,
        spec,
        extra,
        gpu=gpu,
        cpu=cpu,
        detach=detach,
        nodes=nodes or None,
        local=local,
        cancel_on_interrupt=cancel_on_interrupt,
        paths=Paths.at(ROOT),
        secrets=secrets,
        tensorboard_flag=tensorboard,
        resume=resume,
        max_recoveries=_number(max_recoveries, "max-recoveries", int),
    )
    if code:
        raise Exit(code=code)


@task(help={"run": "The run id (default: the latest).", "follow": "Keep streaming until the run ends."})
@_guard
def logs(c, run=None, follow=False):
    """Print (or follow) a run's log, ending with its exit code."""
    from remotefit import jobs

    code = jobs.logs(_ws(c), run, follow=follow)
    if code:
        raise Exit(code=code)


@task(help={"run": "The run id (default: the latest)."})
@_guard
def pull(c, run=None):
    """Bring a run's outputs, log and run.json home into runs/<job>/<run-id>/."""
    from remotefit import jobs

    print(jobs.pull(_ws(c), run))


@task
@_guard
def runs(c):
    """List runs: the local history plus what is live on the nodes."""
    from remotefit import jobs

    _say(jobs.runs_table(_ws(c)))


@task(help={"run": "The run id (default: the active run)."})
@_guard
def cancel(c, run=None):
    """Stop a run on every node."""
    from remotefit import jobs

    _say(jobs.cancel(_ws(c), run))


# -- demo ---------------------------------------------------------------------------------
@task(help={"keep": "Leave the node and sandbox running at the end (destroy later with `inv destroy`)."})
@_guard
def demo(c, keep=False):
    """Run the whole life cycle on the sandbox: up, apply, fit jobs/resnet, destroy, down."""
    from remotefit import demo as dm

    raise Exit(code=dm.run(dict(c.config.get("remotefit", {}) or {}), keep=keep, root=ROOT))


# -- sandbox ------------------------------------------------------------------------------
@task(name="up")
@_guard
def sandbox_up(c):
    """Start the sandbox moto server, restoring its last state (harmless when it already runs)."""
    from remotefit.config import Paths
    from remotefit.sandbox import Sandbox

    print(Sandbox(Paths.at(ROOT).sandbox_dir).up().endpoint)


@task(name="down")
@_guard
def sandbox_down(c):
    """Stop the sandbox (moto server, nodes, our ssh connections to them) and forget its state."""
    from remotefit.config import Paths
    from remotefit.sandbox import Sandbox

    paths = Paths.at(ROOT)
    stopped = Sandbox(paths.sandbox_dir).down(ssh_config=paths.ssh_config)
    _say([f"stopped {s}" for s in stopped] or ["the sandbox was not running"])


@task(name="status")
@_guard
def sandbox_status(c):
    """Show the sandbox: its moto server, which kind of node it starts, and each node's state."""
    from remotefit.config import Paths
    from remotefit.sandbox import Sandbox

    _say(Sandbox(Paths.at(ROOT).sandbox_dir).status_lines())


@task(name="console", positional=["instance"], help={"instance": "The node's instance id (`inv sandbox.status`)."})
@_guard
def sandbox_console(c, instance):
    """Show a sandbox node's console: its boot as systemd and cloud-init printed it."""
    from remotefit.config import Paths
    from remotefit.sandbox import Sandbox

    print(Sandbox(Paths.at(ROOT).sandbox_dir).console(instance))


@task(
    name="interrupt",
    help={
        "node": "Which node (default 0); it must be a spot node.",
        "in_": "Seconds from the notice to the end of the instance (default 120, as on AWS).",
    },
)
@_guard
def sandbox_interrupt(c, node=0, in_=120.0):
    """Interrupt a sandbox spot node as AWS would: a notice on its metadata service, then its end."""
    from remotefit import nodes as nd

    _say(nd.interrupt(_ws(c), _number(node, "node", int), _number(in_, "in", float)))


# -- tunnels -------------------------------------------------------------------------------
@task(
    name="open",
    positional=["port"],
    help={
        "port": "The node's port to forward, e.g. 6006 (TensorBoard) or 8888 (Jupyter).",
        "node": "Which node (default 0).",
        "local_port": "The port on this machine (default: the same as PORT, or the next free one).",
        "wait": "Seconds to wait for something to listen on PORT on the node (default 10).",
    },
)
@_guard
def tunnel_open(c, port, node=0, local_port=None, wait=None):
    """Forward a node's port to 127.0.0.1 on this machine and print its URL."""
    from remotefit import nodes as nd
    from remotefit import tunnel

    remote_port = tunnel.valid_port(_number(port, "port", int), "PORT")
    index = _number(node, "node", int)
    local = None if local_port is None else tunnel.valid_port(_number(local_port, "local-port", int), "--local-port")
    wait_s = 10.0 if wait is None else _number(wait, "wait", float)
    ws = _ws(c)
    _, lines = tunnel.open_tunnel(ws, nd.require_nodes(ws), remote_port, node=index, local_port=local, wait_s=wait_s)
    _say(lines)


@task(name="list")
@_guard
def tunnel_list(c):
    """List the open tunnels with their URLs."""
    from remotefit import tunnel

    _say(tunnel.list_lines(_ws(c)))


@task(name="close", help={"port": "Close only the tunnel on this local port (default: all)."})
@_guard
def tunnel_close(c, port=None):
    """Close the open tunnels (or one, by its local port)."""
    from remotefit import tunnel

    _say(tunnel.close(_ws(c), _number(port, "port", int)))


tunnel_ns = Collection("tunnel")
tunnel_ns.add_task(tunnel_open, default=True)
tunnel_ns.add_task(tunnel_list)
tunnel_ns.add_task(tunnel_close)
sandbox = Collection("sandbox", sandbox_up, sandbox_down, sandbox_status, sandbox_console, sandbox_interrupt)
ns = Collection(
    check,
    env,
    tfvars,
    backend,
    render,
    validate,
    plan,
    apply,
    status,
    ssh,
    stop,
    start,
    destroy,
    gc,
    sync,
    fit,
    logs,
    pull,
    runs,
    cancel,
    demo,
    sandbox,
    tunnel_ns,
)

"""Shared fixtures. End-to-end tests drive the real `inv` tasks in an isolated project: their own
aws_env_vars, generated/ and runs/ folders (REMOTEFIT_ENV_FILE / REMOTEFIT_GENERATED / REMOTEFIT_RUNS),
so they never touch a developer's sandbox, and each gets its own moto server and sshd nodes."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
INV = str(Path(sys.executable).parent / "inv")

ENV_FILE = """\
AWS_ACCOUNT=testacct
AWS_REGION={region}
STAGE={stage}
TF_STATE_BUCKET={bucket}
TARGET=sandbox
"""


# Tests never touch a developer's kept records (keys, sandbox: config.kept_dir); projects set their own.
os.environ["REMOTEFIT_HOME"] = tempfile.mkdtemp(prefix="remotefit-test-home-")

# xdist's workers share this machine's cores, so each sandbox job (and each local training) gets its share
# of threads, not all of them (remotefit/sandbox.py job_threads: on 2 cores, 3 trainings at once took 30% less
# CPU with 1 thread each than with 2).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
if _WORKERS > 1:
    os.environ.setdefault("REMOTEFIT_SANDBOX_THREADS", str(max(1, len(os.sched_getaffinity(0)) // _WORKERS)))

# Every end-to-end test needs these; `requires(...)` names more (checkov, terraform alone).
E2E_TOOLS = ("terraform", "ssh", "rsync", "sshd")
# The venv's bin folder first: scripts/bootstrap may have installed terraform there.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


def tool_path(name: str) -> str | None:
    """Where a tool the tests need is, or None."""
    if name == "sshd":
        return "/usr/sbin/sshd" if Path("/usr/sbin/sshd").exists() else None
    from remotefit.tools import find_binary

    return find_binary(name)


def tools_present() -> bool:
    return all(tool_path(t) for t in E2E_TOOLS)


# A test that drives the real chain (moto server, terraform, ssh/rsync, sshd nodes). Without the tools it is
# skipped on a developer's machine, but under CI=true or --strict-e2e a missing tool is a failure naming it.
e2e = pytest.mark.e2e
needs_tools = e2e  # the older name


def requires(*tools: str) -> pytest.MarkDecorator:
    """Mark a test that needs these tools (strict like e2e, but not counted as end to end)."""
    return pytest.mark.requires(*tools)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--strict-e2e",
        action="store_true",
        help="fail (not skip) tests whose tools are missing; on by default when CI=true",
    )


def strict(config: pytest.Config) -> bool:
    ci = os.environ.get("CI", "").lower() in ("1", "true", "yes")
    return ci or bool(config.getoption("--strict-e2e")) or os.environ.get("REMOTEFIT_STRICT_E2E") == "1"


def require_root(request: pytest.FixtureRequest, why: str) -> None:
    """Skip a test that needs root, or fail it where a skipped test hides a missing capability (CI)."""
    if os.geteuid() != 0:
        if strict(request.config):
            pytest.fail(f"{why}; a skipped test is a failure under CI=true / --strict-e2e", pytrace=False)
        pytest.skip(why)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "requires(*tools): needs these tools; strict under CI like e2e")
    config.addinivalue_line("markers", "fault: an injected fault (tests/test_e2e_faults.py), counted apart")


# The heaviest files first (each takes minutes on booted nodes on 2 cores). xdist deals whole files to its
# workers in collection order (--no-loadscope-reorder in pyproject.toml): a heavy file dealt last would be a
# tail the other workers wait out, and its own reorder puts the files with the most tests (unit tests) first.
HEAVY_FIRST = (
    "test_demo.py",
    "test_e2e_spot.py",
    "test_e2e_container.py",
    "test_e2e_nodes.py",
    "test_e2e_durable.py",
    "test_e2e_jobs.py",
    "test_e2e_policy_coverage.py",
    "test_e2e_faults.py",
    "test_e2e_promises.py",
    "test_e2e_everyday.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests stay in order


def pytest_runtest_setup(item: pytest.Item) -> None:
    needed: list[str] = list(E2E_TOOLS) if item.get_closest_marker("e2e") else []
    for mark in item.iter_markers("requires"):
        needed += [t for t in mark.args if t not in needed]
    missing = [t for t in needed if not tool_path(t)]
    if not missing:
        return
    msg = f"missing tool(s): {', '.join(missing)} (scripts/bootstrap installs them)"
    if strict(item.config):
        pytest.fail(f"{msg}; a skipped end-to-end test is a failure under CI=true / --strict-e2e", pytrace=False)
    pytest.skip(msg)


@dataclass
class _Counted:
    """One end-to-end test that ran, as an entry of pytest's closing line (`N e2e ran`)."""

    nodeid: str
    count_towards_summary: bool = True


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    # Runs in the controller under xdist too; counts tests marked e2e (and fault) whose body ran.
    if report.when != "call" or _reporter is None:
        return
    for mark, label in (("e2e", "e2e ran"), ("fault", "faults ran")):
        if mark in report.keywords:
            _reporter.stats.setdefault(label, []).append(_Counted(report.nodeid))


_reporter = None


def node_mode_line() -> str:
    """Which kind of sandbox node the end-to-end tests run on, and why (the test report says it)."""
    from remotefit.errors import UserError
    from remotefit.sandbox import Sandbox

    try:
        mode, why = Sandbox(Path(tempfile.gettempdir())).node_mode()
    except UserError as exc:
        return f"sandbox nodes: none ({exc})"
    return f"sandbox nodes: {mode} ({why})"


def pytest_report_header(config: pytest.Config) -> str:
    return node_mode_line()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    terminalreporter.write_line(node_mode_line())


@pytest.hookimpl(trylast=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    global _reporter
    _reporter = session.config.pluginmanager.get_plugin("terminalreporter")


@dataclass
class Project:
    """An isolated remotefit project that runs the real tasks from the repo root."""

    dir: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def cwd(self) -> Path:
        """Where `inv` runs: the repo root (the project's files are redirected by REMOTEFIT_* variables)."""
        return ROOT

    @property
    def generated(self) -> Path:
        return self.dir / "generated"

    @property
    def runs(self) -> Path:
        return self.dir / "runs"

    @property
    def kept(self) -> Path:
        """The records kept outside generated/ (keys, the sandbox): where this project's env puts them."""
        from remotefit.config import kept_dir, remotefit_home

        return kept_dir(self.generated, remotefit_home(self.env))

    @property
    def sandbox(self) -> Path:
        return self.kept / "sandbox"

    @property
    def env_file(self) -> Path:
        return self.dir / "aws_env_vars"

    def inv(
        self, *args: str, check: bool = True, timeout: float = 600, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run `inv ARGS` from `cwd` with this project's files; check=True asserts exit 0."""
        res = subprocess.run(
            [INV, *args],
            cwd=self.cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
        if check and res.returncode != 0:
            raise AssertionError(
                f"inv {' '.join(args)} exited {res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}"
            )
        return res

    def ssh(self, alias: str, command: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run `command` on a node through the project's own ssh config, as a user would by hand."""
        return subprocess.run(
            ["ssh", "-F", str(self.generated / "ssh_config"), alias, command],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def workspace(self):  # noqa: ANN201 - a Workspace bound to this project, for boto3 assertions
        from remotefit.workspace import Workspace

        old = {k: os.environ.get(k) for k in self.env if k.startswith("REMOTEFIT_")}
        os.environ.update({k: v for k, v in self.env.items() if k.startswith("REMOTEFIT_")})
        try:
            return Workspace(root=ROOT, defaults={"terraform_mirror": "/opt/tf-plugins"})
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def down(self) -> None:
        self.inv("sandbox.down", check=False, timeout=60)


# A shell line printing the instance a node is: a loopback node's sshd sets REMOTEFIT_NODE; a container node
# is a machine of its own, and cloud-init keeps its instance id as on EC2.
NODE_ID_CMD = 'echo "${REMOTEFIT_NODE:-$(cat /var/lib/cloud/data/instance-id 2>/dev/null)}"'


def containers(p: Project) -> bool:
    """Whether this project's new sandbox nodes are booted containers (REMOTEFIT_SANDBOX_NODES)."""
    return p.env.get("REMOTEFIT_SANDBOX_NODES", "auto") in ("container", "auto") and _can_boot()


def _can_boot() -> bool:
    from remotefit import sandbox_machine

    return sandbox_machine.available() is None


def loopback_nodes(p: Project) -> Project:
    """Pin a project to loopback nodes: for tests of the loopback node's own machinery (its sshd, its
    watchdog on this machine's /proc); the container file shows the same on booted nodes."""
    p.env["REMOTEFIT_SANDBOX_NODES"] = "loopback"
    return p


def node_record(p: Project, index: int = 0) -> dict:
    """Node `index` as the project's inventory (generated/nodes.json) records it."""
    return json.loads((p.generated / "nodes.json").read_text())["nodes"][index]


def booted(p: Project, index: int = 0) -> bool:
    """Whether node `index` is a booted container (its own disk, processes and address), not a loopback sshd."""
    f = p.sandbox / "nodes" / node_record(p, index)["instance_id"] / "node.json"
    return f.exists() and json.loads(f.read_text()).get("mode") == "container"


def on_node(p: Project, path: str | Path, index: int = 0) -> Path:
    """Where node `index`'s file `path` is seen from this machine: the path itself on a loopback node (it
    shares this machine's disk); under its root disk, mounted here, on a booted node. Not for the node's
    /tmp, a tmpfs of its own: make files there with `touch_on_node`."""
    if not booted(p, index):
        return Path(path)
    return p.sandbox / "nodes" / node_record(p, index)["instance_id"] / "root" / str(path).lstrip("/")


def touch_on_node(p: Project, path: str | Path, index: int = 0) -> None:
    """Create the empty file `path` (and its folders) on node `index` over ssh, as the job's user would: the
    gate a test's job waits for, wherever that node keeps its files."""
    q = shlex.quote(str(path))
    res = p.ssh(node_record(p, index)["alias"], f"mkdir -p $(dirname {q}) && touch {q}")
    assert res.returncode == 0, res.stderr


WATCHDOG = ROOT / "remotefit" / "node" / "watchdog.py"


def watchdog_config(p: Project, index: int = 0) -> dict:
    """Node `index`'s watchdog configuration, as its watchdog reads it."""
    n = node_record(p, index)
    if booted(p, index):  # written by the node's own user data
        res = p.ssh(n["alias"], "cat /etc/remotefit/watchdog.json")
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout)
    return json.loads((p.sandbox / "nodes" / n["instance_id"] / "watchdog.json").read_text())


def watchdog_tick(
    p: Project, now: float, *, idle_since: float | None = None, index: int = 0
) -> subprocess.CompletedProcess[str]:
    """One tick of node `index`'s own watchdog, with its own configuration, its clock at `now`: on this
    machine for a loopback node, as root over ssh on a booted one (where the shutdown it runs ends the node,
    and may end the ssh session before the last line). With `idle_since`, it sees an empty /proc (no live
    run, and the test's own ssh session is no user) and an idle clock started then."""
    with_state = json.dumps({"first_tick": idle_since}) if idle_since is not None else "{}"
    node, on_booted = node_record(p, index), booted(p, index)  # (read once: the tick may end the node)
    if on_booted:
        tmp, argv = "/var/tmp/remotefit-tick", ["python3", "/opt/remotefit/watchdog.py"]
        argv += ["--config", "/etc/remotefit/watchdog.json"]
    else:
        tmp, argv = tempfile.mkdtemp(prefix="remotefit-tick-"), [sys.executable, str(WATCHDOG)]
        argv += ["--config", str(p.sandbox / "nodes" / node["instance_id"] / "watchdog.json")]
    argv += ["--state", f"{tmp}/state.json", "--imds-timeout", "2"]
    if idle_since is not None:
        argv += ["--proc", f"{tmp}/proc"]
    script = f"mkdir -p {tmp}/proc && echo {shlex.quote(with_state)} > {tmp}/state.json && "
    script += f"REMOTEFIT_FAKE_NOW={now} exec {shlex.join(argv)}"
    if on_booted:
        return p.ssh(node["alias"], f"sudo sh -c {shlex.quote(script)}", timeout=300)
    return subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=300)


def make_project(
    base: Path, stage: str = "test", region: str = "us-east-1", bucket: str = "remotefit-test-state"
) -> Project:
    base.mkdir(parents=True, exist_ok=True)
    (base / "aws_env_vars").write_text(ENV_FILE.format(region=region, stage=stage, bucket=bucket))
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "REMOTEFIT_", "TARGET", "STAGE", "TF_STATE"))
    }
    env.update(
        {
            "REMOTEFIT_ENV_FILE": str(base / "aws_env_vars"),
            "REMOTEFIT_GENERATED": str(base / "generated"),
            "REMOTEFIT_RUNS": str(base / "runs"),
            "REMOTEFIT_HOME": str(base / "home"),
            "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
        }
    )
    # Which kind of sandbox node the suite runs on is the machine's choice, not the project's: booted
    # containers where this machine can boot them (auto, the default), loopback sshds elsewhere; CI sets
    # REMOTEFIT_SANDBOX_NODES explicitly and checks the report's last line.
    env.update(machine_wide())
    return Project(base, env)


def machine_wide() -> dict[str, str]:
    """The settings of this machine, not of a project, that every test project keeps: which kind of sandbox
    node runs (REMOTEFIT_SANDBOX_NODES), the image cache, the address-slice registry, the threads of a job."""
    names = ("REMOTEFIT_SANDBOX_NODES", "REMOTEFIT_CACHE", "REMOTEFIT_SANDBOX_SLOTS", "REMOTEFIT_SANDBOX_THREADS")
    return {name: os.environ[name] for name in names if os.environ.get(name)}


@pytest.fixture
def project(tmp_path: Path):
    """A fresh isolated project; its sandbox is stopped afterwards."""
    p = make_project(tmp_path / "proj")
    yield p
    p.down()


@pytest.fixture(scope="module")
def module_project(tmp_path_factory: pytest.TempPathFactory):
    """One isolated project shared by a module's tests (one sandbox, one apply), stopped afterwards."""
    p = make_project(tmp_path_factory.mktemp("proj"))
    yield p
    p.down()

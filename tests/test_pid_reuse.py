"""A sandbox record's pid, reused by another daemon of the same kind, must not be signalled.

This machine's pids wrap within minutes under the suite (pid_max 32768; ~33,000 processes a run, plus
threads), so a dead node's recorded pid soon names another node's supervisor, and a marker in the command
line cannot tell them apart. Each case here reuses a pid for real: in a pid namespace of its own, with
ns_last_pid set so the next process gets the dead one's pid, as CRIU restores pids.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import ROOT, require_root

pytestmark = pytest.mark.fault

# Runs inside the new pid namespace (its own /proc): starts A, notes it in A's record as the sandbox does,
# lets A die, makes B (the same kind of daemon, another node's) take A's pid, then asks the sandbox to stop
# what A's record names. Prints a JSON verdict.
SCRIPT = textwrap.dedent(
    """
    import json, os, signal, subprocess, sys, time
    from dataclasses import asdict
    from pathlib import Path
    from remotefit.sandbox import Sandbox, SandboxNode, Server, stop_pid
    from remotefit.node.contract import start_ticks

    kind, base = sys.argv[1], Path(sys.argv[2])
    sb = Sandbox(base / "sandbox")
    marker = {"supervisor": ["-m", "remotefit.sandbox_machine", "--dir"], "moto": ["moto", "--port"]}[kind]

    def daemon(tag):
        argv = [sys.executable, "-c", "import time; time.sleep(120)", *marker, str(base / tag)]
        return subprocess.Popen(argv, start_new_session=True)

    a = daemon("a")
    time.sleep(0.05)
    started = start_ticks(a.pid)
    if kind == "supervisor":
        d = sb.nodes_dir / "i-a"
        d.mkdir(parents=True)
        node = SandboxNode("i-a", 22, a.pid, "ubuntu", "/w", mode="container", host="127.0.0.9")
        node.note(a.pid)
        (d / "node.json").write_text(json.dumps(asdict(node)))
    else:
        sb.dir.mkdir(parents=True)
        sb.record.write_text(json.dumps(asdict(Server(a.pid, 1, time.time(), started))))
    a.kill()
    a.wait()
    time.sleep(0.02)  # start times are in clock ticks: B must start in a later one
    Path("/proc/sys/kernel/ns_last_pid").write_text(str(a.pid - 1))
    b = daemon("b")
    time.sleep(0.05)
    reused = b.pid == a.pid
    if kind == "supervisor":
        sb.stop_node(sb.node("i-a"))
    else:
        sb.down()
    time.sleep(0.2)
    spared = b.poll() is None
    print(json.dumps({"reused": reused, "spared": spared, "a_start": started, "b_start": start_ticks(b.pid)}))
    b.kill()
    """
)


@pytest.mark.parametrize("kind", ["supervisor", "moto"])
def test_a_reused_pid_of_another_daemon_is_not_signalled(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    require_root(request, "a pid namespace of its own and ns_last_pid need root")
    if shutil.which("unshare") is None:
        pytest.fail("unshare (util-linux) is missing")
    res = subprocess.run(  # noqa: S603
        [
            "unshare",
            "--pid",
            "--fork",
            "--kill-child",
            "--mount-proc",
            sys.executable,
            "-c",
            SCRIPT,
            kind,
            str(tmp_path),
        ],  # noqa: S607
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
    )
    assert res.returncode == 0, res.stderr[-3000:]
    verdict = json.loads(res.stdout.strip().splitlines()[-1])
    assert verdict["reused"], f"the namespace did not hand out the dead daemon's pid again: {verdict}"
    assert verdict["a_start"] != verdict["b_start"], verdict
    assert verdict["spared"], f"the sandbox signalled another daemon that took a dead one's pid: {verdict}"

"""`inv demo`: the whole life cycle on the sandbox, from nothing to a trained model and back to nothing.

It always targets the sandbox (never a billed account) and keeps its records in generated/demo/, so it
neither disturbs a user's own stage nor leaves anything running: whatever happens — a failed stage,
Ctrl-C — it destroys what it created, stops the sandbox and says what it cleaned.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from remotefit.errors import UserError
from remotefit.proc import atomic_write, echo

# Measured on this project's 2-core CI machine: ~25-40 s of training, test accuracy ≈ 0.99 on digits.
DEMO_ARGS = ["--data", "digits", "--width", "16", "--image-size", "32", "--batch-size", "64", "--epochs", "20"]
DEMO_STAGE = "demo"


def _workspace(defaults: dict[str, Any], root: Path) -> Any:
    from remotefit.config import GENERATED_ENV, load_settings
    from remotefit.workspace import Workspace

    gen = Path(os.environ.get(GENERATED_ENV) or root / "generated") / "demo"
    settings = load_settings(root).model_copy(update={"TARGET": "sandbox", "STAGE": DEMO_STAGE})
    ws = Workspace(root=root, defaults=defaults, settings=settings)
    ws.paths = dataclasses.replace(ws.paths, generated=gen)
    return ws


def run(defaults: dict[str, Any], keep: bool = False, root: Path | None = None) -> int:
    """Run every stage, timing each; return 0 on success. Cleans up on any failure or interrupt."""
    from remotefit import jobs, nodes, stack

    ws = _workspace(defaults, root or Path.cwd())
    timings: list[tuple[str, float]] = []
    applied = False
    result: dict[str, Any] = {}

    def stage(name: str, fn: Callable[[], Any]) -> Any:
        echo(f"\n== {name}")
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
        timings.append((name, dt))
        echo(f"== {name}: done in {dt:.1f} s")
        return out

    def fit() -> int:
        job = jobs.load_job(ws.paths.root / "jobs" / "resnet")
        # Ctrl-C cancels the run and reaches the demo's own handler (which destroys the node), rather
        # than detaching from a run on a node that is about to go.
        code = jobs.fit(ws, job, DEMO_ARGS, cancel_on_interrupt=True, raise_interrupt=True)
        if code:
            raise UserError(f"the demo job failed with exit code {code}", code=code)
        return code

    t_start = time.perf_counter()
    ok = False
    try:
        stage("sandbox up", lambda: ws.sandbox.up())
        if not stage("check", lambda: stack.check(ws, offline=False, terraform_binary=ws.defaults.terraform_binary)):
            raise UserError("required tools are missing (see the table above); run scripts/bootstrap")
        stage("tfvars", lambda: echo(f"wrote {stack.write_tfvars(ws, nodes.planned_node_variables(ws))}"))
        stage("backend", lambda: [echo(line) for line in stack.backend(ws)])
        spec = nodes.resolve_spec(ws, cpu=True, max_hours=1, idle_minutes=15)
        stage("apply (1 CPU node)", lambda: nodes.apply(ws, spec))
        applied = True
        stage("fit jobs/resnet (digits)", fit)
        stage("status", lambda: [echo(line) for line in nodes.status_table(nodes.status_rows(ws))])
        result = _latest_result(ws)
        if not keep:
            stage("destroy", lambda: [echo(line) for line in nodes.destroy(ws)])
            applied = False
            stage("sandbox down", lambda: [echo(f"stopped {s}") for s in ws.sandbox.down()])
        ok = True
    except UserError as exc:
        echo(f"\ndemo failed: {exc.message}")
        return_code = exc.code or 1
    except KeyboardInterrupt:
        echo("\ndemo interrupted")
        return_code = 130
    finally:
        if not ok:
            _cleanup(ws, applied)
    total = time.perf_counter() - t_start
    _report(ws, timings, total, result, ok, keep)
    return 0 if ok else return_code


def _cleanup(ws: Any, applied: bool) -> None:
    """Leave nothing behind after a failure: destroy what was applied, stop every sandbox process."""
    from remotefit import nodes

    echo("cleaning up:")
    if applied or nodes.inventory(ws):
        try:
            for line in nodes.destroy(ws):
                echo(f"  {line}")
        except (UserError, KeyboardInterrupt) as exc:
            echo(f"  destroy failed ({exc}); stopping the sandbox removes every sandbox instance anyway")
    stopped = ws.sandbox.down()
    for s in stopped:
        echo(f"  stopped {s}")
    if not stopped:
        echo("  no sandbox process was running")


def _latest_result(ws: Any) -> dict[str, Any]:
    runs = sorted(ws.paths.runs.glob("resnet/*/run.json"), key=lambda p: p.stat().st_mtime)
    if not runs:
        return {}
    run_dir = runs[-1].parent
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
    return {"dir": run_dir, "summary": summary}


def _report(
    ws: Any, timings: list[tuple[str, float]], total: float, result: dict[str, Any], ok: bool, keep: bool
) -> None:
    echo("\n== demo summary")
    for name, dt in timings:
        echo(f"  {name:<26} {dt:7.1f} s  {100 * dt / total if total else 0:5.1f} %")
    echo(f"  {'total':<26} {total:7.1f} s")
    if result:
        d, s = result["dir"], result["summary"]
        acc = s.get("final_test_acc", s.get("final_acc"))
        if acc is not None:
            echo(f"  final test accuracy: {acc:.4f} (best {s.get('best_test_acc', acc):.4f})")
        for name in ("curves.png", "summary.json", "run.json"):
            echo(f"  {name:<13} {d / name}")
    if keep and ok:
        # The demo has its own records (generated/demo) and stage: point the tasks at them, never at the
        # user's own stage (which may be on real AWS).
        env = f"REMOTEFIT_GENERATED={ws.paths.generated} STAGE={DEMO_STAGE} TARGET=sandbox"
        echo(f"  kept the node and the sandbox; when done: {env} inv destroy --yes && {env} inv sandbox.down")
    ws.paths.generated.mkdir(parents=True, exist_ok=True)
    atomic_write(
        ws.paths.generated / "timings.json",
        json.dumps({"ok": ok, "total_s": total, "stages": [{"name": n, "seconds": t} for n, t in timings]}, indent=2),
    )

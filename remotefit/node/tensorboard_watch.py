#!/usr/bin/env python3
"""remotefit: serve one run's TensorBoard on this node while the run lasts.

Started detached by the laptop (remotefit/tensorboard.py) right after the run starts. Waits for the
job's venv (runs/<id>/run.json names it; the runner marks it ready), then runs that venv's
`python -m tensorboard.main --logdir <job dir>/<logdir> --host 127.0.0.1 --port <port>`, and stops it
when the run ends (its exit_code appears) or when this watcher gets SIGTERM (`inv tunnel.close`).
Standard library only, Python 3.8+.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

READY_MARKER = ".remotefit-ready"  # runner.py's


def main() -> int:
    p = argparse.ArgumentParser(prog="tensorboard-watcher")
    p.add_argument("--base", required=True)
    p.add_argument("--run-id", required=True)
    p.add_argument("--logdir", required=True)
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args()
    run_dir = os.path.join(args.base, "runs", args.run_id)
    ended = os.path.join(run_dir, "exit_code")
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

    python = None
    while python is None and not stopping and not os.path.exists(ended):
        try:
            with open(os.path.join(run_dir, "run.json"), encoding="utf-8") as f:
                meta = json.load(f)
        except (OSError, ValueError):
            meta = {}
        venv = meta.get("venv")
        if venv and os.path.isfile(os.path.join(venv, READY_MARKER)):
            python = os.path.join(venv, "bin", "python")
        time.sleep(0.5)
    if python is None:
        print("tensorboard: the run ended (or was stopped) before its venv was ready", flush=True)
        return 0
    logdir = os.path.join(meta.get("job_dir") or ".", args.logdir)
    os.makedirs(logdir, exist_ok=True)
    argv = [python, "-m", "tensorboard.main", "--logdir", logdir, "--host", "127.0.0.1", "--port", str(args.port)]
    print("tensorboard: " + " ".join(argv), flush=True)
    tb = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    while not stopping and not os.path.exists(ended) and tb.poll() is None:
        time.sleep(0.5)
    if tb.poll() is None:
        tb.terminate()
        try:
            tb.wait(10)
        except subprocess.TimeoutExpired:
            tb.kill()
            tb.wait()
    print(f"tensorboard: stopped (exit {tb.returncode})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

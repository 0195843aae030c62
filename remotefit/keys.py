"""The stage's SSH key pair: generated locally (ed25519, 0600); only the public half reaches Terraform.

`tls_private_key` would put the private key into Terraform state, so we never use it. The pair lives in
the project's kept folder (config.kept_dir), not in generated/: a node trusts only the key it was created
with, so `rm -rf generated/` must not take it away.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from remotefit.config import kept_dir
from remotefit.errors import UserError
from remotefit.proc import run


def key_path(generated: Path, stage: str) -> Path:
    return kept_dir(generated) / "keys" / f"{stage}_ed25519"


def _adopt_legacy_key(generated: Path, path: Path) -> None:
    """Move a pair that older versions wrote to generated/keys into the kept folder (never overwrite)."""
    old = generated / "keys" / path.name
    if path.exists() or not (old.exists() and old.with_suffix(".pub").exists()):
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    shutil.copy2(old.with_suffix(".pub"), path.with_suffix(".pub"))
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.copy2(old, tmp)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)  # the private key lands last, as in ensure_key
    old.unlink()
    old.with_suffix(".pub").unlink()


def keygen_argv(path: Path, comment: str) -> list[str]:
    return ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)]


def ensure_key(generated: Path, stage: str) -> Path:
    """Create the stage's key once; an existing key is never replaced (nodes trust it)."""
    path = key_path(generated, stage)
    _adopt_legacy_key(generated, path)
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
    os.chmod(path.parent.parent, 0o700)  # the kept folder holds private keys: ours alone
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

"""Resolve the machine image once, in Python, so Terraform gets a pinned id.

On AWS the id comes from the public SSM parameters AWS and Canonical publish. moto has none of those
parameters (and forbids creating `/aws/...` names), so the resolver is injectable and the sandbox
picks one of moto's own images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from remotefit.errors import UserError

SSM_PARAMETERS = {
    # NVIDIA driver, CUDA and PyTorch preinstalled: nothing heavy happens at boot.
    "gpu": "/aws/service/deeplearning/ami/x86_64/oss-nvidia-driver-gpu-pytorch-2.9-ubuntu-24.04/latest/ami-id",
    "cpu": "/aws/service/canonical/ubuntu/server/24.04/stable/current/amd64/hvm/ebs-gp3/ami-id",
}
# Where each image keeps the Python that already has PyTorch (the job venv sees its packages).
NODE_PYTHON = {"gpu": "/opt/pytorch/bin/python3", "cpu": "/usr/bin/python3"}


@dataclass(frozen=True)
class Ami:
    id: str
    ssh_user: str
    python: str
    source: str


class AmiResolver(Protocol):
    def resolve(self, profile: str) -> Ami: ...


class SsmAmiResolver:
    """Real AWS: read the public SSM parameter for the profile."""

    def __init__(self, ssm: Any) -> None:
        self.ssm = ssm

    def resolve(self, profile: str) -> Ami:
        from botocore.exceptions import BotoCoreError, ClientError

        name = SSM_PARAMETERS[profile]
        try:
            value = self.ssm.get_parameter(Name=name)["Parameter"]["Value"]
        except (ClientError, BotoCoreError) as exc:
            raise UserError(f"could not resolve the {profile} AMI from SSM parameter {name}: {exc}") from None
        return Ami(id=value, ssh_user="ubuntu", python=NODE_PYTHON[profile], source=f"ssm:{name}")


class ImageListResolver:
    """Sandbox: moto ships a list of public images; take a stable one (the first Ubuntu, else the first)."""

    def __init__(self, ec2: Any) -> None:
        self.ec2 = ec2

    def resolve(self, profile: str) -> Ami:
        images = sorted(self.ec2.describe_images(Owners=["amazon"])["Images"], key=lambda i: i["ImageId"])
        if not images:
            raise UserError("the sandbox has no machine images; restart it with `inv sandbox.down sandbox.up`")
        ubuntu = [i for i in images if "ubuntu" in i.get("Name", "").lower()]
        img = (ubuntu or images)[0]
        return Ami(id=img["ImageId"], ssh_user="ubuntu", python="python3", source=f"sandbox image {img.get('Name')}")

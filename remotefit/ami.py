"""Resolve the machine image once, in Python, so Terraform gets a pinned id.

On AWS the id comes from the public SSM parameters AWS and Canonical publish. moto has none of those
parameters (and forbids creating `/aws/...` names), so the resolver is injectable and the sandbox
picks one of moto's own images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from remotefit.errors import UserError, aws_error_code

# GPU nodes: an AWS Deep Learning AMI line (NVIDIA driver, CUDA and PyTorch preinstalled: nothing heavy
# happens at boot), chosen by `gpu_image` in invoke.yaml (config.Defaults) and resolved through AWS's
# public parameter; CPU nodes: Canonical's stock Ubuntu 24.04.
DLAMI_PARAMETER = "/aws/service/deeplearning/ami/x86_64/{line}/latest/ami-id"
CPU_PARAMETER = "/aws/service/canonical/ubuntu/server/24.04/stable/current/amd64/hvm/ebs-gp3/ami-id"
# PyTorch 2.12 on Ubuntu 24.04: the newest x86_64 OSS-driver PyTorch line on Ubuntu 24.04 when this was
# set (2.9's patch support ended 2026-10-15, see AWS's DLAMI support policy). Move it when AWS ends it.
DEFAULT_GPU_IMAGE = "oss-nvidia-driver-gpu-pytorch-2.12-ubuntu-24.04"
# Where each image keeps the Python that already has PyTorch (the job venv sees its packages).
DLAMI_PYTORCH_PYTHON = "/opt/pytorch/bin/python3"
SYSTEM_PYTHON = "/usr/bin/python3"


def ssm_parameter(profile: str, gpu_image: str) -> str:
    """The public SSM parameter that names the current AMI of the profile's image."""
    return DLAMI_PARAMETER.format(line=gpu_image) if profile == "gpu" else CPU_PARAMETER


def node_python(profile: str, gpu_image: str) -> str:
    """PyTorch DLAMIs keep PyTorch's Python in /opt/pytorch; other images (base DLAMI, Ubuntu) in /usr/bin."""
    return DLAMI_PYTORCH_PYTHON if profile == "gpu" and "-pytorch-" in gpu_image else SYSTEM_PYTHON


# The parameters of the default images.
SSM_PARAMETERS = {"gpu": ssm_parameter("gpu", DEFAULT_GPU_IMAGE), "cpu": CPU_PARAMETER}


@dataclass(frozen=True)
class Ami:
    id: str
    ssh_user: str
    python: str
    source: str


class AmiResolver(Protocol):
    def source(self, profile: str) -> str | None: ...

    def resolve(self, profile: str) -> Ami: ...


class SsmAmiResolver:
    """Real AWS: read the public SSM parameter for the profile."""

    def __init__(self, ssm: Any, gpu_image: str = DEFAULT_GPU_IMAGE) -> None:
        self.ssm = ssm
        self.gpu_image = gpu_image

    def source(self, profile: str) -> str | None:
        """What a pin of this profile must have come from (a changed `gpu_image` re-resolves it)."""
        return "ssm:" + ssm_parameter(profile, self.gpu_image)

    def resolve(self, profile: str) -> Ami:
        from botocore.exceptions import BotoCoreError, ClientError

        name = ssm_parameter(profile, self.gpu_image)
        try:
            value = self.ssm.get_parameter(Name=name)["Parameter"]["Value"]
        except (ClientError, BotoCoreError) as exc:
            code = aws_error_code(exc)
            if code == "ParameterNotFound" and profile == "gpu":
                raise UserError(
                    f"invoke.yaml: remotefit.gpu_image={self.gpu_image!r}: AWS publishes no image line of that "
                    f"name ({name} not found); list the current ones with `aws ssm get-parameters-by-path "
                    "--path /aws/service/deeplearning/ami/x86_64 --query 'Parameters[].Name'`"
                ) from None
            raise UserError(f"could not resolve the {profile} AMI from SSM parameter {name}: {exc}") from None
        python = node_python(profile, self.gpu_image)
        return Ami(id=value, ssh_user="ubuntu", python=python, source=f"ssm:{name}")


class ImageListResolver:
    """Sandbox: moto ships a list of public images; take a stable one (the first Ubuntu, else the first)."""

    def __init__(self, ec2: Any, gpu_image: str = DEFAULT_GPU_IMAGE) -> None:
        self.ec2 = ec2
        self.gpu_image = gpu_image

    def source(self, profile: str) -> str | None:
        return None  # moto's image list does not change under a pin

    def resolve(self, profile: str) -> Ami:
        images = sorted(self.ec2.describe_images(Owners=["amazon"])["Images"], key=lambda i: i["ImageId"])
        if not images:
            raise UserError("the sandbox has no machine images; restart it with `inv sandbox.down sandbox.up`")
        ubuntu = [i for i in images if "ubuntu" in i.get("Name", "").lower()]
        img = (ubuntu or images)[0]
        # The Python the real image would have: a container node boots the image that has it (sandbox_image's
        # dl variant keeps PyTorch in /opt/pytorch); a loopback node runs this machine's instead.
        python = node_python(profile, self.gpu_image)
        return Ami(id=img["ImageId"], ssh_user="ubuntu", python=python, source=f"sandbox image {img.get('Name')}")

"""The GPU image line is a setting (invoke.yaml `remotefit.gpu_image`) with a supported default, resolved
through AWS's public SSM parameter (checked with botocore's Stubber), and a changed setting re-resolves
the pinned AMI."""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import pytest
from botocore.stub import Stubber

from remotefit import ami
from remotefit.config import Defaults, Settings, load_defaults
from remotefit.errors import UserError
from remotefit.nodes import terraform_dir
from remotefit.workspace import Workspace

SETTINGS_KEYS = ("AWS_ACCOUNT", "AWS_REGION", "STAGE", "TF_STATE_BUCKET", "AWS_PROFILE", "TARGET")


def test_default_line_is_a_supported_pytorch_dlami() -> None:
    line = Defaults().gpu_image
    assert line == "oss-nvidia-driver-gpu-pytorch-2.12-ubuntu-24.04"
    assert ami.ssm_parameter("gpu", line) == (
        "/aws/service/deeplearning/ami/x86_64/oss-nvidia-driver-gpu-pytorch-2.12-ubuntu-24.04/latest/ami-id"
    )
    assert ami.ssm_parameter("cpu", line) == (
        "/aws/service/canonical/ubuntu/server/24.04/stable/current/amd64/hvm/ebs-gp3/ami-id"
    )


@pytest.mark.parametrize(
    "bad", ["pytorch 2.9", "oss-nvidia-driver-gpu-pytorch-2.12-al2023", "/aws/service/x/ami-id", ""]
)
def test_bad_gpu_image_is_one_line(bad: str) -> None:
    with pytest.raises(UserError) as exc:
        load_defaults({"gpu_image": bad})
    msg = exc.value.message
    assert msg.startswith(f"invoke.yaml: remotefit.gpu_image={bad!r}: must name an Ubuntu Deep Learning AMI line")
    assert "\n" not in msg and "Value error" not in msg


def stubbed_ssm(name: str, value: str | None) -> tuple[object, Stubber]:
    ssm = boto3.client("ssm", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
    stub = Stubber(ssm)
    if value is None:
        stub.add_client_error("get_parameter", "ParameterNotFound", expected_params={"Name": name})
    else:
        stub.add_response(
            "get_parameter", {"Parameter": {"Name": name, "Value": value, "Type": "String"}}, {"Name": name}
        )
    stub.activate()
    return ssm, stub


@pytest.mark.parametrize(
    ("line", "python"),
    [
        ("oss-nvidia-driver-gpu-pytorch-2.11-ubuntu-24.04", "/opt/pytorch/bin/python3"),
        ("base-oss-nvidia-driver-gpu-ubuntu-24.04", "/usr/bin/python3"),
    ],
)
def test_resolver_asks_for_the_configured_line(line: str, python: str) -> None:
    name = f"/aws/service/deeplearning/ami/x86_64/{line}/latest/ami-id"
    ssm, stub = stubbed_ssm(name, "ami-0123456789abcdef0")
    got = ami.SsmAmiResolver(ssm, line).resolve("gpu")
    stub.assert_no_pending_responses()
    assert got == ami.Ami("ami-0123456789abcdef0", "ubuntu", python, f"ssm:{name}")


def test_unknown_line_names_the_setting() -> None:
    line = "oss-nvidia-driver-gpu-pytorch-9.99-ubuntu-24.04"
    ssm, _ = stubbed_ssm(ami.ssm_parameter("gpu", line), None)
    with pytest.raises(UserError) as exc:
        ami.SsmAmiResolver(ssm, line).resolve("gpu")
    assert exc.value.message.startswith(f"invoke.yaml: remotefit.gpu_image={line!r}: AWS publishes no image line")
    assert "get-parameters-by-path" in exc.value.message


def test_changed_setting_re_resolves_the_pin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for k in SETTINGS_KEYS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("REMOTEFIT_GENERATED", str(tmp_path / "generated"))
    settings = Settings(AWS_ACCOUNT="a", AWS_REGION="us-east-1", STAGE="t", TF_STATE_BUCKET="remotefit-t", TARGET="aws")

    def pin(line: str, ami_id: str | None) -> dict:
        ws = Workspace(root=tmp_path, defaults={"gpu_image": line}, settings=settings)
        ssm, stub = stubbed_ssm(ami.ssm_parameter("gpu", line), ami_id) if ami_id else stubbed_ssm("unused", "x")
        monkeypatch.setattr(ws, "ami_resolver", lambda: ami.SsmAmiResolver(ssm, line))
        return terraform_dir._pinned_ami(ws, "gpu", refresh=False)

    old, new = "oss-nvidia-driver-gpu-pytorch-2.11-ubuntu-24.04", "oss-nvidia-driver-gpu-pytorch-2.12-ubuntu-24.04"
    assert pin(old, "ami-old")["id"] == "ami-old"
    assert pin(old, None)["id"] == "ami-old"  # pinned: SSM is not asked again ("latest" moving changes nothing)
    assert pin(new, "ami-new")["id"] == "ami-new"  # the setting changed: resolved again
    pins = json.loads((tmp_path / "generated" / "ami_pins.json").read_text())
    assert pins["us-east-1/gpu/aws"]["source"] == f"ssm:{ami.ssm_parameter('gpu', new)}"

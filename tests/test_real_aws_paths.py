"""The real-AWS side of every place the code branches on the sandbox (docs/sandbox-branches.md), with
stubbed answers: the public-IP lookup (a working, a failing and a lying service), the SSM AMI resolver
(moto's SSM with the public parameters seeded, and botocore Stubber for errors), the Deep Learning AMI's
Python reaching the node record and the job's PATH, the IMDS address in user data, and the endpoint-free
environment, clients, tfvars and backend config. Nothing here starts a sandbox or reaches AWS."""

from __future__ import annotations

import json
import re
import socket
import threading
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from botocore.stub import Stubber
from moto import mock_aws

from remotefit import ami, jobs, nodes, stack
from remotefit.config import Settings, kept_dir, load_settings
from remotefit.errors import UserError
from remotefit.nodes import provision, terraform_dir
from remotefit.workspace import Workspace

ROOT = Path(__file__).resolve().parent.parent
SETTINGS_KEYS = ("AWS_ACCOUNT", "AWS_REGION", "STAGE", "TF_STATE_BUCKET", "AWS_PROFILE", "TARGET")
GPU_PARAM, CPU_PARAM = ami.SSM_PARAMETERS["gpu"], ami.SSM_PARAMETERS["cpu"]


def aws_ws(tmp_path: Path, **defaults: Any) -> Workspace:
    settings = Settings(
        AWS_ACCOUNT="acct",
        AWS_REGION="us-east-1",
        STAGE="prod",
        TF_STATE_BUCKET="remotefit-prod-state",
        TARGET="aws",
    )
    return Workspace(root=tmp_path, defaults=defaults, settings=settings)


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for k in SETTINGS_KEYS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("REMOTEFIT_GENERATED", str(tmp_path / "generated"))
    monkeypatch.setenv("REMOTEFIT_HOME", str(tmp_path / "home"))
    for k in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(k, raising=False)
    # moto and Stubber need credentials to sign with; none of them are real
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)


def no_sandbox(tmp_path: Path) -> None:
    for where in (tmp_path / "generated" / "sandbox", kept_dir(tmp_path / "generated") / "sandbox"):
        assert not where.exists(), "the AWS path must never start the sandbox"


# -- the public-IP lookup ----------------------------------------------------------------------
@pytest.fixture
def ip_service():
    """A local stand-in for checkip.amazonaws.com whose answer each test sets."""
    state = SimpleNamespace(status=200, body=b"", hits=0)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            state.hits += 1
            self.send_response(state.status)
            self.end_headers()
            self.wfile.write(state.body)

        def log_message(self, *args: Any) -> None:
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    state.url = f"http://127.0.0.1:{srv.server_port}/"
    yield state
    srv.shutdown()
    srv.server_close()


def test_public_ip_becomes_a_slash_32_asked_once(tmp_path: Path, ip_service) -> None:
    ip_service.body = b"52.94.76.10\n"
    ws = aws_ws(tmp_path, caller_ip_url=ip_service.url)
    assert ws.caller_cidr() == "52.94.76.10/32"
    assert ws.caller_cidr() == "52.94.76.10/32"
    assert ip_service.hits == 1  # apply's pre-flight and every fallback candidate reuse it
    assert ws.caller_cidr("198.51.100.0/24") == "198.51.100.0/24" and ip_service.hits == 1
    no_sandbox(tmp_path)


def test_a_failing_service_is_one_line_naming_allow_cidr(tmp_path: Path, ip_service) -> None:
    ip_service.status, ip_service.body = 503, b"busy"
    with pytest.raises(UserError) as exc:
        aws_ws(tmp_path, caller_ip_url=ip_service.url).caller_cidr()
    msg = exc.value.message
    assert f"could not find this machine's public IP from {ip_service.url}" in msg and "--allow-cidr" in msg
    assert "\n" not in msg


def test_an_unreachable_service_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(UserError) as exc:
        aws_ws(tmp_path, caller_ip_url=f"http://127.0.0.1:{port}/").caller_cidr()
    assert "pass --allow-cidr YOUR.IP.ADDR.ESS/32" in exc.value.message


@pytest.mark.parametrize(
    "answer",
    [
        b"<html>rate limited</html>",  # garbage
        b"",  # nothing
        b"10.1.2.3",  # private: a proxy or NAT box answering for itself
        b"192.168.0.7\n",
        b"100.64.3.4",  # carrier-grade NAT
        b"127.0.0.1",
        b"169.254.169.254",
        b"0.0.0.0",  # would become 0.0.0.0/32, but never this machine
        b"2600:1f18:4c2::17",  # IPv6: the security group rule is IPv4 (cidr_ipv4)
    ],
)
def test_a_lying_service_is_refused(tmp_path: Path, ip_service, answer: bytes) -> None:
    ip_service.body = answer
    with pytest.raises(UserError) as exc:
        aws_ws(tmp_path, caller_ip_url=ip_service.url).caller_cidr()
    msg = exc.value.message
    assert "--allow-cidr" in msg and "\n" not in msg, msg
    assert ip_service.url in msg


def test_the_sandbox_never_asks_the_service(tmp_path: Path, ip_service, monkeypatch) -> None:
    """The SSH rule's source on the sandbox is where its nodes see this machine: 127.0.0.1 for loopback nodes,
    the bridge's gateway for booted ones; never this machine's public address."""
    from remotefit.sandbox import NODES_ENV

    ws = aws_ws(tmp_path, caller_ip_url=ip_service.url)
    ws.__dict__["endpoint"] = "http://127.0.0.1:1"  # as if the sandbox were up (cached_property)
    mode = ws.sandbox.node_mode()[0]  # this machine's own, as the suite runs it
    assert ws.caller_cidr() == ws.sandbox.caller_cidr() and ip_service.hits == 0
    if mode == "container":
        from remotefit import sandbox_machine

        assert ws.caller_cidr() == f"{sandbox_machine.gateway(sandbox_machine.bridge_network())}/32"
    monkeypatch.setenv(NODES_ENV, "loopback")
    assert ws.caller_cidr() == "127.0.0.1/32" and ip_service.hits == 0


def test_only_sandbox_jobs_get_a_short_openmp_spin_and_a_share_of_the_threads(tmp_path: Path, monkeypatch) -> None:
    """A real node is the job's own (OpenMP's defaults are right there); sandbox nodes share this machine's
    cores, where long-spinning threads burn the CPU the others need (bench/bench_omp.py), and where several
    sandboxes at once each get the threads REMOTEFIT_SANDBOX_THREADS says."""
    from remotefit.sandbox import THREADS_ENV

    monkeypatch.setenv(THREADS_ENV, "1")
    ws = aws_ws(tmp_path)
    assert ws.job_env_defaults() == {}
    ws.settings = ws.settings.model_copy(update={"TARGET": "sandbox"})
    assert ws.job_env_defaults() == {"GOMP_SPINCOUNT": "10000", "OMP_NUM_THREADS": "1"}
    monkeypatch.delenv(THREADS_ENV)
    assert ws.job_env_defaults() == {"GOMP_SPINCOUNT": "10000"}
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv(THREADS_ENV, bad)
        with pytest.raises(UserError, match=f"REMOTEFIT_SANDBOX_THREADS='{bad}' is not a whole number of threads"):
            ws.job_env_defaults()


# -- the SSM AMI resolver ----------------------------------------------------------------------
def seed_public_parameters(values: dict[str, str], region: str = "us-east-1") -> None:
    """moto refuses PutParameter under /aws/ (as AWS does), so write the public parameters into its backend."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.ssm.models import Parameter, ssm_backends

    params = ssm_backends[DEFAULT_ACCOUNT_ID][region]._parameters
    for name, value in values.items():
        params[name].append(
            Parameter(
                account_id=DEFAULT_ACCOUNT_ID,
                name=name,
                value=value,
                parameter_type="String",
                description=None,
                allowed_pattern=None,
                keyid=None,
                last_modified_date=datetime.now(UTC),
                version=1,
                data_type="aws:ec2:image",
            )
        )


@mock_aws
def test_ssm_resolver_reads_the_public_parameters(tmp_path: Path) -> None:
    ws = aws_ws(tmp_path)
    with pytest.raises(Exception, match="reserved parameter name"):  # what AWS also says to a user
        ws.client("ssm").put_parameter(Name=GPU_PARAM, Value="ami-0aaaaaaaaaaaaaaaa", Type="String")
    seed_public_parameters({GPU_PARAM: "ami-0aaaaaaaaaaaaaaaa", CPU_PARAM: "ami-0bbbbbbbbbbbbbbbb"})
    resolver = ws.ami_resolver()
    assert isinstance(resolver, ami.SsmAmiResolver)
    assert resolver.resolve("gpu") == ami.Ami(
        "ami-0aaaaaaaaaaaaaaaa", "ubuntu", "/opt/pytorch/bin/python3", f"ssm:{GPU_PARAM}"
    )
    assert resolver.resolve("cpu") == ami.Ami("ami-0bbbbbbbbbbbbbbbb", "ubuntu", "/usr/bin/python3", f"ssm:{CPU_PARAM}")
    no_sandbox(tmp_path)


@mock_aws
def test_ssm_parameter_missing_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(UserError) as exc:
        aws_ws(tmp_path).ami_resolver().resolve("gpu")
    msg = exc.value.message
    # A GPU line AWS does not publish names the setting that chose it (invoke.yaml gpu_image).
    assert msg.startswith("invoke.yaml: remotefit.gpu_image=") and f"({GPU_PARAM} not found)" in msg, msg
    assert "\n" not in msg


def test_ssm_access_denied_is_one_line(tmp_path: Path) -> None:
    ssm = aws_ws(tmp_path).client("ssm")
    with Stubber(ssm) as stub:
        stub.add_client_error(
            "get_parameter", "AccessDeniedException", "not allowed", expected_params={"Name": CPU_PARAM}
        )
        with pytest.raises(UserError) as exc:
            ami.SsmAmiResolver(ssm).resolve("cpu")
    assert f"SSM parameter {CPU_PARAM}" in exc.value.message and "AccessDeniedException" in exc.value.message


def test_the_resolved_ami_is_pinned_per_region_and_target(tmp_path: Path) -> None:
    ws = aws_ws(tmp_path)
    ssm = ws.client("ssm")
    ws.ami_resolver = lambda: ami.SsmAmiResolver(ssm)  # type: ignore[method-assign]
    answer = {"Parameter": {"Name": GPU_PARAM, "Type": "String", "Value": "ami-0ccccccccccccccc1", "Version": 3}}
    with Stubber(ssm) as stub:
        stub.add_response("get_parameter", answer, {"Name": GPU_PARAM})  # exactly one call
        first = terraform_dir._pinned_ami(ws, "gpu", refresh=False)
        again = terraform_dir._pinned_ami(ws, "gpu", refresh=False)  # "latest" moving never replaces a node
        stub.assert_no_pending_responses()
    assert (
        first
        == again
        == {
            "id": "ami-0ccccccccccccccc1",
            "ssh_user": "ubuntu",
            "python": "/opt/pytorch/bin/python3",
            "source": f"ssm:{GPU_PARAM}",
        }
    )
    pins = json.loads((tmp_path / "generated" / "ami_pins.json").read_text())
    assert list(pins) == ["us-east-1/gpu/aws"]  # never mixed up with a sandbox pin (keyed by its endpoint)


# -- the Deep Learning AMI's Python on the node ---------------------------------------------------
@mock_aws
def test_dlami_python_reaches_the_node_record_and_the_job_path(tmp_path: Path) -> None:
    ws = aws_ws(tmp_path)
    seed_public_parameters({GPU_PARAM: "ami-0aaaaaaaaaaaaaaaa"})
    pin = terraform_dir._pinned_ami(ws, "gpu", refresh=False)
    (tmp_path / "generated" / "node_vars.json").write_text(json.dumps({"ami_id": pin["id"], "max_hours": 8}))
    ec2 = ws.client("ec2")
    image = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    iid = ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1, InstanceType="g5.xlarge")["Instances"][0][
        "InstanceId"
    ]
    out = {
        "ssh_user": "ubuntu",
        "nodes": [
            {
                "id": iid,
                "public_ip": "54.210.1.2",
                "private_ip": "172.31.7.8",
                "instance_type": "g5.xlarge",
                "market": "on-demand",
                "availability_zone": "us-east-1a",
            }
        ],
    }
    (node,) = provision._record_nodes(ws, SimpleNamespace(output=lambda: out))
    # real AWS: the public address on port 22, the image's user, the image's PyTorch Python
    assert (node.host, node.port, node.user, node.private_ip) == ("54.210.1.2", 22, "ubuntu", "172.31.7.8")
    assert node.workdir == "/home/ubuntu/remotefit"
    assert node.python == "/opt/pytorch/bin/python3"
    assert nodes.inventory(ws) == [node]
    cfg = (tmp_path / "generated" / "ssh_config").read_text()
    assert "HostName 54.210.1.2" in cfg and "Port 22" in cfg and f"HostKeyAlias {iid}" in cfg
    # the runner runs with that Python, and its shims make the job's `python` that Python (on a stock
    # node's PATH: nothing puts /opt/pytorch/bin itself first)
    t = jobs.SshTransport(node, tmp_path / "generated" / "ssh_config")
    job = jobs.Job(path=tmp_path, name="j", command="python train.py")
    line = jobs.start_command(t)
    assert "/opt/pytorch/bin/python3 -S /home/ubuntu/remotefit/.remotefit/runner.py start" in line
    assert "PATH=" not in line
    assert jobs.start_request(job, "j-1", "python train.py", gpu=True)["check_cuda"] is True
    no_sandbox(tmp_path)


# -- the watchdog's IMDS address in user data --------------------------------------------------
def test_user_data_points_the_watchdog_at_the_real_imds() -> None:
    text = (ROOT / "templates" / "user_data.sh.tftpl").read_text()
    body = text.split("<<REMOTEFIT_CONFIG_EOF\n", 1)[1].split("\nREMOTEFIT_CONFIG_EOF", 1)[0]
    body = re.sub(r'"deadline_epoch": [^,]+,', '"deadline_epoch": 0,', body)
    body = body.replace("${idle_minutes}", "30").replace("${ssh_user}", "ubuntu")
    from remotefit.node import contract

    cfg = contract.watchdog_config(**json.loads(body))  # the user data writes what differs from the defaults
    assert cfg["imds"] == "http://169.254.169.254"  # the sandbox gives its watchdog 127.0.0.1:9 instead
    assert cfg["shutdown_cmd"] == ["shutdown", "-h", "now"]  # the sandbox terminates through moto instead
    assert cfg["base"] == "/home/ubuntu/remotefit"


# -- no endpoint anywhere on AWS ---------------------------------------------------------------
@mock_aws
def test_aws_env_clients_tfvars_and_backend_have_no_endpoint(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("AWS_PROFILE", "team")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws_config"))
    (tmp_path / "aws_config").write_text("[profile team]\nregion = us-east-1\n")
    # AWS_PROFILE only in the environment: load_settings lays it over aws_env_vars, as `inv` does.
    (tmp_path / "aws_env_vars").write_text(
        "AWS_ACCOUNT=acct\nAWS_REGION=us-east-1\nSTAGE=prod\nTF_STATE_BUCKET=remotefit-prod-state\nTARGET=aws\n"
    )
    ws = Workspace(root=tmp_path, defaults={}, settings=load_settings(tmp_path))
    assert ws.settings.AWS_PROFILE == "team"
    assert ws.endpoint is None
    env = ws.aws_env()
    assert env == {"AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1", "AWS_PROFILE": "team"}
    s3 = ws.client("s3")
    assert re.fullmatch(r"https://s3(\.us-east-1)?\.amazonaws\.com", s3.meta.endpoint_url), s3.meta.endpoint_url
    assert (s3.meta.config.s3 or {}).get("addressing_style") != "path"
    values = stack.backend_values(ws)
    assert values == {
        "bucket": "remotefit-prod-state",
        "key": "remotefit/prod/terraform.tfstate",
        "region": "us-east-1",
        "use_lockfile": True,
        "encrypt": True,
        "profile": "team",
    }
    tfvars = stack.write_tfvars(ws, {}).read_text()
    assert re.search(r"^aws_endpoint\s*=\s*null$", tfvars, re.M), tfvars
    assert ws.supports("placement_groups") and ws.supports("tls_bucket_policy") and ws.supports("gpu_driver")
    no_sandbox(tmp_path)


@mock_aws
def test_several_nodes_get_a_cluster_placement_group_on_aws(tmp_path: Path) -> None:
    ws = aws_ws(tmp_path)
    seed_public_parameters({CPU_PARAM: "ami-0bbbbbbbbbbbbbbbb"})
    spec = nodes.resolve_spec(ws, nodes=2, allow_cidr="203.0.113.7/32")
    values = nodes.node_variables(ws, spec, "us-east-1a", spec.instance_type, spec.market)
    assert values["cluster_placement"] is True and values["ami_id"] == "ami-0bbbbbbbbbbbbbbbb"
    assert values["allow_cidr"] == "203.0.113.7/32" and values["allow_world_ssh"] is False
    no_sandbox(tmp_path)


# -- what a spot node has cost: the spot price, as apply printed it --------------------------------
def _node(index: int, iid: str, itype: str, market: str, launched: datetime) -> Any:
    from remotefit.ssh import Node

    return Node(
        index,
        f"rf-prod-{index}",
        iid,
        "54.0.0.1",
        22,
        "ubuntu",
        "172.31.0.1",
        "/w",
        "python3",
        itype,
        market,
        "us-east-1a",
        launched.isoformat(),
    )


def test_status_and_destroy_price_spot_nodes_at_the_spot_price(tmp_path: Path, monkeypatch) -> None:
    from datetime import timedelta

    ws = aws_ws(tmp_path)
    now = datetime.now(UTC)  # _spent reads the clock itself
    launched = now - timedelta(minutes=30)
    spot = _node(0, "i-0000000000000000a", "c7i.8xlarge", "spot", launched)
    demand = _node(1, "i-0000000000000000b", "c7i.xlarge", "on-demand", launched)
    nodes.write_inventory(ws, [spot, demand])
    (tmp_path / "generated" / "node_vars.json").write_text(json.dumps({"max_hours": 8}))
    ec2 = ws.client("ec2")
    monkeypatch.setattr(ws, "client", lambda service, region=None: ec2)
    monkeypatch.setattr(terraform_dir, "read_state", lambda ws: None)  # no state in the bucket: the local records hold
    instances = [
        {"InstanceId": n.instance_id, "State": {"Name": "running", "Code": 16}, "LaunchTime": launched}
        for n in (spot, demand)
    ]
    history = {
        "SpotPriceHistory": [
            {
                "AvailabilityZone": az,
                "InstanceType": "c7i.8xlarge",
                "ProductDescription": "Linux/UNIX",
                "SpotPrice": price,
                "Timestamp": now - timedelta(minutes=5),
            }
            for az, price in (("us-east-1a", "0.5100"), ("us-east-1b", "0.4900"))
        ]
    }
    with Stubber(ec2) as stub:
        stub.add_response("describe_instances", {"Reservations": [{"Instances": instances}]})
        stub.add_response("describe_spot_price_history", history)  # once: the on-demand node asks nobody
        rows = {r["node"]: r for r in nodes.status_rows(ws, now=now)}
        stub.add_response("describe_spot_price_history", history)
        total = provision._spent(ws, [spot, demand])
        stub.assert_no_pending_responses()
    # Each node at its own price plus its public IPv4 address ($0.005/h; no disk_gb recorded here):
    # the spot node at the spot price of the AZ it runs in (us-east-1a: 0.51, not the cheaper 1b's 0.49).
    assert rows["rf-prod-0"]["cost so far"] == "$0.26"  # (0.51 + 0.005) $/h × 0.5 h
    assert rows["rf-prod-1"]["cost so far"] == "$0.09"  # (0.1785 list price + 0.005) $/h × 0.5 h
    assert rows["rf-prod-0"]["deadline in"] == "7.5 h"
    assert total is not None and abs(total - (0.515 + 0.1835) * 0.5) < 0.01  # a few seconds after `now`: ≈

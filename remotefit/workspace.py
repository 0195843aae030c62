"""A Workspace ties the validated settings, the tool defaults and the paths to the cloud they target.

This is the one place that knows about TARGET: on the sandbox it starts the moto server on demand and
hands its endpoint and test credentials to boto3, the AWS CLI and Terraform. Nothing else branches on
the target.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import os
import sys
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from remotefit.config import Defaults, Paths, Settings, load_defaults, load_settings
from remotefit.errors import UserError
from remotefit.sandbox import SANDBOX_REGION_CREDENTIALS, Sandbox

if TYPE_CHECKING:
    from remotefit.ami import AmiResolver

# Set to a file path to append one JSON line per AWS call made through `Workspace.client` (service,
# operation, the parameters that name resources): the IAM policy coverage test reads it.
CALL_LOG_ENV = "REMOTEFIT_AWS_CALL_LOG"
_LOGGED_PARAMS = ("Bucket", "Key", "Resources", "Tags", "TagSpecifications", "InstanceIds", "Name", "RoleName")
# What the moto server does not implement (each is skipped on the sandbox, and only there).
SANDBOX_GAPS = frozenset({"placement_groups", "tls_bucket_policy", "gpu_driver"})


@dataclass(frozen=True)
class Reach:
    host: str
    port: int
    user: str
    workdir: str
    private_host: str | None = None
    python: str | None = None


class Workspace:
    """Settings + defaults + paths, and lazily the endpoint and AWS clients that follow from them."""

    def __init__(
        self,
        root: Path | str | None = None,
        defaults: dict[str, Any] | Defaults | None = None,
        settings: Settings | None = None,
    ) -> None:
        self.paths = Paths.at(root)
        self.settings = settings or load_settings(self.paths.root)
        self.defaults = defaults if isinstance(defaults, Defaults) else load_defaults(defaults)
        self._identity: dict[str, str] | None = None
        self._public_cidr: str | None = None
        self._default_subnets: dict[str, bool] | None = None

    @property
    def stage(self) -> str:
        return self.settings.STAGE

    @cached_property
    def sandbox(self) -> Sandbox:
        return Sandbox(self.paths.sandbox_dir)

    @cached_property
    def endpoint(self) -> str | None:
        """The API endpoint every client uses: the sandbox's moto server, or None for real AWS."""
        return self.sandbox.up().endpoint if self.settings.is_sandbox else None

    def aws_env(self) -> dict[str, str]:
        """Environment for child processes (terraform, aws CLI) so they reach the same cloud we do."""
        env = {"AWS_REGION": self.settings.AWS_REGION, "AWS_DEFAULT_REGION": self.settings.AWS_REGION}
        if self.settings.AWS_PROFILE:
            env["AWS_PROFILE"] = self.settings.AWS_PROFILE
        if self.endpoint:
            env |= {"AWS_ENDPOINT_URL": self.endpoint, **SANDBOX_REGION_CREDENTIALS}
        return env

    @cached_property
    def _session(self) -> Any:
        import boto3

        kwargs: dict[str, Any] = {"region_name": self.settings.AWS_REGION}
        if self.endpoint:
            kwargs |= {
                "aws_access_key_id": SANDBOX_REGION_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                "aws_secret_access_key": SANDBOX_REGION_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            }
        elif self.settings.AWS_PROFILE:
            kwargs["profile_name"] = self.settings.AWS_PROFILE
        try:
            return boto3.Session(**kwargs)
        except Exception as exc:  # botocore's ProfileNotFound and friends
            raise UserError(f"aws_env_vars: AWS_PROFILE: {exc}; fix the profile name or run `aws configure`") from None

    def client(self, service: str, region: str | None = None) -> Any:
        """A boto3 client for `service`, pointed at the sandbox when that is the target."""
        from botocore.config import Config

        cfg = Config(
            retries={"mode": "standard", "max_attempts": 4},
            connect_timeout=5,
            read_timeout=60,
            s3={"addressing_style": "path"} if self.endpoint else {},
        )
        client = self._session.client(
            service, region_name=region or self.settings.AWS_REGION, endpoint_url=self.endpoint, config=cfg
        )
        log = os.environ.get(CALL_LOG_ENV)
        if log:
            client.meta.events.register("provide-client-params.*.*", functools.partial(_log_call, Path(log)))
        return client

    def caller_identity(self) -> dict[str, str]:
        """STS GetCallerIdentity (asked once per Workspace: apply's pre-flight and every capacity
        fallback need it), with missing or expired credentials turned into one clear line."""
        if self._identity is None:
            self._identity = self._ask_identity()
        return self._identity

    def _ask_identity(self) -> dict[str, str]:
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        try:
            ident = self.client("sts").get_caller_identity()
        except NoCredentialsError:
            raise UserError(
                "no AWS credentials found: set AWS_PROFILE in aws_env_vars, or run `aws configure` "
                "(or `aws sso login`), then `inv check`"
            ) from None
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("ExpiredToken", "ExpiredTokenException", "RequestExpired"):
                raise UserError("your AWS credentials have expired: refresh them (`aws sso login`)") from None
            raise UserError(f"AWS rejected the credentials ({code}): check AWS_PROFILE in aws_env_vars") from None
        except BotoCoreError as exc:
            raise UserError(f"cannot reach AWS STS: {exc}") from None
        return {k: ident[k] for k in ("Account", "Arn", "UserId")}

    def default_subnets(self) -> dict[str, bool]:
        """{AZ: gives public IPv4 on launch} for the default subnets of the region's default VPC (asked once).

        Accounts created before 2013-12 or cleaned up by hand may have no default VPC, or lack the
        default subnet of an AZ: one line says how to create them."""
        if self._default_subnets is None:
            ec2 = self.client("ec2")
            region = self.settings.AWS_REGION
            vpcs = ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}]).get("Vpcs", [])
            if not vpcs:
                raise UserError(
                    f"the account has no default VPC in {region}, which remotefit launches into: "
                    f"create one with `aws ec2 create-default-vpc --region {region}`"
                )
            subnets = ec2.describe_subnets(
                Filters=[
                    {"Name": "vpc-id", "Values": [vpcs[0]["VpcId"]]},
                    {"Name": "default-for-az", "Values": ["true"]},
                ]
            ).get("Subnets", [])
            self._default_subnets = {s["AvailabilityZone"]: bool(s.get("MapPublicIpOnLaunch")) for s in subnets}
        return self._default_subnets

    def tags(self) -> dict[str, str]:
        """Tags on everything we create: how `destroy` verifies and `gc` finds what is ours."""
        return {
            "project": "remotefit",
            "stage": self.stage,
            "account-name": self.settings.AWS_ACCOUNT,
            "managed-by": "remotefit",
        }

    def job_env_defaults(self) -> dict[str, str]:
        """What every job's environment starts from on this target; job.toml's [env] overrides it. Sandbox
        nodes share this machine's cores with each other and with it, where OpenMP threads spinning 300,000
        times between parallel regions (libgomp's default, PyTorch's OpenMP on Linux) burn the CPU the rest
        needs: beside two busy processes the CPU resnet job took 1.5x the wall time and 1.6x the CPU
        (bench/bench_omp.py), while a short spin was as fast on an idle machine. A real node is the job's
        own, so it keeps OpenMP's default. $REMOTEFIT_SANDBOX_THREADS also sets OMP_NUM_THREADS, where
        several sandboxes share the cores (sandbox.job_threads)."""
        if not self.settings.is_sandbox:
            return {}
        from remotefit.sandbox import job_threads

        threads = job_threads()
        return {"GOMP_SPINCOUNT": "10000"} | ({"OMP_NUM_THREADS": str(threads)} if threads else {})

    def caller_cidr(self, override: str | None = None, i_know: bool = False) -> str:
        """The only CIDR allowed to reach SSH: --allow-cidr, or this machine's public address."""
        if override:
            return check_cidr(override, i_know)
        if self.endpoint:
            # Loopback nodes see us at 127.0.0.1; container nodes at the bridge's gateway (the VPC router).
            return self.sandbox.caller_cidr()
        if self._public_cidr:
            return self._public_cidr  # looked up once per Workspace
        import urllib.request

        url = self.defaults.caller_ip_url
        try:
            with urllib.request.urlopen(url, timeout=5) as r:  # noqa: S310
                answer = r.read(64).decode(errors="replace").strip()
        except (OSError, ValueError):
            raise UserError(
                f"could not find this machine's public IP from {url}; pass --allow-cidr YOUR.IP.ADDR.ESS/32"
            ) from None
        try:
            ip = ipaddress.ip_address(answer)
        except ValueError:
            ip = None
        # The SSH rule is one IPv4 /32 (cidr_ipv4): a private, reserved or IPv6 answer (a proxy or a
        # captive portal speaking for itself) would open the wrong door or none, so refuse it.
        if not isinstance(ip, ipaddress.IPv4Address) or not ip.is_global:
            raise UserError(
                f"{url} answered {answer[:40]!r}, which is not a public IPv4 address; "
                "pass --allow-cidr YOUR.IP.ADDR.ESS/32"
            )
        self._public_cidr = f"{ip}/32"
        return self._public_cidr

    def backend_overrides(self) -> dict[str, object]:
        """What the S3 backend config (generated/backend.hcl) adds for this target: on the sandbox, the moto
        server as its endpoint and the AWS-only checks skipped; on AWS, nothing."""
        if not self.endpoint:
            return {}
        return {
            "endpoints": {"s3": self.endpoint, "sts": self.endpoint},
            "use_path_style": True,
            "skip_credentials_validation": True,
            "skip_requesting_account_id": True,
            "skip_metadata_api_check": True,
            "skip_region_validation": True,
        }

    def supports(self, feature: str) -> bool:
        """Features the moto server lacks, so the sandbox skips them and says so (see sandbox.py)."""
        return not (self.endpoint and feature in SANDBOX_GAPS)

    def reach_node(
        self, instance_id: str, public_ip: str, ssh_user: str, public_key: str, node_vars: dict[str, Any]
    ) -> Reach:
        """How to reach an instance over SSH: its public IP on AWS, a loopback sshd on the sandbox."""
        if not self.endpoint:
            return Reach(public_ip, 22, ssh_user, f"/home/{ssh_user}/remotefit")
        node = self.sandbox.start_node(
            instance_id,
            public_key,
            endpoint=self.endpoint,
            region=self.settings.AWS_REGION,
            max_hours=float(node_vars.get("max_hours", self.defaults.max_hours)),
            idle_minutes=int(node_vars.get("idle_minutes", self.defaults.idle_minutes)),
            ssh_user=ssh_user,
        )
        # A loopback node runs jobs with this machine's Python; a container node has its own, as on EC2.
        python = None if node.mode == "container" else sys.executable
        return Reach(node.host, node.port, node.user, node.workdir, private_host=node.host, python=python)

    def provide_requirements(self, requirements: Path) -> None:
        """Make a job's requirements installable on its nodes: on AWS they come from PyPI; container sandbox
        nodes have no route out, so this machine fetches them into the wheelhouse the nodes read."""
        if self.settings.is_sandbox and any(n.mode == "container" for n in self.sandbox.nodes()):
            from remotefit.sandbox_image import wheels_for

            wheels_for(requirements)

    def forget_unreached(self, keep: set[str], keep_disks: bool = False) -> None:
        """Stop sandbox nodes whose instance is no longer ours (scaled down or destroyed), or whose instance
        was stopped (keep_disks: a container node's disk stays for `inv start`)."""
        if self.settings.is_sandbox:
            for node in self.sandbox.nodes():
                if node.instance_id not in keep:
                    self.sandbox.stop_node(node, keep_disk=keep_disks)

    def ami_resolver(self) -> AmiResolver:
        from remotefit.ami import ImageListResolver, SsmAmiResolver

        if self.endpoint:
            return ImageListResolver(self.client("ec2"), self.defaults.gpu_image)
        return SsmAmiResolver(self.client("ssm"), self.defaults.gpu_image)


def _log_call(path: Path, params: dict[str, Any], model: Any, **_: Any) -> None:
    """botocore hook: one JSON line per call (never a secret: only resource-naming parameters)."""
    line = {
        "service": model.service_model.signing_name,
        "operation": model.name,
        "params": {k: params[k] for k in _LOGGED_PARAMS if k in params},
    }
    with path.open("a") as f:
        f.write(json.dumps(line, default=str) + "\n")


def check_cidr(value: str, i_know: bool = False) -> str:
    """Validate --allow-cidr: a real network, never the whole internet unless explicitly consented."""
    try:
        net = ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise UserError(f"--allow-cidr {value!r} is not a CIDR block; use e.g. 203.0.113.7/32") from None
    if net.prefixlen < 8 and not i_know:
        what = "the whole internet" if net.prefixlen == 0 else f"a /{net.prefixlen} (millions of addresses)"
        raise UserError(
            f"--allow-cidr {value} would open SSH to {what}; use your own /32, or add --i-know if you really mean it"
        )
    return str(net)

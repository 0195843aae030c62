"""The sandbox's moto server, with fixes for moto bugs that make it answer unlike AWS.

The sandbox's server (`python -m remotefit.sandbox moto`, see sandbox.serve_moto) applies them before it
serves; `python -m remotefit.sandbox_moto ARGS` runs plain `moto.server` with them. Each fix is narrow,
named after the AWS behaviour it restores, and tested in tests/test_sandbox_moto.py; none makes moto more
lenient than AWS.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from typing import Any

RESTORE_HEADER = "x-remotefit-sandbox"  # on the laptop's replay requests: they pass a held server's gate
READY_PATH = "/remotefit-sandbox/ready"  # opens the gate once the replay is done
RESTORE_ENVIRON = "HTTP_" + RESTORE_HEADER.upper().replace("-", "_")  # the header, as WSGI hands it over


class RestoreGate:
    """WSGI: with `hold` (a server that is to be restored), every request but the replay's and moto's
    control calls is answered 503 (as AWS answers when it cannot serve now: every SDK retries it) until
    READY_PATH is posted: a node's uploader must never see the empty world of a half-restored server (a
    NoSuchBucket is final for it), nor slip a request in between the replayed ones."""

    def __init__(self, app: Any, hold: bool) -> None:
        self.app = app
        self.open = threading.Event()
        if not hold:
            self.open.set()

    def __call__(self, environ: Any, start_response: Any) -> Any:
        if not self.open.is_set():
            path = environ.get("PATH_INFO", "")
            if path == READY_PATH:
                self.open.set()
                print("sandbox: restored; serving every client again", flush=True)
                start_response("200 OK", [("Content-Type", "text/plain")])
                return [b"ready"]
            if not (environ.get(RESTORE_ENVIRON) == "restore" or path.startswith("/moto-api/")):
                body = b"<Error><Code>ServiceUnavailable</Code><Message>sandbox restoring its state</Message></Error>"
                start_response("503 Service Unavailable", [("Content-Type", "application/xml"), ("Retry-After", "1")])
                return [body]
        return self.app(environ, start_response)


class Serial:
    """WSGI: one request at a time, so moto's recorder logs requests in the order they drew IDs from the
    seeded generator and a replay rebuilds the same IDs (with Terraform's parallel requests interleaving, it
    would not).

    An SDK retry of a call already carried out (its answer lost on a loaded machine) gets that answer again
    instead of running twice: a second AddRoleToInstanceProfile, say, would fail with LimitExceeded and fail
    the apply for a sandbox hiccup. Both SDKs mark retries (amz-sdk-request: attempt=N) and keep one
    amz-sdk-invocation-id across the attempts of one call."""

    KEEP = 256  # retries come within seconds; a few hundred calls is plenty

    def __init__(self, app: Any) -> None:
        self.app = app
        self.lock = threading.Lock()
        self.answered: OrderedDict[str, tuple[str, list[Any], list[bytes]]] = OrderedDict()

    def __call__(self, environ: Any, start_response: Any) -> Any:
        call = environ.get("HTTP_AMZ_SDK_INVOCATION_ID", "")
        retry = re.search(r"attempt=([2-9]|\d\d)", environ.get("HTTP_AMZ_SDK_REQUEST", ""))
        with self.lock:
            if call and retry and call in self.answered:
                status, headers, body = self.answered[call]
                print(
                    f"sandbox: {environ.get('REQUEST_METHOD')} retry of call {call} answered as before ({status})",
                    flush=True,
                )
                start_response(status, headers)
                return body
            seen: dict[str, Any] = {}

            def keep(status: str, headers: list[Any], exc_info: Any = None) -> Any:
                seen.update(status=status, headers=headers)
                return start_response(status, headers, exc_info)

            body = list(self.app(environ, keep))
            if call and str(seen.get("status", "")).startswith("2"):
                self.answered[call] = (seen["status"], seen["headers"], body)
                while len(self.answered) > self.KEEP:
                    self.answered.popitem(last=False)
            return body


def fix_modify_instance_attribute() -> None:
    """ModifyInstanceAttribute with an attribute moto 5 does not handle (the AWS provider sends
    InstanceInitiatedShutdownBehavior right after every launch) falls through to moto's security-group
    handler, which replaces the instance's groups with an empty list. AWS leaves the groups alone and sets
    the attribute; so does this: every later plan then sees the groups the instance really has."""
    from moto.ec2.responses.instances import InstanceResponse

    original = InstanceResponse._security_grp_instance_attribute_handler

    def handler(self: Any) -> bool:
        value = self._get_param("InstanceInitiatedShutdownBehavior.Value")
        if value is not None:
            self.error_on_dryrun()
            instance_id = self._get_param("InstanceId")
            self.ec2_backend.modify_instance_attribute(instance_id, "instance_initiated_shutdown_behavior", value)
            return True
        if not self._get_param("GroupId.1") and not self._get_param("Groups"):
            return False  # not a group change: moto then says it does not implement the attribute
        return bool(original(self))

    InstanceResponse._security_grp_instance_attribute_handler = handler  # type: ignore[method-assign]


def fix_rule_descriptions() -> None:
    """DescribeSecurityGroupRules returns the description of CIDR rules only; a rule that references a
    security group loses its description, so every plan of a 2-node stage showed it as added again."""
    from moto.ec2.models.security_groups import SecurityGroupRule

    def description(self: Any) -> str | None:
        return self.ip_range.get("Description") or self.source_group.get("Description")

    SecurityGroupRule.description = property(description)  # type: ignore[assignment,method-assign]


def slice_private_ips(offset: int) -> None:
    """Not a fix: a sandbox's moto gives private IPs from `offset` addresses into each subnet (after AWS's
    reserved ones) instead of from .4, so two sandboxes on one machine, whose container nodes share one
    bridge, never hand out the same address (sandbox_machine.claim_slot). AWS, too, picks any free
    address of the subnet."""
    from moto.ec2.models.subnets import Subnet

    original = Subnet.get_available_subnet_ip

    def get_available_subnet_ip(self: Any, instance: Any) -> str:
        if not getattr(self, "_remotefit_sliced", False):
            self._remotefit_sliced = True
            hosts = self._base_avail_ip_iterator()  # moto's one (cached) iterator over the subnet
            for _ in range(offset):
                next(hosts, None)
        return str(original(self, instance))

    Subnet.get_available_subnet_ip = get_available_subnet_ip  # type: ignore[method-assign]


def apply_fixes() -> None:
    fix_modify_instance_attribute()
    fix_rule_descriptions()


def main(argv: list[str] | None = None) -> None:
    from moto import server

    apply_fixes()
    server.main(argv)


if __name__ == "__main__":
    main()

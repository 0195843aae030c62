"""The sandbox's moto server, with fixes for moto bugs that make it answer unlike AWS.

The sandbox's server (`python -m remotefit.sandbox moto`, see sandbox.serve_moto) applies them before it
serves; `python -m remotefit.sandbox_moto ARGS` runs plain `moto.server` with them. Each fix is narrow,
named after the AWS behaviour it restores, and tested in tests/test_sandbox_moto.py; none makes moto more
lenient than AWS.
"""

from __future__ import annotations

from typing import Any


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

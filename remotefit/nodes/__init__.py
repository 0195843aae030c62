"""Training nodes: the spec from flags, pre-flight, apply with capacity fallback, SSH readiness, status,
stop/start, destroy with verification, and garbage collection of orphans.

The package, by concern (each module's docstring says more):

- `spec`: what the user asked for (NodeSpec from the flags) and the last applied spec
- `terraform_dir`: the node variables (tfvars), AMI pins, the state in the bucket, and the local records
  rebuilt from it (generated/nodes.json, generated/ssh_config)
- `provision`: plan, apply with capacity fallback, pre-flight and cost, destroy, spot recovery
- `ready`: the boot markers over ssh, and apply's wait until every node is ready
- `fleet`: the running nodes: status, stop/start, ssh, gc, sandbox spot interruptions
- `ec2`: DescribeInstances for our instance ids

The names below are the package's interface (`from remotefit import nodes; nodes.apply(...)`). To
replace one in a test, patch it where it is looked up: in the module that calls it.
"""

from remotefit.inventory import inventory, require_nodes
from remotefit.nodes.fleet import (
    explain_unreachable,
    gc,
    interrupt,
    known_instance_ids,
    pick_node,
    ssh_interactive,
    start,
    status_lines,
    status_rows,
    status_table,
    stop,
    unreachable_hint,
)
from remotefit.nodes.provision import (
    apply,
    cost_lines,
    destroy,
    disruptions,
    leftovers,
    node_rate,
    plan,
    preflight_checks,
    recover,
)
from remotefit.nodes.ready import (
    BOOT_DIR,
    BOOT_FAILED_RC,
    BOOT_LOG,
    BOOTING_RC,
    boot_failure,
    ready_command,
    wait_ready,
)
from remotefit.nodes.spec import NodeSpec, last_spec, resolve_spec
from remotefit.nodes.terraform_dir import (
    cluster_capable,
    current_placement,
    default_az,
    destroy_variables,
    load_node_vars,
    node_variables,
    planned_node_variables,
    read_state,
    rebuild_inventory,
    refresh_tfvars,
    stable_identity,
    state_if_any,
    state_instances,
    write_inventory,
)
from remotefit.ssh import Node

__all__ = [
    "BOOTING_RC",
    "BOOT_DIR",
    "BOOT_FAILED_RC",
    "BOOT_LOG",
    "Node",
    "NodeSpec",
    "apply",
    "boot_failure",
    "cluster_capable",
    "cost_lines",
    "current_placement",
    "default_az",
    "destroy",
    "destroy_variables",
    "disruptions",
    "explain_unreachable",
    "gc",
    "interrupt",
    "inventory",
    "known_instance_ids",
    "last_spec",
    "leftovers",
    "load_node_vars",
    "node_rate",
    "node_variables",
    "pick_node",
    "plan",
    "planned_node_variables",
    "preflight_checks",
    "read_state",
    "ready_command",
    "rebuild_inventory",
    "recover",
    "refresh_tfvars",
    "require_nodes",
    "resolve_spec",
    "ssh_interactive",
    "stable_identity",
    "start",
    "state_if_any",
    "state_instances",
    "status_lines",
    "status_rows",
    "status_table",
    "stop",
    "unreachable_hint",
    "wait_ready",
    "write_inventory",
]

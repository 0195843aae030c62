"""The inventory of live nodes: generated/nodes.json, written by apply (remotefit/nodes/).

Read on every fit, sync, logs and pull, so it is kept light: it imports neither Terraform, pre-flight
nor AWS modules, and remotefit.nodes (which does) is loaded only when the inventory must be rebuilt.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from remotefit.errors import UserError
from remotefit.ssh import Node

if TYPE_CHECKING:
    from remotefit.workspace import Workspace


def inventory_file(ws: Workspace) -> Path:
    return ws.paths.generated / "nodes.json"


def inventory(ws: Workspace) -> list[Node]:
    """The live nodes of this stage (an inventory written for another STAGE is not ours)."""
    try:
        data = json.loads(inventory_file(ws).read_text())
        if data.get("stage") != ws.stage:
            return []
        return [Node(**n) for n in data["nodes"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def require_nodes(ws: Workspace) -> list[Node]:
    nodes = inventory(ws)
    if not nodes:
        from remotefit.nodes import rebuild_inventory

        nodes = rebuild_inventory(ws)  # generated/ lost: the state knows the nodes
    if not nodes:
        raise UserError(f"no nodes are up for stage {ws.stage}: run `inv apply` (or `inv apply --gpu`) first")
    return nodes

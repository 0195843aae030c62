"""What runs on the nodes: runner.py, watchdog.py, the contract.py they share with the laptop, and the
systemd units. Installed with remotefit as package data; the laptop uploads these files (runner and
contract at each fit) or renders them into the user data (watchdog, contract, units). They are
read here as files, never imported as remotefit modules on a node (a node has no remotefit).
"""

from __future__ import annotations

from pathlib import Path

NODE_DIR = Path(__file__).resolve().parent
# Files Terraform's user data embeds (templates/main.tf.j2 reads them with file()).
USER_DATA_FILES = (
    "contract.py",
    "watchdog.py",
    "remotefit-watchdog.service",
    "remotefit-watchdog.timer",
    "remotefit-spot.service",
)

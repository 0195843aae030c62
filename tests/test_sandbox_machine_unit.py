"""Container sandbox nodes, the pure parts: addresses, the bridge range check, argv, the seed, the mode."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from remotefit import sandbox_image, sandbox_machine
from remotefit.errors import UserError
from remotefit.sandbox import Sandbox

NET = ipaddress.IPv4Network("172.31.0.0/16")


def test_node_ip_is_motos_private_ip_when_the_bridge_holds_it() -> None:
    assert sandbox_machine.node_ip("172.31.0.4", NET) == "172.31.0.4"
    assert sandbox_machine.gateway(NET) == "172.31.0.1"


def test_node_ip_keeps_the_host_part_in_another_range() -> None:
    other = ipaddress.IPv4Network("10.213.0.0/16")
    assert sandbox_machine.node_ip("172.31.5.17", other) == "10.213.5.17"
    # Never the network, the gateway (the VPC router) or the broadcast address.
    assert sandbox_machine.node_ip("172.31.0.0", other) == "10.213.0.2"
    assert sandbox_machine.node_ip("172.31.255.255", other) == "10.213.255.254"


def test_overlap_names_the_interface_and_ignores_our_bridge() -> None:
    addrs = [("lo", "127.0.0.1/8"), ("eth0", "172.31.16.5/20"), (sandbox_machine.bridge_name(NET), "172.31.0.1/16")]
    assert sandbox_machine.overlap(NET, addrs) == "172.31.16.5/20 on eth0"
    assert sandbox_machine.overlap(NET, addrs[:1] + addrs[2:]) is None


@pytest.mark.parametrize(
    ("value", "why"),
    [("nonsense", "is not an IPv4 range"), ("8.8.0.0/16", "private range"), ("10.1.2.0/28", "/24 or larger")],
)
def test_bad_bridge_ranges_are_one_line(monkeypatch: pytest.MonkeyPatch, value: str, why: str) -> None:
    monkeypatch.setenv(sandbox_machine.BRIDGE_CIDR_ENV, value)
    with pytest.raises(UserError, match=why) as exc:
        sandbox_machine.bridge_network()
    assert sandbox_machine.BRIDGE_CIDR_ENV in str(exc.value) and "\n" not in str(exc.value)


def test_nspawn_boots_the_overlay_on_the_bridge_with_the_wheelhouse_read_only() -> None:
    cfg = {"root": "/n/root", "instance_id": "i-1", "wheelhouse": "/c/wheels", "wheels_mount": "/opt/remotefit-wheels"}
    cfg["bridge"] = "rfsb-0123abcd"
    argv = sandbox_machine.nspawn_argv(cfg)
    assert argv[:4] == ["systemd-nspawn", "--boot", "--register=no", "--keep-unit"]
    assert "--directory=/n/root" in argv and "--machine=i-1" in argv
    assert "--network-bridge=rfsb-0123abcd" in argv
    assert len(sandbox_machine.bridge_name(NET)) <= 15 and sandbox_machine.bridge_name(NET).startswith("rfsb-")
    assert "--bind-ro=/c/wheels:/opt/remotefit-wheels" in argv
    assert sandbox_machine.overlay_argv("/img", Path("/n/disk"), Path("/n/root")) == [
        "mount", "-t", "overlay", "overlay", "-o",
        "lowerdir=/img,upperdir=/n/disk/upper,workdir=/n/disk/work", "/n/root",
    ]  # fmt: skip


def test_seed_is_what_ec2_metadata_gives_cloud_init() -> None:
    seed = sandbox_machine.seed_files("i-1", "ip-172-31-0-4", "ssh-ed25519 AAAA k\n", "#!/bin/bash\n")
    assert (
        seed["meta-data"] == "instance-id: i-1\nlocal-hostname: ip-172-31-0-4\npublic-keys:\n  - ssh-ed25519 AAAA k\n"
    )
    assert seed["user-data"] == "#!/bin/bash\n"


def test_the_image_recipe_names_its_folder() -> None:
    key = sandbox_image.recipe_key()
    assert sandbox_image.image_dir(Path("/c")) == Path(f"/c/images/debian-bookworm-cpu-{key}")
    assert "rsync" in sandbox_image.BASE_PACKAGES  # the laptop's sync needs it on the node
    assert sandbox_image.debootstrap_argv(Path("/t"), "http://m")[-3:] == ["bookworm", "/t", "http://m"]


def test_node_mode(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    sb = Sandbox(tmp_path)
    monkeypatch.delenv("REMOTEFIT_SANDBOX_NODES", raising=False)
    assert sb.node_mode()[0] == "loopback"
    monkeypatch.setenv("REMOTEFIT_SANDBOX_NODES", "vm")
    with pytest.raises(UserError, match="is not one of loopback, container, auto"):
        sb.node_mode()
    monkeypatch.setattr(sandbox_machine, "available", lambda: "container nodes need root")
    monkeypatch.setenv("REMOTEFIT_SANDBOX_NODES", "auto")
    assert sb.node_mode() == ("loopback", "fallback: container nodes need root")
    monkeypatch.setenv("REMOTEFIT_SANDBOX_NODES", "container")
    with pytest.raises(UserError, match="container nodes need root; or set REMOTEFIT_SANDBOX_NODES=loopback"):
        sb.node_mode()
    monkeypatch.setattr(sandbox_machine, "available", lambda: None)
    assert sb.node_mode()[0] == "container"
    assert sb.caller_cidr() == "172.31.0.1/32"  # the bridge's gateway: where a node sees our ssh from

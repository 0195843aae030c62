"""The sandbox node's metadata service answers as EC2's IMDSv2 does (tokens required, notices on demand),
and the node's own watchdog code reads a spot notice from it through configuration alone."""

from __future__ import annotations

import importlib.util
import json
import threading
import urllib.error
import urllib.request
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest

from remotefit import sandbox_imds

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("remotefit_node_watchdog", ROOT / "remotefit" / "node" / "watchdog.py")
watchdog = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(watchdog)


@pytest.fixture
def imds(tmp_path: Path):
    facts = {"instance_id": "i-0abc", "instance_type": "c7i.large", "availability_zone": "us-east-1b"}
    (tmp_path / sandbox_imds.FACTS).write_text(json.dumps({**facts, "region": "us-east-1", "role": "rf-node"}))
    server = ThreadingHTTPServer(("127.0.0.1", 0), sandbox_imds.handler_for(sandbox_imds.Metadata(tmp_path)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", tmp_path
    server.shutdown()


def call(url: str, method: str = "GET", headers: dict[str, str] | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url, method=method, headers=headers or {})  # noqa: S310 - loopback test server
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:  # noqa: S310
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""


def token(base: str, ttl: str = "60") -> str:
    code, body = call(f"{base}/latest/api/token", "PUT", {"X-aws-ec2-metadata-token-ttl-seconds": ttl})
    assert code == 200
    return body


def test_tokens_are_required_as_with_http_tokens_required(imds):
    base, _ = imds
    assert call(f"{base}/latest/meta-data/instance-id")[0] == 401  # IMDSv1 style: refused
    assert call(f"{base}/latest/meta-data/instance-id", headers={"X-aws-ec2-metadata-token": "forged"})[0] == 401
    assert call(f"{base}/latest/api/token", "PUT")[0] == 400  # no TTL
    assert call(f"{base}/latest/api/token", "PUT", {"X-aws-ec2-metadata-token-ttl-seconds": "21601"})[0] == 400
    fwd = {"X-aws-ec2-metadata-token-ttl-seconds": "60", "X-Forwarded-For": "10.0.0.1"}
    assert call(f"{base}/latest/api/token", "PUT", fwd)[0] == 403  # a proxied request is refused
    t = {"X-aws-ec2-metadata-token": token(base)}
    assert call(f"{base}/latest/meta-data/instance-id", headers=t) == (200, "i-0abc")
    assert call(f"{base}/latest/meta-data/placement/availability-zone", headers=t) == (200, "us-east-1b")
    assert call(f"{base}/latest/meta-data/iam/security-credentials/", headers=t) == (200, "rf-node")
    code, body = call(f"{base}/latest/meta-data/iam/security-credentials/rf-node", headers=t)
    creds = json.loads(body)
    assert code == 200 and creds["Code"] == "Success" and {"AccessKeyId", "Token", "Expiration"} <= set(creds)
    assert call(f"{base}/latest/meta-data/no-such-thing", headers=t)[0] == 404


def test_a_posted_notice_is_what_the_nodes_watchdog_reads(imds):
    base, d = imds
    assert watchdog.spot_notice(base, 2.0) == ("none", None)  # 404: no notice, as on EC2
    notice = {"action": "terminate", "time": "2026-12-02T12:00:00Z"}
    (d / sandbox_imds.NOTICE).write_text(json.dumps(notice))
    assert watchdog.spot_notice(base, 2.0) == ("notice", notice)


def test_botocore_takes_the_node_roles_credentials_from_it(imds, monkeypatch, tmp_path):
    """What the sandbox's sshd tells node sessions (AWS_EC2_METADATA_SERVICE_ENDPOINT, no ~/.aws) is enough
    for boto3's own chain to find credentials, as with an instance profile on EC2."""
    import botocore.session

    base, _ = imds
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", base)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    creds = botocore.session.Session().get_credentials()
    assert creds is not None and creds.method == "iam-role"
    frozen = creds.get_frozen_credentials()
    assert (frozen.access_key, frozen.token) == ("testing", "sandbox-session-token")

"""The instance metadata service of one sandbox node: what 169.254.169.254 answers on EC2, on a loopback port.

IMDSv2 only, as the launch template requires (`http_tokens = "required"`): `PUT /latest/api/token` with
`X-aws-ec2-metadata-token-ttl-seconds` (1..21600) returns a token; every GET needs a live token (401
without one); a request carrying `X-Forwarded-For` is refused (403), as EC2 refuses it. Paths:

    /latest/meta-data/instance-id, instance-type, local-ipv4
    /latest/meta-data/placement/availability-zone, placement/region
    /latest/meta-data/iam/security-credentials/          the node role's name
    /latest/meta-data/iam/security-credentials/<role>    temporary keys (the sandbox's test keys)
    /latest/meta-data/spot/instance-action               404 until `inv sandbox.interrupt` posts a notice

The node facts come from `<node dir>/imds.json`, the notice from `<node dir>/spot-instance-action.json`
(read on every request, so a notice appears without a restart). The server binds port 0 and writes the
port it got to `<node dir>/imds.port`: no race with another process for a "free" port.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import secrets
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

MAX_TTL = 21600
NOTICE = "spot-instance-action.json"
FACTS = "imds.json"
PORT_FILE = "imds.port"


def _iso(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Metadata:
    """What one node's metadata says, and its tokens."""

    def __init__(self, node_dir: Path) -> None:
        self.dir = node_dir
        self.tokens: dict[str, float] = {}  # token -> expiry (epoch)

    def facts(self) -> dict[str, str]:
        try:
            value = json.loads((self.dir / FACTS).read_text())
        except (OSError, ValueError):
            return {}
        return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}

    def new_token(self, ttl: int) -> str:
        token = secrets.token_urlsafe(32)
        self.tokens[token] = time.time() + ttl
        return token

    def valid(self, token: str | None) -> bool:
        return bool(token) and self.tokens.get(str(token), 0) > time.time()

    def answer(self, path: str) -> tuple[int, str]:
        facts = self.facts()
        role = facts.get("role", "")
        fixed = {
            "instance-id": facts.get("instance_id"),
            "instance-type": facts.get("instance_type"),
            "local-ipv4": facts.get("local_ipv4", "127.0.0.1"),
            "placement/availability-zone": facts.get("availability_zone"),
            "placement/region": facts.get("region"),
            "iam/security-credentials": role,
            "iam/security-credentials/": role,
        }
        key = path.removeprefix("/latest/meta-data/")
        if not path.startswith("/latest/meta-data/"):
            return 404, "Not Found"
        if key in fixed and fixed[key]:
            return 200, str(fixed[key])
        if role and key == f"iam/security-credentials/{role}":
            now = time.time()
            return 200, json.dumps(
                {
                    "Code": "Success",
                    "LastUpdated": _iso(now),
                    "Type": "AWS-HMAC",
                    # The sandbox's moto server takes any keys; these are its documented test keys.
                    "AccessKeyId": facts.get("access_key_id", "testing"),
                    "SecretAccessKey": facts.get("secret_access_key", "testing"),
                    "Token": "sandbox-session-token",
                    "Expiration": _iso(now + 6 * 3600),
                }
            )
        if key == "spot/instance-action":
            try:
                return 200, (self.dir / NOTICE).read_text()
            except OSError:
                return 404, "Not Found"
        return 404, "Not Found"


def handler_for(md: Metadata) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "EC2ws"
        sys_version = ""

        def _send(self, code: int, body: str, ttl: int | None = None) -> None:
            data = body.encode()
            self.send_response(code)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(data)))
            if ttl is not None:
                self.send_header("X-aws-ec2-metadata-token-ttl-seconds", str(ttl))
            self.end_headers()
            self.wfile.write(data)

        def do_PUT(self) -> None:  # noqa: N802 - http.server's name
            if self.headers.get("X-Forwarded-For"):
                return self._send(403, "Forbidden")
            if self.path != "/latest/api/token":
                return self._send(404, "Not Found")
            try:
                ttl = int(self.headers.get("X-aws-ec2-metadata-token-ttl-seconds", ""))
            except ValueError:
                return self._send(400, "Bad Request")
            if not 1 <= ttl <= MAX_TTL:
                return self._send(400, "Bad Request")
            return self._send(200, md.new_token(ttl), ttl)

        def do_GET(self) -> None:  # noqa: N802
            if self.headers.get("X-Forwarded-For"):
                return self._send(403, "Forbidden")
            if not md.valid(self.headers.get("X-aws-ec2-metadata-token")):
                return self._send(401, "Unauthorized")
            code, body = md.answer(self.path)
            return self._send(code, body)

        def log_message(self, fmt: str, *args: object) -> None:
            sys.stderr.write(f"{_iso(time.time())} imds: {fmt % args}\n")

    return Handler


def serve(node_dir: Path) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler_for(Metadata(node_dir)))
    tmp = node_dir / f".{PORT_FILE}.tmp"
    tmp.write_text(str(server.server_address[1]))
    os.replace(tmp, node_dir / PORT_FILE)
    server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m remotefit.sandbox_imds", description=__doc__.splitlines()[0])
    p.add_argument("--dir", required=True, type=Path, help="the sandbox node's folder (imds.json, notices)")
    serve(p.parse_args(argv).dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())

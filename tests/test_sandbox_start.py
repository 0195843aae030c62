"""Starting the sandbox's moto server: a stranger answering on the chosen port is never taken for it."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from remotefit import sandbox
from remotefit.sandbox import Sandbox, pid_alive


class _Stranger(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_a_stranger_on_the_port_is_not_our_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stranger = ThreadingHTTPServer(("127.0.0.1", 0), _Stranger)
    threading.Thread(target=stranger.serve_forever, daemon=True).start()
    ports = [stranger.server_port, sandbox.free_port()]  # the first "free" port is taken after all
    monkeypatch.setattr(sandbox, "free_port", lambda prefer=None: ports.pop(0))
    sb = Sandbox(tmp_path / "sandbox")
    try:
        srv = sb.up()
        assert srv.port != stranger.server_port and not ports
        assert pid_alive(srv.pid, "moto")
        assert f"Running on http://127.0.0.1:{srv.port}" in (tmp_path / "sandbox" / "moto.log").read_text()
        assert sb.server() == srv
    finally:
        sb.down()
        stranger.shutdown()
        stranger.server_close()


def test_an_sdk_retry_of_a_done_call_gets_the_same_answer_not_a_second_run(tmp_path: Path) -> None:
    """A retry (amz-sdk-request: attempt=2, same invocation id) of a call the server carried out is answered
    as before; the same call made anew still fails as on AWS (a profile holds one role)."""
    import boto3
    from botocore.exceptions import ClientError

    sb = Sandbox(tmp_path / "sandbox")
    srv = sb.up()
    try:
        iam = boto3.client(
            "iam",
            endpoint_url=srv.endpoint,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        iam.create_role(RoleName="r", AssumeRolePolicyDocument="{}")
        iam.create_instance_profile(InstanceProfileName="p")
        headers: dict[str, str] = {}

        def pin(request, **_kw):  # noqa: ANN001, ANN202 - botocore's before-send hook
            request.headers.update(headers)

        iam.meta.events.register("before-send.iam.AddRoleToInstanceProfile", pin)
        headers.update({"amz-sdk-invocation-id": "call-1", "amz-sdk-request": "attempt=1; max=3"})
        iam.add_role_to_instance_profile(InstanceProfileName="p", RoleName="r")
        headers["amz-sdk-request"] = "attempt=2; max=3"  # its answer was "lost": the SDK tries again
        iam.add_role_to_instance_profile(InstanceProfileName="p", RoleName="r")
        assert "retry of call call-1 answered as before" in (tmp_path / "sandbox" / "moto.log").read_text()
        assert len(iam.get_instance_profile(InstanceProfileName="p")["InstanceProfile"]["Roles"]) == 1
        headers.update({"amz-sdk-invocation-id": "call-2", "amz-sdk-request": "attempt=1; max=3"})
        with pytest.raises(ClientError, match="LimitExceeded"):
            iam.add_role_to_instance_profile(InstanceProfileName="p", RoleName="r")
    finally:
        sb.down()

"""Bad input gets a 4xx problem response naming the field, never a 500 or a traceback (no VM needed)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from agentkernel.client import ApiError, Client, Sandbox, SandboxInfo
from tests.api.server import api_server
from tests.conftest import cli

JSON = {"content-type": "application/json"}


@pytest.fixture
def bare_api(isolated_home: Path, tmp_path: Path) -> Iterator[str]:
    with api_server(tmp_path) as url:
        yield url


def problem(response: httpx.Response, status: int, code: str, field: str | None) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert (body["status"], body["code"], body.get("field")) == (status, code, field)
    assert body["detail"] and "Traceback" not in response.text


def test_bad_requests_are_problems(bare_api: str) -> None:
    with httpx.Client(base_url=bare_api) as http:
        problem(http.post("/run", content=b'{"command": [', headers=JSON), 400, "malformed_json", "body")
        problem(http.post("/run", json={"command": ["ls"], "imagee": "base"}), 422, "unknown_field", "imagee")
        problem(http.post("/run", json={}), 422, "missing_field", "command")
        problem(http.post("/run", json={"command": []}), 422, "invalid_field", "command")
        problem(http.post("/run", json={"command": ["ls"], "timeout": -1}), 422, "invalid_field", "timeout")
        problem(http.post("/run", json={"command": ["ls"], "env": {"A": 1}}), 422, "invalid_field", "env.A")
        problem(http.post("/run", json={"command": ["ls"], "cwd": "tmp"}), 422, "invalid_path", "cwd")
        problem(
            http.post("/run", json={"command": ["ls"], "profile": "lax"}), 422, "invalid_field", "profile"
        )
        problem(http.post("/run", json={"command": ["a\u0000b"]}), 422, "invalid_field", "command")
        problem(http.post("/run", json={"command": ["ls"], "image": "nope"}), 422, "unknown_image", "image")
        problem(
            http.post("/run", json={"command": ["ls"], "stdin": "x" * (5 << 20)}),
            413,
            "payload_too_large",
            "body",
        )
        problem(http.post("/sandboxes", json={"name": "no/slash"}), 422, "invalid_field", "name")
        problem(http.get("/sandboxes/nope"), 404, "sandbox_not_found", "name")
        problem(http.get("/sandboxes/-bad-"), 422, "invalid_field", "name")
        problem(http.delete("/sandboxes/nope"), 404, "sandbox_not_found", "name")
        problem(http.post("/sandboxes/nope/exec", json={"command": ["ls"]}), 404, "sandbox_not_found", "name")
        problem(http.get("/sandboxes/nope/files/etc/%2E%2E/passwd"), 422, "invalid_path", "path")
        problem(http.put("/sandboxes/nope/files/a/%2e%2e/b", content=b"x"), 422, "invalid_path", "path")
        problem(http.get("/sandboxes/nope/files/etc/passwd"), 404, "sandbox_not_found", "name")
        problem(http.put("/sandboxes/nope/files/x?mode=999", content=b"x"), 422, "invalid_field", "mode")
        problem(http.get("/no/such/route"), 404, "not_found", None)
        problem(http.patch("/sandboxes"), 405, "method_not_allowed", None)
        assert http.get("/sandboxes").json() == []


def test_sdk_raises_api_errors(bare_api: str) -> None:
    with Client(bare_api) as ak:
        with pytest.raises(ApiError) as missing:
            ak.sandbox("nope")
        assert (missing.value.status, missing.value.code, missing.value.field) == (
            404,
            "sandbox_not_found",
            "name",
        )
        box = Sandbox(
            ak, SandboxInfo("nope", "running", "qemu", "base", "", 1, 512, "moderate", ""), owned=False
        )
        with pytest.raises(ValueError, match=r"'\.\.'"):  # URL normalization would resolve it: never sent
            box.remove_file("/root/../../../sandboxes/other")
        with pytest.raises(ApiError) as gone:
            box.exec(["true"])
        assert gone.value.code == "sandbox_not_found"


def test_non_loopback_needs_a_key(isolated_home: Path) -> None:
    refused = cli("serve", "--host", "0.0.0.0", "--port", "1")
    assert refused.returncode == 1
    assert b"AGENTKERNEL_API_KEY" in refused.stderr and b"Traceback" not in refused.stderr

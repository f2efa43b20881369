"""Web pages cannot drive the API: a Host naming another site (DNS rebinding) and a foreign Origin
(cross-site requests and WebSocket hijacking) are refused before anything runs, on a real server."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from starlette.types import Message, Receive, Scope, Send
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from agentkernel.api.guard import AllowedHosts, WebGuard
from agentkernel.client import Client
from tests.api.server import api_server
from tests.conftest import cli

EVIL = "http://evil.example"
ROUTES = [
    ("GET", "/health"),
    ("GET", "/openapi.json"),
    ("POST", "/run"),
    ("GET", "/sandboxes"),
    ("POST", "/sandboxes"),
    ("DELETE", "/sandboxes/box?force=true"),
    ("POST", "/sandboxes/box/exec"),
    ("PUT", "/sandboxes/box/files/root/x"),
]
RUN = {"command": ["ls"]}


@pytest.fixture
def bare_api(isolated_home: Path, tmp_path: Path) -> Iterator[str]:
    with api_server(tmp_path) as url:
        yield url


def refused(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert (body["status"], body["code"]) == (status, code)
    assert body["detail"] and "Traceback" not in response.text


def port_of(url: str) -> int:
    port = urlsplit(url).port
    assert port is not None
    return port


def attach_refusal(url: str, **options: object) -> tuple[int, dict[str, object]]:
    """Try to attach `touch /root/pwned` to sandbox `box`: the status and problem of the refusal."""
    ws_url = url.replace("http://", "ws://") + "/sandboxes/box/attach?command=touch&command=/root/pwned"
    with pytest.raises(InvalidStatus) as denied, connect(ws_url, open_timeout=30, **options):
        pass
    answer = denied.value.response
    assert answer.headers["content-type"] == "application/problem+json"
    return answer.status_code, json.loads(bytes(answer.body or b""))


def test_foreign_host_is_refused_on_every_route(bare_api: str) -> None:
    port = port_of(bare_api)
    with httpx.Client(base_url=bare_api) as http:
        for host in ("evil.example", f"evil.example:{port}", "localhost.evil.example", "127.0.0.1.nip.io"):
            for method, path in ROUTES:
                body = RUN if method == "POST" else None
                answer = http.request(method, path, json=body, headers={"Host": host})
                refused(answer, 421, "host_not_allowed")
                assert host in answer.json()["detail"]
        refused(http.get("/health", headers={"Host": "::1"}), 400, "invalid_host")  # an address needs []
        assert http.get("/sandboxes").json() == []


def test_loopback_names_are_accepted(bare_api: str) -> None:
    port = port_of(bare_api)
    with httpx.Client(base_url=bare_api) as http:
        loopback = ("127.0.0.1", f"127.0.0.1:{port}", f"localhost:{port}", "LocalHost", f"[::1]:{port}")
        for host in (*loopback, "127.8.9.10:1"):
            assert http.get("/health", headers={"Host": host}).status_code == 200, host
            assert http.get("/sandboxes", headers={"Host": host}).json() == []


def test_foreign_origins_are_refused(bare_api: str) -> None:
    port = port_of(bare_api)
    with httpx.Client(base_url=bare_api) as http:
        foreign = [
            {"Origin": EVIL},
            {"Origin": f"{EVIL}:{port}"},
            {"Origin": "null"},  # a sandboxed iframe, a file:// page
            {"Origin": "http://localhost:3000"},  # another server on this machine
            {"Origin": f"ftp://127.0.0.1:{port}"},
            {"Origin": f"http://127.0.0.1:{port}.evil.example"},
            {"Sec-Fetch-Site": "cross-site"},
            {"Sec-Fetch-Site": "same-site"},
        ]
        for headers in foreign:
            for method, path in ROUTES:
                body = RUN if method == "POST" else None
                refused(http.request(method, path, json=body, headers=headers), 403, "origin_not_allowed")
        assert http.get("/sandboxes").json() == []  # nothing was made
        for origin in (f"http://127.0.0.1:{port}", f"http://localhost:{port}", f"http://[::1]:{port}"):
            same = {"Origin": origin, "Sec-Fetch-Site": "same-origin"}
            reached = http.post("/sandboxes/box/exec", json=RUN, headers=same)  # it reaches the route
            refused(reached, 404, "sandbox_not_found")


def test_websocket_from_a_foreign_page_is_refused(bare_api: str) -> None:
    port = port_of(bare_api)
    assert attach_refusal(bare_api, origin=EVIL)[0] == 403
    status, body = attach_refusal(bare_api, origin="null")
    assert (status, body["code"]) == (403, "origin_not_allowed")
    rebound = socket.create_connection(("127.0.0.1", port))
    host_url = f"http://evil.example:{port}"  # the Host a rebinding page's WebSocket sends
    status, body = attach_refusal(host_url, sock=rebound)
    assert (status, body["code"]) == (421, "host_not_allowed")
    status, body = attach_refusal(bare_api, origin=f"http://127.0.0.1:{port}")  # same origin: let through
    assert (status, body["code"]) == (404, "sandbox_not_found")


def test_guard_runs_before_authentication(isolated_home: Path, tmp_path: Path) -> None:
    with api_server(tmp_path, api_key="s3cret") as url, httpx.Client(base_url=url) as http:
        refused(http.get("/health", headers={"Host": "evil.example"}), 421, "host_not_allowed")
        refused(http.get("/sandboxes", headers={"Host": "evil.example"}), 421, "host_not_allowed")
        key = {"Authorization": "Bearer s3cret"}
        refused(http.post("/run", json=RUN, headers={**key, "Origin": EVIL}), 403, "origin_not_allowed")
        assert http.get("/sandboxes", headers=key).json() == []
        assert attach_refusal(url, origin=EVIL)[0] == 403  # not 401: the key check is never reached


def test_allowed_hosts_for_a_reverse_proxy(isolated_home: Path, tmp_path: Path) -> None:
    args = ["--allow-host", "proxy.example", "--allow-host", "TLS.example:443"]
    with api_server(tmp_path, args=args) as url, httpx.Client(base_url=url) as http:
        port = port_of(url)
        for host in ("proxy.example", "proxy.example:8080", "tls.example"):
            assert http.get("/sandboxes", headers={"Host": host}).status_code == 200, host
        refused(http.get("/sandboxes", headers={"Host": "other.example"}), 421, "host_not_allowed")
        for origin in (f"http://proxy.example:{port}", "https://tls.example", "https://tls.example:443"):
            answer = http.post("/sandboxes/box/exec", json=RUN, headers={"Origin": origin})
            refused(answer, 404, "sandbox_not_found")
        for origin in ("http://proxy.example", "https://tls.example:8443", EVIL):
            answer = http.post("/sandboxes/box/exec", json=RUN, headers={"Origin": origin})
            refused(answer, 403, "origin_not_allowed")


def test_allowed_hosts_from_the_environment(
    isolated_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENTKERNEL_ALLOW_HOSTS", "one.example two.example:443")
    with api_server(tmp_path) as url, httpx.Client(base_url=url) as http:
        for host in ("one.example", "two.example"):
            assert http.get("/health", headers={"Host": host}).status_code == 200, host
        refused(http.get("/health", headers={"Host": "three.example"}), 421, "host_not_allowed")


def test_bad_allowed_host_is_one_line_error(isolated_home: Path) -> None:
    for bad in ("http://proxy.example", "a b", "*", "proxy.example:99999"):
        result = cli("serve", "--port", "1", "--allow-host", bad)
        assert result.returncode == 1, bad
        assert (
            result.stderr.startswith(b"agentkernel: error: --allow-host")
            and b"Traceback" not in result.stderr
        )
        assert result.stderr.count(b"\n") == 1


def test_no_listening_beyond_loopback_without_a_key(
    isolated_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AGENTKERNEL_API_KEY", raising=False)
    for host in ("0.0.0.0", "::", "192.0.2.1"):
        result = cli("serve", "--host", host, "--port", "1", timeout=60)
        assert result.returncode == 1, host
        assert result.stderr.startswith(b"agentkernel: error: refusing to listen on " + host.encode())
        assert result.stderr.count(b"\n") == 1 and b"Traceback" not in result.stderr


def local_address() -> str | None:
    """A non-loopback address of this machine, if it has a route anywhere (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.123", 9))
        except OSError:
            return None
        address: str = s.getsockname()[0]
    return None if address.startswith("127.") else address


def test_wildcard_listen_accepts_addresses_not_names(isolated_home: Path, tmp_path: Path) -> None:
    """On 0.0.0.0 (which needs a key) a Host may be the address the connection came in on, or a
    loopback name, or an allowed name; any other name or address is refused."""
    with api_server(tmp_path, api_key="k", args=["--host", "0.0.0.0"]) as url:
        port = port_of(url)
        with httpx.Client(base_url=url) as http:
            assert http.get("/health", headers={"Host": f"localhost:{port}"}).status_code == 200
            refused(http.get("/health", headers={"Host": "evil.example"}), 421, "host_not_allowed")
            refused(http.get("/health", headers={"Host": "0.0.0.0"}), 421, "host_not_allowed")
            refused(http.get("/health", headers={"Host": "198.51.100.7"}), 421, "host_not_allowed")
        address = local_address()
        if address is None:
            pytest.skip("this machine has no non-loopback address")
        with httpx.Client(base_url=f"http://{address}:{port}") as http:
            assert http.get("/health").status_code == 200
            answer = http.post("/run", json=RUN, headers={"Origin": f"http://{address}:{port}"})
            refused(answer, 401, "unauthorized")  # past the guard: same-origin on that address
            refused(http.get("/health", headers={"Host": "evil.example"}), 421, "host_not_allowed")


def guarded(scope_headers: list[tuple[bytes, bytes]], http_version: str = "1.1") -> int:
    """The status WebGuard answers an HTTP request with (200: it let the request through)."""
    sent: list[Message] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def receive() -> Message:
        return {"type": "http.request", "body": b""}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "http_version": http_version,
        "method": "POST",
        "path": "/run",
        "headers": scope_headers,
        "server": ("127.0.0.1", 18888),
    }
    asyncio.run(WebGuard(app, AllowedHosts())(scope, receive, send))
    status: int = sent[0]["status"]
    return status


def test_missing_or_repeated_host() -> None:
    """uvicorn's HTTP parser (h11) already refuses these; the guard must not rely on that, since
    other parsers (httptools) pass them on. Checked on the middleware itself for that reason."""
    assert guarded([]) == 400
    assert guarded([], http_version="1.0") == 200  # no browser sends a request without Host
    assert guarded([(b"host", b"127.0.0.1"), (b"host", b"evil.example")]) == 400
    assert guarded([(b"host", b"127.0.0.1"), (b"origin", b"http://127.0.0.1:18888")]) == 200
    assert (
        guarded([(b"host", b"127.0.0.1"), (b"origin", b"http://127.0.0.1:18888"), (b"origin", b"null")])
        == 400
    )


@pytest.mark.vm
def test_foreign_origin_never_runs_a_command(api: str, tmp_path: Path) -> None:
    """The command would leave a file in the project (shared at /workspace): refused, it does not."""
    marker = tmp_path / "pwned"
    run = {"command": ["touch", "/workspace/pwned"], "profile": "permissive"}
    with httpx.Client(base_url=api, timeout=120) as http:
        refused(http.post("/run", json=run, headers={"Origin": EVIL}), 403, "origin_not_allowed")
        refused(http.post("/run", json=run, headers={"Host": "evil.example"}), 421, "host_not_allowed")
        assert not marker.exists()
        assert http.get("/sandboxes").json() == []
        same = http.post("/run", json=run, headers={"Origin": f"http://127.0.0.1:{port_of(api)}"})
        assert same.status_code == 200 and same.json()["exit_code"] == 0, same.text
        assert marker.exists()  # the same request from this server's own origin does run


@pytest.mark.vm
def test_foreign_origin_cannot_attach(api: str) -> None:
    with Client(api) as ak, ak.create_sandbox("box") as box:
        status, body = attach_refusal(api, origin=EVIL)
        assert (status, body["code"]) == (403, "origin_not_allowed")
        rebound = socket.create_connection(("127.0.0.1", port_of(api)))
        status, body = attach_refusal(f"http://evil.example:{port_of(api)}", sock=rebound)
        assert (status, body["code"]) == (421, "host_not_allowed")
        assert box.exec(["ls", "/root"]).stdout == ""  # the command never ran
        with box.attach(["touch", "/root/pwned"]) as term:
            assert b"".join(term) == b"" and term.exit is not None and term.exit.exit_code == 0
        assert box.exec(["ls", "/root"]).stdout == "pwned\n"  # as it does for a real client

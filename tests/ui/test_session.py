"""The dashboard's doors over plain HTTP, on a real server: the login, its cookie, CSRF tokens, the
security headers, and bad form values answered with a message on the page and a 4xx status."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from agentkernel.api.dashboard import session
from agentkernel.client import Client
from tests.ui.conftest import KEY

CSRF = re.compile(r'name="csrf" value="([^"]+)"')


@contextmanager
def logged_in(url: str) -> Iterator[tuple[httpx.Client, str]]:
    """A client logged in to the dashboard, and the CSRF token of its session."""
    with httpx.Client(base_url=url, timeout=120) as client:
        page = client.get("/ui/login")
        token = CSRF.search(page.text)
        assert token, page.text
        done = client.post("/ui/login", data={"csrf": token[1], "key": KEY})
        assert done.status_code == 303, done.text
        session = CSRF.search(client.get("/ui/").text)
        assert session
        yield client, session[1]


def test_login_sets_a_strict_http_only_cookie_and_refuses_a_wrong_key(server: str) -> None:
    with httpx.Client(base_url=server) as anonymous:
        page = anonymous.get("/ui/", headers={"Accept": "text/html"})
        assert (page.status_code, page.headers["location"]) == (303, "/ui/login")
        assert anonymous.get("/ui/events").status_code == 401  # no cookie: no data, no redirect loop
        form = anonymous.get("/ui/login")
        csp = form.headers["content-security-policy"]
        assert "script-src 'self';" in csp and "frame-ancestors 'none'" in csp
        token = CSRF.search(form.text)
        assert token
        wrong = anonymous.post("/ui/login", data={"csrf": token[1], "key": "not-the-key"})
        assert wrong.status_code == 401 and "wrong API key" in wrong.text
        assert "agentkernel_session" not in wrong.headers.get("set-cookie", "")
        forged = anonymous.post("/ui/login", data={"csrf": "forged", "key": KEY})
        assert forged.status_code == 403 and "expired" in forged.text

        form = anonymous.get("/ui/login")
        token = CSRF.search(form.text)
        assert token
        done = anonymous.post("/ui/login", data={"csrf": token[1], "key": KEY})
        assert (done.status_code, done.headers["location"]) == (303, "/ui/")
        cookie = next(c for c in done.headers.get_list("set-cookie") if c.startswith("agentkernel_session="))
        attributes = {a.strip().lower() for a in cookie.split(";")[1:]}
        assert {"httponly", "samesite=strict", "path=/ui"} <= attributes, cookie
        assert anonymous.get("/ui/").status_code == 200
        host = anonymous.get("/ui/host")
        assert host.status_code == 200 and "Acceleration" in host.text
        assert "pool daemon is not running" in host.text and "<td>base</td>" in host.text  # an image
        # the cookie opens /ui only: the API itself still wants the Bearer key
        assert anonymous.get("/sandboxes").status_code == 401


def test_actions_need_the_csrf_token_and_bad_values_are_shown(server: str) -> None:
    with logged_in(server) as (client, csrf):
        missing = client.post("/ui/sandboxes", data={"name": "x"})
        assert missing.status_code == 403 and missing.json()["code"] == "csrf"
        wrong = client.post("/ui/sandboxes", data={"name": "x", "csrf": "nope"})
        assert wrong.status_code == 403
        for field, value, status, says in (
            ("vcpus", "many", 422, "vcpus: expected a whole number"),
            ("name", "-bad name", 422, "invalid sandbox name"),
            ("image", "no-such-image", 422, "no-such-image"),
            ("labels", "novalue", 422, "novalue"),
        ):
            page = client.post("/ui/sandboxes", data={"csrf": csrf, field: value})
            assert page.status_code == status, (field, page.status_code, page.text[-500:])
            shown = re.search(r'<p class="error" id="error" role="alert">(.*?)</p>', page.text, re.S)
            assert shown and says in shown[1], (field, page.text[-800:])
        assert client.get("/ui/?label=broken").status_code == 422
        gone = client.post("/ui/sandboxes/nothere/stop", data={"csrf": csrf})
        assert gone.status_code == 404 and "nothere" in gone.text
        # a page on another origin cannot post, even with the cookie and the token
        cross = client.post("/ui/sandboxes", data={"csrf": csrf}, headers={"Origin": "http://evil.example"})
        assert cross.status_code == 403
        assert client.post("/ui/logout", data={"csrf": csrf}).status_code == 303
        assert client.get("/ui/events").status_code == 401


def test_terminal_websocket_needs_session_and_token(server: str) -> None:
    with logged_in(server) as (client, csrf):
        cookie = f"agentkernel_session={client.cookies['agentkernel_session']}"
    ws = server.replace("http://", "ws://") + "/ui/sandboxes/none/attach"
    for url, headers in (
        (f"{ws}?csrf={csrf}", {}),  # no session cookie
        (ws, {"Cookie": cookie}),  # no token
        (f"{ws}?csrf=wrong", {"Cookie": cookie}),
    ):
        with pytest.raises(InvalidStatus) as refused:
            connect(url, additional_headers=headers, open_timeout=10).close()
        assert refused.value.response.status_code in (401, 403)
    with pytest.raises(InvalidStatus) as missing:  # with both, the attach itself answers
        connect(f"{ws}?csrf={csrf}", additional_headers={"Cookie": cookie}, open_timeout=10).close()
    assert missing.value.response.status_code == 404


@pytest.mark.vm
def test_sandbox_page_files_and_actions(server: str) -> None:
    with logged_in(server) as (client, csrf):
        made = client.post("/ui/sandboxes", data={"csrf": csrf, "name": "files", "labels": "team=web"})
        assert (made.status_code, made.headers["location"]) == (303, "/ui/sandboxes/files"), made.text[-800:]
        assert 'data-name="files"' in client.get("/ui/?label=team=web").text
        assert 'data-name="files"' not in client.get("/ui/?label=team=db").text

        with Client(server, api_key=KEY) as api:  # a command, and a connection the gateway refuses
            box = api.sandbox("files")
            assert box.exec(["echo", "from", "the", "api"]).exit_code == 0
            ask = "GET http://169.254.169.254/ HTTP/1.1\\r\\nHost: 169.254.169.254\\r\\n\\r\\n"
            box.exec(["sh", "-c", f"printf '{ask}' | nc -w 10 10.0.2.100 3128"])
            waiting = box.run(["sleep", "600"], background=True)
        page = client.get("/ui/sandboxes/files")
        assert "<code>echo from the api</code>" in page.text
        shown = re.search(r'<table id="background">(.*?)</table>', page.text, re.S)
        assert shown and "<code>sleep 600</code>" in shown[1] and f"running (pid {waiting.pid})" in shown[1]
        refused = re.search(r'<tr class="refused">(.*?)</tr>', page.text, re.S)
        assert refused and "169.254.169.254" in refused[1], page.text[-3000:]

        # The page's tables follow the sandbox as it runs: a decision made after the stream opened
        # arrives on it.
        with client.stream("GET", "/ui/sandboxes/files/events", timeout=60) as events:
            lines = events.iter_lines()
            first = _next_event(lines, "network")
            assert "169.254.169.254" in first and "late.invalid" not in first
            with Client(server, api_key=KEY) as api:
                later = "GET http://late.invalid/ HTTP/1.1\\r\\nHost: late.invalid\\r\\n\\r\\n"
                api.sandbox("files").exec(["sh", "-c", f"printf '{later}' | nc -w 10 10.0.2.100 3128"])
            assert "late.invalid" in _next_event(lines, "network")
        assert client.get("/ui/sandboxes/nobody/events").status_code == 404

        upload = {"file": ("note.txt", b"from the page\n", "text/plain")}
        done = client.post(
            "/ui/sandboxes/files/upload", data={"csrf": csrf, "directory": "/tmp"}, files=upload
        )
        assert done.status_code == 303, done.text[-800:]
        page = client.get("/ui/sandboxes/files", params={"path": "/tmp"})
        assert page.status_code == 200 and "note.txt" in page.text
        sections = ('id="details"', 'id="policy"', 'id="console"', 'id="audit"', 'id="terminal-box"')
        for section in sections:
            assert section in page.text
        got = client.get("/ui/sandboxes/files/download", params={"path": "/tmp/note.txt"})
        assert got.content == b"from the page\n"
        assert "attachment" in got.headers["content-disposition"]

        no_file = client.post(
            "/ui/sandboxes/files/upload", data={"csrf": csrf, "directory": "/tmp"}, files={"file": ("", b"")}
        )
        assert no_file.status_code == 422 and "choose a file" in no_file.text
        a_dir = client.get("/ui/sandboxes/files/download", params={"path": "/tmp"})
        assert 400 <= a_dir.status_code < 500 and 'class="error"' in a_dir.text
        outside = client.get("/ui/sandboxes/files", params={"path": "/../etc"})
        assert outside.status_code == 200 and "&#39;..&#39;" in outside.text  # the listing says why not
        fork = client.post("/ui/fork", data={"csrf": csrf, "snapshot": "no-such-snapshot"})
        assert 400 <= fork.status_code < 500 and "no snapshot named &#39;no-such-snapshot&#39;" in fork.text

        assert client.post("/ui/sandboxes/files/stop", data={"csrf": csrf}).status_code == 303
        assert ">stopped<" in client.get("/ui/sandboxes/files").text
        assert client.post("/ui/sandboxes/files/remove", data={"csrf": csrf}).status_code == 303
        assert 'data-name="files"' not in client.get("/ui/").text


def test_sessions_are_bounded_and_expire(monkeypatch: pytest.MonkeyPatch) -> None:
    store = session.Sessions(api_key=None)
    monkeypatch.setattr(session, "MAX_SESSIONS", 3)
    here = ("127.0.0.1:8000", "127.0.0.1")
    tokens = [store.login(here)[0] for _ in range(4)]
    assert store.find(tokens[0], here) is None  # the oldest made room
    assert all(store.find(t, here) is not None for t in tokens[1:])
    store.open[tokens[1]].expires = 0
    assert store.find(tokens[1], here) is None
    store.logout(tokens[2])
    assert store.find(tokens[2], here) is None and store.find(None, here) is None


def test_a_session_is_refused_on_another_host_port_or_client_address(server: str) -> None:
    """Cookies are not port-scoped: a server in a sandbox forwarded to the same host name may get the
    cookie. Replayed with another Host (another port, another name) or from another address, it is
    as if logged out; where it logged in, it still works."""
    host = server.removeprefix("http://")
    port = int(host.rsplit(":", 1)[1])
    with logged_in(server) as (client, _):
        cookie = {session.COOKIE: client.cookies[session.COOKIE]}
        for other in (f"127.0.0.1:{port + 1}", f"localhost:{port}"):
            with httpx.Client(base_url=server, cookies=cookie, headers={"Host": other}) as replay:
                assert replay.get("/ui/").status_code == 401, other
        moved = httpx.HTTPTransport(local_address="127.0.0.2")
        with httpx.Client(base_url=server, cookies=cookie, transport=moved) as replay:
            assert replay.get("/ui/").status_code == 401
        assert client.get("/ui/").status_code == 200


def _next_event(lines: Iterator[str], name: str) -> str:
    """The data of the next Server-Sent Event called `name`."""
    event = None
    for line in lines:
        if line.startswith("event: "):
            event = line.removeprefix("event: ")
        elif line.startswith("data: ") and event == name:
            return line.removeprefix("data: ")
    raise AssertionError(f"the stream ended before a {name} event")

"""Secrets brokered by the egress gateway, in real sandboxes, over real TLS.

An HTTPS server on the host's loopback (127.0.0.2, allowed in the test's policy, with a certificate
from a CA the gateway is told to trust) must receive the real secret when the guest sends the
placeholder; inside the guest nothing may hold the secret (environments, /proc, files, its RAM read
from the host), nor may the console or audit log; the placeholder sent to another allowed host is
refused and audited; a guest that distrusts the sandbox CA gets nothing through.
"""

from __future__ import annotations

import http.server
import json
import mmap
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agentkernel.backends.qemu.backend import ram_file
from agentkernel.network.hostnames import normalise_host
from agentkernel.network.mitm import Issuer, make_ca
from agentkernel.service import audit, sandboxes
from tests.conftest import cli

SECRET = "sk-ant-REAL-6b1f0c9e3d2a4f5e8c7b"  # what must never be inside the sandbox
UPSTREAM, ELSEWHERE = "127.0.0.2", "127.0.0.3"


@dataclass
class Servers:
    https_port: int
    http_port: int
    ca_file: Path
    received: list[bytes] = field(default_factory=list)  # by both servers, in order


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    cert, key = make_ca("upstream-test")
    ca_file = tmp_path / "upstream-ca.pem"
    ca_file.write_bytes(cert)
    received: list[bytes] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            received.append(f"{self.requestline}\n{self.headers}".encode() + body)
            reply = json.dumps({"ok": True, "usage": {"input_tokens": 5, "output_tokens": 7}}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        do_GET = do_POST = _answer

        def log_message(self, *args: object) -> None:
            pass

    https = http.server.ThreadingHTTPServer((UPSTREAM, 0), Handler)
    https.socket = (
        Issuer(cert, key).context(normalise_host(UPSTREAM)).wrap_socket(https.socket, server_side=True)
    )
    plain = http.server.ThreadingHTTPServer((ELSEWHERE, 0), Handler)
    for server in (https, plain):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    yield Servers(https.server_address[1], plain.server_address[1], ca_file, received)
    for server in (https, plain):
        server.shutdown()


def write_config(servers: Servers) -> None:
    Path("agentkernel.toml").write_text(
        f'[security.domains]\nallow = ["{UPSTREAM}", "{ELSEWHERE}"]\n\n'
        f'[secrets.API_KEY]\nfrom_env = "AK_TEST_SECRET"\nhosts = ["{UPSTREAM}"]\n'
        f'upstream_ca = "{servers.ca_file}"\nin_url = true\nin_body = true\n'
    )


GUEST = r"""
import json, os, ssl, sys, urllib.request, urllib.error
key = os.environ["API_KEY"]
https, plain = sys.argv[1], sys.argv[2]

def call(url, *, data=None, headers=None, context=None):
    request = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=60, context=context) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except Exception as exc:
        return "error", repr(exc)

out = {"placeholder": key}
out["brokered"] = call(
    f"https://{https}/v1/messages?k={key}",
    data=json.dumps({"key": key}).encode(),
    headers={"x-api-key": key, "Authorization": "Bearer " + key, "Content-Type": "application/json"},
)
out["header"] = call(f"http://{plain}/h", headers={"x-api-key": key})
out["query"] = call(f"http://{plain}/q?k={key}")
out["body"] = call(f"http://{plain}/b", data=("k=" + key).encode())
distrusting = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # trusts no CA, the sandbox's included
orig = "/etc/ssl/certs/ca-certificates.crt.agentkernel-orig"
if os.path.exists(orig):
    distrusting.load_verify_locations(orig)  # the image's own store, as it was
out["distrusting"] = call(f"https://{https}/distrust", headers={"x-api-key": key}, context=distrusting)
print(json.dumps(out))
"""

SEARCH = r"""
import os, sys
needle = bytes.fromhex(sys.argv[1])
skip = ("/proc", "/sys", "/dev")
found = []
for pid in os.listdir("/proc"):
    if pid.isdigit():
        for part in ("environ", "cmdline"):
            try:
                if needle in open(f"/proc/{pid}/{part}", "rb").read():
                    found.append(f"/proc/{pid}/{part}")
            except OSError:
                pass
for top, dirs, files in os.walk("/"):
    dirs[:] = [d for d in dirs if os.path.join(top, d) not in skip]
    for name in files:
        path = os.path.join(top, name)
        try:
            with open(path, "rb") as f:
                if needle in f.read(64 << 20):
                    found.append(path)
        except OSError:
            pass
print("found:", found)
print("env:", "API_KEY=akph_" in open("/proc/self/environ", "rb").read().decode("latin-1").replace("\0", " "))
"""


def ram_holds(path: Path, needle: bytes) -> bool:
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as ram:
        return ram.find(needle) != -1


def test_guest_uses_placeholder_and_never_holds_the_secret(cli_home: Path, servers: Servers) -> None:
    write_config(servers)
    env = {"AK_TEST_SECRET": SECRET}
    made = cli("create", "sec", "--image", "python", "--secret", "API_KEY", env=env)
    assert made.returncode == 0, made.stderr.decode()
    started = cli("start", "sec", env=env)
    assert started.returncode == 0, started.stderr.decode()
    Path("guest.py").write_text(GUEST)
    Path("search.py").write_text(SEARCH)
    for script in ("guest.py", "search.py"):
        assert cli("cp", script, f"sec:/root/{script}").returncode == 0

    ran = cli(
        "exec", "sec", "--", "python3", "/root/guest.py",
        f"{UPSTREAM}:{servers.https_port}", f"{ELSEWHERE}:{servers.http_port}",
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr.decode()
    out = json.loads(ran.stdout.decode().strip().splitlines()[-1])
    placeholder = out["placeholder"]
    assert placeholder.startswith("akph_") and SECRET not in placeholder

    # The real host got the real value in the URL, both headers and the body; never the placeholder.
    assert out["brokered"][0] == 200 and '"output_tokens": 7' in out["brokered"][1], out["brokered"]
    assert len(servers.received) == 1, servers.received
    brokered = [r for r in servers.received if r.startswith(b"POST /v1/messages")]
    assert len(brokered) == 1 and brokered[0].count(SECRET.encode()) == 4
    assert placeholder.encode() not in brokered[0]

    # The other allowed host got nothing: each attempt was refused and audited.
    for where in ("header", "query", "body"):
        assert out[where][0] == 403, (where, out[where])
    assert not any(placeholder.encode() in r or SECRET.encode() in r for r in servers.received[1:])
    attempts = [e for e in audit.entries("sec") if e["event"] == "exfiltration"]
    assert {e["where"] for e in attempts} == {"header", "url", "body"}
    assert all(e["host"] == ELSEWHERE and e["secret"] == "API_KEY" for e in attempts)
    # Each names the command that made it: the one whose exec entry has that id.
    (execd,) = [e for e in audit.entries("sec") if e["event"] == "exec" and "/root/guest.py" in e["argv"]]
    assert re.fullmatch(r"c-[0-9a-f]{8}", execd["command"]), execd
    assert {e["command"] for e in attempts} == {execd["command"]}

    # A client that does not trust the sandbox CA fails closed: the host saw no such request.
    assert out["distrusting"][0] == "error" and "CERTIFICATE_VERIFY_FAILED" in out["distrusting"][1]
    assert not any(b"/distrust" in r for r in servers.received)

    # Model request recorded with its token usage.
    (request,) = [e for e in audit.entries("sec") if e["event"] == "model_request"]
    assert request["status"] == 200 and request["usage"] == {"input_tokens": 5, "output_tokens": 7}
    assert request["command"] == execd["command"]

    # Nor the guest's memory (its RAM file, read from the host while it runs) ...
    spec = sandboxes.spec_of(sandboxes.get("sec"))
    ram = ram_file(spec)
    assert ram.stat().st_size >= 256 << 20
    assert not ram_holds(ram, SECRET.encode())
    assert ram_holds(ram, placeholder.encode())  # the search is real: the placeholder is there
    # ... nor the console log, the audit log, or any file of the data dir.
    assert SECRET.encode() not in spec.console_log.read_bytes()

    # Nothing in the guest holds it: processes' environments and argv, files. (Last: the search
    # itself must hold what it looks for; its argv has it in hex.)
    searched = cli("exec", "sec", "--", "python3", "/root/search.py", SECRET.encode().hex())
    assert searched.returncode == 0, searched.stderr.decode()
    assert "found: []" in searched.stdout.decode() and "env: True" in searched.stdout.decode()
    assert SECRET not in audit.log_path().read_text()
    for top, _dirs, files in os.walk(cli_home):  # the shared images and cache are symlinks: not walked
        for name in files:
            path = Path(top, name)
            if path.is_file() and path != ram:
                assert SECRET.encode() not in path.read_bytes(), path
    assert cli("rm", "-f", "sec").returncode == 0


def test_guest_trusts_sandbox_ca_through_its_stores(cli_home: Path, servers: Servers) -> None:
    """The system store and the variables clients read all lead to the sandbox CA."""
    write_config(servers)
    script = (
        "echo $SSL_CERT_FILE $REQUESTS_CA_BUNDLE $NODE_EXTRA_CA_CERTS; "
        "grep -c 'BEGIN CERTIFICATE' /run/agentkernel/sandbox-ca.pem; "
        "tail -c 2000 /run/agentkernel/ca-bundle.pem | grep -c 'END CERTIFICATE'; "
        "[ -f /etc/ssl/certs/ca-certificates.crt ] && cmp -s /etc/ssl/certs/ca-certificates.crt "
        "/run/agentkernel/ca-bundle.pem && echo system-store || echo no-system-store"
    )
    ran = cli(
        "run", "--image", "python", "--secret", "API_KEY", "--", "/bin/sh", "-c", script,
        env={"AK_TEST_SECRET": SECRET},
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr.decode()
    out = ran.stdout.decode().split()
    assert out[:3] == ["/run/agentkernel/ca-bundle.pem"] * 2 + ["/run/agentkernel/sandbox-ca.pem"]
    assert out[3] == "1" and out[4] >= "1"
    assert out[5] in ("system-store", "no-system-store")


@pytest.mark.parametrize(
    ("config", "args", "env", "message"),
    [
        ("", ["--secret", "NOPE"], {}, "unknown secret 'NOPE'"),
        (
            '[secrets.K]\nfrom_env = "AK_TEST_SECRET"\nhosts = []\n',
            ["--secret", "K"],
            {},
            "secret K has no hosts",
        ),
        (
            '[secrets.K]\nfrom_env = "AK_TEST_SECRET"\nhosts = ["not a host"]\n',
            ["--secret", "K"],
            {},
            "secrets.K.hosts[0]: must be a domain pattern",
        ),
        (
            '[secrets.K]\nfrom_env = "AK_MISSING_VAR"\nhosts = ["api.example.com"]\n',
            ["--secret", "K"],
            {},
            "secret K: environment variable AK_MISSING_VAR is not set",
        ),
        (
            '[secrets.K]\nfrom_env = "AK_TEST_SECRET"\nhosts = ["api.example.com"]\n',
            ["--secret", "K", "--profile", "restrictive"],
            {"AK_TEST_SECRET": SECRET},
            "secrets are used through the network",
        ),
    ],
)
def test_bad_secret_input_is_one_clear_error_before_boot(
    cli_home: Path, config: str, args: list[str], env: dict[str, str], message: str
) -> None:
    Path("agentkernel.toml").write_text(config)
    for command in (["run", *args, "--", "true"], ["create", "bad", *args]):
        result = cli(*command, env={"AK_MISSING_VAR": "", **env})
        stderr = result.stderr.decode()
        assert result.returncode != 0
        assert message in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert json.loads(cli("list", "--json").stdout) == []


def test_sdk_names_a_secret_the_server_holds(cli_home: Path, servers: Servers, tmp_path: Path) -> None:
    """The value is in the server's secret store (set through stdin, private to its owner); a client
    names the secret, never sends it, and its command still reaches the host with it."""
    from agentkernel.client import ApiError, Client
    from tests.api.server import api_server

    Path("agentkernel.toml").write_text(
        f'[security.domains]\nallow = ["{UPSTREAM}"]\n\n'
        f'[secrets.API_KEY]\nhosts = ["{UPSTREAM}"]\nupstream_ca = "{servers.ca_file}"\n'
    )
    stored = cli("secret", "set", "API_KEY", "--host", UPSTREAM, input=f"{SECRET}\n".encode())
    assert stored.returncode == 0, stored.stderr.decode()
    store = cli_home / "secrets"
    assert store.stat().st_mode & 0o777 == 0o700
    assert (store / "API_KEY.json").stat().st_mode & 0o777 == 0o600
    listed = cli("secret", "ls")
    assert UPSTREAM in listed.stdout.decode() and SECRET not in listed.stdout.decode()

    script = (
        "import os, urllib.request; key = os.environ['API_KEY']; print(key[:5]); "
        f"url = 'https://{UPSTREAM}:{servers.https_port}/sdk'; "
        "r = urllib.request.Request(url, headers={'x-api-key': key}); "
        "print(urllib.request.urlopen(r, timeout=60).status)"
    )
    with api_server(tmp_path) as url, Client(url, timeout=600) as client:
        with pytest.raises(ApiError) as refused:
            client.run(["true"], secrets=["NOT_THERE"])
        assert refused.value.status == 422 and "unknown secret 'NOT_THERE'" in refused.value.detail
        result = client.run(["python3", "-c", script], image="python", secrets=["API_KEY"])
    assert result.exit_code == 0, result.stderr
    assert result.stdout.split() == ["akph_", "200"]
    (seen,) = servers.received
    assert seen.startswith(b"GET /sdk") and f"X-Api-Key: {SECRET}".encode() in seen
    assert cli("secret", "rm", "API_KEY").returncode == 0
    assert cli("secret", "ls").stdout.decode().strip() == ""


def test_mcp_names_a_secret_the_server_holds(cli_home: Path, servers: Servers, tmp_path: Path) -> None:
    from tests.mcp.test_mcp_server import Client, error_text, ok, with_server

    Path("agentkernel.toml").write_text(
        f'[security.domains]\nallow = ["{UPSTREAM}"]\n\n'
        f'[secrets.API_KEY]\nhosts = ["{UPSTREAM}"]\nupstream_ca = "{servers.ca_file}"\n'
    )
    assert cli("secret", "set", "API_KEY", "--host", UPSTREAM, input=f"{SECRET}\n".encode()).returncode == 0
    script = (
        "import os, urllib.request; "
        f"r = urllib.request.Request('https://{UPSTREAM}:{servers.https_port}/mcp', "
        "headers={'authorization': 'Bearer ' + os.environ['API_KEY']}); "
        "print(urllib.request.urlopen(r, timeout=60).status)"
    )

    async def body(client: Client) -> None:
        unknown = error_text(await client.call_tool("run_command", {"command": "true", "secrets": ["NOPE"]}))
        assert "unknown secret 'NOPE'" in unknown
        ran = ok(
            await client.call_tool(
                "run_command",
                {"command": ["python3", "-c", script], "image": "python", "secrets": ["API_KEY"]},
            )
        )
        assert (ran["exit_code"], ran["stdout"]) == (0, "200\n"), ran

    with_server(body, tmp_path)
    (seen,) = servers.received
    assert seen.startswith(b"GET /mcp") and f"Authorization: Bearer {SECRET}".encode() in seen

"""A real coding agent, installed from the npm registry in its image, under `agent run` with its key
brokered: Codex reaches a stand-in for its provider on the host's loopback through the sandbox's egress
gateway. The stand-in gets the real key; the sandbox only ever had a placeholder, and nothing the run
leaves on the host (console log, audit log, records) holds the key.

The image (`agent-codex`: Debian, Node.js 22, `@openai/codex`) is built from its recipe the first time,
which needs the npm registry; it is cached with the other images afterwards. Codex is pointed at the
stand-in as a user would point it at any provider (`-c model_providers...`, with `env_key` naming the
brokered variable).
"""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agentkernel.network.hostnames import normalise_host
from agentkernel.network.mitm import Issuer, make_ca
from tests.conftest import cli

KEY = "sk-proj-REAL-8d2e4f6a0b1c3e5d7f9a"  # what must never be inside the sandbox
UPSTREAM = "127.0.0.2"
ANSWER = "hello from the stand-in provider"


@dataclass
class Provider:
    port: int
    ca_file: Path
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)  # (request line, headers)


def _events(model: str) -> bytes:
    """A Responses API stream with one assistant message."""
    message = {
        "type": "message",
        "id": "msg_1",
        "role": "assistant",
        "content": [{"type": "output_text", "text": ANSWER, "annotations": []}],
    }
    usage = {
        "input_tokens": 11,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": 7,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 18,
    }
    events = [
        {"type": "response.created", "response": {"id": "resp_1", "model": model}},
        {"type": "response.output_item.done", "output_index": 0, "item": message},
        {"type": "response.completed", "response": {"id": "resp_1", "model": model, "usage": usage}},
    ]
    return b"".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events)


@pytest.fixture
def provider(tmp_path: Path) -> Iterator[Provider]:
    cert, key = make_ca("provider-test")
    ca_file = tmp_path / "provider-ca.pem"
    ca_file.write_bytes(cert)
    seen: list[tuple[str, dict[str, str]]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            seen.append((self.requestline, {k.lower(): v for k, v in self.headers.items()}))
            if self.command == "POST" and self.path.endswith("/responses"):
                model = json.loads(body or b"{}").get("model", "stand-in")
                reply, kind = _events(str(model)), "text/event-stream"
            else:
                reply, kind = json.dumps({"object": "list", "data": []}).encode(), "application/json"
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        do_GET = do_POST = _answer

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer((UPSTREAM, 0), Handler)
    server.socket = (
        Issuer(cert, key).context(normalise_host(UPSTREAM)).wrap_socket(server.socket, server_side=True)
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield Provider(server.server_address[1], ca_file, seen)
    server.shutdown()


def test_codex_reaches_its_provider_without_its_key_entering_the_sandbox(
    cli_home: Path, provider: Provider, tmp_path: Path
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "agentkernel.toml").write_text(
        f'[security.domains]\nallow = ["{UPSTREAM}"]\n\n'
        f'[secrets.CODEX_API_KEY]\nfrom_env = "CODEX_API_KEY"\nhosts = ["{UPSTREAM}"]\n'
        f'upstream_ca = "{provider.ca_file}"\n'
    )
    stand_in = f"https://{UPSTREAM}:{provider.port}/v1"
    ran = cli(
        "agent", "run", "codex", "--dir", str(project), "-e", "NO_COLOR=1",
        "--", "exec", "--skip-git-repo-check",
        "-c", "model_provider=standin", "-c", "model_providers.standin.name=standin",
        "-c", f"model_providers.standin.base_url={stand_in}",
        "-c", "model_providers.standin.env_key=CODEX_API_KEY",
        "-c", "model_providers.standin.wire_api=responses",
        "say hello",
        env={"CODEX_API_KEY": KEY, "OPENAI_API_KEY": ""},
        input=b"",
        timeout=500,
    )  # fmt: skip
    out, err = ran.stdout.decode(errors="replace"), ran.stderr.decode(errors="replace")
    responses = [h for line, h in provider.requests if line.startswith("POST") and "/responses" in line]
    assert responses, (ran.returncode, out[-2000:], err[-2000:], provider.requests)
    # The provider got the real key, as the agent sends it; the agent only ever had the placeholder.
    assert all(h.get("authorization") == f"Bearer {KEY}" for h in responses), responses
    assert ran.returncode == 0 and ANSWER in out, (out[-2000:], err[-2000:])

    # Nothing the run left on the host holds the key: console logs, the audit log, records, state.
    holders = [
        path
        for path in cli_home.rglob("*")
        if path.is_file() and not path.is_symlink() and KEY.encode() in path.read_bytes()
    ]
    assert holders == []
    audit = [json.loads(line) for line in (cli_home / "audit.jsonl").read_text().splitlines()]
    requests = [e for e in audit if e["event"] == "model_request" and e.get("host") == UPSTREAM]
    assert requests and all(e["status"] == 200 for e in requests), requests


def test_agent_run_refuses_its_key_as_plain_env_and_a_run_without_terminal_or_arguments(
    cli_home: Path, tmp_path: Path
) -> None:
    leaked = cli(
        "agent", "run", "codex", "--dir", str(tmp_path), "-e", "OPENAI_API_KEY=sk-x", "--", "exec", "hi"
    )
    assert leaked.returncode == 1
    assert b"--env OPENAI_API_KEY: that is Codex's key" in leaked.stderr and b"Traceback" not in leaked.stderr
    bare = cli("agent", "run", "codex", "--dir", str(tmp_path))  # stdin is not a terminal here
    assert bare.returncode == 1 and b"give the agent arguments after `--`" in bare.stderr
    bad = cli("agent", "run", "codex", "--dir", str(tmp_path), "-e", "NOEQUALS", "--", "exec", "hi")
    assert bad.returncode == 1 and b"--env: 'NOEQUALS': expected KEY=VALUE" in bad.stderr

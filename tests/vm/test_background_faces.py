"""Background commands through the faces on a real sandbox: the CLI (in subprocesses: each one gone
before the next, so the command outlives every client) and the SDK against a real server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agentkernel.client import Client, ExitEvent
from tests.api.server import api_server
from tests.conftest import cli

pytestmark = pytest.mark.vm


def ok(*args: str) -> bytes:
    result = cli(*args)
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout


def test_cli_and_sdk_background_commands(cli_home: Path, tmp_path: Path) -> None:
    ok("create", "box")
    ok("start", "box")
    script = "echo one; sleep 2; echo two >&2; exit 3"
    first = int(ok("exec", "-d", "box", "--", "sh", "-c", script))
    [listed] = json.loads(ok("commands", "box", "--json"))
    assert (listed["id"], listed["state"], listed["command"]) == (first, "running", ["sh", "-c", script])

    # Output from the start, followed until it exits; then wait gives its status as its own.
    assert ok("output", "box", str(first), "-f") == b"one\ntwo\n"
    assert cli("wait", "box", str(first)).returncode == 3
    assert ok("output", "box", str(first)) == b"one\ntwo\n"

    sleeper = int(ok("exec", "--detach", "box", "--", "sleep", "600"))
    assert ok("kill", "box", str(sleeper), "-s", "TERM").strip() == str(sleeper).encode()
    assert cli("wait", "box", str(sleeper)).returncode == 128 + 15
    again = cli("kill", "box", str(sleeper))
    assert again.returncode == 1 and again.stderr.decode().count("\n") == 1
    assert "has exited" in again.stderr.decode()
    missing = cli("output", "box", "999")
    assert missing.returncode == 1 and b"no background command 999" in missing.stderr
    states = {c["id"]: c["state"] for c in json.loads(ok("commands", "box", "--json"))}
    assert states == {first: "exited", sleeper: "exited"}

    with api_server(tmp_path) as url:
        with Client(url) as ak:
            box = ak.sandbox("box")
            cat = box.run(["cat"], background=True)
            cat.send_stdin("over the API\n")
        with Client(url) as ak:  # a new client reconnects to it
            cat = ak.sandbox("box").connect_command(cat.id)
            cat.close_stdin()
            assert "".join(c.data for c in cat) == "over the API\n"
            assert cat.exit == ExitEvent(0, None, False)
            assert ak.sandbox("box").connect_command(first).wait() == ExitEvent(3, None, False)
    assert ok("output", "box", str(cat.id)) == b"over the API\n"

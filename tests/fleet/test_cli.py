"""Bad input to `serve --node`, `serve --fleet` and `fleet ...`: one clear line each, never a traceback
or a hang (the real CLI in a subprocess)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.api.server import free_port
from tests.conftest import cli


def one_line_error(*args: str, env: dict[str, str] | None = None) -> str:
    started = time.monotonic()
    result = cli(*args, env=env, timeout=60)
    assert time.monotonic() - started < 30, "it hung"
    assert result.returncode != 0
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("agentkernel: error: "), result.stderr.decode()
    assert b"Traceback" not in result.stderr
    return lines[0]


@pytest.mark.parametrize("mode", ["--fleet", "--node"])
def test_unreachable_etcd_names_every_url_tried(mode: str) -> None:
    dead = [f"http://127.0.0.1:{free_port()}" for _ in range(2)]
    line = one_line_error(
        "serve", mode, "--port", str(free_port()), "--etcd", ",".join(dead), env={"AGENTKERNEL_NODE_KEY": "k"}
    )
    assert "etcd is unreachable" in line and all(url in line for url in dead), line


def test_status_with_unreachable_etcd() -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    line = one_line_error("fleet", "status", "--etcd", dead)
    assert line == f"agentkernel: error: etcd is unreachable (tried {dead}: cannot connect)"


@pytest.mark.parametrize(
    ("args", "env", "says"),
    [
        (["serve", "--node", "--etcd", "http://127.0.0.1:2379"], {}, "AGENTKERNEL_NODE_KEY: not set"),
        (["serve", "--fleet", "--etcd", "etcd:2379"], {}, "is not an etcd client URL"),
        (["serve", "--fleet"], {"AGENTKERNEL_NODE_KEY": "k"}, "--etcd: expected URL[,URL...]"),
        (["serve", "--node", "--fleet", "--etcd", "http://a:1"], {}, "exclude each other"),
        (["serve", "--capacity", "3"], {}, "need --node"),
        (
            ["serve", "--node", "--etcd", "http://a:1", "--node-id", "-x"],
            {"AGENTKERNEL_NODE_KEY": "k"},
            "--node-id",
        ),
        (
            ["serve", "--node", "--etcd", "http://a:1", "--advertise", "a:1"],
            {"AGENTKERNEL_NODE_KEY": "k"},
            "--advertise",
        ),
    ],
)
def test_bad_options(args: list[str], env: dict[str, str], says: str) -> None:
    line = one_line_error(*args, env={"AGENTKERNEL_NODE_KEY": "", "AGENTKERNEL_ETCD": "", **env})
    assert says in line, line


def test_certs_for_a_bad_host_name(tmp_path: Path) -> None:
    line = one_line_error("fleet", "certs", str(tmp_path / "certs"), "--host", "not a host")
    assert line == "agentkernel: error: --host: 'not a host' is not a host name or an address"
    assert not (tmp_path / "certs").exists()

"""Declaring secrets (agentkernel.toml, the store, agents' keys) and reading token usage: no VM."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from agentkernel.agents import catalog
from agentkernel.config import Secret
from agentkernel.errors import AgentkernelError
from agentkernel.network import secret_store, usage
from agentkernel.network.brokering import PLACEHOLDER, bind, guest_env, read_value
from tests.conftest import cli


def test_bind_from_env_keeps_no_value(monkeypatch: pytest.MonkeyPatch, isolated_home: Path) -> None:
    monkeypatch.setenv("AK_KEY", "value-of-the-key")
    declared = {"KEY": Secret(from_env="AK_KEY", hosts=("API.Example.com", "*.example.org"))}
    (first,) = bind(["KEY"], declared)
    (second,) = bind(["KEY", "KEY"], declared)
    assert PLACEHOLDER.fullmatch(first.placeholder) and first.placeholder != second.placeholder
    assert first.hosts == ("api.example.com", "*.example.org")
    assert first.serves("api.example.com") and first.serves("x.example.org")
    assert not first.serves("example.org") and not first.serves("evil.com")
    assert "value-of-the-key" not in json.dumps(first.record())
    assert guest_env([first]) == {"KEY": first.placeholder}
    assert read_value(first) == "value-of-the-key"


def test_bind_from_file_is_relative_to_the_config(tmp_path: Path, isolated_home: Path) -> None:
    (tmp_path / "key.txt").write_text("file-secret-value\n")
    declared = {"K": Secret(from_file="key.txt", hosts=("api.example.com",))}
    (binding,) = bind(["K"], declared, base=tmp_path)
    assert read_value(binding) == "file-secret-value"
    with pytest.raises(AgentkernelError, match=r"secret K: cannot read .*missing.txt"):
        bind(["K"], {"K": Secret(from_file="missing.txt", hosts=("api.example.com",))}, base=tmp_path)


@pytest.mark.parametrize(
    ("declared", "message"),
    [
        ({"K": Secret(from_env="AK_KEY", from_file="f", hosts=("a.com",))}, "not both"),
        ({"K": Secret(from_env="AK_KEY", hosts=("a b",))}, "secret K: security.domains pattern"),
        ({"K": Secret(from_env="AK_KEY", hosts=("a.com",), upstream_ca="/nonexistent")}, "no such file"),
        ({"K": Secret(from_env="AK_KEY", hosts=("a.com",))}, "the value must be one line of 8"),
    ],
)
def test_bad_declarations(
    declared: dict[str, Secret], message: str, monkeypatch: pytest.MonkeyPatch, isolated_home: Path
) -> None:
    monkeypatch.setenv("AK_KEY", "short")
    with pytest.raises(AgentkernelError, match=message):
        bind(["K"], declared)


def test_invalid_secret_name(isolated_home: Path) -> None:
    with pytest.raises(AgentkernelError, match="invalid secret name"):
        bind(["BAD-NAME"], {})


def test_agent_keys_are_brokered_to_their_providers(
    monkeypatch: pytest.MonkeyPatch, isolated_home: Path
) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test-value")
    monkeypatch.setenv("GEMINI_API_KEY", "gemini-test-value")
    claude, gemini = bind(["ANTHROPIC_API_KEY", "GEMINI_API_KEY"], catalog.KEY_HOSTS)
    assert claude.hosts == ("api.anthropic.com",) and claude.source == "env:ANTHROPIC_API_KEY"
    assert gemini.hosts == ("generativelanguage.googleapis.com",) and gemini.in_url
    assert set(catalog.KEY_HOSTS) == {v for a in catalog.AGENTS.values() for v in a.key_vars}


def test_store_is_private_and_never_shows_values(isolated_home: Path) -> None:
    result = cli("secret", "set", "K", "--host", "api.example.com", input=b"stored-secret-value\n")
    assert result.returncode == 0, result.stderr
    directory = isolated_home / "secrets"
    assert directory.stat().st_mode & 0o777 == 0o700
    assert (directory / "K.json").stat().st_mode & 0o777 == 0o600
    assert secret_store.value("K") == "stored-secret-value"
    (binding,) = bind(["K"], {})
    assert binding.source == "store:K" and binding.hosts == ("api.example.com",)
    listed = cli("secret", "ls", "--json")
    assert json.loads(listed.stdout) == [{"name": "K", "hosts": ["api.example.com"]}]
    assert cli("secret", "rm", "K").returncode == 0
    assert secret_store.value("K") is None
    gone = cli("secret", "rm", "K")
    assert gone.returncode == 1 and gone.stderr.decode().strip() == "agentkernel: error: no stored secret 'K'"


def test_store_refuses_values_in_argv_and_secrets_without_hosts(isolated_home: Path) -> None:
    in_argv = cli("secret", "set", "K", "--host", "a.com", "the-value-itself", input=b"")
    assert in_argv.returncode != 0 and secret_store.value("K") is None
    no_hosts = cli("secret", "set", "K", input=b"some-secret-value\n")
    assert no_hosts.returncode == 1 and b"secret K has no hosts" in no_hosts.stderr


def test_usage_from_json_sse_and_gzip() -> None:
    anthropic = {"id": "m", "usage": {"input_tokens": 3, "output_tokens": 9}}
    assert usage.extract(json.dumps(anthropic).encode()) == {"input_tokens": 3, "output_tokens": 9}
    stream = (
        b'event: message_start\ndata: {"type": "message_start", "message": {"usage": '
        b'{"input_tokens": 25, "output_tokens": 1}}}\n\n'
        b'event: content_block_delta\ndata: {"type": "content_block_delta"}\n\n'
        b'event: message_delta\ndata: {"type": "message_delta", "usage": {"output_tokens": 15}}\n\n'
    )
    assert usage.extract(stream) == {"input_tokens": 25, "output_tokens": 15}
    gemini = {"usageMetadata": {"promptTokenCount": 4, "totalTokenCount": 10}}
    assert usage.extract(gzip.compress(json.dumps(gemini).encode()), "gzip") == gemini["usageMetadata"]
    assert usage.extract(b"<html>no usage</html>") is None
    assert usage.extract(b"\x00garbage", "br") is None

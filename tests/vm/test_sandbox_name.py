"""`[sandbox] name` in agentkernel.toml: the name `create` gives when none is given, through the real
CLI; `run` still names its own sandboxes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.conftest import cli

pytestmark = pytest.mark.vm


def ok(*args: str) -> str:
    result = cli(*args)
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode()


def one_line_error(*args: str) -> str:
    result = cli(*args)
    assert result.returncode == 1
    assert result.stderr.count(b"\n") == 1 and b"Traceback" not in result.stderr
    return result.stderr.decode().strip()


def names() -> list[str]:
    return sorted(s["name"] for s in json.loads(ok("list", "--json")))


def test_create_takes_the_name_from_the_file(cli_home: Path, tmp_path: Path) -> None:
    (tmp_path / ".git").mkdir()  # no agentkernel.toml above the test's directory is looked for
    assert one_line_error("create").endswith(
        "no sandbox name: agentkernel create NAME, or set [sandbox] name in agentkernel.toml"
    )
    (tmp_path / "agentkernel.toml").write_text('[sandbox]\nname = "proj"\n')
    assert ok("create") == "proj\n"
    assert names() == ["proj"]
    assert one_line_error("create").endswith("a sandbox named 'proj' already exists")
    assert ok("create", "other") == "other\n"  # a name given wins
    assert names() == ["other", "proj"]

    # `run` names its own sandbox, whatever the file says
    hostname = ok("run", "--no-pool", "--no-network", "--", "hostname").strip()
    assert re.fullmatch(r"run-[0-9a-f]+", hostname), hostname
    assert names() == ["other", "proj"]

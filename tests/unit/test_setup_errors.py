"""`setup` and `image` failures are one clear line naming what to do; nothing is built or left behind."""

from __future__ import annotations

import sys
from pathlib import Path

from agentkernel.service.setup import missing_packages
from tests.conftest import cli


def test_missing_packages_are_named() -> None:
    tools = {"sh": "dash", "no-such-program-xyz": "xyz-tools", "no-such-program-abc": "xyz-tools"}
    assert missing_packages(tools) == ["xyz-tools"]


def test_setup_on_a_machine_without_the_tools(isolated_home: Path, tmp_path: Path) -> None:
    bare_path = tmp_path / "bin"
    bare_path.mkdir()
    (bare_path / "python3").symlink_to(sys.executable)
    result = cli("setup", "--yes", env={"PATH": str(bare_path)})
    assert result.returncode != 0
    (line,) = result.stderr.decode().strip().splitlines()
    assert line.startswith("agentkernel: error: missing system packages:")
    assert "apt-get install -y" in line and "musl-tools" in line
    assert not (isolated_home / "cache").exists() or not any((isolated_home / "cache").rglob("*"))


def test_bad_kernel_source(isolated_home: Path) -> None:
    result = cli("setup", "--yes", "--kernel-source", "/no/such/linux.tar.xz")
    assert result.returncode != 0
    (line,) = result.stderr.decode().strip().splitlines()  # checked before anything is built
    assert "--kernel-source /no/such/linux.tar.xz" in line


def test_unreachable_kernel_url(isolated_home: Path) -> None:
    # Port 9 on loopback: nothing listens, so the fetch fails at once.
    result = cli("setup", "--yes", "--image", "base", "--kernel-source", "http://127.0.0.1:9/linux.tar.xz")
    assert result.returncode != 0
    stderr = result.stderr.decode()
    line = stderr.strip().splitlines()[-1]  # after the progress lines of the steps that ran
    assert "Traceback" not in stderr
    assert "cannot fetch kernel source http://127.0.0.1:9/linux.tar.xz" in line
    leftovers = [p for p in (isolated_home / "cache" / "kernel").glob("*") if p.name != "current"]
    assert leftovers == []


def test_image_commands_without_setup(isolated_home: Path) -> None:
    result = cli("image", "build", "base")
    assert result.returncode != 0
    assert (
        result.stderr.decode().strip()
        == "agentkernel: error: no guest agent built yet: run `agentkernel setup`"
    )
    listed = cli("image", "list", "--json")
    assert listed.returncode == 0 and listed.stdout.strip() == b"[]"


def test_version_and_help_everywhere() -> None:
    assert cli("--version").stdout.decode().strip() == "agentkernel 0.1.0"
    for command in (
        "setup",
        "status",
        "run",
        "create",
        "exec",
        "image",
        "image pull",
        "cp",
        "audit",
        "bench",
    ):
        result = cli(*command.split(), "--help")
        assert result.returncode == 0, command
        assert b"Usage" in result.stdout

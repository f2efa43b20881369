"""`agents`, `agent run`'s checks and `plugin install|list`, through the real CLI in temp dirs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomlkit

from agentkernel.agents.catalog import AGENTS, launch
from agentkernel.cli.agent_cmds import AGENT_RESOURCES, agent_request
from agentkernel.config import load_config
from agentkernel.errors import AgentkernelError
from agentkernel.images import store
from agentkernel.images.recipes import RECIPES, _mmdebstrap_args
from tests.conftest import cli

MCP_ENTRY = {"command": "agentkernel", "args": ["mcp-server"]}
"""A project's entry: the command from PATH, so the committed file holds no path of this machine."""
GLOBAL_ENTRY = {"command": str(Path(sys.executable).parent / "agentkernel"), "args": ["mcp-server"]}
"""The user's own configs name this installation (agents started outside a shell lack its PATH)."""


@pytest.fixture
def home(tmp_path: Path) -> dict[str, str]:
    """A HOME of its own, so --global writes stay in the test's temp dir."""
    (tmp_path / "home").mkdir()
    return {"HOME": str(tmp_path / "home"), "XDG_CONFIG_HOME": "", "CODEX_HOME": ""}


def ok(*args: str, env: dict[str, str]) -> str:
    result = cli(*args, env=env)
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode()


def test_install_merges_with_existing_configs(tmp_path: Path, home: dict[str, str]) -> None:
    project = tmp_path / "project"
    (project / ".gemini").mkdir(parents=True)
    (project / ".mcp.json").write_text(json.dumps({"mcpServers": {"other": {"command": "x"}}, "extra": 1}))
    (project / ".gemini" / "settings.json").write_text(json.dumps({"theme": "dark", "mcpServers": {}}))
    (project / ".codex").mkdir()
    (project / ".codex" / "config.toml").write_text(
        '# mine\nmodel = "o3"  # keep\n\n[mcp_servers.other]\ncommand = "x"\n'
    )
    (project / "opencode.json").write_text(
        json.dumps({"mcp": {"agentkernel": {"command": ["old"], "environment": {"K": "v"}}}})
    )
    d = ["--dir", str(project)]

    for target in ("claude", "gemini", "codex", "opencode", "mcp"):
        ok("plugin", "install", target, *d, env=home)

    claude = json.loads((project / ".mcp.json").read_text())
    assert claude == {"mcpServers": {"other": {"command": "x"}, "agentkernel": MCP_ENTRY}, "extra": 1}
    skill = (project / ".claude" / "skills" / "agentkernel" / "SKILL.md").read_text()
    assert skill.startswith("---\nname: agentkernel\n")
    gemini = json.loads((project / ".gemini" / "settings.json").read_text())
    assert gemini == {"theme": "dark", "mcpServers": {"agentkernel": MCP_ENTRY}}
    codex_text = (project / ".codex" / "config.toml").read_text()
    assert codex_text.startswith('# mine\nmodel = "o3"  # keep\n')
    assert tomlkit.parse(codex_text)["mcp_servers"] == {"other": {"command": "x"}, "agentkernel": MCP_ENTRY}
    opencode = json.loads((project / "opencode.json").read_text())["mcp"]["agentkernel"]
    assert opencode == {  # the user's own keys in our entry stay
        "command": [MCP_ENTRY["command"], "mcp-server"],
        "environment": {"K": "v"},
        "type": "local",
        "enabled": True,
    }

    again = ok("plugin", "install", "claude", *d, env=home)
    assert again.count("unchanged") == 2
    listed = ok("plugin", "list", *d, env=home)
    assert [line.split()[:3] for line in listed.splitlines()[1:]] == [
        ["claude", "yes", "no"],
        ["codex", "yes", "no"],
        ["gemini", "yes", "no"],
        ["opencode", "yes", "no"],
        ["mcp", "yes", "-"],
    ]


def test_global_dry_run_and_refusals(tmp_path: Path, home: dict[str, str]) -> None:
    user = Path(home["HOME"])
    (user / ".claude.json").write_text(json.dumps({"numStartups": 3, "projects": {"/x": {}}}))
    dry = ok("plugin", "install", "claude", "--global", "--dry-run", env=home)
    assert "would update" in dry and "would create" in dry
    assert json.loads((user / ".claude.json").read_text()) == {"numStartups": 3, "projects": {"/x": {}}}
    assert not (user / ".claude").exists()

    ok("plugin", "install", "claude", "--global", env=home)
    assert json.loads((user / ".claude.json").read_text())["mcpServers"] == {"agentkernel": GLOBAL_ENTRY}
    assert json.loads((user / ".claude.json").read_text())["numStartups"] == 3
    ok("plugin", "install", "opencode", "--global", env=home)
    assert (user / ".config" / "opencode" / "opencode.json").is_file()
    ok("plugin", "install", "codex", "--global", env=home)
    assert (
        tomlkit.parse((user / ".codex" / "config.toml").read_text())["mcp_servers"]["agentkernel"]
        == GLOBAL_ENTRY
    )

    broken = tmp_path / "broken"
    (broken / ".gemini").mkdir(parents=True)
    (broken / ".gemini" / "settings.json").write_text('{"theme": "dark",}')
    refused = cli("plugin", "install", "gemini", "--dir", str(broken), env=home)
    assert (
        refused.returncode == 1 and b"cannot parse" in refused.stderr and b"Traceback" not in refused.stderr
    )
    assert (broken / ".gemini" / "settings.json").read_text() == '{"theme": "dark",}'

    mine = broken / ".claude" / "skills" / "agentkernel" / "SKILL.md"
    mine.parent.mkdir(parents=True)
    mine.write_text("my own notes\n")
    skipped = ok("plugin", "install", "claude", "--dir", str(broken), env=home)
    assert "skipped" in skipped and mine.read_text() == "my own notes\n"

    no_global = cli("plugin", "install", "mcp", "--global", env=home)
    assert no_global.returncode == 1 and b"no global one" in no_global.stderr
    unknown = cli("plugin", "install", "vim", env=home)
    assert unknown.returncode == 1 and b"unknown plugin target" in unknown.stderr


def strings(value: object) -> list[str]:
    """Every string in a parsed JSON or TOML document, keys included."""
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (str(k), *strings(v))]
    if isinstance(value, list):
        return [s for v in value for s in strings(v)]
    return [value] if isinstance(value, str) else []


def test_project_configs_hold_no_path_of_this_machine(tmp_path: Path, home: dict[str, str]) -> None:
    project = tmp_path / "project"
    project.mkdir()
    for target in ("claude", "gemini", "codex", "opencode", "mcp"):
        ok("plugin", "install", target, "--dir", str(project), env=home)
    configs = {
        ".mcp.json": json.loads((project / ".mcp.json").read_text()),
        ".gemini/settings.json": json.loads((project / ".gemini" / "settings.json").read_text()),
        ".codex/config.toml": tomlkit.parse((project / ".codex" / "config.toml").read_text()).unwrap(),
        "opencode.json": json.loads((project / "opencode.json").read_text()),
    }
    for name, config in configs.items():
        absolute = [s for s in strings(config) if s.startswith("/")]
        assert not absolute, (name, absolute)
    assert configs[".mcp.json"]["mcpServers"]["agentkernel"] == MCP_ENTRY
    assert configs["opencode.json"]["mcp"]["agentkernel"]["command"] == ["agentkernel", "mcp-server"]

    on_path = {**home, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    assert b"not on PATH" not in cli("plugin", "install", "mcp", "--dir", str(project), env=on_path).stderr
    elsewhere = {**home, "PATH": "/usr/bin:/bin"}
    warned = cli("plugin", "install", "mcp", "--dir", str(project), env=elsewhere)
    assert warned.returncode == 0 and b"`agentkernel` is not on PATH" in warned.stderr


def test_dry_run_shows_the_content_and_writes_nothing(tmp_path: Path, home: dict[str, str]) -> None:
    project = tmp_path / "project"
    project.mkdir()
    before = '{"mcpServers": {"other": {"command": "x"}}}'
    (project / ".mcp.json").write_text(before)
    dry = ok("plugin", "install", "claude", "--dir", str(project), "--dry-run", env=home)
    assert f"would update     {project / '.mcp.json'} (mcpServers.agentkernel)" in dry
    assert f"--- {project / '.mcp.json'}\n+++ {project / '.mcp.json'}\n" in dry
    assert f"-{before}\n\\ No newline at end of file\n" in dry
    assert '+    "agentkernel": {\n+      "command": "agentkernel",\n' in dry
    skill = project / ".claude" / "skills" / "agentkernel" / "SKILL.md"
    assert f"would create     {skill} (file)\n--- /dev/null\n+++ {skill}\n" in dry
    assert "+name: agentkernel\n" in dry and "+# Sandboxed commands with agentkernel\n" in dry
    assert (project / ".mcp.json").read_text() == before
    assert not (project / ".claude").exists()

    ok("plugin", "install", "claude", "--dir", str(project), env=home)
    again = ok("plugin", "install", "claude", "--dir", str(project), "--dry-run", env=home)
    assert again.count("unchanged") == 2 and "---" not in again  # nothing would change: no diff


def test_agents_listing_shows_keys(home: dict[str, str]) -> None:
    env = {**home, "PATH": os.environ["PATH"], "ANTHROPIC_API_KEY": "sk-test", "GEMINI_API_KEY": ""}
    rows = {row["name"]: row for row in json.loads(ok("agents", "--json", env=env))}
    assert set(rows) == {"claude", "gemini", "codex", "opencode"}
    assert rows["claude"]["keys_set"] == ["ANTHROPIC_API_KEY"]
    assert rows["gemini"]["keys_set"] == []
    assert rows["codex"]["image"] == "agent-codex"
    table = ok("agents", env=env)
    assert "Claude Code" in table and "set (ANTHROPIC_API_KEY)" in table


def test_launch_brokers_only_the_agents_key(tmp_path: Path) -> None:
    environ = {
        "ANTHROPIC_API_KEY": "a",
        "OPENAI_API_KEY": "o",
        "AWS_SECRET_ACCESS_KEY": "no",
        "TERM": "xterm",
    }
    claude = launch("claude", tmp_path, environ)
    assert claude.env == {"TERM": "xterm"}  # the key is brokered, never in the sandbox
    assert claude.secrets == ("ANTHROPIC_API_KEY",)
    assert (claude.workdir, claude.command, claude.project_dir) == (
        "/workspace",
        ["claude"],
        tmp_path.resolve(),
    )
    assert launch("codex", tmp_path, environ).secrets == ("OPENAI_API_KEY",)
    assert launch("gemini", tmp_path, environ).secrets == ()


def test_agent_run_refuses_clearly(tmp_path: Path) -> None:
    unknown = cli("agent", "run", "vim")
    assert unknown.returncode == 1 and b"unknown agent 'vim'" in unknown.stderr
    no_dir = cli("agent", "run", "claude", "--dir", str(tmp_path / "nope"))
    assert no_dir.returncode == 1 and b"no such directory" in no_dir.stderr
    offline = cli("agent", "run", "claude", "--dir", str(tmp_path), "--profile", "restrictive")
    assert offline.returncode == 1 and b"needs the network" in offline.stderr
    no_tty = cli("agent", "run", "claude", "--dir", str(tmp_path), input=b"")
    assert no_tty.returncode == 1 and b"run it in a terminal" in no_tty.stderr


def test_agent_images_come_from_recipes() -> None:
    for agent in AGENTS.values():
        recipe = RECIPES[agent.image]
        assert recipe.npm[-1] == agent.package and "nodejs" in recipe.packages
        hook = [a for a in _mmdebstrap_args(recipe, "T") if a.startswith("--customize-hook=")]
        assert len(hook) == 1 and agent.package in hook[0]
    assert not any(a.startswith("--customize-hook=") for a in _mmdebstrap_args(RECIPES["node"], "T"))


def refused(*args: str) -> str:
    """The one line `agent run` refuses with (no terminal: it never gets to start a sandbox)."""
    result = cli("agent", "run", *args, input=b"")
    assert result.returncode == 1, result.stdout
    assert result.stderr.count(b"\n") == 1 and b"Traceback" not in result.stderr
    return result.stderr.decode().removeprefix("agentkernel: error: ").strip()


def test_agent_run_without_a_name_runs_the_preferred_agent(tmp_path: Path) -> None:
    project = tmp_path / "project"
    (project / ".git").mkdir(parents=True)  # no agentkernel.toml above it is looked for
    assert refused("--dir", str(project)) == (
        "no agent named and no [agent] preferred in agentkernel.toml:"
        " name one of claude, gemini, codex, opencode"
    )
    (project / "agentkernel.toml").write_text('[agent]\npreferred = "gemini"\n')
    assert refused("--dir", str(project)) == (
        "agent run attaches Gemini CLI's interactive UI: run it in a terminal, or give the agent arguments "
        "after `--` for a run without one"
    )
    assert refused("--dir", str(project), "--profile", "restrictive") == (
        "Gemini CLI needs the network to reach its API: use a profile that has it"
    )
    assert refused("codex", "--dir", str(project)).startswith("agent run attaches Codex's")  # a name wins
    (project / "agentkernel.toml").write_text('[agent]\npreferred = "vim"\n')
    assert refused("--dir", str(project)).endswith(
        'agent.preferred: must be one of claude, gemini, codex, opencode (got "vim")'
    )


@pytest.fixture
def agent_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A data dir of its own whose store has an image named as Claude Code's (the base image: the
    real one is built from the npm registry)."""
    base = store.get("base").path
    monkeypatch.setenv("AGENTKERNEL_HOME", str(tmp_path / "home"))
    with store.scratch() as scratch:
        copy = scratch / "rootfs.ext4"
        subprocess.run(["cp", "--sparse=always", str(base), str(copy)], check=True)
        return store.add(copy, AGENTS["claude"].image, source="test").name


def test_agent_sandbox_resources_come_from_flags_then_the_file_then_the_agent_defaults(
    tmp_path: Path, agent_image: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test-0123456789")  # read when it is bound
    project = tmp_path / "project"
    (project / ".git").mkdir(parents=True)
    claude = launch("claude", project, {"ANTHROPIC_API_KEY": "sk-ant-test-0123456789"})

    def request(toml: str, **flags: int | None) -> tuple[int, int, int | None]:
        (project / "agentkernel.toml").write_text(toml)
        config, path = load_config(search_from=project)
        given = {"vcpus": None, "memory_mb": None, **flags}
        made = agent_request(claude, config, path, profile=None, **given)
        assert (made.image, made.mount_dir) == (agent_image, project.resolve())
        assert [s.name for s in made.secrets] == ["ANTHROPIC_API_KEY"]
        return made.vcpus, made.memory_mb, made.disk_mb

    assert request("") == (*AGENT_RESOURCES, None)
    assert request("[resources]\nvcpus = 3\ndisk_mb = 4096\n") == (3, AGENT_RESOURCES[1], 4096)
    assert request("[resources]\nvcpus = 3\nmemory_mb = 1024\n", vcpus=4) == (4, 1024, None)
    assert request("[resources]\nmemory_mb = 1024\n", memory_mb=4096) == (AGENT_RESOURCES[0], 4096, None)
    with pytest.raises(AgentkernelError, match=r"vcpus.*between 1 and 32"):
        request("", vcpus=0)

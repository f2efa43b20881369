"""The coding agents agentkernel knows: how to tell whether each is installed and has its key, and how
to launch one in a sandbox with the project mounted and its own API key brokered: the sandbox gets
a placeholder, the egress gateway sends the key to its provider's API hosts only (docs/secrets.md)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from agentkernel.config import Secret
from agentkernel.errors import AgentkernelError
from agentkernel.images.recipes import get_recipe
from agentkernel.service.sandboxes import WORKSPACE


@dataclass(frozen=True)
class Agent:
    name: str
    title: str
    binary: str
    key_vars: tuple[str, ...]
    """The environment variables that hold its credentials; only these go into its sandbox."""

    @property
    def image(self) -> str:
        """Its image, from the recipe of the same name."""
        return f"agent-{self.name}"

    @property
    def package(self) -> str:
        """Its npm package, which its recipe installs."""
        return get_recipe(self.image).npm[-1]


AGENTS = {
    agent.name: agent
    for agent in (
        Agent("claude", "Claude Code", "claude", ("ANTHROPIC_API_KEY",)),
        Agent("gemini", "Gemini CLI", "gemini", ("GEMINI_API_KEY", "GOOGLE_API_KEY")),
        Agent("codex", "Codex", "codex", ("OPENAI_API_KEY", "CODEX_API_KEY")),  # CODEX_API_KEY: `codex exec`
        # OpenCode talks to whichever provider it is set up for; these are the providers' keys.
        Agent(
            "opencode",
            "OpenCode",
            "opencode",
            ("ANTHROPIC_API_KEY", "OPENAI_API_KEY", "GEMINI_API_KEY", "OPENROUTER_API_KEY"),
        ),
    )
}


# Where each provider's key may go. Gemini keys can be sent as a `key` query parameter too.
KEY_HOSTS: dict[str, Secret] = {
    "ANTHROPIC_API_KEY": Secret(from_env="ANTHROPIC_API_KEY", hosts=("api.anthropic.com",)),
    "OPENAI_API_KEY": Secret(from_env="OPENAI_API_KEY", hosts=("api.openai.com",)),
    "CODEX_API_KEY": Secret(from_env="CODEX_API_KEY", hosts=("api.openai.com",)),
    "GEMINI_API_KEY": Secret(
        from_env="GEMINI_API_KEY", hosts=("generativelanguage.googleapis.com",), in_url=True
    ),
    "GOOGLE_API_KEY": Secret(
        from_env="GOOGLE_API_KEY", hosts=("generativelanguage.googleapis.com",), in_url=True
    ),
    "OPENROUTER_API_KEY": Secret(from_env="OPENROUTER_API_KEY", hosts=("openrouter.ai",)),
}


def chosen(name: str | None, preferred: str | None) -> str:
    """The agent to run: the one named, else the project's `[agent] preferred`."""
    if name is not None:
        return name
    if preferred is not None:
        return preferred
    raise AgentkernelError(
        f"no agent named and no [agent] preferred in agentkernel.toml: name one of {', '.join(AGENTS)}"
    )


def get_agent(name: str) -> Agent:
    try:
        return AGENTS[name]
    except KeyError:
        raise AgentkernelError(f"unknown agent {name!r}: use {', '.join(AGENTS)}") from None


@dataclass(frozen=True)
class AgentStatus:
    agent: Agent
    installed: str | None
    """Where its program is on this machine, if it is."""
    keys_set: tuple[str, ...]
    image_built: bool


def status(agent: Agent, environ: Mapping[str, str], image_built: bool) -> AgentStatus:
    return AgentStatus(agent, shutil.which(agent.binary), passed_keys(agent, environ), image_built)


def passed_keys(agent: Agent, environ: Mapping[str, str]) -> tuple[str, ...]:
    return tuple(var for var in agent.key_vars if environ.get(var))


@dataclass(frozen=True)
class Launch:
    """How `agent run` starts an agent: its image, the project to mount, its environment, and the
    secrets (its key variables that are set) to broker, declared as in `KEY_HOSTS`."""

    agent: Agent
    project_dir: Path
    env: dict[str, str]
    command: list[str]
    workdir: str = WORKSPACE
    secrets: tuple[str, ...] = ()


def project_directory(path: Path) -> Path:
    """`path` (the --dir flag) made absolute, if it is a directory."""
    directory = path.expanduser().resolve()
    if not directory.is_dir():
        raise AgentkernelError(f"--dir {path}: no such directory")
    return directory


def launch(name: str, project_dir: Path, environ: Mapping[str, str] | None = None) -> Launch:
    """The launch of agent `name` on `project_dir`: TERM in its environment, its own key variables
    (those set) as secrets, no more."""
    agent = get_agent(name)
    directory = project_directory(project_dir)
    environ = os.environ if environ is None else environ
    env = {"TERM": environ.get("TERM", "xterm-256color")}
    return Launch(agent, directory, env, [agent.binary], secrets=passed_keys(agent, environ))

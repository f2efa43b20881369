"""`agentkernel agents`, `agentkernel agent run` and `agentkernel plugin install|list`."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from agentkernel.cli.output import console, err_console, print_json
from agentkernel.errors import AgentkernelError

if TYPE_CHECKING:
    from agentkernel.agents.catalog import Launch
    from agentkernel.config import Config
    from agentkernel.service.request import SandboxRequest

agent_app = typer.Typer(help="Run a coding agent in a sandbox.", no_args_is_help=True)
plugin_app = typer.Typer(help="Add agentkernel's MCP server to coding agents' configs.", no_args_is_help=True)
DIRECTORY = typer.Option(Path("."), "--dir", metavar="DIR", help="The project directory.")


def _image_built(name: str) -> bool:
    from agentkernel.images import store

    try:
        store.get(name)
    except AgentkernelError:
        return False
    return True


def agents(json_out: bool = typer.Option(False, "--json", help="Print a JSON array.")) -> None:
    """Show each coding agent: installed on this machine? API key set? Its sandbox image built?"""
    from agentkernel.agents import catalog

    rows = [catalog.status(a, os.environ, _image_built(a.image)) for a in catalog.AGENTS.values()]
    if json_out:
        print_json(
            [
                {
                    "name": r.agent.name,
                    "title": r.agent.title,
                    "installed": r.installed,
                    "key_vars": list(r.agent.key_vars),
                    "keys_set": list(r.keys_set),
                    "image": r.agent.image,
                    "image_built": r.image_built,
                }
                for r in rows
            ]
        )
        return
    console.print(f"{'AGENT':<10} {'NAME':<12} {'INSTALLED':<10} {'API KEY':<28} IMAGE")
    for r in rows:
        key = f"set ({', '.join(r.keys_set)})" if r.keys_set else f"not set ({r.agent.key_vars[0]})"
        image = f"{r.agent.image} ({'built' if r.image_built else 'not built'})"
        console.print(
            f"{r.agent.name:<10} {r.agent.title:<12} {'yes' if r.installed else 'no':<10} {key:<28} {image}"
        )


AGENT_RESOURCES = (2, 2048)
"""vCPUs and memory in MB of an agent's sandbox when neither a flag nor agentkernel.toml sets them:
more than a command's default, for the agent's Node.js runtime."""


@agent_app.command("run")
def run(
    agent: str | None = typer.Argument(
        None, help="claude, gemini, codex or opencode (default: [agent] preferred in agentkernel.toml)."
    ),
    args: list[str] | None = typer.Argument(
        None,
        metavar="[-- ARGS...]",
        help="Arguments for the agent, after `--` (say, `codex -- exec 'fix the tests'`): with them it may "
        "run without a terminal.",
    ),
    env: list[str] = typer.Option(
        [],
        "--env",
        "-e",
        metavar="KEY=VALUE",
        help="Set KEY=VALUE in the agent's environment (say, its provider's base URL). Keys belong in "
        "[secrets]: a value given here enters the sandbox.",
    ),
    directory: Path = DIRECTORY,
    profile: str | None = typer.Option(
        None, "--profile", metavar="PROFILE", help="Security profile (default moderate)."
    ),
    vcpus: int | None = typer.Option(
        None,
        "--vcpus",
        metavar="N",
        help=f"Virtual CPUs (default: agentkernel.toml, else {AGENT_RESOURCES[0]}).",
    ),
    memory: int | None = typer.Option(
        None,
        "--memory",
        metavar="MB",
        help=f"Memory in MB (default: agentkernel.toml, else {AGENT_RESOURCES[1]}).",
    ),
) -> None:
    """Start AGENT in a sandbox with the project at /workspace. Its API key stays on this machine:
    the sandbox gets a placeholder that the egress gateway swaps for the key in requests to the
    provider's API only ([secrets.NAME] in agentkernel.toml overrides where the key comes from)."""
    from agentkernel.agents import catalog
    from agentkernel.artifacts import agent as guest_agent
    from agentkernel.config import load_config, resolve_policy
    from agentkernel.images import make
    from agentkernel.service.checks import check_env, parse_pairs
    from agentkernel.service.setup import new_log

    extra_env = check_env(parse_pairs(env, field="--env"), field="--env")
    project = catalog.project_directory(directory)
    config, config_path = load_config(search_from=project)
    launch = catalog.launch(catalog.chosen(agent, config.agent.preferred), project)
    spec = launch.agent
    if not resolve_policy(config, profile=profile).network:
        raise AgentkernelError(f"{spec.title} needs the network to reach its API: use a profile that has it")
    if leaked := sorted(set(extra_env) & set(spec.key_vars)):
        raise AgentkernelError(
            f"--env {leaked[0]}: that is {spec.title}'s key, brokered without entering the sandbox: "
            "set it on this machine, not with --env"
        )
    terminal = os.isatty(0)
    if not terminal and not args:
        raise AgentkernelError(
            f"agent run attaches {spec.title}'s interactive UI: run it in a terminal, or give the agent "
            "arguments after `--` for a run without one"
        )
    if not launch.secrets:
        err_console.print(
            f"[dim]{' and '.join(spec.key_vars)} not set: {spec.title} will ask you to log in[/dim]"
        )
    agent_binary = guest_agent.current()
    if agent_binary is None:
        raise AgentkernelError("no guest agent built yet: run `agentkernel setup`")
    make.ensure_recipes([spec.image], agent_binary, log=new_log())  # builds it the first time
    request = agent_request(launch, config, config_path, profile=profile, vcpus=vcpus, memory_mb=memory)
    code = run_attached(
        [*launch.command, *(args or [])],
        env={**launch.env, **extra_env},
        workdir=launch.workdir,
        request=request,
        project_dir=project,
        terminal=terminal,
    )
    raise typer.Exit(code)


def agent_request(
    launch: Launch,
    config: Config,
    config_path: Path | None,
    *,
    profile: str | None,
    vcpus: int | None,
    memory_mb: int | None,
) -> SandboxRequest:
    """The sandbox of `launch`: its image, the project at /workspace, the agent's keys brokered (to
    their provider's hosts unless agentkernel.toml's [secrets.NAME] says otherwise); the rest from
    the flags (None: not given), then agentkernel.toml (`config`, read from `config_path`), then the
    defaults, AGENT_RESOURCES for vCPUs and memory. Its image must be built."""
    from agentkernel.agents import catalog
    from agentkernel.service.request import SandboxFlags, resolve

    flags = SandboxFlags(
        image=launch.agent.image,
        vcpus=vcpus,
        memory_mb=memory_mb,
        profile=profile,
        directory=launch.project_dir,
        secrets=launch.secrets,
    )
    with_keys = replace(config, secrets={**catalog.KEY_HOSTS, **config.secrets})
    return resolve(
        flags,
        with_keys,
        project_dir=launch.project_dir,
        config_path=config_path,
        defaults=AGENT_RESOURCES,
    )


def run_attached(
    command: list[str],
    *,
    env: dict[str, str],
    workdir: str | None,
    request: SandboxRequest,
    project_dir: Path,
    terminal: bool = True,
) -> int:
    """Run `command` in a new sandbox made for `request`, attached to ours (on a terminal when
    `terminal`, else to our stdin, stdout and stderr), then remove the sandbox; the command's exit code.
    SIGTERM, SIGHUP and SIGINT remove the sandbox too (on a terminal the keys typed, ^C included, go
    to the guest) and exit 128+N; if this process is killed outright, the reaper removes the sandbox
    it owned."""
    from agentkernel.cli.signals import SignalGuard, run_until_signalled
    from agentkernel.cli.streams import attach_process, raw_terminal, terminal_size
    from agentkernel.protocol.connection import ExitStatus
    from agentkernel.service.service import SandboxService

    async def go(_guard: SignalGuard) -> ExitStatus:
        async with SandboxService(project_dir) as service, service.ephemeral(request) as (_name, conn):
            proc = await conn.exec(command, env=env, cwd=workdir, pty=terminal_size() if terminal else None)
            with raw_terminal(terminal):
                return await attach_process(proc, stdin=True, tty_mode=terminal)

    return run_until_signalled(go).shell_code


@plugin_app.command("install")
def plugin_install(
    target: str = typer.Argument(..., help="claude, codex, gemini, opencode or mcp."),
    global_: bool = typer.Option(False, "--global", help="Into the user's config, not the project's."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show what would change; write nothing."),
    directory: Path = DIRECTORY,
) -> None:
    """Add agentkernel's MCP server (and for Claude Code, a skill) to an agent's config, merging."""
    from agentkernel.agents import plugins

    found = plugins.locations(
        target, global_=global_, project_dir=directory.resolve(), home=Path.home(), environ=os.environ
    )
    for location in found:
        change = plugins.install(location, dry_run=dry_run)
        verb = (
            f"would {change.action}" if dry_run and change.action in ("create", "update") else change.action
        )
        note = f": {change.detail}" if change.action == "skipped" else ""
        console.print(f"{verb:<16} {location.path} ({location.what}){note}", markup=False)
        if dry_run:
            typer.echo(change.diff(), nl=False)
    warning = plugins.path_warning(global_=global_)
    if warning:
        err_console.print(f"warning: {warning}", markup=False)


@plugin_app.command("list")
def plugin_list(directory: Path = DIRECTORY) -> None:
    """Show which agents' configs have agentkernel, in the project and in the user's home."""
    from agentkernel.agents import plugins

    console.print(f"{'TARGET':<10} {'PROJECT':<10} GLOBAL")
    for target in plugins.TARGETS:
        states = []
        for global_ in (False, True):
            try:
                found = plugins.locations(
                    target,
                    global_=global_,
                    project_dir=directory.resolve(),
                    home=Path.home(),
                    environ=os.environ,
                )
            except AgentkernelError:
                states.append("-")
                continue
            have = [plugins.is_installed(location) for location in found]
            states.append("yes" if all(have) else "partly" if any(have) else "no")
        console.print(f"{target:<10} {states[0]:<10} {states[1]}")

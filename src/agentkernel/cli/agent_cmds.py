"""`agentkernel agents`, `agentkernel agent run` and `agentkernel plugin install|list`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import typer

from agentkernel.cli.output import console, err_console, print_json
from agentkernel.errors import AgentkernelError

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


@agent_app.command("run")
def run(
    agent: str = typer.Argument(..., help="claude, gemini, codex or opencode."),
    directory: Path = DIRECTORY,
    profile: str | None = typer.Option(
        None, "--profile", metavar="PROFILE", help="Security profile (default moderate)."
    ),
    vcpus: int = typer.Option(2, "--vcpus", metavar="N", help="Virtual CPUs."),
    memory: int = typer.Option(2048, "--memory", metavar="MB", help="Memory in MB."),
) -> None:
    """Start AGENT in a sandbox with the project at /workspace. Its API key stays on this machine:
    the sandbox gets a placeholder that the egress gateway swaps for the key in requests to the
    provider's API only ([secrets.NAME] in agentkernel.toml overrides where the key comes from)."""
    from agentkernel.agents import catalog
    from agentkernel.artifacts import agent as guest_agent
    from agentkernel.config import load_config, resolve_policy
    from agentkernel.images import api
    from agentkernel.network import brokering
    from agentkernel.service.setup import new_log

    launch = catalog.launch(agent, directory)
    spec = launch.agent
    config, config_path = load_config(search_from=launch.project_dir)
    policy = resolve_policy(config, profile=profile)
    secrets = brokering.bind(
        launch.secrets,
        {**catalog.KEY_HOSTS, **config.secrets},
        base=config_path.parent if config_path else launch.project_dir,
    )
    if not policy.network:
        raise AgentkernelError(f"{spec.title} needs the network to reach its API: use a profile that has it")
    if not os.isatty(0):
        raise AgentkernelError(f"agent run attaches {spec.title}'s interactive UI: run it in a terminal")
    if not launch.secrets:
        err_console.print(
            f"[dim]{' and '.join(spec.key_vars)} not set: {spec.title} will ask you to log in[/dim]"
        )
    agent_binary = guest_agent.current()
    if agent_binary is None:
        raise AgentkernelError("no guest agent built yet: run `agentkernel setup`")
    api.ensure_recipes([spec.image], agent_binary, log=new_log())  # builds it the first time

    code = run_attached(
        launch.command,
        env=launch.env,
        workdir=launch.workdir,
        image=spec.image,
        vcpus=vcpus,
        memory_mb=memory,
        policy=policy,
        mount_dir=launch.project_dir,
        secrets=secrets,
    )
    raise typer.Exit(code)


def run_attached(command: list[str], *, env: dict[str, str], workdir: str | None, **options: Any) -> int:
    """Run `command` on a terminal in a new sandbox (`options` as for `sandboxes.create`), attached
    to ours, then remove the sandbox; the command's exit code. SIGTERM, SIGHUP and SIGINT remove the
    sandbox too (the keys typed, ^C included, go to the guest) and exit 128+N; if this process is
    killed outright, the reaper removes the sandbox it owned."""
    from agentkernel.cli.signals import SignalGuard, run_until_signalled
    from agentkernel.cli.streams import attach_process, raw_terminal, terminal_size
    from agentkernel.protocol.client import ExitStatus
    from agentkernel.service import sandboxes

    async def go(_guard: SignalGuard) -> ExitStatus:
        async with sandboxes.ephemeral(**options) as (_name, conn):
            proc = await conn.exec(command, env=env, cwd=workdir, pty=terminal_size())
            with raw_terminal(True):
                return await attach_process(proc, stdin=True, tty_mode=True)

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

"""The `agentkernel` command line."""

from __future__ import annotations

import logging
import sys

import typer

from agentkernel import __version__
from agentkernel.cli import (
    agent_cmds,
    audit_cmd,
    bench_cmd,
    command_cmds,
    daemon_cmds,
    doctor_cmd,
    files_cmds,
    fleet_cmds,
    images_cmd,
    lifecycle_cmds,
    port_cmds,
    sandbox_cmds,
    secret_cmds,
    server_cmds,
    setup_cmd,
    snapshot_cmds,
    status_cmd,
    thin,
)
from agentkernel.errors import AgentkernelError

app = typer.Typer(
    name="agentkernel",
    help="Run AI coding agents and their commands in hardware-isolated microVMs.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        print(f"agentkernel {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", "-V", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Run AI coding agents and their commands in hardware-isolated microVMs."""


app.command("setup")(setup_cmd.setup)
app.command("status")(status_cmd.status)
app.command("doctor")(doctor_cmd.doctor)
app.add_typer(bench_cmd.app, name="bench")
app.command("audit")(audit_cmd.audit)
app.add_typer(snapshot_cmds.app, name="snapshot")
app.add_typer(daemon_cmds.app, name="daemon")
app.command("fork")(snapshot_cmds.fork)
app.add_typer(images_cmd.app, name="image")
app.command("serve")(server_cmds.serve)
app.add_typer(fleet_cmds.app, name="fleet")
app.command("mcp-server")(server_cmds.mcp_server)
app.command("agents")(agent_cmds.agents)
app.add_typer(agent_cmds.agent_app, name="agent")
app.add_typer(agent_cmds.plugin_app, name="plugin")
app.add_typer(secret_cmds.app, name="secret")
app.add_typer(files_cmds.app, name="files")
for _name, _fn, _aliases in (
    ("run", sandbox_cmds.run, ()),
    ("create", sandbox_cmds.create, ()),
    ("start", sandbox_cmds.start, ()),
    ("stop", sandbox_cmds.stop, ()),
    ("remove", sandbox_cmds.remove, ("rm",)),
    ("list", sandbox_cmds.list_cmd, ("ls",)),
    ("exec", sandbox_cmds.exec_cmd, ()),
    ("attach", sandbox_cmds.attach, ()),
    ("cp", sandbox_cmds.cp, ()),
    ("logs", sandbox_cmds.logs, ()),
    ("commands", command_cmds.commands, ()),
    ("output", command_cmds.output, ()),
    ("wait", command_cmds.wait, ()),
    ("kill", command_cmds.kill, ()),
    ("update", lifecycle_cmds.update, ()),
    ("pause", lifecycle_cmds.pause, ()),
    ("resume", lifecycle_cmds.resume, ()),
    ("port", port_cmds.port, ()),
):
    settings = sandbox_cmds.COMMAND_SETTINGS if _name in ("run", "exec") else {}
    for _alias in (_name, *_aliases):
        app.command(_alias, context_settings=settings, hidden=_alias != _name)(_fn)


def main() -> None:
    """Entry point: expected errors become one line on stderr and a non-zero exit, never a traceback."""
    # The service logs for servers (serve, mcp-server, which show it); a command says things its own way.
    logging.getLogger("agentkernel").addHandler(logging.NullHandler())
    try:
        # Named as installed, also under `python -m agentkernel`: usage lines and completion scripts
        # (whose variable is _AGENTKERNEL_COMPLETE) then match the command a user types.
        code = app(standalone_mode=False, prog_name="agentkernel")
    except typer.TyperException as exc:  # usage errors: bad options, missing arguments
        print(f"agentkernel: error: {thin.one_line(exc.format_message())} (see --help)", file=sys.stderr)
        sys.exit(exc.exit_code)
    except AgentkernelError as exc:
        print(f"agentkernel: error: {thin.one_line(str(exc))}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except OSError as exc:  # on the host's side: a full disk, a file it may not read or write
        print(thin.os_error_line(exc), file=sys.stderr)
        sys.exit(1)
    except (KeyboardInterrupt, typer.Abort):
        print("agentkernel: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)

"""Background commands from the command line: `exec -d` starts one (sandbox_cmds.exec_cmd); these list
them, print their output, wait for them and signal them, docker-like.

    agentkernel exec -d box -- python3 -m http.server   # prints the command's id
    agentkernel commands box                            # ID PID STATE EXIT OUTPUT COMMAND
    agentkernel output box 1 -f                         # its output from the start, then as it comes
    agentkernel wait box 1                              # exits with the command's exit status
    agentkernel kill box 1 -s TERM
"""

from __future__ import annotations

import shlex
import sys

import typer

from agentkernel.cli.output import console, err_console, human_size, print_json
from agentkernel.cli.sandbox_cmds import TIMEOUT_EXIT, with_service
from agentkernel.protocol.connection import BackgroundInfo, ExitStatus
from agentkernel.service.commands import as_dict
from agentkernel.service.service import SandboxService

Box = typer.Argument(..., metavar="NAME", help="Sandbox name.")
CommandId = typer.Argument(..., metavar="ID", help="The background command's id (from `exec -d`).")


def commands(
    name: str = Box, json_out: bool = typer.Option(False, "--json", help="Print a JSON array.")
) -> None:
    """List a sandbox's background commands, running and exited."""
    found = with_service(lambda service: service.list_commands(name))
    if json_out:
        print_json([as_dict(info) for info in found])
        return
    if not found:
        console.print("no background commands")
        return
    console.print(f"{'ID':>4} {'PID':>7} {'STATE':<8} {'EXIT':<10} {'OUTPUT':>9}  COMMAND", highlight=False)
    for info in found:
        command = shlex.join(info.argv)
        console.print(
            f"{info.id:>4} {info.pid:>7} {'running' if info.running else 'exited':<8} {_ended(info):<10} "
            f"{human_size(info.output_size):>9}  {command[:60]}",
            highlight=False,
            markup=False,
        )


def _ended(info: BackgroundInfo) -> str:
    status = info.status
    if status is None:
        return "-"
    if status.timed_out:
        return "timed out"
    return str(status.exit_code) if status.exit_code is not None else f"signal {status.signal}"


def output(
    name: str = Box,
    command_id: int = CommandId,
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing its output until it exits."),
) -> None:
    """Print a background command's output (stdout and stderr together) from the start the sandbox
    keeps (its last 1 MiB); with -f, then its output as it comes until it exits."""

    async def work(service: SandboxService) -> None:
        reader = await service.command_output(name, command_id, follow=follow)
        try:
            async for chunk in reader.output():
                if chunk.lost:
                    sys.stdout.buffer.flush()
                    err_console.print(
                        f"agentkernel: {chunk.lost} bytes of output were dropped before they were read "
                        "(the sandbox keeps the last 1 MiB)",
                        highlight=False,
                    )
                sys.stdout.buffer.write(chunk.data)
                sys.stdout.buffer.flush()
        finally:
            reader.close()

    with_service(work)


def wait(name: str = Box, command_id: int = CommandId) -> None:
    """Wait for a background command to exit; exits with its exit status (128+N if signal N ended it,
    124 if its timeout was up)."""
    status: ExitStatus = with_service(lambda service: service.wait_command(name, command_id))
    if status.timed_out:
        err_console.print(f"agentkernel: command {command_id} timed out and was killed", highlight=False)
        raise typer.Exit(TIMEOUT_EXIT)
    raise typer.Exit(status.shell_code)


def kill(
    name: str = Box,
    command_id: int = CommandId,
    signal: str = typer.Option(
        "KILL", "--signal", "-s", metavar="SIGNAL", help="Signal name (TERM, INT, ...) or number."
    ),
) -> None:
    """Send a signal (default KILL) to a background command and the processes it started."""
    with_service(lambda service: service.signal_command(name, command_id, signal))
    print(command_id)

"""`agentkernel update`, `pause` and `resume`: change a running sandbox's lifetime, freeze it, thaw it."""

from __future__ import annotations

import typer

from agentkernel.cli.output import console
from agentkernel.cli.sandbox_cmds import with_service
from agentkernel.errors import InvalidRequestError
from agentkernel.service.checks import check_lifetime


def update(
    name: str = typer.Argument(..., help="A running or paused sandbox."),
    lifetime: float | None = typer.Option(
        None,
        "--lifetime",
        metavar="SECONDS",
        help="Stop it this many seconds from now, earlier or later than before (0: run until stopped).",
    ),
) -> None:
    """Change a running sandbox: when its lifetime ends (this run; a later start gets its own)."""
    if lifetime is None:
        raise InvalidRequestError("--lifetime", "nothing to change: give --lifetime SECONDS")
    seconds = check_lifetime(lifetime, field="--lifetime") if lifetime else None
    with_service(lambda service: service.set_timeout(name, seconds))
    console.print(name)


def pause(name: str = typer.Argument(..., help="A running sandbox.")) -> None:
    """Freeze a running sandbox: its processes stop where they are, its memory is kept on the host."""
    with_service(lambda service: service.pause(name))
    console.print(name)


def resume(name: str = typer.Argument(..., help="A paused sandbox.")) -> None:
    """Let a paused sandbox's processes run on where they were."""
    with_service(lambda service: service.resume(name))
    console.print(name)

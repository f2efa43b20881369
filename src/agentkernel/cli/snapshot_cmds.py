"""`agentkernel snapshot ...` and `agentkernel fork`: save running sandboxes, start copies of them."""

from __future__ import annotations

import functools

import typer

from agentkernel.cli.output import console, human_size, print_json
from agentkernel.cli.sandbox_cmds import with_service
from agentkernel.service.service import SandboxService

app = typer.Typer(help="Save running sandboxes as snapshots.", no_args_is_help=True)


@app.command("create")
def create(
    sandbox: str = typer.Argument(..., help="A running sandbox."),
    name: str = typer.Argument(..., help="Name for the snapshot."),
) -> None:
    """Save a running sandbox's memory, devices and disk; it runs on."""
    snapshot = with_service(lambda service: service.snapshot(sandbox, name))
    console.print(snapshot.name)


@app.command("list")
def list_cmd(json_out: bool = typer.Option(False, "--json", help="Print a JSON array.")) -> None:
    """List snapshots."""
    found = [s.public() for s in with_service(lambda service: service.list_snapshots())]
    if json_out:
        print_json(found)
        return
    if not found:
        console.print("no snapshots")
    for s in found:
        console.print(
            f"{s['name']:<24} from {s['source']:<24} {s['image']:<10} "
            f"{human_size(s['disk_bytes']):>10}  {s['created_at']}"
        )


@app.command("rm")
def remove(names: list[str] = typer.Argument(..., help="Snapshot names.")) -> None:
    """Remove snapshots (not while sandboxes forked from them exist)."""
    for name in names:
        with_service(functools.partial(SandboxService.remove_snapshot, name=name))
        console.print(name)


def fork(
    snapshot: str = typer.Argument(..., help="The snapshot to start from."),
    name: str = typer.Argument(..., help="Name for the new sandbox."),
) -> None:
    """Start a new sandbox from a snapshot: memory, devices and disk as they were."""
    with_service(lambda service: service.fork(snapshot, name))
    console.print(name)

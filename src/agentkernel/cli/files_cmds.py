"""`agentkernel files ...`: a sandbox's files beyond `cp`: ls, stat, mkdir, mv, rm, watch.

Modes are shown and taken as octal strings ("0644"), as on every face.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import typer

from agentkernel.cli.output import console, print_json
from agentkernel.cli.sandbox_cmds import with_service
from agentkernel.protocol.connection import FileInfo
from agentkernel.service.files import MAX_DEPTH, MODE_DESCRIPTION, format_mode, parse_mode
from agentkernel.service.service import SandboxService

app = typer.Typer(help="Look at and change the files in a sandbox.", no_args_is_help=True)
JSON = typer.Option(False, "--json", help="Print JSON.")
BOX = typer.Argument(..., metavar="SANDBOX", help="The sandbox's name.")
PATH = typer.Argument(..., help="Absolute path in the sandbox.")


def _shown(info: FileInfo) -> dict[str, object]:
    return {**dataclasses.asdict(info), "mode": format_mode(info.mode)}


@app.command("ls")
def ls(
    name: str = BOX,
    path: str = typer.Argument("/", help="Absolute directory path in the sandbox."),
    depth: int = typer.Option(1, "--depth", "-d", min=1, max=MAX_DEPTH, metavar="N", help="Levels to list."),
    json_out: bool = JSON,
) -> None:
    """List a directory (with --depth, the directories below it too)."""
    entries = with_service(lambda service: service.list_dir(name, path, depth=depth))
    if json_out:
        print_json([_shown(e) for e in entries])
        return
    for e in entries:
        suffix = "/" if e.kind == "dir" else "@" if e.kind == "symlink" else ""
        console.print(f"{format_mode(e.mode)} {e.size:>12} {e.name}{suffix}", highlight=False, markup=False)


@app.command("stat")
def stat_cmd(name: str = BOX, path: str = PATH, json_out: bool = JSON) -> None:
    """Show what is at a path; exits 1 if nothing is."""
    info = dataclasses.replace(with_service(lambda service: service.stat(name, path)), name=path)
    if json_out:
        print_json(_shown(info))
    else:
        console.print(f"{path}: {info.kind}, {info.size} bytes, mode {format_mode(info.mode)}", markup=False)


@app.command("mkdir")
def mkdir(
    name: str = BOX,
    path: str = PATH,
    mode: str = typer.Option("0755", "--mode", "-m", metavar="MODE", help=MODE_DESCRIPTION),
    parents: bool = typer.Option(True, "--parents/--no-parents", help="Create missing parents too."),
) -> None:
    """Make a directory."""
    bits = parse_mode(mode)
    with_service(lambda service: service.mkdir(name, path, parents=parents, mode=bits))


@app.command("mv")
def mv(name: str = BOX, source: str = PATH, dest: str = typer.Argument(..., help="The new path.")) -> None:
    """Move or rename a file or directory (a file at the new path is replaced)."""
    with_service(lambda service: service.rename(name, source, dest))


@app.command("rm")
def rm(
    name: str = BOX,
    path: str = PATH,
    recursive: bool = typer.Option(False, "--recursive", "-r", help="Remove a directory tree."),
) -> None:
    """Remove a file, a symlink or an empty directory (with -r, a tree)."""
    with_service(lambda service: service.remove_path(name, path, recursive=recursive))


@app.command("watch")
def watch(
    name: str = BOX,
    path: str = typer.Argument(..., help="Absolute directory path in the sandbox."),
    recursive: bool = typer.Option(False, "--recursive", "-r", help="Watch the directories below too."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object a line."),
) -> None:
    """Print changes under a directory as they happen, until Ctrl-C or the directory is removed."""

    async def follow(service: SandboxService) -> None:
        watcher = await service.watch(name, path, recursive=recursive)
        async for change in watcher.events():
            line = json.dumps(dataclasses.asdict(change)) if json_out else f"{change.event} {change.name}"
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    with_service(follow)

"""`agentkernel image ...`: list, build, pull and remove root filesystem images."""

from __future__ import annotations

from pathlib import Path

import typer

from agentkernel.cli.output import console, human_size, print_json
from agentkernel.errors import AgentkernelError

# The image modules are imported in each command: they are slow to import, and other commands
# (above all `run`) should not pay for them.

app = typer.Typer(help="Manage root filesystem images.", no_args_is_help=True)


def _agent() -> Path:
    from agentkernel.artifacts import agent

    path = agent.current()
    if path is None:
        raise AgentkernelError("no guest agent built yet: run `agentkernel setup`")
    return path


@app.command("list")
def list_images(json_out: bool = typer.Option(False, "--json", help="Print a JSON array.")) -> None:
    """List images."""
    from agentkernel.images import store

    images = store.list_images()
    if json_out:
        print_json([img.public() for img in images])
        return
    if not images:
        console.print("no images: run `agentkernel setup`")
    for img in images:
        console.print(f"{img.name:<24} {img.digest[:12]}  {human_size(img.size_bytes):>10}  {img.source}")


@app.command("build")
def build(
    name: str = typer.Argument(
        ..., help="A recipe (base, python, node, rust, go) or, with --from, any name."
    ),
    source: Path | None = typer.Option(
        None, "--from", metavar="DIR", help="Build from this directory tree instead."
    ),
) -> None:
    """Build an image from a recipe, or from a directory with --from."""
    from agentkernel.images import make
    from agentkernel.service.setup import new_log

    log = new_log()
    image = (
        make.build_from_dir(source, name, _agent(), log=log)
        if source is not None
        else make.build_recipe(name, _agent(), log=log)
    )
    console.print(f"{image.name} {image.digest}")


@app.command("pull")
def pull_image(
    ref: str = typer.Argument(..., help="Image reference, e.g. registry.example:5000/team/tool:1.0"),
    name: str | None = typer.Option(
        None, "--name", metavar="NAME", help="Store it under this name (default: the reference)."
    ),
) -> None:
    """Pull an OCI image from a registry and turn it into a sandbox image."""
    from agentkernel.images.pull import pull as pull_ref
    from agentkernel.service.setup import new_log

    image = pull_ref(ref, _agent(), log=new_log(), name=name)
    console.print(f"{image.name} {image.digest}")


@app.command("rm")
def remove(names: list[str] = typer.Argument(..., help="Image names.")) -> None:
    """Remove images (the content goes when no name refers to it)."""
    from agentkernel.images import store

    for name in names:
        store.remove(name)
        console.print(name)

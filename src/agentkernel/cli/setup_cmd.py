"""`agentkernel setup`: build and cache the guest kernel, agent and default images."""

from __future__ import annotations

import sys

import typer

from agentkernel.cli.output import console
from agentkernel.errors import AgentkernelError
from agentkernel.images import DEFAULT_IMAGES


def setup(
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask before long builds."),
    kernel_source: str | None = typer.Option(
        None,
        "--kernel-source",
        metavar="TARBALL|URL|DIR",
        help="Kernel source to build from (default: Debian's linux-source-6.1 package).",
    ),
    images: list[str] = typer.Option(
        list(DEFAULT_IMAGES), "--image", "-i", metavar="IMAGE", help="Images to build (repeatable)."
    ),
) -> None:
    """Build (or reuse from the cache) the guest kernel, the guest agent and the default images.

    The first run builds a kernel (minutes) and Debian-based images; later runs reuse what is cached,
    verified by content hash.
    """
    from agentkernel.service import setup as service  # slow to import: only this command needs it

    service.check_system()
    if not yes:
        if not sys.stdin.isatty():
            raise AgentkernelError("setup may build for several minutes: pass --yes to run non-interactively")
        typer.confirm("Build the guest kernel, agent and images now (minutes, about 1 GB)?", abort=True)
    result = service.setup(kernel_source=kernel_source, images=tuple(images))
    console.print(f"agent:  {result.agent}")
    console.print(f"kernel: {result.kernel}")
    for image in result.images:
        console.print(f"image {image.name}: {image.path}")
    console.print(f"built now: {', '.join(result.built) or 'nothing (all cached)'}; log: {result.log}")

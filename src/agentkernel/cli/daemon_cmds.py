"""`agentkernel daemon start|stop|status`: the warm pool that `run` takes ready sandboxes from."""

from __future__ import annotations

import sys
from typing import Any

import typer

from agentkernel.cli.output import console, err_console, print_json
from agentkernel.cli.sandbox_cmds import with_service
from agentkernel.pool import control, kinds
from agentkernel.service.request import SandboxFlags

app = typer.Typer(help="The warm pool of ready sandboxes that `run` uses.", no_args_is_help=True)


@app.command("start")
def start(
    images: list[str] = typer.Option(
        [],
        "--image",
        metavar="IMAGE[=N]",
        help="Keep sandboxes of this image, N of them (repeatable; default: every image `run` would "
        "choose here, or agentkernel.toml's [pool] images).",
    ),
    size: int | None = typer.Option(
        None, "--size", min=1, max=200, metavar="N", help="Ready sandboxes per image (default 2)."
    ),
    profile: str | None = typer.Option(
        None, "--profile", metavar="PROFILE", help="Their security profile (as `run`)."
    ),
    network: bool | None = typer.Option(None, "--network/--no-network", help="Override its network."),
    vcpus: int | None = typer.Option(None, "--vcpus", metavar="N", help="Their virtual CPUs (as `run`)."),
    memory: int | None = typer.Option(None, "--memory", metavar="MB", help="Their memory in MB."),
    backend: str | None = typer.Option(
        None, "--backend", metavar="BACKEND", help="Their backend (default: as `run`)."
    ),
    parallel: int | None = typer.Option(
        None,
        "--parallel",
        min=1,
        max=64,
        metavar="N",
        help="Sandboxes made at once (default: as the host's cores and free memory allow).",
    ),
    max_age: float = typer.Option(
        600, "--max-age", min=1, metavar="SECONDS", help="Replace ready ones older than this (s)."
    ),
    health_interval: float = typer.Option(
        15, "--health-interval", min=0.5, metavar="SECONDS", help="Seconds between checks."
    ),
    wait: bool = typer.Option(False, "--wait", help="Return once every pool is full."),
) -> None:
    """Start the pool daemon in the background. It keeps every image `run` in this directory would
    choose, each sandbox as `run` here would make it (flags, then agentkernel.toml, then the
    defaults), so that `run` can take them."""
    flags = SandboxFlags(backend=backend, vcpus=vcpus, memory_mb=memory, profile=profile, network=network)
    plan = with_service(
        lambda service: kinds.plan(service, flags, images=images, size=size, parallel=parallel)
    )
    pid = control.start(plan.kinds, max_age=max_age, health_interval=health_interval, parallel=plan.parallel)
    console.print(f"pool daemon started (pid {pid}); log: {control.log_file()}")
    for kind in plan.kinds:
        console.print(f"  {kind.image}: {kind.size} ready")
    if wait:
        control.wait_ready(_progress)
        if sys.stderr.isatty():
            err_console.print()
        console.print("pool ready")


def _progress(status: dict[str, Any]) -> None:
    if sys.stderr.isatty():
        filled = ", ".join(f"{p['image']} {len(p['ready'])}/{p['size']}" for p in status["pools"])
        err_console.print(f"filling: {filled}", end="\r")


@app.command("stop")
def stop() -> None:
    """Stop the pool daemon; its ready sandboxes are removed (handed-out ones are not touched)."""
    pid = control.stop()
    console.print(f"pool daemon stopped (pid {pid})")


@app.command("status")
def status(json_out: bool = typer.Option(False, "--json", help="Print one JSON object.")) -> None:
    """Show whether the daemon runs, and each pool's ready sandboxes."""
    pid = control.running_pid()
    if pid is None:
        if json_out:
            print_json({"running": False})
            return
        console.print("pool daemon: not running")
        raise typer.Exit(1)
    current = control.status()
    if json_out:
        print_json({"running": True, **current})
        return
    console.print(
        f"pool daemon: running (pid {current['pid']}, up {current['uptime_s']:.0f} s, "
        f"max age {current['max_age_s']:g} s, {current['parallel']} made at once); "
        f"acquires of kinds not kept: {current['misses']}"
    )
    for pool in current["pools"]:
        network = "network" if pool["network"] else "no network"
        console.print(
            f"  {pool['image']:<10} {len(pool['ready'])}/{pool['size']} ready, {pool['making']} making  "
            f"({pool['profile']}, {network}, {pool['vcpus']} vcpu, {pool['memory_mb']} MB)  "
            f"handed out {pool['handed_out']}, found empty {pool['empty_acquires']}"
        )
        if pool["last_error"]:
            console.print(f"    last error: {pool['last_error']}")

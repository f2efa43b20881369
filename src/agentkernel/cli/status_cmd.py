"""`agentkernel status`: acceleration, backends, kernel and images."""

from __future__ import annotations

import typer

from agentkernel.cli.output import console, human_size, print_json


def status(json_out: bool = typer.Option(False, "--json", help="Print one JSON object.")) -> None:
    """Show how sandboxes run on this host and what is installed."""
    from agentkernel.service.status import status as get_status  # slow to import: only this command needs it

    info = get_status()
    if json_out:
        print_json(info)
        return
    if info["accel"] == "kvm":
        console.print("acceleration: [green]KVM[/green] (hardware virtualization)")
    else:
        console.print(f"acceleration: [yellow]TCG[/yellow] software emulation, slower: {info['kvm_note']}")
    for name, b in info["backends"].items():
        mark = "[green]available[/green]" if b["available"] else "[red]unavailable[/red]"
        console.print(f"backend {name}: {mark}: {b['reason']}")
    fc = info["firecracker"]
    if fc is not None:
        line = fc["problem"] or f"Firecracker {fc['version']} ({fc['path']})"
        console.print(f"firecracker: {line}", markup=False, highlight=False)
    chosen = info["default_backend"]
    how = chosen["warning"] or "a VM"
    console.print(f"default backend: {chosen['name'] or 'none'} ({how})", markup=False, highlight=False)
    console.print(f"kernel: {info['kernel'] or 'not built: run `agentkernel setup`'}")
    console.print(f"agent: {info['agent'] or 'not built: run `agentkernel setup`'}")
    if not info["images"]:
        console.print("images: none: run `agentkernel setup`")
    for img in info["images"]:
        console.print(f"image {img['name']}: {human_size(img['size_bytes'])} {img['path']}")
    console.print(f"data dir: {info['data_dir']}")
    pool = info["pool"]
    if not pool["running"]:
        console.print("pool daemon: not running (`agentkernel daemon start` keeps sandboxes ready)")
    elif "error" in pool:
        console.print(f"pool daemon: not answering: {pool['error']}")
    else:
        ready = ", ".join(f"{image} {n}" for image, n in pool["ready"].items())
        console.print(f"pool daemon: running (pid {pool['pid']}); ready: {ready}")

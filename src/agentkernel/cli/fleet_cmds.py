"""`agentkernel fleet nodes` and `fleet status`: the fleet as its etcd holds it (docs/deploy.md)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import typer

from agentkernel.cli.output import console, print_json
from agentkernel.fleet import ETCD_ENV

app = typer.Typer(
    help="A fleet of hosts behind one API: its nodes, load and placements.", no_args_is_help=True
)

ETCD = typer.Option(
    ..., "--etcd", envvar=ETCD_ENV, metavar="URL[,URL...]", help="Client URLs of the fleet's etcd members."
)
JSON = typer.Option(False, "--json", help="Print JSON.")


async def _read(urls: list[str]) -> tuple[list[dict[str, Any]], list[Any]]:
    from agentkernel.fleet import store
    from agentkernel.fleet.etcd import Etcd

    async with Etcd(urls) as etcd:
        return [store.node_view(n) for n in await store.live_nodes(etcd)], await store.placements(etcd)


@app.command("nodes")
def nodes(
    node: str | None = typer.Argument(None, help="Show this node only."),
    etcd: str = ETCD,
    json_out: bool = JSON,
) -> None:
    """The live nodes (those whose lease holds), their capacity and load."""
    from agentkernel.errors import NoSuchNodeError
    from agentkernel.fleet.etcd import parse_urls

    rows, _ = asyncio.run(_read(parse_urls(etcd)))
    if node is not None:
        rows = [r for r in rows if r["id"] == node]
        if not rows:
            raise NoSuchNodeError(node)
    if json_out:
        print_json(rows[0] if node is not None else rows)
        return
    if not rows:
        console.print("no live nodes")
    for r in rows:
        console.print(
            f"{r['id']:<20} {r['url']:<28} placed {r['placed']:>3}/{r['capacity']:<3} "
            f"running {r['running']:>3}  {r['cores']} cores {r['memory_mb']} MB  "
            f"images: {', '.join(r['images']) or '-'}"
        )


@app.command("status")
def status(etcd: str = ETCD, json_out: bool = JSON) -> None:
    """Nodes, how full the fleet is, and the sandboxes placed on nodes that are gone (lost)."""
    from agentkernel.fleet.etcd import parse_urls

    rows, placed = asyncio.run(_read(parse_urls(etcd)))
    live = {r["id"] for r in rows}
    lost = [{"name": p.name, "node": p.node} for p in placed if p.node not in live]
    summary = {
        "nodes": len(rows),
        "capacity": sum(r["capacity"] for r in rows),
        "placed": sum(r["placed"] for r in rows),
        "running": sum(r["running"] for r in rows),
        "per_node": {r["id"]: r["placed"] for r in rows},
        "lost": lost,
    }
    if json_out:
        print_json(summary)
        return
    console.print(
        f"{summary['nodes']} live nodes, {summary['placed']}/{summary['capacity']} sandboxes placed, "
        f"{summary['running']} running, {len(lost)} lost"
    )
    for r in rows:
        console.print(f"  {r['id']:<20} placed {r['placed']:>3}/{r['capacity']:<3} running {r['running']:>3}")
    for s in lost:
        console.print(f"  lost: {s['name']} (node {s['node']} is gone)")


@app.command("certs")
def certs(
    directory: Path = typer.Argument(..., help="Directory to write the PEM files to."),
    host: list[str] = typer.Option(
        ..., "--host", metavar="NAME|ADDRESS", help="A name or address nodes are reached at (repeatable)."
    ),
) -> None:
    """A CA for the fleet and, signed by it, a node and a router certificate, for mutual TLS between
    routers and nodes (serve --tls-ca/--tls-cert/--tls-key; docs/deploy.md)."""
    from agentkernel.fleet.tls import make

    for path in make(directory, host):
        console.print(str(path))

"""A node of the fleet (`agentkernel serve --node`): the single-host API, registered in etcd.

The node holds a lease of `ttl` seconds and renews it every second; its key (address, capacity,
load) lives under the lease, so when the node dies or is cut off from etcd its key vanishes within the
TTL and the routers show its sandboxes as lost. The key is rewritten whenever the load changes. On
each registration (at start, and after losing its lease) the node reconciles: placement records that
name it for sandboxes it no longer has are removed; the ones it still runs simply come back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlsplit

from agentkernel import __version__
from agentkernel.errors import FleetError, InvalidRequestError
from agentkernel.fleet import DEFAULT_TTL, NODE_KEY_ENV, store
from agentkernel.fleet.etcd import Etcd
from agentkernel.fleet.tls import TlsFiles
from agentkernel.sandbox.state import SandboxRecord

if TYPE_CHECKING:
    from agentkernel.service.snapshots import Snapshot

log = logging.getLogger("agentkernel.fleet")

RENEW_EVERY = 1.0
"""Seconds between renewals and load checks: well inside the shortest useful TTL (2 s)."""
SETTLE = 30.0
"""Placements younger than this are not reconciled away: a router may be creating the sandbox now."""

NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}")


class Holdings(Protocol):
    """What a node publishes of what it holds (the service behind its API)."""

    async def list_sandboxes(self) -> list[SandboxRecord]: ...
    async def list_snapshots(self) -> list[Snapshot]: ...


@dataclass(frozen=True)
class NodeConfig:
    id: str
    url: str
    etcd: tuple[str, ...]
    ttl: int = DEFAULT_TTL
    capacity: int | None = None
    """Sandboxes it takes; None: as many of the default size as its memory holds."""
    tls: TlsFiles | None = None
    """Serve HTTPS and take only routers with a client certificate from the fleet's CA."""


def node_key(*, required: bool = True) -> str | None:
    """The secret routers authenticate to nodes with: the same on every router and node. Optional
    where mutual TLS authenticates them."""
    key = os.environ.get(NODE_KEY_ENV, "")
    if not key and required:
        raise InvalidRequestError(
            NODE_KEY_ENV,
            "not set: routers and nodes need the same secret in it (it authenticates routers), "
            "or certificates from one CA (--tls-ca, --tls-cert, --tls-key)",
        )
    return key or None


def check_etcd(config: NodeConfig) -> None:
    """Fail at start, with the URLs tried, when no etcd member answers (rather than serve unregistered)."""

    async def check() -> None:
        async with Etcd(config.etcd) as etcd:
            await store.nodes(etcd)

    asyncio.run(check())


def check_node_id(node_id: str) -> str:
    if not NODE_ID.fullmatch(node_id):
        raise InvalidRequestError(
            "--node-id", f"{node_id!r}: letters, digits, '.', '_' and '-', starting with a letter or digit"
        )
    return node_id


def check_advertise(url: str) -> str:
    """An http(s) URL with a host and no path, or empty (derived from the listen address)."""
    parts = urlsplit(url)
    if url and (parts.scheme not in ("http", "https") or not parts.hostname or parts.path.strip("/")):
        raise InvalidRequestError("--advertise", f"{url!r} is not a URL like http://10.0.0.5:18888")
    return url.rstrip("/")


def host_memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise FleetError("cannot read the host's memory from /proc/meminfo")


def describe(
    config: NodeConfig, records: list[SandboxRecord], images: list[str], snapshots: list[str]
) -> store.NodeInfo:
    from agentkernel.config import DEFAULT_MEMORY_MB

    memory = host_memory_mb()
    return store.NodeInfo(
        id=config.id,
        url=config.url,
        cores=os.cpu_count() or 1,
        memory_mb=memory,
        capacity=config.capacity if config.capacity is not None else max(memory // DEFAULT_MEMORY_MB, 1),
        running=sum(r.status == "running" for r in records),
        sandboxes=len(records),
        images=tuple(sorted(images)),
        snapshots=tuple(sorted(snapshots)),
        version=__version__,
    )


async def run(config: NodeConfig, holdings: Holdings) -> None:
    """Register and keep the registration fresh until cancelled; then withdraw it at once."""
    from agentkernel.images import store as images

    async with Etcd(config.etcd) as etcd:
        lease = 0
        try:
            while True:
                try:
                    lease = await etcd.grant(config.ttl)
                    await reconcile(etcd, config.id, await holdings.list_sandboxes())
                    published: store.NodeInfo | None = None
                    while True:
                        snapshots = [s.name for s in await holdings.list_snapshots()]
                        info = describe(config, await holdings.list_sandboxes(), images.names(), snapshots)
                        if info != published:
                            await etcd.put(store.node_key(config.id), info.encode(), lease=lease)
                            if published is None:
                                log.info("registered as node %s (%s) in etcd", config.id, config.url)
                            published = info
                        if await etcd.keepalive(lease) <= 0:
                            log.warning("the lease of node %s expired: registering again", config.id)
                            break
                        await asyncio.sleep(RENEW_EVERY)
                except FleetError as exc:  # etcd unreachable, or a record changing under us: again
                    log.warning("node %s: %s", config.id, exc)
                    await asyncio.sleep(RENEW_EVERY)
        finally:
            if lease:
                with contextlib.suppress(FleetError):
                    await asyncio.shield(etcd.revoke(lease))


async def reconcile(etcd: Etcd, node: str, records: list[SandboxRecord]) -> None:
    """Make the placements naming `node` match the sandboxes it has: those it no longer has are
    removed (it restarted without them), those it has without one are recorded (it came back with
    them after they were forgotten as lost, or they were made on it directly)."""
    now, present = time.time(), {r.name: r for r in records}
    placed = {p.name: p for p in await store.placements(etcd)}
    for gone in placed.values():
        if gone.node == node and gone.name not in present and now - gone.created_at > SETTLE:
            log.info("node %s no longer has sandbox %s: removing its placement", node, gone.name)
            await store.release(etcd, gone.name)
    for name, record in present.items():
        if name not in placed:
            await store.adopt(etcd, store.Placement(name, node, record.vcpus, record.memory_mb))


def with_defaults(config: NodeConfig, host: str, port: int) -> NodeConfig:
    """The advertised URL defaults to the listen address (the host name for a wildcard listen)."""
    if config.url:
        return config
    import socket

    name = socket.getfqdn() if host in ("0.0.0.0", "::", "") else host
    name = f"[{name}]" if ":" in name else name
    scheme = "https" if config.tls else "http"
    return replace(config, url=f"{scheme}://{name}:{port}")

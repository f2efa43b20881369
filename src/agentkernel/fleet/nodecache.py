"""The live nodes as a router knows them: read once, then kept current by an etcd watch on their keys.

A router answers every call on a sandbox with the node that holds it; reading every node's record
from etcd for each call would put the whole membership on the wire per request. The watch streams
only changes (a node registering, its load changing, its lease expiring), so the router learns of a
dead node as soon as etcd deletes its key. While the watch is down (etcd unreachable, a member that
fell silent) the cache is not trusted: reads go to etcd directly, and fail with its error.
"""

from __future__ import annotations

import asyncio
import logging

from agentkernel.errors import FleetError
from agentkernel.fleet import store
from agentkernel.fleet.etcd import Etcd, Event

log = logging.getLogger("agentkernel.fleet")

RETRY = 1.0
"""Seconds between attempts to read and watch again after the watch broke."""


class NodeCache:
    """Run `follow()` as a task for as long as the router serves; `nodes()` and `node()` read."""

    def __init__(self, etcd: Etcd) -> None:
        self.etcd = etcd
        self._nodes: dict[str, store.NodeInfo] = {}
        self._synced = False
        self.revision = 0
        """The etcd revision the cache is current to (0: not current)."""

    async def nodes(self) -> dict[str, store.NodeInfo]:
        if self._synced:
            return dict(self._nodes)
        return await store.nodes(self.etcd)

    async def node(self, node_id: str) -> store.NodeInfo | None:
        """The live node `node_id`; one the cache does not know yet is looked up in etcd (it may have
        registered a moment ago, and a sandbox been placed on it since)."""
        if self._synced and node_id in self._nodes:
            return self._nodes[node_id]
        kv = await self.etcd.get(store.node_key(node_id))
        return store.NodeInfo.decode(kv.value) if kv else None

    async def follow(self) -> None:
        """Read every node's record, then apply the watch's changes; again from a fresh read whenever
        the watch breaks. Never returns (cancel it)."""
        while True:
            try:
                kvs, revision = await self.etcd.range(store.NODES, prefix=True, limit=store.MAX_NODES)
                self._nodes = {}
                for kv in kvs:
                    info = store.NodeInfo.decode(kv.value)
                    self._nodes[info.id] = info
                self.revision, self._synced = revision, True
                async for events in self.etcd.watch(store.NODES, prefix=True, start_revision=revision + 1):
                    self._apply(events)
            except (FleetError, ValueError, KeyError) as exc:
                log.info("watch on the fleet's nodes broke (%s): reading etcd again", exc)
            except Exception:  # follow() runs beside the router's server: ending it would stop the router
                log.exception("watch on the fleet's nodes failed: reading etcd again")
            self._synced = False
            await asyncio.sleep(RETRY)

    def _apply(self, events: list[Event]) -> None:
        for event in events:
            node_id = event.kv.key[len(store.NODES) :].decode()
            if event.deleted:
                self._nodes.pop(node_id, None)
            else:
                self._nodes[node_id] = store.NodeInfo.decode(event.kv.value)
            self.revision = max(self.revision, event.kv.mod_revision)

"""What the fleet keeps in etcd, and the transactions that change it.

    /agentkernel/fleet/nodes/<node>        a node's address, capacity and load, under the node's lease:
                                           it disappears when the node stops renewing the lease
    /agentkernel/fleet/load/<node>         sandboxes placed on the node and the memory they reserve,
                                           written only together with a placement, in one transaction
    /agentkernel/fleet/sandboxes/<name>    which node a sandbox was placed on (no lease: it outlives
                                           its node, so the sandbox shows as lost rather than vanishing)

A placement compares the node's load key with the version it read and the sandbox's key with absence:
two routers placing at once both read the same load, one transaction succeeds and the other re-reads.
So a node never holds more than its capacity, and a name is placed once.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from agentkernel.errors import (
    FleetError,
    FleetFullError,
    NoSuchSandboxError,
    NoSuchSnapshotError,
    SandboxExistsError,
)
from agentkernel.fleet.etcd import KV, Etcd, absent, delete, put, unchanged

ROOT = b"/agentkernel/fleet/"
NODES = ROOT + b"nodes/"
LOAD = ROOT + b"load/"
SANDBOXES = ROOT + b"sandboxes/"
SAMPLE = 3
"""Live nodes compared for one placement (the best of a few random ones spreads load without every
router piling onto the same emptiest node)."""
TRIES = 50
"""Placement transactions tried before giving up: each failure means another router placed meanwhile."""
MAX_NODES = 10_000
MAX_SANDBOXES = 1_000_000


def node_key(node: str) -> bytes:
    return NODES + node.encode()


def load_key(node: str) -> bytes:
    return LOAD + node.encode()


def sandbox_key(name: str) -> bytes:
    return SANDBOXES + name.encode()


@dataclass(frozen=True)
class NodeInfo:
    """What a node publishes about itself. `capacity` is how many sandboxes it takes, `memory_mb` the
    memory it gives them; the load fields are what it runs now."""

    id: str
    url: str
    cores: int
    memory_mb: int
    capacity: int
    running: int = 0
    sandboxes: int = 0
    images: tuple[str, ...] = ()
    snapshots: tuple[str, ...] = ()
    """Snapshots on its disk (the pool's templates among them): a fork of one is placed on a holder."""
    version: str = ""

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def decode(cls, data: bytes) -> NodeInfo:
        """A ValueError for a record that is not a node's."""
        raw = json.loads(data)
        if not isinstance(raw, dict):
            raise ValueError("a node record is not a JSON object")
        known = {k: v for k, v in raw.items() if k in cls.__dataclass_fields__}
        try:
            known["images"] = tuple(known.get("images", ()))
            known["snapshots"] = tuple(known.get("snapshots", ()))
            return cls(**known)
        except TypeError as exc:
            raise ValueError(f"a malformed node record ({exc})") from None


@dataclass(frozen=True)
class Load:
    """The sandboxes routers placed on a node and the memory they asked for."""

    count: int = 0
    memory_mb: int = 0

    def encode(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def decode(cls, kv: KV | None) -> Load:
        if kv is None:
            return cls()
        raw = json.loads(kv.value)
        return cls(int(raw["count"]), int(raw["memory_mb"]))


@dataclass(frozen=True)
class Placement:
    name: str
    node: str
    vcpus: int
    memory_mb: int
    created_at: float = field(default_factory=time.time)

    def encode(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def decode(cls, data: bytes) -> Placement:
        raw = json.loads(data)
        return cls(raw["name"], raw["node"], int(raw["vcpus"]), int(raw["memory_mb"]), raw["created_at"])


@dataclass(frozen=True)
class LiveNode:
    info: NodeInfo
    load: Load
    load_kv: KV | None

    def fits(self, memory_mb: int) -> bool:
        return self.load.count < self.info.capacity and self.load.memory_mb + memory_mb <= self.info.memory_mb

    def free(self, memory_mb: int) -> float:
        """The share of the node left after this sandbox: the scarcer of slots and memory."""
        slots = (self.info.capacity - self.load.count - 1) / max(self.info.capacity, 1)
        memory = (self.info.memory_mb - self.load.memory_mb - memory_mb) / max(self.info.memory_mb, 1)
        return min(slots, memory)


async def nodes(etcd: Etcd) -> dict[str, NodeInfo]:
    """The live nodes: those whose lease still holds their key."""
    kvs, _ = await etcd.range(NODES, prefix=True, limit=MAX_NODES)
    found = {}
    for kv in kvs:
        info = NodeInfo.decode(kv.value)
        found[info.id] = info
    return found


async def loads(etcd: Etcd) -> dict[str, KV]:
    kvs, _ = await etcd.range(LOAD, prefix=True, limit=MAX_NODES)
    return {kv.key[len(LOAD) :].decode(): kv for kv in kvs}


async def live_nodes(etcd: Etcd) -> list[LiveNode]:
    found, load = await asyncio.gather(nodes(etcd), loads(etcd))
    return [LiveNode(info, Load.decode(load.get(id)), load.get(id)) for id, info in sorted(found.items())]


async def placements(etcd: Etcd) -> list[Placement]:
    kvs, _ = await etcd.range(SANDBOXES, prefix=True, limit=MAX_SANDBOXES)
    return [Placement.decode(kv.value) for kv in kvs]


async def placement(etcd: Etcd, name: str) -> Placement:
    kv = await etcd.get(sandbox_key(name))
    if kv is None:
        raise NoSuchSandboxError(name)
    return Placement.decode(kv.value)


async def place(
    etcd: Etcd,
    name: str,
    *,
    vcpus: int,
    memory_mb: int,
    snapshot: str | None = None,
    rng: random.Random | None = None,
) -> tuple[Placement, NodeInfo]:
    """Record `name` on the best of a few random live nodes with room for it, in one transaction;
    the placement and the node it chose. A fork of `snapshot` goes only to a node that holds it (its
    memory and disk files are there and nowhere else)."""
    rng = rng or random.Random()
    for _ in range(TRIES):
        live = await live_nodes(etcd)
        if not live:
            raise FleetFullError("no node is registered in etcd: start `agentkernel serve --node` on a host")
        if snapshot is not None:
            live = [n for n in live if snapshot in n.info.snapshots]
            if not live:
                raise NoSuchSnapshotError(snapshot)
        room = [n for n in live if n.fits(memory_mb)]
        if not room:
            holding = f" holding snapshot '{snapshot}'" if snapshot is not None else ""
            raise FleetFullError(
                f"no node{holding} has room for a sandbox of {memory_mb} MB: all {len(live)} are full "
                "(see `agentkernel fleet nodes`)"
            )
        best = max(rng.sample(room, min(SAMPLE, len(room))), key=lambda n: n.free(memory_mb))
        chosen = Placement(name, best.info.id, vcpus, memory_mb)
        load = Load(best.load.count + 1, best.load.memory_mb + memory_mb)
        key, lkey = sandbox_key(name), load_key(best.info.id)
        if await etcd.txn(
            [absent(key), unchanged(lkey, best.load_kv)],
            [put(key, chosen.encode()), put(lkey, load.encode())],
        ):
            return chosen, best.info
        if await etcd.get(key) is not None:
            raise SandboxExistsError(f"a sandbox named '{name}' already exists in the fleet")
    raise FleetFullError(f"could not place '{name}': other routers kept changing every node's load")


async def adopt(etcd: Etcd, placed: Placement) -> bool:
    """Record a sandbox its node already has (it came back with it, or it was made on the node
    directly), counting it in the node's load; False if the name is placed already."""
    key, lkey = sandbox_key(placed.name), load_key(placed.node)
    for _ in range(TRIES):
        load_kv = await etcd.get(lkey)
        old = Load.decode(load_kv)
        load = Load(old.count + 1, old.memory_mb + placed.memory_mb)
        if await etcd.txn(
            [absent(key), unchanged(lkey, load_kv)], [put(key, placed.encode()), put(lkey, load.encode())]
        ):
            return True
        if await etcd.get(key) is not None:
            return False
    raise FleetError(f"could not record '{placed.name}': its node's load kept changing")


async def release(etcd: Etcd, name: str) -> None:
    """Forget where `name` was placed and give its room back to its node (nothing if not placed)."""
    key = sandbox_key(name)
    for _ in range(TRIES):
        kv = await etcd.get(key)
        if kv is None:
            return
        gone = Placement.decode(kv.value)
        lkey = load_key(gone.node)
        load_kv = await etcd.get(lkey)
        old = Load.decode(load_kv)
        load = Load(max(old.count - 1, 0), max(old.memory_mb - gone.memory_mb, 0))
        ops = [delete(key), put(lkey, load.encode()) if load_kv else delete(lkey)]
        if await etcd.txn([unchanged(key, kv), unchanged(lkey, load_kv)], ops):
            return
    raise FleetError(f"could not release '{name}': its node's load kept changing")


def node_view(node: LiveNode) -> dict[str, Any]:
    """A node as `fleet nodes` and `GET /fleet/nodes` show it."""
    info = node.info
    return {
        "id": info.id,
        "url": info.url,
        "version": info.version,
        "cores": info.cores,
        "memory_mb": info.memory_mb,
        "capacity": info.capacity,
        "placed": node.load.count,
        "placed_memory_mb": node.load.memory_mb,
        "running": info.running,
        "sandboxes": info.sandboxes,
        "images": list(info.images),
        "snapshots": list(info.snapshots),
    }

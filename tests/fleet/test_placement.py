"""Placement and the etcd client against the real etcd cluster, without VMs: routers racing on a
nearly full node, one name placed twice, failover between members, a lease that expires."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

from agentkernel.errors import EtcdUnavailable, FleetFullError, SandboxExistsError
from agentkernel.fleet import store
from agentkernel.fleet.etcd import Etcd
from agentkernel.fleet.nodecache import NodeCache
from tests.api.server import free_port
from tests.fleet.conftest import EtcdCluster, wipe


def run(coro: object) -> object:
    return asyncio.run(asyncio.wait_for(coro, 60))  # type: ignore[arg-type]


async def register(etcd: Etcd, node: str, capacity: int, ttl: int = 10) -> int:
    """A node's record under a lease, as `serve --node` writes it (no server behind it)."""
    lease = await etcd.grant(ttl)
    info = store.NodeInfo(node, f"http://127.0.0.1:9/{node}", cores=2, memory_mb=1 << 20, capacity=capacity)
    await etcd.put(store.node_key(node), info.encode(), lease=lease)
    return lease


@pytest.fixture
def cluster(etcd_cluster: EtcdCluster) -> EtcdCluster:
    wipe(etcd_cluster)
    yield etcd_cluster
    wipe(etcd_cluster)


def test_two_routers_racing_never_overfill_a_node(cluster: EtcdCluster) -> None:
    """Two routers (each its own etcd client, talking to different members) place 20 sandboxes at
    once on a node with room for 2 more: exactly 2 succeed, the rest get fleet_full."""

    async def scenario() -> tuple[list[object], store.Load, list[store.Placement]]:
        async with Etcd(cluster.urls) as a, Etcd(cluster.urls[::-1]) as b:
            lease = await register(a, "full", capacity=5)
            for i in range(3):
                await store.place(a, f"old-{i}", vcpus=1, memory_mb=512)
            results = await asyncio.gather(
                *(store.place(a if i % 2 else b, f"new-{i}", vcpus=1, memory_mb=512) for i in range(20)),
                return_exceptions=True,
            )
            load = store.Load.decode(await a.get(store.load_key("full")))
            placed = await store.placements(a)
            await a.revoke(lease)
            return results, load, placed

    results, load, placed = run(scenario())  # type: ignore[misc]
    won = [r for r in results if isinstance(r, tuple)]
    assert len(won) == 2, results
    assert all(isinstance(r, FleetFullError) for r in results if r not in won)
    assert load == store.Load(5, 5 * 512)
    assert len(placed) == 5


def test_one_name_is_placed_once(cluster: EtcdCluster) -> None:
    async def scenario() -> list[object]:
        async with Etcd(cluster.urls) as a, Etcd(cluster.urls[1:]) as b:
            await register(a, "x", capacity=10)
            await register(a, "y", capacity=10)
            return await asyncio.gather(
                *(store.place(c, "same", vcpus=1, memory_mb=256) for c in (a, b, a, b)),
                return_exceptions=True,
            )

    results = run(scenario())
    assert isinstance(results, list)
    assert sum(isinstance(r, tuple) for r in results) == 1, results
    assert sum(isinstance(r, SandboxExistsError) for r in results) == 3, results


def test_release_gives_the_room_back(cluster: EtcdCluster) -> None:
    async def scenario() -> tuple[store.Load, store.Load]:
        async with Etcd(cluster.urls) as etcd:
            await register(etcd, "only", capacity=1)
            await store.place(etcd, "a", vcpus=1, memory_mb=512)
            with pytest.raises(FleetFullError, match="no node has room"):
                await store.place(etcd, "b", vcpus=1, memory_mb=512)
            full = store.Load.decode(await etcd.get(store.load_key("only")))
            await store.release(etcd, "a")
            await store.place(etcd, "b", vcpus=1, memory_mb=512)
            return full, store.Load.decode(await etcd.get(store.load_key("only")))

    full, after = run(scenario())  # type: ignore[misc]
    assert full == after == store.Load(1, 512)


def test_placement_prefers_free_capacity(cluster: EtcdCluster) -> None:
    """With every node sampled (three), each sandbox goes to the node left freest: a node with twice
    the capacity takes about twice the sandboxes."""

    async def scenario() -> dict[str, int]:
        async with Etcd(cluster.urls) as etcd:
            for node, capacity in (("big", 8), ("small-1", 4), ("small-2", 4)):
                await register(etcd, node, capacity)
            for i in range(8):
                await store.place(etcd, f"s{i}", vcpus=1, memory_mb=128)
            counts: dict[str, int] = {}
            for p in await store.placements(etcd):
                counts[p.node] = counts.get(p.node, 0) + 1
            return counts

    assert run(scenario()) == {"big": 4, "small-1": 2, "small-2": 2}


def test_no_node_registered_is_one_clear_error(cluster: EtcdCluster) -> None:
    async def scenario() -> None:
        async with Etcd(cluster.urls) as etcd:
            await store.place(etcd, "nowhere", vcpus=1, memory_mb=512)

    with pytest.raises(FleetFullError, match="no node is registered"):
        run(scenario())


def test_failover_past_a_dead_member_and_one_error_naming_every_url(cluster: EtcdCluster) -> None:
    dead = [f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"]

    async def works() -> int:
        async with Etcd([*dead, cluster.urls[0]]) as etcd:
            await etcd.put(b"/agentkernel/fleet/probe", b"1")
            kv = await etcd.get(b"/agentkernel/fleet/probe")
            assert kv is not None and kv.value == b"1"
            return kv.mod_revision

    assert run(works())

    async def fails() -> None:
        async with Etcd(dead, timeout=1) as etcd:
            await etcd.get(b"x")

    started = time.monotonic()
    with pytest.raises(EtcdUnavailable) as caught:
        run(fails())
    assert time.monotonic() - started < 5
    message = str(caught.value)
    assert "\n" not in message and all(url in message for url in dead), message


def test_an_expired_lease_takes_the_node_away(cluster: EtcdCluster) -> None:
    async def scenario() -> tuple[int, set[str]]:
        async with Etcd(cluster.urls) as etcd:
            lease = await register(etcd, "brief", capacity=1, ttl=2)
            assert "brief" in await store.nodes(etcd)
            await asyncio.sleep(4)
            return await etcd.keepalive(lease), set(await store.nodes(etcd))

    left, nodes = run(scenario())  # type: ignore[misc]
    assert left == 0 and "brief" not in nodes


def test_the_router_learns_node_changes_by_watch(cluster: EtcdCluster) -> None:
    """The node cache reads etcd once, then follows the watch: a node that registers, changes its
    load and has its lease end shows in the cache without another read of every node."""

    async def scenario() -> None:
        async with Etcd(cluster.urls) as etcd, Etcd(cluster.urls[::-1]) as writer:
            ranges = 0
            real_range = etcd.range

            async def counted(*args: Any, **kwargs: Any) -> Any:
                nonlocal ranges
                ranges += 1
                return await real_range(*args, **kwargs)

            etcd.range = counted  # type: ignore[method-assign]
            cache = NodeCache(etcd)
            task = asyncio.create_task(cache.follow())
            try:
                await until(lambda: cache.revision > 0)
                lease = await register(writer, "watched", capacity=2)
                await until(lambda: "watched" in cache._nodes)
                busier = store.NodeInfo(
                    "watched", "http://127.0.0.1:9/", cores=2, memory_mb=1024, capacity=2, running=1
                )
                await writer.put(store.node_key("watched"), busier.encode(), lease=lease)
                await until(lambda: cache._nodes.get("watched") == busier)
                await writer.revoke(lease)  # as when the lease expires: etcd deletes the key
                await until(lambda: "watched" not in cache._nodes)
                assert (await cache.nodes()) == {} and ranges == 1
            finally:
                task.cancel()

    run(scenario())


async def until(check: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "the cache did not follow"
        await asyncio.sleep(0.05)


def test_a_watch_on_an_unreachable_etcd_is_one_error() -> None:
    async def scenario() -> None:
        async with Etcd([f"http://127.0.0.1:{free_port()}"]) as etcd:
            async for _ in etcd.watch(b"/x", start_revision=1):
                raise AssertionError("no events from a dead etcd")

    with pytest.raises(
        EtcdUnavailable,
        match=r"etcd is unreachable for a watch \(tried http://127.0.0.1:\d+: cannot connect\)",
    ):
        run(scenario())

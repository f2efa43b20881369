"""The host side of CONNECT against guests that break the protocol, or predate it."""

from __future__ import annotations

import asyncio

import pytest

from agentkernel.errors import AgentConnectionError, SandboxStateError
from agentkernel.protocol.connection import Connection
from tests.hostile.conftest import Guests
from tests.hostile.test_hostile_guests import HANG, hostile

pytestmark = pytest.mark.usefixtures("traced")


def test_connect_flood_beyond_the_window_while_nobody_reads(guests: Guests) -> None:
    """What the guest sends on a connection waits for the host's reader, a window at most: an agent
    that sends more breaks the connection instead of growing the host's memory."""

    async def work(conn: Connection) -> None:
        await conn.hello(timeout=10)
        stream = await conn.open_tcp(8000)
        while not conn.broken:
            await asyncio.sleep(0.01)
        await stream.read()

    outcome = hostile(guests, "connect-flood", work)
    assert isinstance(outcome.error, AgentConnectionError)
    assert "sent more data than its window allows" in str(outcome.error)


def test_an_agent_before_ports_is_never_sent_connect(guests: Guests) -> None:
    """An agent of protocol 2 would drop the connection on CONNECT: the host refuses with what to do,
    and the connection goes on working."""

    async def body() -> None:
        async with await Connection.open_unix(guests("old-agent"), shared_stream=True) as conn:
            await conn.hello(timeout=10)
            with pytest.raises(
                SandboxStateError, match=r"cannot reach ports in the guest: recreate the sandbox"
            ):
                await conn.open_tcp(8000)
            assert (await conn.run(["echo", "still"])).stdout == b"still\n"

    asyncio.run(asyncio.wait_for(body(), HANG))

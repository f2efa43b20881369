"""One shared agent connection per running sandbox, for long-lived servers (the HTTP API, MCP).

`sandboxes.session()` takes one of the sandbox's few agent ports for as long as it is open, so a
server that opened a session per request would run out of ports under load. A Connection multiplexes
any number of concurrent execs and file operations, so the pool keeps one per sandbox and hands it to
every caller. A connection that broke (the VM stopped or was restarted by another process) is replaced
on the next `get`.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

import anyio

from agentkernel.errors import AgentkernelError, SandboxNotRunningError
from agentkernel.protocol.connection import Connection
from agentkernel.service import sandboxes


@dataclass
class _Entry:
    conn: Connection
    pid: int
    session: contextlib.AsyncExitStack


class ConnectionPool:
    """Agent connections by sandbox name. Belongs to one event loop; close it before the loop ends."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}
        self._opening: dict[str, asyncio.Future[Connection]] = {}

    async def get(self, name: str) -> Connection:
        """The connection to running sandbox `name`, opened if there is no live one."""
        record = await anyio.to_thread.run_sync(sandboxes.get, name)
        if record.status != "running" or record.pid is None:
            await self.discard(name)
            raise SandboxNotRunningError(name, record.status)
        while True:
            entry = self._entries.get(name)
            if entry is not None and not entry.conn.broken and entry.pid == record.pid:
                return entry.conn
            pending = self._opening.get(name)
            if pending is None:
                return await self._open(name, record.pid)
            with contextlib.suppress(Exception):  # its opener reports the failure; try again here
                await asyncio.shield(pending)

    async def _open(self, name: str, pid: int) -> Connection:
        """Open a connection for `name`; concurrent callers wait for this one instead of opening more."""
        pending = self._opening[name] = asyncio.get_running_loop().create_future()
        try:
            await self._close(name)
            session = contextlib.AsyncExitStack()
            conn = await session.enter_async_context(sandboxes.session(name))
            self._entries[name] = _Entry(conn, pid, session)
            pending.set_result(conn)
            return conn
        except BaseException as exc:
            pending.set_exception(exc if isinstance(exc, Exception) else AgentkernelError("cancelled"))
            pending.exception()  # retrieved: waiters only retry
            raise
        finally:
            del self._opening[name]

    async def discard(self, name: str) -> None:
        """Close the connection to `name`, if any (before the sandbox is stopped or removed)."""
        pending = self._opening.get(name)
        if pending is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(pending)
        await self._close(name)

    async def _close(self, name: str) -> None:
        entry = self._entries.pop(name, None)
        if entry is not None:
            with contextlib.suppress(AgentkernelError):
                await entry.session.aclose()

    async def close(self) -> None:
        for name in list(self._entries):
            await self.discard(name)

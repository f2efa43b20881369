"""A small client for QEMU's machine protocol (QMP): JSON commands over the VM's control socket."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any

from agentkernel.errors import QmpError

MAX_LINE = 1 << 20


class Qmp:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def connect(cls, path: Path, *, timeout: float = 10.0) -> Qmp:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(str(path), limit=MAX_LINE), timeout
            )
            qmp = cls(reader, writer)
            await asyncio.wait_for(qmp._read(), timeout)  # the greeting
            await qmp.execute("qmp_capabilities")
        except (OSError, TimeoutError, ValueError) as exc:
            raise QmpError(f"cannot talk to QEMU's control socket {path}: {exc}") from None
        return qmp

    async def execute(self, command: str, **arguments: Any) -> Any:
        message: dict[str, Any] = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        self._writer.write(json.dumps(message).encode() + b"\n")
        await self._writer.drain()
        while True:
            reply = await self._read()
            if "event" in reply:
                continue
            if "error" in reply:
                raise QmpError(f"QEMU refused {command}: {reply['error'].get('desc', reply['error'])}")
            return reply.get("return")

    async def _read(self) -> dict[str, Any]:
        line = await self._reader.readline()
        if not line:
            raise QmpError("QEMU closed its control socket")
        reply = json.loads(line)
        if not isinstance(reply, dict):
            raise QmpError("unexpected reply on QEMU's control socket")
        return reply

    async def wait_migration(self, *, timeout: float) -> None:
        """Until the outgoing or incoming migration completes; its error if it fails."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            info = await self.execute("query-migrate")
            status = info.get("status")
            if status == "completed":
                return
            if status in ("failed", "cancelled"):
                raise QmpError(f"QEMU migration {status}: {info.get('error-desc', 'no detail')}")
            if asyncio.get_running_loop().time() > deadline:
                raise QmpError(f"QEMU migration did not finish within {timeout:g}s (status {status})")
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()

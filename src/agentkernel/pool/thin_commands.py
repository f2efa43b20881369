"""The pool daemon's side of `stop`, `rm` and `cp` on the thin command line (`cli/thin_served.py`).

The daemon has the service loaded; a thin client asks it to stop or remove sandboxes by name, or to
copy a file, and prints what the full command would have printed, from the reply. The work is the
service's own (`SandboxService.stop`, `reap` and `remove`, `service/transfers`, as the full commands
call them), so locks, backends, cleanup and audit are the same. A client that closes its end (it was
interrupted or killed) cancels the work where it is, as the full command is cancelled when its process
is interrupted (the service's cleanup still runs).

A copy's host file is opened by the client, which sends it over the socket (SCM_RIGHTS, after the
daemon asks with `wire.SEND_FD`): the daemon never opens a path for a client, so no client reaches a
file through it that it could not open itself (another mount namespace, a confined process). A
download reads the sandbox's file first (its errors come first, as in the full `cp`), then asks for the
client's part file, and leaves setting its mode and renaming it into place to the client.

A reply holds the names done, in order, and the error the full command would have ended with (its
message and exit status), or `refused` when the request was not one the client may send (nothing
was done: the full command line then runs).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from agentkernel.errors import AgentkernelError, os_error_text
from agentkernel.pool import wire
from agentkernel.service import transfers
from agentkernel.service.checks import NAME_RE
from agentkernel.service.service import SandboxService, call

T = TypeVar("T")
OPS = ("stop_sandbox", "remove_sandboxes", "copy_file")
MAX_NAMES = 256
FD_TIMEOUT = 5.0
"""Seconds a client has to send its host file once asked."""
REFUSED = {"ok": True, "refused": "not a request this daemon takes"}
Work = Callable[[SandboxService], Awaitable[None]]


class ClientLeft(Exception):
    """The client closed its connection, or did not send a file when asked."""


class Refused(Exception):
    """The client sent a file the request may not use: nothing was done."""


def answer(message: dict[str, Any], connection: int) -> dict[str, Any]:
    """The reply to a stop, remove or copy (run in a worker thread: it waits for VMs). `connection`
    is a duplicate of the client's socket, which this closes."""
    with socket.socket(fileno=connection) as client:
        client.settimeout(FD_TIMEOUT)
        done: list[str] = []
        reply: dict[str, Any] = {"ok": True, "done": done}
        work = _work(message, client, done, reply)
        if work is None:
            return REFUSED
        try:
            call(work)
        except Refused:
            return REFUSED
        except (asyncio.CancelledError, ClientLeft):
            return {"ok": False, "error": "the client left"}  # to no one: it has gone
        except AgentkernelError as exc:
            reply["error"] = {"message": str(exc), "exit_code": exc.exit_code}
        except transfers.HostWriteError as exc:  # the client names its file in the message
            reply["error"] = {"write_error": str(exc), "exit_code": 1}
        except OSError as exc:  # on the host's side, as the full command line words it
            reply["error"] = {"message": os_error_text(exc), "exit_code": 1}
        return reply


async def watched(client: socket.socket, work: Awaitable[T]) -> T:
    """`work`, cancelled should the client close its end meanwhile."""
    task = asyncio.ensure_future(work)

    def readable() -> None:
        try:
            if client.recv(4096, socket.MSG_DONTWAIT):
                return  # bytes a request does not have: dropped
        except BlockingIOError:
            return
        except OSError:
            pass
        task.cancel()

    loop = asyncio.get_running_loop()
    loop.add_reader(client.fileno(), readable)
    try:
        return await task
    finally:
        loop.remove_reader(client.fileno())


def _work(
    message: dict[str, Any], client: socket.socket, done: list[str], reply: dict[str, Any]
) -> Work | None:
    """What the service is to do for `message` (the names it finished go to `done`, what a copy's
    client needs to know to `reply`); None if the request is malformed."""
    op = message["op"]
    if op == "copy_file":
        return _copy(message, client, reply)
    names, force = _names(message.get("names")), message.get("force", False)
    if names is None or not isinstance(force, bool):
        return None
    if op == "stop_sandbox":
        if len(names) != 1 or force:
            return None

        async def stop(service: SandboxService) -> None:
            await watched(client, service.stop(names[0]))
            done.append(names[0])

        return stop

    async def remove(service: SandboxService) -> None:
        await watched(client, service.reap())  # first, as the full `rm`
        for name in names:
            await watched(client, service.remove(name, force=force))
            done.append(name)

    return remove


def _copy(message: dict[str, Any], client: socket.socket, reply: dict[str, Any]) -> Work | None:
    """A copy to the sandbox from the client's open host file, or from the sandbox into the client's
    part file (whose mode the reply gives)."""
    name, remote, upload, local_name = (message.get(k) for k in ("sandbox", "remote", "upload", "local_name"))
    if not (isinstance(name, str) and NAME_RE.fullmatch(name) and isinstance(remote, str)):
        return None
    if upload is True and isinstance(local_name, str):

        async def send(service: SandboxService) -> None:
            fd = await asyncio.to_thread(_host_file, client, writable=False)
            with os.fdopen(fd, "rb") as f:
                await watched(client, transfers.send_file(service, name, f, local_name, remote))

        return send
    if upload is False:

        async def receive(service: SandboxService) -> None:
            info, chunks = await watched(client, transfers.open_remote(service, name, remote))
            async with contextlib.aclosing(chunks):
                fd = await asyncio.to_thread(_host_file, client, writable=True)
                with os.fdopen(fd, "wb") as f:
                    await watched(client, transfers.write_chunks(chunks, f))
            reply["mode"] = info.mode & 0o777

        return receive
    return None


def _host_file(client: socket.socket, *, writable: bool) -> int:
    """The client's open host file, asked for with SEND_FD: a regular file open for writing
    (`writable`) or reading. ClientLeft if it sends none; Refused if it is not such a file."""
    try:
        client.sendall(json.dumps(wire.SEND_FD).encode() + b"\n")
        _data, fds, _flags, _address = socket.recv_fds(client, 1, 1, socket.MSG_CMSG_CLOEXEC)
    except OSError:  # gone, or silent past FD_TIMEOUT
        raise ClientLeft from None
    if not fds:
        raise ClientLeft
    fd = fds[0]
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    access = flags & os.O_ACCMODE
    usable = (os.O_WRONLY, os.O_RDWR) if writable else (os.O_RDONLY, os.O_RDWR)
    # An O_PATH descriptor names a file without the right to read or write it.
    if not stat.S_ISREG(os.fstat(fd).st_mode) or flags & os.O_PATH or access not in usable:
        os.close(fd)
        raise Refused
    return fd


def _names(given: object) -> list[str] | None:
    """`given` if it is 1 to MAX_NAMES valid sandbox names."""
    if not isinstance(given, list) or not 0 < len(given) <= MAX_NAMES:
        return None
    names = [n for n in given if isinstance(n, str) and NAME_RE.fullmatch(n)]
    return names if len(names) == len(given) else None

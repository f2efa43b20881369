"""The pool daemon's side of `stop`, `rm` and `cp` on the thin command line (`cli/thin_served.py`).

The daemon has the service loaded; a thin client asks it to stop or remove sandboxes by name, or to
copy a file, and prints what the full command would have printed, from the reply. The work is the
service's own (`SandboxService.stop`, `reap` and `remove`, `service/transfers`, as the full commands
call them), so locks, backends, cleanup and audit are the same; a client that leaves while it waits
does not stop the work, as a command that was asked for runs to its end.

A copy's host file is opened by the client, which sends it over the socket (SCM_RIGHTS): the daemon
never opens a path for a client, so no client reaches a file through it that it could not open itself
(another mount namespace, a confined process), and the client renames a download into place itself.

A reply holds the names done, in order, and the error the full command would have ended with (its
message and exit status), or `refused` when the request was not one the client may send (nothing
was done: the full command line then runs).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import socket
import stat
from collections.abc import Awaitable, Callable
from typing import Any

from agentkernel.errors import AgentkernelError
from agentkernel.service import transfers
from agentkernel.service.checks import NAME_RE
from agentkernel.service.service import SandboxService, call

OPS = ("stop_sandbox", "remove_sandboxes", "copy_file")
MAX_NAMES = 256


def answer(message: dict[str, Any], connection: int) -> dict[str, Any]:
    """The reply to a stop, remove or copy (run in a worker thread: it waits for VMs). A copy's host
    file comes on `connection` (the client's socket: see `receive_fd`)."""
    done: list[str] = []
    received = receive_fd(connection) if message["op"] == "copy_file" else None
    try:
        work = _work(message, done, received)
        if work is None:
            return {"ok": True, "refused": f"not a {message['op']} this daemon takes"}
        reply: dict[str, Any] = {"ok": True, "done": done}
        try:
            call(work)
        except AgentkernelError as exc:
            reply["error"] = {"message": str(exc), "exit_code": exc.exit_code}
        except transfers.HostWriteError as exc:  # the client names its file in the message
            reply["error"] = {"write_error": str(exc), "exit_code": 1}
        except OSError as exc:  # on the host's side, as the full command line words it
            where = f"{exc.filename}: " if exc.filename else ""
            reply["error"] = {"message": f"{where}{exc.strerror or exc}", "exit_code": 1}
        return reply
    finally:
        if received is not None:
            os.close(received)


SEND_FD = {"ok": True, "send": "fd"}
"""The daemon's first answer to a copy: the client then sends its open host file (SCM_RIGHTS)."""
FD_TIMEOUT = 5.0


def receive_fd(connection: int) -> int | None:
    """The file descriptor the client sends on socket `connection` after SEND_FD (None if it sends
    none within FD_TIMEOUT). The daemon's event loop has stopped reading that socket meanwhile."""
    with socket.socket(fileno=os.dup(connection)) as sock:
        if not select.select([sock], [], [], FD_TIMEOUT)[0]:
            return None
        with contextlib.suppress(OSError):
            _data, fds, _flags, _address = socket.recv_fds(sock, 1, 1)
            return fds[0] if fds else None
    return None


Work = Callable[[SandboxService], Awaitable[None]]


def _work(message: dict[str, Any], done: list[str], received: int | None) -> Work | None:
    """What the service is to do for `message` (the names it finished go to `done`; a copy's host file
    is `received`); None if the request is malformed or not the daemon's to do."""
    op = message["op"]
    if op == "copy_file":
        return _copy(message, received)
    names, force = _names(message.get("names")), message.get("force", False)
    if names is None or not isinstance(force, bool):
        return None
    if op == "stop_sandbox":
        if len(names) != 1 or force:
            return None

        async def stop(service: SandboxService) -> None:
            await service.stop(names[0])
            done.append(names[0])

        return stop

    async def remove(service: SandboxService) -> None:
        await service.reap()  # first, as the full `rm`
        for name in names:
            await service.remove(name, force=force)
            done.append(name)

    return remove


def _copy(message: dict[str, Any], received: int | None) -> Work | None:
    """A copy to the sandbox from the client's open regular file `received`, or from the sandbox into
    it (the client then renames it into place)."""
    name, remote, upload, local_name = (message.get(k) for k in ("sandbox", "remote", "upload", "local_name"))
    if not (isinstance(name, str) and NAME_RE.fullmatch(name) and isinstance(remote, str)):
        return None
    if received is None or not stat.S_ISREG(os.fstat(received).st_mode):
        return None
    fd, access = received, fcntl.fcntl(received, fcntl.F_GETFL) & os.O_ACCMODE
    if upload is True and isinstance(local_name, str) and access in (os.O_RDONLY, os.O_RDWR):

        async def send(service: SandboxService) -> None:
            with os.fdopen(os.dup(fd), "rb") as f:  # a copy: `answer` closes the one received
                await transfers.send_file(service, name, f, local_name, remote)

        return send
    if upload is False and access in (os.O_WRONLY, os.O_RDWR):

        async def receive(service: SandboxService) -> None:
            with os.fdopen(os.dup(fd), "wb") as f:
                await transfers.receive_file(service, name, remote, f)

        return receive
    return None


def _names(given: object) -> list[str] | None:
    """`given` if it is 1 to MAX_NAMES valid sandbox names."""
    if not isinstance(given, list) or not 0 < len(given) <= MAX_NAMES:
        return None
    names = [n for n in given if isinstance(n, str) and NAME_RE.fullmatch(n)]
    return names if len(names) == len(given) else None

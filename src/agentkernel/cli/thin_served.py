"""`agentkernel stop`, `rm` and `cp` on the standard library: the pool daemon, which has the service
loaded, does the work (`pool/thin_commands.py`) and this prints what the full command prints.

Anything in doubt before the request is sent is a Fallback to the full command line with nothing
done: arguments spelled another way or a name the service would refuse (the full command line words
the error), no daemon running, a daemon that does not know the request. A `cp`'s host file is opened
here, by the process that asked, and sent to the daemon over the socket, which never opens a path for
a client; a download is renamed into place here. Once a request is sent, the work is the daemon's
until this process closes its connection (interrupted, killed): the daemon then cancels it, as the
full command stops when its process does.
"""

from __future__ import annotations

import contextlib
import json
import socket
import sys
from pathlib import Path

from agentkernel.cli.thin import Fallback, one_line
from agentkernel.errors import AgentkernelError
from agentkernel.pool import wire
from agentkernel.service import transfers
from agentkernel.service.checks import NAME_RE

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Any

CONNECT_TIMEOUT = 2.0
FORCE = ("-f", "--force")


def parse(command: str, args: Sequence[str]) -> dict[str, Any]:
    """The daemon's request for `stop NAME` or `rm [-f] NAME...` as click reads them (options
    anywhere, names after `--`); else a Fallback."""
    names: list[str] = []
    force, options = False, True
    for arg in args:
        if options and arg == "--":
            options = False
        elif options and command != "stop" and arg in FORCE:
            force = True
        elif (options and arg.startswith("-")) or not NAME_RE.fullmatch(arg):
            raise Fallback(arg)  # --help, another spelling, a name the full command line words an error for
        else:
            names.append(arg)
    if not names or (command == "stop" and len(names) != 1):
        raise Fallback(command)
    if command == "stop":
        return {"op": "stop_sandbox", "names": names}
    return {"op": "remove_sandboxes", "names": names, "force": force}


def parse_copy(args: Sequence[str]) -> tuple[dict[str, Any], str]:
    """The daemon's request for `cp SRC DST` (one side NAME:/path) as the full command reads it, and
    the host path; else a Fallback (an option, `--`, both or neither side in a sandbox, a name or
    path it refuses)."""
    if len(args) != 2 or any(arg.startswith("-") for arg in args):
        raise Fallback("cp")
    (src_name, src), (dst_name, dst) = (_split_remote(arg) for arg in args)
    if (src_name is None) == (dst_name is None):
        raise Fallback("cp")
    if dst_name is not None:
        return {"op": "copy_file", "sandbox": dst_name, "remote": dst, "upload": True}, src
    return {"op": "copy_file", "sandbox": src_name, "remote": src, "upload": False}, dst


def copy(args: Sequence[str]) -> int:
    """`cp`: the daemon copies to or from the sandbox through the service (`service/transfers`, as
    the full `cp` does), with the host file this process opens and hands over when asked."""
    request, path = parse_copy(args)
    local = Path(path)
    if request["upload"]:
        with transfers.open_source(local) as f:
            return _outcome(_asked({**request, "local_name": local.name}, lambda: f.fileno()))
    target = transfers.download_target(request["sandbox"], request["remote"], local)
    with contextlib.ExitStack() as parts:
        made: list[transfers.Part] = []

        def part() -> int:  # asked for once the sandbox's file is open: its errors come first
            made.append(parts.enter_context(transfers.Part(target)))
            return made[0].file.fileno()

        reply = _asked(request, part)
        error, mode = reply.get("error"), reply.get("mode")
        if isinstance(error, dict) and isinstance(error.get("write_error"), str):
            raise transfers.cannot_write(target, error["write_error"])
        if error is None and made and isinstance(mode, int):
            made[0].keep(mode)
        return _outcome(reply)


def _split_remote(spec: str) -> tuple[str | None, str]:
    """`NAME:/path` -> (NAME, /path); a local path -> (None, path), as `cp` splits them."""
    head, sep, tail = spec.partition(":")
    if sep and head and "/" not in head:
        if not (tail.startswith("/") and NAME_RE.fullmatch(head)):
            raise Fallback(spec)
        return head, tail
    return None, spec


def run(command: str, args: Sequence[str]) -> int:
    """Have the daemon do `command` (`stop`, `rm`, `remove` or `cp`) and print its outcome; the exit
    status."""
    if command == "cp":
        return copy(args)
    return _outcome(_asked(parse(command, args)))


def _outcome(reply: dict[str, Any]) -> int:
    """What the full command prints, from the daemon's reply; its exit status."""
    if reply.get("refused") is not None:
        raise Fallback("refused")  # nothing was done
    done, error = reply.get("done"), reply.get("error")
    if not isinstance(done, list):
        raise AgentkernelError("the pool daemon sent a malformed reply")
    sys.stdout.write("".join(f"{name}\n" for name in done if isinstance(name, str)))
    sys.stdout.flush()
    if error is None:
        return 0
    message, code = (
        (error.get("message"), error.get("exit_code")) if isinstance(error, dict) else (None, None)
    )
    if not isinstance(message, str) or not isinstance(code, int) or isinstance(code, bool):
        message, code = "the pool daemon sent a malformed reply", 1
    print(f"agentkernel: error: {one_line(message)}", file=sys.stderr)
    return code


def _asked(message: dict[str, Any], host_file: Callable[[], int] | None = None) -> dict[str, Any]:
    """The daemon's reply to `message`; `host_file` gives the file descriptor to send when the daemon
    asks for it (a copy's host file). Fallback when the request could not be sent; once it is, a
    daemon that dies before answering is an error (some of the work may be done)."""
    line = json.dumps(message).encode() + b"\n"
    if len(line) > wire.MAX_REQUEST:
        raise Fallback("request too long")  # the full command line says what is wrong with it
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.settimeout(CONNECT_TIMEOUT)
            sock.connect(str(wire.socket_path()))
            sock.sendall(line)
        except OSError:
            raise Fallback("no daemon") from None
        sock.settimeout(None)  # the work waits for VMs and locks, as the full command does
        with sock.makefile("rb") as lines:
            reply = _reply(lines.readline(wire.MAX_LINE))
            if host_file is not None and reply == wire.SEND_FD:
                socket.send_fds(sock, [b"\0"], [host_file()])
                reply = _reply(lines.readline(wire.MAX_LINE))
        return reply


def _reply(line: bytes) -> dict[str, Any]:
    try:
        reply = json.loads(line)
    except ValueError:
        reply = None
    if not isinstance(reply, dict):
        raise AgentkernelError("the pool daemon did not answer the request")
    if not reply.get("ok"):
        error = str(reply.get("error"))
        if error.startswith("unknown request"):  # a daemon started before this version: nothing done
            raise Fallback(error)
        raise AgentkernelError(f"the pool daemon refused: {error}")
    return reply

"""What the host asks of the agent and how it reads the answers, for every client of the guest
protocol (the asyncio `connection.Connection` and the thin command line's `blocking` client alike).

On the standard library's cheapest modules only: the thin command line imports it.
"""

from __future__ import annotations

import os
import time
from errno import E2BIG

from agentkernel.errors import (
    AgentkernelError,
    ArgumentsTooLongError,
    ExecError,
    ProtocolError,
    WorkingDirectoryError,
)
from agentkernel.protocol.frames import (
    ARG_MAX,
    ARG_POINTER,
    INITIAL_WINDOW,
    MAGIC,
    MAX_ARG_STRLEN,
    MAX_PAYLOAD,
    OLDEST_VERSION,
    VERSION,
    FieldValue,
    FrameType,
    Record,
    Tag,
    encode,
    encode_record,
)

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

WINDOW_GRANT_STEP = INITIAL_WINDOW // 4
"""Bytes of a channel's data read before this side grants the agent that much more window."""
HELLO_RETRY = 0.25
"""Seconds between HELLOs while the agent has not answered (a serial port drops what comes while the
guest has it closed)."""
RESYNC_AFTER = 5.0
"""Seconds of unanswered HELLOs after which RESYNC is sent once before the next."""
RESYNC = bytes(MAX_PAYLOAD + 16)
"""Zero bytes that reset an agent left mid-frame by an earlier client (docs/protocol.md)."""
ENTROPY_BYTES = 64
START_TIMEOUT = 60.0
"""Seconds the agent has to answer an EXEC with STARTED or ERROR (it does once the program runs)."""
TIMEOUT_GRACE = 10.0
"""Seconds past a command's `timeout` after which the host stops waiting for the agent to end it."""
MAX_TIMEOUT = 100 * 365 * 86400.0
"""Longest command timeout, in seconds (the protocol's milliseconds go far beyond)."""
PATH_MAX = 4096
"""Linux's limit on a path, with its NUL: a longer path or working directory fails in the guest."""


def raw(text: str) -> bytes:
    """Text as the bytes it came from: arguments and paths that were not UTF-8 reach the guest as given
    (Python holds their bytes as lone surrogates)."""
    return text.encode(errors="surrogateescape")


def new_command_id() -> str:
    """The id of one command the host starts: `c-` and 8 hex digits, in its exec audit entry."""
    return f"c-{os.urandom(4).hex()}"  # as secrets.token_hex, without its imports (start-up time)


def hello_frame(
    *,
    hostname: str | None,
    set_clock: bool,
    max_procs: int | None,
    memory_mb: int | None,
    version: int = VERSION,
) -> bytes:
    """A HELLO from a host of protocol `version`. Fresh host randomness on every greeting reseeds the
    guest's generator, so copies resumed from one snapshot do not share their random numbers.
    `max_procs` and `memory_mb` limit the guest's processes (protocol.md)."""
    fields: list[tuple[Tag, FieldValue]] = [
        (Tag.VERSION, version),
        (Tag.MAGIC, MAGIC),
        (Tag.ENTROPY, os.urandom(ENTROPY_BYTES)),
    ]
    if hostname:
        fields.append((Tag.HOSTNAME, hostname.encode()))
    if set_clock:
        fields.append((Tag.TIME_NS, time.time_ns()))
    if max_procs is not None:
        fields.append((Tag.MAX_PROCS, max_procs))
    if memory_mb is not None:
        fields.append((Tag.MEMORY_MB, memory_mb))
    return encode(0, FrameType.HELLO, encode_record(fields))


def exec_fields(
    *,
    cwd: str | None = None,
    uid: int | None = None,
    gid: int | None = None,
    timeout: float | None = None,
    pty: tuple[int, int] | None = None,
    detach: bool = False,
) -> list[tuple[Tag, FieldValue]]:
    """An EXEC's fields before its argv and env, once they are checked."""
    if timeout is not None and not 0 <= timeout <= MAX_TIMEOUT:  # NaN too
        raise AgentkernelError(f"the timeout must be from 0 to {MAX_TIMEOUT:g} seconds (got {timeout:g})")
    fields: list[tuple[Tag, FieldValue]] = []
    if cwd:
        if len(raw(cwd)) >= PATH_MAX:
            raise AgentkernelError(f"the working directory is longer than {PATH_MAX - 1} bytes")
        fields.append((Tag.CWD, raw(cwd)))
    if uid is not None:
        fields.append((Tag.UID, uid))
    if gid is not None:
        fields.append((Tag.GID, gid))
    if timeout:
        fields.append((Tag.TIMEOUT_MS, max(1, int(timeout * 1000))))
    if pty:
        fields += [(Tag.PTY, 1), (Tag.ROWS, pty[0]), (Tag.COLS, pty[1])]
    if detach:
        fields.append((Tag.DETACH, 1))
    return fields


def hello_version(record: Record, newest: int = VERSION) -> int:
    """The protocol version an agent's HELLO answer speaks, checked (ProtocolError: no magic, or a
    version outside OLDEST_VERSION to `newest`)."""
    if record.bytes(Tag.MAGIC) != MAGIC:
        raise ProtocolError("agent HELLO lacks the protocol magic")
    version = record.int(Tag.VERSION) or 0
    if not OLDEST_VERSION <= version <= newest:
        raise ProtocolError(f"agent speaks protocol version {version}, not {OLDEST_VERSION} to {newest}")
    return version


def check_arguments(argv: Sequence[str | bytes], env: Mapping[str, str]) -> tuple[list[bytes], list[bytes]]:
    """`argv` and `env` as the strings execve gets, if they are within its limits in the guest;
    otherwise ArgumentsTooLongError, naming the limit. Linux's own count also takes in the
    program's path, so a request just under ARG_MAX can still fail in the guest (as E2BIG)."""
    args = [raw(a) if isinstance(a, str) else a for a in argv]
    strings = [raw(f"{k}={v}") for k, v in env.items()]
    for i, arg in enumerate(args):
        if len(arg) >= MAX_ARG_STRLEN:
            raise ArgumentsTooLongError(
                f"argument {i} is {len(arg)} bytes long; Linux takes at most {MAX_ARG_STRLEN - 1} bytes "
                "in one argument (MAX_ARG_STRLEN)"
            )
    for key, string in zip(env, strings, strict=True):
        if len(string) >= MAX_ARG_STRLEN:
            raise ArgumentsTooLongError(
                f"environment variable {key[:64]} is {len(string)} bytes long with its name; Linux takes "
                f"at most {MAX_ARG_STRLEN - 1} bytes in one (MAX_ARG_STRLEN)"
            )
    total = sum(len(s) + 1 + ARG_POINTER for s in (*args, *strings))
    if total > ARG_MAX:
        raise ArgumentsTooLongError(
            f"the command's arguments and environment take {total} bytes; Linux takes at most {ARG_MAX} "
            f"(ARG_MAX, counting each string with its NUL byte and {ARG_POINTER} bytes for its pointer)"
        )
    return args, strings


def exit_fields(record: Record) -> tuple[int | None, int | None, bool]:
    """An EXIT's exit code, signal and whether the command's timeout killed it."""
    return record.int(Tag.EXIT_CODE), record.int(Tag.SIGNAL), bool(record.int(Tag.TIMED_OUT, 0))


def shell_code(exit_code: int | None, signal: int | None) -> int:
    """The exit code a shell would report: the code, or 128+N when killed by signal N."""
    if signal is not None:
        return 128 + signal
    return exit_code if exit_code is not None else 255


def exec_error(record: Record) -> ExecError:
    errno = record.int(Tag.ERRNO)
    message = record.str(Tag.MESSAGE, "the agent could not run the command")[:500]
    if errno == E2BIG:
        return ArgumentsTooLongError(
            f"the guest refused the command's arguments ({message}): Linux takes at most {ARG_MAX} bytes "
            f"of arguments and environment (ARG_MAX) and {MAX_ARG_STRLEN - 1} in one (MAX_ARG_STRLEN)"
        )
    if record.str(Tag.CAUSE) == "cwd":
        return WorkingDirectoryError(message, errno)
    error = ExecError(message, errno)
    code = record.int(Tag.EXIT_CODE)
    if code is not None and 0 < code < 256:
        error.exit_code = code  # what a shell gives: 127 for no such command, 126 for one that cannot run
    return error

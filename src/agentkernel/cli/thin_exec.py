"""`agentkernel exec` on the standard library: a command in a running QEMU sandbox, over the blocking
client (`protocol.blocking`), as the full command line would run it.

Everything that decides whether this path may run comes first, and any doubt is a Fallback with
nothing printed and nothing started: a flag it does not take (`-t`, `-d`, `--help`, ...), input the
service's checks refuse (the full command line words that with its flag names), a sandbox that is
not a running QEMU one or whose record reconciling would change, no exec file for its VMM, every agent
port in use, an agent that does not answer. From the EXEC on, it is this path's: the command's output
and exit status, the same errors and exit codes, the same audit entry.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import sys
import time
from pathlib import Path

from agentkernel.cli.thin import Fallback, as_recorded
from agentkernel.errors import (
    AgentConnectionError,
    AgentkernelError,
    ArgumentsTooLongError,
    ExecError,
    WorkingDirectoryError,
)
from agentkernel.protocol import blocking
from agentkernel.protocol.frames import exec_records
from agentkernel.protocol.requests import check_arguments, exec_fields, new_command_id, shell_code
from agentkernel.sandbox import db
from agentkernel.service import audit, checks, exec_file, owners

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping, Sequence
    from typing import Any, TextIO

TIMEOUT_EXIT = 124
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
CONNECT_TIMEOUT = 2.0
HELLO_TIMEOUT = 8.0
"""Seconds an agent has to answer HELLO before the full command line is left to it (past
RESYNC_AFTER: an agent an earlier client left mid-frame is reset first)."""


class GaveUpError(AgentkernelError):
    """A second signal arrived before the command ended (or it did not end `waited` seconds after the
    first): we stop waiting, as a shell would."""

    def __init__(self, signo: int, *, waited: float | None = None) -> None:
        name = signal.Signals(signo).name
        if waited is not None:
            message = f"the command did not end within {waited:g}s of {name}: stopped waiting for it"
        else:
            message = (
                f"stopped waiting for the command after a second {name}; it may still run in the sandbox"
            )
        super().__init__(message)
        self.exit_code = 128 + signo


class Request:
    """What `exec` was asked: the sandbox, the command and its settings, once checked."""

    def __init__(
        self, name: str, command: list[str], env: dict[str, str], cwd: str | None, timeout: float | None
    ) -> None:
        self.name, self.command, self.env, self.cwd, self.timeout = name, command, env, cwd, timeout
        self.interactive = False


def parse(args: Sequence[str]) -> Request:
    """`exec`'s arguments as the full command line reads them (options, NAME, then the command after
    an optional `--`); a Fallback for anything else."""
    env: list[str] = []
    cwd: str | None = None
    timeout: str | None = None
    interactive = False
    i = 0
    while i < len(args) and args[i].startswith("-"):
        arg = args[i]
        name, eq, value = arg.partition("=")
        if arg in ("-i", "--interactive"):
            interactive = True
        elif name in ("-e", "--env", "-w", "--workdir", "--timeout"):
            if eq and name.startswith("--"):
                given = value
            elif not eq and i + 1 < len(args):
                i += 1
                given = args[i]
            else:
                raise Fallback(arg)
            if name in ("-e", "--env"):
                env.append(given)
            elif name in ("-w", "--workdir"):
                cwd = given
            else:
                timeout = given
        else:
            raise Fallback(arg)  # -t, -d, --help, `--` before the name, a spelling not taken here
        i += 1
    if i >= len(args):
        raise Fallback("no name")
    box, command = args[i], list(args[i + 1 :])
    command = command[1:] if command[:1] == ["--"] else command
    if not command:
        raise Fallback("no command")
    try:
        seconds = float(timeout) if timeout is not None else None
        request = Request(
            checks.validate_name(box),
            checks.check_command(command),
            checks.check_env(checks.parse_pairs(env, field="env")),
            checks.guest_path(cwd, field="cwd") if cwd is not None else None,
            checks.check_timeout(seconds),
        )
    except (AgentkernelError, ValueError):  # the full command line words it, with its flag names
        raise Fallback(box) from None
    request.interactive = interactive
    return request


def run(args: Sequence[str]) -> int:
    """Run `exec` here; its exit status. Fallback before anything is done when this path may not."""
    request = parse(args)
    row = running_row(request.name)
    with connected(request, row) as (agent, records, command_id), Signals() as signals:
        return attached(agent, request, records, command_id, row["pid"], signals)


@contextlib.contextmanager
def connected(
    request: Request, row: Mapping[str, Any]
) -> Iterator[tuple[blocking.AgentSocket, list[bytes], str]]:
    """A greeted agent connection of running sandbox `row` on a port held for it, with the EXEC
    records of `request` and the command's id; Fallback (nothing sent but a HELLO) when there is none."""
    rundir = Path(row["rundir"])
    data = exec_file.read(rundir, row["pid"])
    if data is None:
        raise Fallback("no exec file")
    command_id = new_command_id()
    env = {**exec_file.command_env(data, command_id, os.environ), **request.env}
    try:
        argv, env_strings = check_arguments(request.command, env)
        fields = exec_fields(cwd=request.cwd, timeout=request.timeout)
        records = exec_records(fields, argv, env_strings)
    except (AgentkernelError, ValueError):
        raise Fallback("arguments") from None
    if len(records) != 1:
        raise Fallback("arguments over one frame")
    with _agent_port(rundir, data["sockets"]) as sock:
        try:
            agent = blocking.AgentSocket.connect(sock, timeout=CONNECT_TIMEOUT)
        except OSError:
            raise Fallback("connect") from None
        try:
            hello = data["hello"]
            try:
                agent.hello(
                    hostname=str(hello.get("hostname") or request.name),
                    max_procs=hello.get("max_procs"),
                    memory_mb=hello.get("memory_mb"),
                    timeout=HELLO_TIMEOUT,
                )
            except AgentConnectionError:
                raise Fallback("hello") from None
            yield agent, records, command_id
        finally:
            agent.close()


def running_row(name: str) -> dict[str, Any]:
    """The sandbox's row, if it is a running QEMU sandbox that reconciling would leave as it is."""
    try:
        row = db.row(name, wait=False)
        if row is None or row["status"] != "running" or row["backend"] != "qemu" or row["pid"] is None:
            raise Fallback(name)
        extra = json.loads(row["extra"])
        if not isinstance(extra, dict) or owners.dead_owner(extra.get("owner")) is not None:
            raise Fallback(name)
        if not as_recorded(row, extra):
            raise Fallback(name)
    except (AgentkernelError, db.Busy, ValueError, TypeError, AttributeError, KeyError, OSError):
        raise Fallback(name) from None
    return row


@contextlib.contextmanager
def _agent_port(rundir: Path, sockets: list[str]) -> Iterator[str]:
    """A free agent port's socket, held (as `sandboxes._port_lock` holds one) while in use."""
    from agentkernel import paths

    for port, sock in enumerate(sockets):
        try:
            f: TextIO = paths.open_private(rundir / f"agent{port}.lock", "w")
        except OSError:
            raise Fallback("lock") from None
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            continue
        with f:
            yield sock
        return
    raise Fallback("every agent port is in use")  # the full command line waits for one


class Signals:
    """The exit signals while this process runs a command: recorded from entry on; once the command
    runs (`on_wakeup`), the first is passed on to it, and a second one, or `give_up_after` seconds
    after the first, stops the waiting (GaveUpError)."""

    def __init__(self, give_up_after: float | None = None) -> None:
        self.give_up_after = give_up_after
        self.received: list[int] = []
        self.forwarded: list[int] = []
        self.give_up_at: float | None = None
        self._saved: dict[int, Any] = {}

    def __enter__(self) -> Signals:
        self.read_end, self._write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._old_wakeup = signal.set_wakeup_fd(self._write_end, warn_on_full_buffer=False)
        self._saved = {signo: signal.signal(signo, self._on_signal) for signo in FORWARDED_SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        signal.set_wakeup_fd(self._old_wakeup)
        for signo, handler in self._saved.items():
            signal.signal(signo, handler)
        os.close(self.read_end)
        os.close(self._write_end)

    def _on_signal(self, signo: int, _frame: object) -> None:
        self.received.append(signo)

    def alarm(self) -> float | None:
        return self.give_up_at

    def pass_on(self, agent: blocking.AgentSocket) -> None:
        """Forward what came to the command; GaveUpError at a second signal or past the grace."""
        if self.give_up_at is not None and time.monotonic() >= self.give_up_at:
            raise GaveUpError(self.forwarded[0], waited=self.give_up_after)
        while self.received:
            signo = self.received.pop(0)
            if self.forwarded:
                raise GaveUpError(signo)
            self.forwarded.append(signo)
            if self.give_up_after is not None:
                self.give_up_at = time.monotonic() + self.give_up_after
            agent.signal(signo)


def timed_out_message(timeout: float | None) -> str:
    """What `exec` and `run` say of a command its timeout killed (the guest says so: it may say it
    of a command that had none)."""
    after = f" after {timeout:g}s" if timeout else ""
    return f"the command timed out{after} and was killed"


def attached(
    agent: blocking.AgentSocket,
    request: Request,
    records: list[bytes],
    command_id: str,
    pid: int,
    signals: Signals,
) -> int:
    """Start the command and stay with it until it exits (output to ours, signals as `signals` says);
    its exit status, after its audit entry."""
    agent.wakeup, agent.alarm = signals.read_end, signals.alarm
    agent.on_wakeup = lambda: signals.pass_on(agent)
    try:
        agent.start(records)  # an ERROR answer here is not audited, as `Connection.exec` does not
    except blocking.Lost as exc:
        raise _explained(request.name, pid, exc) from None
    started = time.monotonic()
    try:
        code, signo, timed_out = agent.pump(stdin=0 if request.interactive else None, timeout=request.timeout)
    except blocking.Lost as exc:
        raise _explained(request.name, pid, exc) from None
    except (ExecError, ArgumentsTooLongError, WorkingDirectoryError) as exc:  # the agent's ERROR
        audit.record("exec", request.name, argv=request.command, command=command_id, error=str(exc))
        raise
    audit.record(
        "exec",
        request.name,
        argv=request.command,
        command=command_id,
        exit_code=code,
        signal=signo,
        timed_out=timed_out,
        duration_s=round(time.monotonic() - started, 3),
    )
    if timed_out:
        print(f"agentkernel: {timed_out_message(request.timeout)}", file=sys.stderr)
        return TIMEOUT_EXIT
    return shell_code(code, signo)


def _explained(name: str, pid: int, error: AgentConnectionError) -> AgentConnectionError:
    """A lost connection as the service words it (most often: the VM ended, and why)."""
    from agentkernel.service import sandboxes

    return sandboxes.explained_loss(name, pid, error)

"""A blocking client of the guest protocol for one command at a time, on the standard library alone:
what the thin command line runs `exec` with. The asyncio `connection.Connection` is the full client
(any number of operations at once); this one greets the agent and runs one EXEC, streaming its output
to file descriptors and its stdin from one, under the same windows and limits.

Everything read from the agent is checked as `Connection` checks it: frames by `FrameDecoder`, data
against the window this side granted, frame types against what an EXEC may answer. Any violation
raises ProtocolError, an AgentConnectionError, as does a connection the agent closed (`Lost`).
"""

from __future__ import annotations

import contextlib
import math
import os
import select
import signal
import socket
import time
from collections import deque

from agentkernel.errors import AgentConnectionError, ProtocolError
from agentkernel.protocol.frames import (
    INITIAL_WINDOW,
    MAX_PAYLOAD,
    Frame,
    FrameDecoder,
    FrameType,
    Tag,
    decode_record,
    encode,
    encode_record,
)
from agentkernel.protocol.requests import (
    HELLO_RETRY,
    RESYNC,
    RESYNC_AFTER,
    START_TIMEOUT,
    TIMEOUT_GRACE,
    WINDOW_GRANT_STEP,
    exec_error,
    exit_fields,
    hello_frame,
    hello_version,
)

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

CHANNEL = 1
"""The one channel this client opens."""
READ_CHUNK = 64 * 1024
PIPE_BUF = 4096
"""Bytes a pipe with room takes in one write without blocking (Linux's PIPE_BUF)."""
EXEC_ANSWERS = frozenset(
    {FrameType.STDOUT, FrameType.STDERR, FrameType.EXIT, FrameType.ERROR, FrameType.WINDOW}
)


class Lost(AgentConnectionError):
    """The agent closed the connection, or it failed under us."""


class AgentSocket:
    """One connection to an agent's Unix socket."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)  # every wait is a select that also watches `wakeup`
        self._sock = sock
        self._decoder = FrameDecoder(hunt_hello=True)
        self._frames: deque[Frame] = deque()
        self._unwritable = False  # the agent's end is closed: what it sent before is still read
        self._sending = False
        self._queued: list[bytes] = []  # SIGNAL frames that came while another frame was half-written
        self.agent_version = 0
        self.wakeup: int | None = None
        """A file descriptor that becomes readable when `on_wakeup` has something to do (signals:
        signal.set_wakeup_fd's); watched in every wait, sends included."""
        self.on_wakeup: Callable[[], None] | None = None
        self.alarm: Callable[[], float | None] | None = None
        """When `on_wakeup` is next due by itself (a monotonic time), or None."""

    @classmethod
    def connect(cls, path: str, *, timeout: float) -> AgentSocket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(path)
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    def close(self) -> None:
        self._sock.close()

    def send(self, data: bytes, *, until: float | None = None) -> None:
        """Write `data` whole, waiting while the socket is full (serving `wakeup` meanwhile, whose
        signals are queued until the frame is whole: see `signal`); AgentConnectionError past `until`.
        Once the agent's end is closed, writes are dropped: its EXIT or EOF, still to be read, says
        more."""
        view = memoryview(data)
        self._sending = True
        try:
            while view and not self._unwritable:
                try:
                    view = view[self._sock.send(view) :]
                except BlockingIOError:
                    if until is not None and time.monotonic() >= until:
                        raise AgentConnectionError("the agent did not read what was sent to it") from None
                    self._wait(writers=[self._sock.fileno()], until=until)
                except (BrokenPipeError, ConnectionResetError):
                    self._unwritable = True
                except OSError as exc:
                    raise Lost(f"lost the connection to the sandbox agent: {exc}") from None
        finally:
            self._sending = False
        while self._queued and not self._unwritable:
            self.send(self._queued.pop(0), until=until)

    def signal(self, signo: int) -> None:
        """Send SIGNAL for the command; while another frame is half-written, once that one is whole."""
        frame = _signal_frame(signo)
        if self._sending:
            self._queued.append(frame)
        else:
            self.send(frame)

    def _kill(self) -> None:
        """SIGKILL the command's group, if the agent takes it within a second (we are giving up)."""
        with contextlib.suppress(AgentConnectionError):
            self.send(_signal_frame(signal.SIGKILL), until=time.monotonic() + 1.0)

    def _wait(
        self, *, readers: Sequence[int] = (), writers: Sequence[int] = (), until: float | None = None
    ) -> set[int]:
        """Wait until one of `readers` is readable or `writers` writable, or `until`; `on_wakeup` runs
        when `wakeup` is readable or `alarm` has come. The ready descriptors."""
        poller = select.poll()
        for fd in readers:
            poller.register(fd, select.POLLIN)
        for fd in writers:
            poller.register(fd, select.POLLOUT)
        if self.wakeup is not None:
            poller.register(self.wakeup, select.POLLIN)
        ring = self.alarm() if self.alarm is not None else None
        ends = [t for t in (until, ring) if t is not None]
        left = max(0.0, min(ends) - time.monotonic()) if ends else None
        ready = {fd for fd, _events in poller.poll(None if left is None else math.ceil(left * 1000))}
        woken = self.wakeup is not None and self.wakeup in ready
        if woken:
            _drain(self.wakeup)  # type: ignore[arg-type]
        if self.on_wakeup is not None and (woken or (ring is not None and time.monotonic() >= ring)):
            self.on_wakeup()
        return ready

    def _output(self, fd: int, data: bytes) -> None:
        """Write `data` to our fd 1 or 2, a pipe's worth at a time once it has room, so that a reader
        that does not read cannot keep signals from being served."""
        view = memoryview(data)
        while view:
            if fd not in self._wait(writers=[fd], until=None):
                continue
            view = view[os.write(fd, view[:PIPE_BUF]) :]

    def _read(self) -> None:
        """Take what the socket has into the frame queue (nothing if it has nothing yet)."""
        try:
            data = self._sock.recv(READ_CHUNK)
        except BlockingIOError:
            return
        except OSError as exc:
            raise Lost(f"lost the connection to the sandbox agent: {exc}") from None
        if not data:
            raise Lost("the sandbox agent closed the connection")
        self._frames.extend(self._decoder.feed(data))

    def next_frame(self, timeout: float | None) -> Frame | None:
        """The next frame, or None if none came within `timeout` seconds (None: wait for one)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._frames:
            if deadline is not None and time.monotonic() >= deadline:
                return None
            if self._sock.fileno() in self._wait(readers=[self._sock.fileno()], until=deadline):
                self._read()
        return self._frames.popleft()

    def hello(self, *, hostname: str, max_procs: int | None, memory_mb: int | None, timeout: float) -> None:
        """Greet the agent as `Connection.hello` does (repeated until answered, one RESYNC after a
        while); AgentConnectionError when it does not answer within `timeout` seconds."""
        frame = hello_frame(hostname=hostname, set_clock=True, max_procs=max_procs, memory_mb=memory_mb)
        deadline = time.monotonic() + timeout
        resync_at = time.monotonic() + RESYNC_AFTER
        while True:
            if time.monotonic() >= resync_at:
                resync_at = float("inf")
                self.send(RESYNC + frame, until=deadline)
            else:
                self.send(frame, until=deadline)
            answer = self.next_frame(HELLO_RETRY)
            if answer is not None:
                break
            if time.monotonic() > deadline:
                raise AgentConnectionError(f"the agent did not answer within {timeout:g}s")
        if answer.channel != 0 or answer.type is not FrameType.HELLO:
            raise ProtocolError(f"expected HELLO, got {answer.type.name}")
        self.agent_version = hello_version(decode_record(answer.payload))

    def _channel_frame(self, timeout: float | None) -> Frame | None:
        """The next frame on the command's channel (repeated HELLO answers on channel 0 dropped)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            frame = self.next_frame(left)
            if frame is None:
                return None
            if frame.channel == 0:
                if frame.type is not FrameType.HELLO:
                    raise ProtocolError(f"unexpected {frame.type.name} frame on the control channel")
                continue
            if frame.channel != CHANNEL:
                raise ProtocolError(f"a frame on channel {frame.channel}, which is not open")
            return frame

    def start(self, records: list[bytes]) -> int:
        """Send an EXEC (one record: callers with more take the full client); the command's pid once
        the agent started it, or the error it answered (`exec_error`)."""
        if len(records) != 1:
            raise ValueError("the blocking client sends one EXEC record")
        self.send(encode(CHANNEL, FrameType.EXEC, records[0]), until=time.monotonic() + START_TIMEOUT)
        frame = self._channel_frame(START_TIMEOUT)
        if frame is None:
            self._kill()
            raise AgentConnectionError(f"the agent did not start the command within {START_TIMEOUT:g}s")
        if frame.type is FrameType.ERROR:
            raise exec_error(decode_record(frame.payload))
        if frame.type is not FrameType.STARTED:
            raise ProtocolError(f"expected STARTED, got {frame.type.name}")
        return decode_record(frame.payload).int(Tag.PID) or -1

    def pump(self, *, stdin: int | None, timeout: float | None) -> tuple[int | None, int | None, bool]:
        """Copy the command's stdout and stderr to fds 1 and 2 (and fd `stdin` to its stdin; None:
        its stdin is closed at once) until it exits; its (exit code, signal, timed out). Past `timeout`
        and TIMEOUT_GRACE the command is killed and AgentConnectionError raised, as `Process` does."""
        give_up_at = None if not timeout else time.monotonic() + timeout + TIMEOUT_GRACE
        recv_window, consumed, send_window = INITIAL_WINDOW, 0, INITIAL_WINDOW
        if stdin is None:
            self.send(encode(CHANNEL, FrameType.STDIN, b""))
        while True:
            while self._frames:
                frame = self._channel_frame(0)
                if frame is None:  # only answers to repeated HELLOs were queued
                    break
                if frame.type not in EXEC_ANSWERS:
                    raise ProtocolError(f"unexpected {frame.type.name} frame during exec")
                if frame.type is FrameType.EXIT:
                    return exit_fields(decode_record(frame.payload))
                if frame.type is FrameType.ERROR:
                    raise exec_error(decode_record(frame.payload))
                if frame.type is FrameType.WINDOW:
                    send_window += _grant(frame)
                    continue
                n = len(frame.payload)
                if n == 0:
                    raise ProtocolError(f"empty {frame.type.name} frame on channel {CHANNEL}")
                if n > recv_window:
                    raise ProtocolError("the agent sent more output than its window")
                recv_window -= n
                self._output(1 if frame.type is FrameType.STDOUT else 2, frame.payload)
                consumed += n
                if consumed >= WINDOW_GRANT_STEP:
                    self.send(encode(CHANNEL, FrameType.WINDOW, encode_record([(Tag.BYTES, consumed)])))
                    recv_window, consumed = recv_window + consumed, 0
            if give_up_at is not None and give_up_at <= time.monotonic():
                self._kill()
                raise AgentConnectionError(
                    f"the agent did not end the command within {TIMEOUT_GRACE:g}s of its timeout"
                )
            reading = [stdin] if stdin is not None and send_window > 0 else []
            ready = self._wait(readers=[self._sock.fileno(), *reading], until=give_up_at)
            if stdin is not None and stdin in ready and reading:
                try:
                    data = os.read(stdin, min(READ_CHUNK, send_window, MAX_PAYLOAD))
                except BlockingIOError:  # another reader of a shared stdin was first
                    continue
                except OSError:
                    data = b""
                self.send(encode(CHANNEL, FrameType.STDIN, data))
                send_window -= len(data)
                if not data:
                    stdin = None
            if self._sock.fileno() in ready:
                self._read()


def _signal_frame(signo: int) -> bytes:
    return encode(CHANNEL, FrameType.SIGNAL, encode_record([(Tag.SIGNAL, signo)]))


def _grant(frame: Frame) -> int:
    grant = decode_record(frame.payload).int(Tag.BYTES) or 0
    if not 0 < grant <= (1 << 31):
        raise ProtocolError(f"bad WINDOW grant {grant}")
    return grant


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass

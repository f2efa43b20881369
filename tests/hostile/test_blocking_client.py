"""The thin command line's blocking guest-protocol client against agents that misbehave: whatever the
agent sends, the client ends with a one-line AgentConnectionError (or the command's own result), never
a hang, a traceback or unbounded memory. Each agent is a script on the other end of a socket pair."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from agentkernel.errors import AgentConnectionError, ExecError
from agentkernel.protocol import blocking
from agentkernel.protocol.frames import (
    HEADER,
    INITIAL_WINDOW,
    MAGIC,
    MAX_PAYLOAD,
    VERSION,
    Frame,
    FrameDecoder,
    FrameType,
    Tag,
    decode_record,
    encode,
    encode_record,
)

pytestmark = pytest.mark.timeout(60)
Fields = list[tuple[Tag, int | bytes | str]]
Script = Callable[["Agent"], None]


class Agent:
    """The agent's end: frames as the client sent them, and raw writes back."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.decoder = FrameDecoder()
        self.pending: list[Frame] = []

    def next(self) -> Frame:
        while not self.pending:
            data = self.sock.recv(1 << 20)
            if not data:
                raise EOFError
            self.pending += self.decoder.feed(data)
        return self.pending.pop(0)

    def expect(self, ftype: FrameType) -> Frame:
        while (frame := self.next()).type is not ftype:
            pass
        return frame

    def send(
        self, channel: int, ftype: FrameType, fields: list[tuple[Tag, int | bytes | str]] | bytes
    ) -> None:
        payload = fields if isinstance(fields, bytes) else encode_record(fields)
        self.sock.sendall(encode(channel, ftype, payload))

    def greet(self, version: int = VERSION) -> None:
        self.expect(FrameType.HELLO)
        self.send(0, FrameType.HELLO, [(Tag.VERSION, version), (Tag.MAGIC, MAGIC)])

    def started(self) -> None:
        self.expect(FrameType.EXEC)
        self.send(1, FrameType.STARTED, [(Tag.PID, 42)])


@pytest.fixture
def talk() -> Iterator[Callable[[Script], blocking.AgentSocket]]:
    threads: list[threading.Thread] = []
    socks: list[socket.socket] = []

    def start(script: Script) -> blocking.AgentSocket:
        ours, theirs = socket.socketpair()
        socks.extend((ours, theirs))

        def serve() -> None:
            with contextlib.suppress(EOFError, OSError):  # the client left
                script(Agent(theirs))

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        threads.append(thread)
        return blocking.AgentSocket(ours)

    yield start
    for sock in socks:
        sock.close()
    for thread in threads:
        thread.join(timeout=5)


def fed_pipe(size: int) -> tuple[int, int]:
    """A pipe a thread writes `size` bytes into (the stdin of a command that wants a lot)."""
    read_end, write_end = os.pipe()

    def feed() -> None:
        with contextlib.suppress(OSError):  # its pipe is closed at the end
            os.write(write_end, b"z" * size)

    threading.Thread(target=feed, daemon=True).start()
    return read_end, write_end


def hello(client: blocking.AgentSocket, timeout: float = 5.0) -> None:
    client.hello(hostname="box", max_procs=None, memory_mb=None, timeout=timeout)


def one_record() -> list[bytes]:
    return [encode_record([(Tag.ARGV, b"true")])]


def test_a_well_behaved_agent_runs_the_command(talk, capfd: pytest.CaptureFixture[str]) -> None:
    def script(agent: Agent) -> None:
        agent.greet()
        agent.started()
        agent.send(1, FrameType.STDOUT, b"out\n")
        agent.send(1, FrameType.STDERR, b"err\n")
        agent.send(1, FrameType.EXIT, [(Tag.EXIT_CODE, 3)])

    client = talk(script)
    hello(client)
    assert client.start(one_record()) == 42
    assert client.pump(stdin=None, timeout=None) == (3, None, False)
    out, err = capfd.readouterr()
    assert (out, err) == ("out\n", "err\n")


def test_output_past_the_window_breaks_the_connection(talk, capfd: pytest.CaptureFixture[str]) -> None:
    def script(agent: Agent) -> None:
        agent.greet()
        agent.started()
        agent.send(1, FrameType.STDOUT, b"x" * 1024)  # too little for the client to grant more
        agent.send(1, FrameType.STDOUT, b"x" * INITIAL_WINDOW)  # the whole window again, not waiting
        agent.next()  # stay until the client leaves

    client = talk(script)
    hello(client)
    client.start(one_record())
    with pytest.raises(AgentConnectionError, match="more output than its window"):
        client.pump(stdin=None, timeout=None)
    capfd.readouterr()


def test_output_within_granted_windows_flows(talk, capfd: pytest.CaptureFixture[str]) -> None:
    """The client grants more window as it writes: an agent that waits for the grants sends 4 MiB."""
    total = 4 << 20

    def script(agent: Agent) -> None:
        agent.greet()
        agent.started()
        window, sent = INITIAL_WINDOW, 0
        while sent < total:
            while window == 0:
                frame = agent.next()
                if frame.type is FrameType.WINDOW:
                    window += decode_record(frame.payload).int(Tag.BYTES) or 0
            n = min(window, 64 << 10, total - sent)
            agent.send(1, FrameType.STDOUT, b"y" * n)
            window, sent = window - n, sent + n
        agent.send(1, FrameType.EXIT, [(Tag.EXIT_CODE, 0)])

    client = talk(script)
    hello(client)
    client.start(one_record())
    assert client.pump(stdin=None, timeout=None) == (0, None, False)
    assert len(capfd.readouterr().out) == total


@pytest.mark.parametrize(
    ("frames", "says"),
    [
        ([(5, FrameType.STDOUT, b"x")], "channel 5, which is not open"),
        ([(0, FrameType.STDOUT, b"x")], "on the control channel"),
        ([(1, FrameType.STARTED, b"")], "unexpected STARTED"),
        ([(1, FrameType.WINDOW, encode_record([(Tag.BYTES, 0)]))], "bad WINDOW grant"),
        ([(1, FrameType.WINDOW, encode_record([(Tag.BYTES, -5)]))], "bad WINDOW grant"),
        ([(1, FrameType.EXIT, b"\x00\x0a\x00\x00\x00\x02ab")], "an int must be 8"),
    ],
)
def test_frames_an_exec_may_not_get_break_it(
    talk, frames: list[tuple[int, FrameType, bytes]], says: str
) -> None:
    def script(agent: Agent) -> None:
        agent.greet()
        agent.started()
        for channel, ftype, payload in frames:
            agent.send(channel, ftype, payload)
        agent.next()  # stay until the client leaves

    client = talk(script)
    hello(client)
    client.start(one_record())
    with pytest.raises(Exception, match=says):
        client.pump(stdin=None, timeout=None)


def test_an_oversized_frame_header_breaks_it_before_anything_is_buffered(talk) -> None:
    def script(agent: Agent) -> None:
        agent.greet()
        agent.started()
        agent.sock.sendall(HEADER.pack(MAX_PAYLOAD + 1, 1, FrameType.STDOUT, 0))
        agent.next()

    client = talk(script)
    hello(client)
    with pytest.raises(AgentConnectionError, match="broke the protocol"):
        client.start(one_record())  # the header may come with STARTED
        client.pump(stdin=None, timeout=None)


def test_hello_is_checked(talk) -> None:
    client = talk(lambda agent: agent.greet(version=VERSION + 1))
    with pytest.raises(AgentConnectionError, match="protocol version"):
        hello(client)

    def no_magic(agent: Agent) -> None:
        agent.expect(FrameType.HELLO)
        agent.send(0, FrameType.HELLO, [(Tag.VERSION, VERSION)])

    client = talk(no_magic)
    with pytest.raises(AgentConnectionError):  # without the magic the HELLO is never found
        hello(client, timeout=0.5)


def test_a_silent_agent_is_given_up_on(talk) -> None:
    def silent(agent: Agent) -> None:
        while True:
            agent.next()

    client = talk(silent)
    with pytest.raises(AgentConnectionError, match="did not answer"):
        hello(client, timeout=0.6)


def test_an_agent_that_leaves_mid_command_is_lost(talk, capfd: pytest.CaptureFixture[str]) -> None:
    def script(agent: Agent) -> None:
        agent.greet()
        agent.started()
        agent.send(1, FrameType.STDOUT, b"partial")
        agent.sock.shutdown(socket.SHUT_RDWR)

    client = talk(script)
    hello(client)
    client.start(one_record())
    with pytest.raises(blocking.Lost, match="closed the connection"):
        client.pump(stdin=None, timeout=None)
    assert capfd.readouterr().out == "partial"


def test_an_exec_error_is_the_full_clients_error(talk) -> None:
    def script(agent: Agent) -> None:
        agent.greet()
        agent.expect(FrameType.EXEC)
        agent.send(
            1, FrameType.ERROR, [(Tag.ERRNO, 2), (Tag.MESSAGE, "nosuch: not found"), (Tag.EXIT_CODE, 127)]
        )

    client = talk(script)
    hello(client)
    with pytest.raises(ExecError, match="nosuch: not found") as raised:
        client.start(one_record())
    assert raised.value.exit_code == 127


def test_a_command_past_its_timeout_and_grace_is_given_up_on(talk, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(blocking, "TIMEOUT_GRACE", 0.3)
    killed = threading.Event()

    def script(agent: Agent) -> None:
        agent.greet()
        agent.started()
        while True:
            frame = agent.next()
            if frame.type is FrameType.SIGNAL and decode_record(frame.payload).int(Tag.SIGNAL) == 9:
                killed.set()

    client = talk(script)
    hello(client)
    client.start(one_record())
    with pytest.raises(AgentConnectionError, match=r"within 0\.3s of its timeout"):
        client.pump(stdin=None, timeout=0.2)
    assert killed.wait(5)


def test_hello_answers_that_come_late_are_dropped(talk, capfd: pytest.CaptureFixture[str]) -> None:
    """An agent answers every HELLO it saw: one may come after STARTED, alone in the queue."""

    def script(agent: Agent) -> None:
        agent.greet()
        agent.started()
        agent.send(0, FrameType.HELLO, [(Tag.VERSION, VERSION), (Tag.MAGIC, MAGIC)])
        time.sleep(0.2)
        agent.send(1, FrameType.STDOUT, b"after\n")
        agent.send(1, FrameType.EXIT, [(Tag.EXIT_CODE, 0)])

    client = talk(script)
    hello(client)
    client.start(one_record())
    assert client.pump(stdin=None, timeout=None) == (0, None, False)
    assert capfd.readouterr().out == "after\n"


def test_malformed_records_are_violations(talk) -> None:
    def short_version(agent: Agent) -> None:
        agent.expect(FrameType.HELLO)
        agent.send(0, FrameType.HELLO, [(Tag.VERSION, b"\x00\x04"), (Tag.MAGIC, MAGIC)])

    with pytest.raises(AgentConnectionError, match="broke the protocol"):
        hello(talk(short_version))

    def bad_pid(agent: Agent) -> None:
        agent.greet()
        agent.expect(FrameType.EXEC)
        agent.send(1, FrameType.STARTED, [(Tag.PID, b"\x01")])

    client = talk(bad_pid)
    hello(client)
    with pytest.raises(AgentConnectionError, match="broke the protocol"):
        client.start(one_record())


def test_a_signal_is_served_while_the_agent_will_not_read_stdin(talk) -> None:
    """An agent that grants a large window and stops reading fills the socket: the client waits to
    write, and a signal still reaches `on_wakeup` (which may end the waiting)."""

    def script(agent: Agent) -> None:
        agent.greet()
        agent.started()
        agent.send(1, FrameType.WINDOW, [(Tag.BYTES, 1 << 30)])
        time.sleep(30)  # reads nothing more

    read_end, write_end = fed_pipe(8 << 20)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK)
    client = talk(script)
    hello(client)
    client.start(one_record())

    class Interrupted(Exception):
        pass

    def on_wakeup() -> None:
        raise Interrupted

    client.wakeup, client.on_wakeup = wake_r, on_wakeup
    threading.Timer(1.0, lambda: os.write(wake_w, b"\0")).start()
    started = time.monotonic()
    with pytest.raises(Interrupted):
        client.pump(stdin=read_end, timeout=None)
    assert time.monotonic() - started < 10
    for fd in (read_end, write_end, wake_r, wake_w):
        os.close(fd)


def test_the_asyncio_client_reports_a_malformed_exit_in_one_line(talk) -> None:
    """The full client too: a malformed record from the agent is an AgentConnectionError (one line on
    every face), never a bare exception."""
    import asyncio

    from agentkernel.protocol.connection import Connection

    def script(agent: Agent) -> None:
        agent.greet()
        agent.started()
        agent.send(1, FrameType.EXIT, b"\x00\x0a\x00\x00\x00\x02ab")  # exit_code of 2 bytes
        agent.next()

    blocking_side = talk(script)
    sock = blocking_side._sock
    sock.setblocking(True)

    async def main() -> None:
        reader, writer = await asyncio.open_connection(sock=sock)
        conn = Connection(reader, writer)
        try:
            await conn.hello(timeout=5)
            proc = await conn.exec(["true"])
            with pytest.raises(AgentConnectionError, match="broke the protocol: field exit_code"):
                await proc.wait()
        finally:
            await conn.close()

    asyncio.run(main())


def test_an_agent_that_reads_nothing_cannot_hold_hello_past_its_timeout(
    talk, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HELLOs unanswered, then a RESYNC of 256 KiB that the agent never reads: the send gives up at
    the greeting's deadline instead of blocking for good."""
    monkeypatch.setattr(blocking, "RESYNC_AFTER", 0.2)
    client = talk(lambda agent: time.sleep(30))
    started = time.monotonic()
    with pytest.raises(AgentConnectionError):
        hello(client, timeout=1.5)
    assert time.monotonic() - started < 5


def test_a_signal_while_a_frame_is_half_written_goes_after_it(talk) -> None:
    """The agent stops reading while stdin flows; a signal then is queued, and once the agent reads
    again every frame it gets is whole, the SIGNAL among them."""
    got: list[FrameType] = []

    def script(agent: Agent) -> None:
        agent.greet()
        agent.started()
        agent.send(1, FrameType.WINDOW, [(Tag.BYTES, 1 << 30)])
        time.sleep(1.5)  # the socket fills while the client writes stdin
        while (frame := agent.next()).type is not FrameType.SIGNAL:
            got.append(frame.type)
        got.append(frame.type)
        agent.send(1, FrameType.EXIT, [(Tag.SIGNAL, 2)])
        while True:  # as an agent does, it reads (and drops) what still comes for the channel
            agent.next()

    read_end, write_end = fed_pipe(16 << 20)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK)
    client = talk(script)
    hello(client)
    client.start(one_record())
    sent = []

    def on_wakeup() -> None:
        if not sent:
            sent.append(True)
            client.signal(2)

    client.wakeup, client.on_wakeup = wake_r, on_wakeup
    threading.Timer(0.7, lambda: os.write(wake_w, b"\0")).start()
    assert client.pump(stdin=read_end, timeout=None) == (None, 2, False)
    assert got[-1] is FrameType.SIGNAL and set(got[:-1]) <= {FrameType.STDIN}
    for fd in (read_end, write_end, wake_r, wake_w):
        os.close(fd)

import asyncio
import errno
import re
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from agentkernel.errors import AgentkernelError, ArgumentsTooLongError, ExecError, FileOpError
from agentkernel.protocol.connection import Connection
from agentkernel.protocol.frames import (
    ARG_MAX,
    ARG_POINTER,
    HEADER,
    MAGIC,
    MAX_ARG_STRLEN,
    MAX_FIELDS,
    MAX_PAYLOAD,
    Frame,
    FrameDecoder,
    FrameType,
    ProtocolError,
    Tag,
    decode_record,
    encode,
    encode_record,
    exec_records,
)
from agentkernel.protocol.requests import check_arguments


def test_round_trip_split_at_every_byte() -> None:
    stream = (
        encode(0, FrameType.PING, b"abc")
        + encode(7, FrameType.STDOUT, b"x" * 1000)
        + encode(7, FrameType.EXIT)
    )
    for cut in range(len(stream) + 1):
        dec = FrameDecoder()
        frames = dec.feed(stream[:cut]) + dec.feed(stream[cut:])
        assert [(f.channel, f.type, len(f.payload)) for f in frames] == [
            (0, FrameType.PING, 3),
            (7, FrameType.STDOUT, 1000),
            (7, FrameType.EXIT, 0),
        ]
        assert dec.buffered == 0


def test_oversized_frame_is_refused_from_the_header_alone() -> None:
    dec = FrameDecoder()
    with pytest.raises(ProtocolError, match="exceeds"):
        dec.feed(HEADER.pack(MAX_PAYLOAD + 1, 1, FrameType.STDOUT, 0))


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (HEADER.pack(0, 1, 99, 0), "unknown frame type"),
        (HEADER.pack(0, 1, FrameType.STDOUT, 1), "flags"),
    ],
)
def test_bad_headers(header: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        FrameDecoder().feed(header)


def test_encode_refuses_oversized_payload() -> None:
    with pytest.raises(ValueError):
        encode(1, FrameType.STDIN, b"x" * (MAX_PAYLOAD + 1))


def test_record_round_trip() -> None:
    payload = encode_record([(Tag.ARGV, b"sh"), (Tag.ARGV, b"-c"), (Tag.TIMEOUT_MS, 1500), (Tag.CWD, "/tmp")])
    record = decode_record(payload)
    assert record.all(Tag.ARGV) == [b"sh", b"-c"]
    assert record.int(Tag.TIMEOUT_MS) == 1500
    assert record.str(Tag.CWD) == "/tmp"
    assert record.int(Tag.PID) is None


def test_negative_ints() -> None:
    assert decode_record(encode_record([(Tag.EXIT_CODE, -1)])).int(Tag.EXIT_CODE) == -1


@pytest.mark.parametrize(
    "payload",
    [
        b"\x00\x01\x00",  # truncated field header
        b"\x00\x01\x00\x00\x00\x10abc",  # field longer than the record
    ],
)
def test_malformed_records(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_record(payload)


def test_int_field_of_wrong_size() -> None:
    record = decode_record(encode_record([(Tag.PID, b"\x01\x02")]))
    with pytest.raises(ProtocolError, match="8"):
        record.int(Tag.PID)


def test_too_many_fields() -> None:
    with pytest.raises(ProtocolError, match="fields"):
        decode_record(encode_record([(Tag.ENV, b"")] * 4097))


def test_hunting_skips_stale_bytes_before_hello() -> None:
    from agentkernel.protocol.frames import MAGIC

    hello = encode(0, FrameType.HELLO, encode_record([(Tag.VERSION, 1), (Tag.MAGIC, MAGIC)]))
    fake = encode(0, FrameType.HELLO, encode_record([(Tag.VERSION, 1)]))  # no magic: not the reply
    stale = b"\x00\x00\x01\x00" + encode(5, FrameType.STDOUT, b"old output")[3:] + fake
    stream = stale + hello + encode(0, FrameType.PONG, b"x")
    for cut in range(0, len(stream), 7):
        dec = FrameDecoder(hunt_hello=True)
        frames = dec.feed(stream[:cut]) + dec.feed(stream[cut:])
        assert [f.type for f in frames] == [FrameType.HELLO, FrameType.PONG]


def test_hunting_holds_bounded_memory() -> None:
    dec = FrameDecoder(hunt_hello=True)
    for _ in range(100):
        assert dec.feed(b"\xab" * 65536) == []
    assert dec.buffered <= 8


def joined(records: list[bytes]) -> tuple[list[bytes], list[bytes]]:
    """What the agent makes of an EXEC and its ARGS: every argv, then every env, in order."""
    decoded = [decode_record(r) for r in records]
    flags = [d.int(Tag.CONTINUED, 0) for d in decoded]
    assert flags == [1] * (len(records) - 1) + [0]
    return [a for d in decoded for a in d.all(Tag.ARGV)], [e for d in decoded for e in d.all(Tag.ENV)]


def test_small_exec_is_one_record() -> None:
    records = exec_records([(Tag.CWD, b"/tmp")], [b"echo", b"hi"], [b"A=1"])
    assert records == [
        encode_record([(Tag.CWD, b"/tmp"), (Tag.ARGV, b"echo"), (Tag.ARGV, b"hi"), (Tag.ENV, b"A=1")])
    ]


def test_large_exec_is_split_between_fields_and_joins_back() -> None:
    argv = [b"sh", b"-c", b"echo $#"] + [b"%06d" % i + b"a" * (i % 300) for i in range(7000)]
    env = [b"V%d=" % i + b"e" * 100_000 for i in range(12)] + [b"X=" + b"x" * (MAX_ARG_STRLEN - 3)]
    records = exec_records([(Tag.CWD, b"/"), (Tag.TIMEOUT_MS, 5000)], argv, env)
    assert len(records) > 5
    assert all(len(r) <= MAX_PAYLOAD for r in records)
    assert decode_record(records[0]).bytes(Tag.CWD) == b"/"
    assert all(decode_record(r).bytes(Tag.CWD) is None for r in records[1:])
    assert joined(records) == (argv, env)
    for r in records:  # each one a frame the decoder takes
        assert FrameDecoder().feed(encode(3, FrameType.ARGS, r))[0].payload == r


def test_many_small_strings_are_split_by_field_count() -> None:
    argv = [b""] * 10_000
    records = exec_records([], argv, [b"A=" for _ in range(5000)])
    assert all(sum(len(v) for v in decode_record(r).fields.values()) <= MAX_FIELDS for r in records)
    assert joined(records) == (argv, [b"A="] * 5000)


def test_argument_limits_are_linux_execve_limits() -> None:
    def cost(strings: list[bytes]) -> int:
        return sum(len(s) + 1 + ARG_POINTER for s in strings)

    longest = "a" * (MAX_ARG_STRLEN - 1)
    assert check_arguments(["x", longest], {"K": "v" * (MAX_ARG_STRLEN - 3)})[0][1] == longest.encode()
    with pytest.raises(ArgumentsTooLongError, match=r"argument 1 is 131072 bytes.*131071.*MAX_ARG_STRLEN"):
        check_arguments(["x", longest + "a"], {})
    with pytest.raises(
        ArgumentsTooLongError, match=r"environment variable K is 131072 bytes.*MAX_ARG_STRLEN"
    ):
        check_arguments(["x"], {"K": "v" * (MAX_ARG_STRLEN - 2)})
    chunk = "c" * 100_000
    argv = ["x"] + [chunk] * 20
    rest = ARG_MAX - cost([a.encode() for a in argv]) - 1 - ARG_POINTER  # what one more string may hold
    at_limit = [*argv, "d" * rest]
    assert cost(check_arguments(at_limit, {})[0]) == ARG_MAX
    with pytest.raises(
        ArgumentsTooLongError, match=rf"take {ARG_MAX + 1} bytes.*at most {ARG_MAX} \(ARG_MAX"
    ):
        check_arguments([*argv, "d" * (rest + 1)], {})
    with pytest.raises(ArgumentsTooLongError, match="ARG_MAX"):  # the env counts too
        check_arguments(at_limit, {"A": ""})
    assert ArgumentsTooLongError("x").errno == errno.E2BIG


async def on_fake_agent(
    tmp_path: Path, version: int, body: Callable[[Connection], Awaitable[None]]
) -> list[Frame]:
    """Run `body` on a connection to a stand-in agent of protocol `version`, which answers each
    request (once no `continued` says more is coming) with ERROR ENOENT; the frames it got."""
    got: list[Frame] = []

    async def agent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        dec = FrameDecoder()
        hello = encode_record([(Tag.VERSION, version), (Tag.MAGIC, MAGIC)])
        while data := await reader.read(65536):
            for frame in dec.feed(data):
                if frame.type is FrameType.HELLO:
                    writer.write(encode(0, FrameType.HELLO, hello))
                    continue
                got.append(frame)
                if not decode_record(frame.payload).int(Tag.CONTINUED, 0):
                    error = encode_record([(Tag.ERRNO, errno.ENOENT)])
                    writer.write(encode(frame.channel, FrameType.ERROR, error))

    server = await asyncio.start_unix_server(agent, path=str(tmp_path / "a.sock"))
    try:
        async with await Connection.open_unix(tmp_path / "a.sock", timeout=5) as conn:
            await conn.hello(set_clock=False)
            await body(conn)
    finally:
        server.close()
    return got


def exec_on_fake_agent(tmp_path: Path, version: int, argv: list[str]) -> tuple[ExecError, list[Frame]]:
    async def body(conn: Connection) -> None:
        with pytest.raises(ExecError) as refused:
            await conn.exec(argv)
        errors.append(refused.value)

    errors: list[ExecError] = []
    frames = asyncio.run(on_fake_agent(tmp_path, version, body))
    return errors[0], frames


def test_client_sends_args_frames_to_a_version_2_agent(tmp_path: Path) -> None:
    argv = ["prog"] + ["a" * 1000] * 1000
    error, frames = exec_on_fake_agent(tmp_path, 2, argv)
    assert error.errno == errno.ENOENT  # the agent's answer, after the whole request
    assert [f.type for f in frames] == [FrameType.EXEC] + [FrameType.ARGS] * 3
    assert joined([f.payload for f in frames])[0] == [a.encode() for a in argv]


def test_client_refuses_a_large_request_to_a_version_1_agent(tmp_path: Path) -> None:
    error, frames = exec_on_fake_agent(tmp_path, 1, ["prog"] + ["a" * 1000] * 1000)
    assert isinstance(error, ArgumentsTooLongError) and "protocol 1" in str(error)
    assert frames == []
    error, frames = exec_on_fake_agent(tmp_path, 1, ["prog", "x"])
    assert error.errno == errno.ENOENT and [f.type for f in frames] == [FrameType.EXEC]


def test_guest_e2big_is_the_arguments_error() -> None:
    from agentkernel.protocol.requests import exec_error

    record = decode_record(encode_record([(Tag.ERRNO, errno.E2BIG), (Tag.MESSAGE, "exec: too long")]))
    assert isinstance(exec_error(record), ArgumentsTooLongError)
    assert "ARG_MAX" in str(exec_error(record))


def test_overlong_path_is_refused_before_sending(tmp_path: Path) -> None:
    async def body(conn: Connection) -> None:
        with pytest.raises(FileOpError, match="longer than 4095 bytes") as refused:
            await conn.stat("/" + "a" * MAX_PAYLOAD)
        assert refused.value.errno == errno.ENAMETOOLONG
        with pytest.raises(AgentkernelError, match="working directory is longer"):
            await conn.exec(["true"], cwd="/" + "a" * MAX_PAYLOAD)

    assert asyncio.run(on_fake_agent(tmp_path, 2, body)) == []


def test_start_errors_name_what_is_missing() -> None:
    from agentkernel.errors import WorkingDirectoryError
    from agentkernel.protocol.requests import exec_error

    def error(*fields: tuple[Tag, int | bytes | str]) -> ExecError:
        return exec_error(decode_record(encode_record(list(fields))))

    missing = error(
        (Tag.MESSAGE, "exec: python4: command not found"),
        (Tag.ERRNO, errno.ENOENT),
        (Tag.EXIT_CODE, 127),
        (Tag.CAUSE, "command"),
    )
    assert (str(missing), missing.exit_code, missing.code, missing.field) == (
        "exec: python4: command not found",
        127,
        "command_not_found",
        "command",
    )
    nodir = error(
        (Tag.MESSAGE, "cwd /nope: no such directory"), (Tag.ERRNO, errno.ENOENT), (Tag.CAUSE, "cwd")
    )
    assert isinstance(nodir, WorkingDirectoryError)
    assert (nodir.exit_code, nodir.code, nodir.field, nodir.status) == (1, "invalid_cwd", "cwd", 422)
    # An older agent says neither: the error is as before.
    old = error((Tag.MESSAGE, "exec: No such file or directory"), (Tag.ERRNO, errno.ENOENT))
    assert type(old) is ExecError and old.exit_code == 1


def test_background_requests_on_the_wire(tmp_path: Path) -> None:
    """What each background request and RENAME sends, as docs/protocol.md gives it; the fake agent's
    ERROR answers each (a start as ExecError, the rest as BackgroundCommandError or FileOpError)."""
    from agentkernel.errors import BackgroundCommandError
    from agentkernel.protocol.connection import INPUT_CHUNK

    async def body(conn: Connection) -> None:
        with pytest.raises(ExecError):
            await conn.exec_background(["sleep", "9"], timeout=2)
        with pytest.raises(BackgroundCommandError) as unknown:
            await conn.signal_background(7, 15)
        assert (unknown.value.status, unknown.value.code) == (422, "background_command_failed")
        for call in (conn.wait_background(7), conn.list_background(), conn.attach_background(7, offset=5)):
            with pytest.raises(BackgroundCommandError):
                await call
        with pytest.raises(BackgroundCommandError):
            await conn.write_background(7, b"x" * (INPUT_CHUNK + 1), eof=True)
        with pytest.raises(FileOpError):
            await conn.rename("/a", "/b")

    frames = asyncio.run(on_fake_agent(tmp_path, 3, body))
    records = [(f.type, decode_record(f.payload)) for f in frames]
    assert [t for t, _ in records] == [
        FrameType.EXEC,
        FrameType.KILL,
        FrameType.WAIT,
        FrameType.JOBS,
        FrameType.ATTACH,
        FrameType.INPUT,
        FrameType.RENAME,
    ]
    start, kill, wait, _, attach, data, rename = (r for _, r in records)
    assert (start.int(Tag.DETACH), start.int(Tag.TIMEOUT_MS), start.all(Tag.ARGV)) == (
        1,
        2000,
        [b"sleep", b"9"],
    )
    assert (kill.int(Tag.CMD), kill.int(Tag.SIGNAL), wait.int(Tag.CMD)) == (7, 15, 7)
    assert (attach.int(Tag.CMD), attach.int(Tag.OFFSET), attach.int(Tag.FOLLOW)) == (7, 5, 1)
    # Refused at its first piece: the rest, and the end of file, are not sent.
    assert (len(data.bytes(Tag.DATA) or b""), data.int(Tag.EOF)) == (INPUT_CHUNK, None)
    assert (rename.bytes(Tag.PATH), rename.bytes(Tag.TO)) == (b"/a", b"/b")


def test_numbers_are_those_of_the_protocol_document() -> None:
    """Every frame type and field tag in docs/protocol.md's tables has the number the host uses."""
    doc = (Path(__file__).parents[2] / "docs" / "protocol.md").read_text()
    rows = re.findall(r"^\| (\d+) \| `([A-Z_a-z]+)` \|", doc, re.MULTILINE)
    types = {name: int(n) for n, name in rows if name.isupper()}
    tags = {name: int(n) for n, name in rows if name.islower()}
    assert types == {t.name: t.value for t in FrameType}
    assert tags == {t.name.lower(): t.value for t in Tag}

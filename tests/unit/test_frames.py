import pytest

from agentkernel.protocol.frames import (
    HEADER,
    MAX_PAYLOAD,
    FrameDecoder,
    FrameType,
    ProtocolError,
    Tag,
    decode_record,
    encode,
    encode_record,
)


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

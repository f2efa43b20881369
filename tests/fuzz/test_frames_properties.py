"""Properties of the host's frame and record decoder, for any bytes a guest could send (Hypothesis)."""

from __future__ import annotations

import itertools

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from agentkernel.protocol.frames import (
    HEADER,
    MAGIC,
    MAX_HELLO,
    MAX_PAYLOAD,
    Frame,
    FrameDecoder,
    FrameType,
    ProtocolError,
    Tag,
    decode_record,
    encode,
    encode_record,
)

channels = st.integers(0, 65535)
types = st.sampled_from(FrameType)
small_frames = st.builds(Frame, channels, types, st.binary(max_size=300))
full_payloads = st.builds(  # a pattern repeated: drawing 256 KiB byte by byte would be slow
    lambda pattern, n: (pattern * n)[:n],
    st.binary(min_size=1, max_size=16),
    st.sampled_from([MAX_PAYLOAD - 1, MAX_PAYLOAD]),
)
frames = small_frames | st.builds(Frame, channels, types, full_payloads)
tags = st.sampled_from(Tag) | st.integers(0, 65535)
values = st.integers(-(2**63), 2**63 - 1) | st.binary(max_size=64)


HELLO_TAIL = HEADER.pack(0, 0, FrameType.HELLO, 0)[4:]
"""How every HELLO header ends (channel 0, type HELLO, flags 0): what hunting looks for."""


def hello(magic: bytes = MAGIC) -> bytes:
    return encode(0, FrameType.HELLO, encode_record([(Tag.VERSION, 1), (Tag.MAGIC, magic)]))


# What a guest could send: whole frames, cut-off frames, HELLOs with and without the magic, the bytes a
# HELLO header ends with, headers claiming any length, and plain noise.
pieces = st.one_of(
    st.builds(lambda f: encode(f.channel, f.type, f.payload), small_frames),
    st.builds(lambda f, n: encode(f.channel, f.type, f.payload)[:n], small_frames, st.integers(0, 300)),
    st.just(hello()),
    st.builds(hello, st.binary(max_size=8)),
    st.just(HELLO_TAIL),
    st.builds(HEADER.pack, st.integers(0, 2**32 - 1), channels, st.integers(0, 255), st.integers(0, 255)),
    st.binary(max_size=64),
)
streams = st.lists(pieces, max_size=12).map(b"".join)


def cut(data: bytes, points: list[int]) -> list[bytes]:
    """`data` split at `points` (positions, in any order, taken modulo its length)."""
    edges = sorted({0, len(data), *(p % (len(data) + 1) for p in points)})
    return [data[a:b] for a, b in itertools.pairwise(edges)]


def decode(chunks: list[bytes], *, hunt: bool) -> tuple[list[Frame], str | None, list[int]]:
    """The frames, the ProtocolError's message (if any) and the bytes buffered after each read."""
    decoder = FrameDecoder(hunt_hello=hunt)
    out: list[Frame] = []
    buffered = []
    try:
        for chunk in chunks:
            out += decoder.feed(chunk)
            buffered.append(decoder.buffered)
    except ProtocolError as exc:
        return out, str(exc), buffered
    return out, None, buffered


@given(st.lists(frames, max_size=8), st.lists(st.integers(0, 2**20), max_size=6))
def test_encoded_frames_decode_to_themselves_however_cut(sent: list[Frame], points: list[int]) -> None:
    data = b"".join(encode(f.channel, f.type, f.payload) for f in sent)
    received, error, buffered = decode(cut(data, points), hunt=False)
    assert (received, error) == (sent, None)
    assert buffered[-1:] in ([], [0])


@given(st.lists(st.tuples(tags, values), max_size=20))
def test_records_decode_to_their_fields(fields: list[tuple[int, int | bytes]]) -> None:
    record = decode_record(encode_record(fields))  # type: ignore[arg-type]
    for tag in {t for t, _ in fields}:
        sent = [v.to_bytes(8, "big", signed=True) if isinstance(v, int) else v for t, v in fields if t == tag]
        assert record.fields[tag] == sent
        last = [v for t, v in fields if t == tag][-1]
        if isinstance(last, int) and tag in Tag.__members__.values():
            assert record.int(Tag(tag)) == last


@settings(max_examples=1000)
@given(streams, st.booleans(), st.lists(st.integers(0, 2**20), max_size=8))
def test_any_bytes_raise_only_protocol_errors_and_stay_bounded(
    data: bytes, hunt: bool, points: list[int]
) -> None:
    """Whatever arrives, cut however: frames or a ProtocolError, and never more than a frame buffered."""
    received, _, buffered = decode(cut(data, points), hunt=hunt)
    assert all(b < HEADER.size + MAX_PAYLOAD for b in buffered)
    if hunt and not received:  # still hunting: at most a HELLO in the making
        assert all(b < HEADER.size + MAX_HELLO for b in buffered)
    for frame in received:
        try:
            record = decode_record(frame.payload)
            for tag in Tag:
                record.str(tag)
                record.int(tag)
        except ProtocolError:
            pass


@settings(max_examples=1000)
@given(streams, st.booleans(), st.lists(st.integers(0, 2**20), max_size=8))
def test_cutting_the_stream_does_not_change_what_it_decodes_to(
    data: bytes, hunt: bool, points: list[int]
) -> None:
    """Against a byte-at-a-time reading: the same frames and the same error. A read that ends in an
    error loses the frames it held before it (the connection is dropped anyway): a prefix remains."""
    whole, whole_error, _ = decode([data[i : i + 1] for i in range(len(data))], hunt=hunt)
    received, error, _ = decode(cut(data, points), hunt=hunt)
    assert error == whole_error
    assert received == whole if error is None else received == whole[: len(received)]


@settings(max_examples=500)
@given(st.binary(min_size=1, max_size=4096), st.booleans())
def test_a_hello_after_any_noise_is_found_on_a_port(noise: bytes, split: bool) -> None:
    """Hunting skips what precedes the HELLO; the HELLO and what follows it are decoded."""
    data = noise + hello() + encode(0, FrameType.PONG, b"x")
    assume(data.find(HELLO_TAIL) == len(noise) + 4)  # nothing earlier that could be taken for one
    received, error, _ = decode(cut(data, [len(noise) + 3] if split else []), hunt=True)
    assert error is None
    assert received == [Frame(0, FrameType.HELLO, hello()[HEADER.size :]), Frame(0, FrameType.PONG, b"x")]

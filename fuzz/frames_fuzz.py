"""Fuzz target for the host's frame and record decoder (src/agentkernel/protocol/frames.py).

The input drives a FrameDecoder as a guest could: its first byte picks hunting for HELLO (a
virtio-serial port) or not and how the rest is cut into reads. Whatever the bytes, the decoder may
only raise ProtocolError, must hold no more than one frame's worth of them, and every frame it returns
must be one that encodes back to the bytes it came from. See fuzz/README.md.
"""

from __future__ import annotations

import sys

from agentkernel.protocol.frames import (
    HEADER,
    MAX_HELLO,
    MAX_PAYLOAD,
    FrameDecoder,
    ProtocolError,
    Tag,
    decode_record,
    encode,
)


def fuzz_one_input(data: bytes) -> None:
    if not data:
        return
    hunting = hunt = bool(data[0] & 1)
    step = 1 + (data[0] >> 1) * 97  # reads of 1 to 12320 bytes
    decoder = FrameDecoder(hunt_hello=hunt)
    decoded = bytearray()
    try:
        for i in range(1, len(data), step):
            frames = decoder.feed(data[i : i + step])
            hunting = hunting and not frames
            assert decoder.buffered < HEADER.size + (MAX_HELLO if hunting else MAX_PAYLOAD)
            for frame in frames:
                decoded += encode(frame.channel, frame.type, frame.payload)
                _records(frame.payload)
    except ProtocolError:
        return
    # Nothing is skipped but what precedes the HELLO that ends a hunt: the frames and what is still
    # buffered are the rest of the input.
    rest = bytes(decoded) + data[len(data) - decoder.buffered :]
    assert data[1:].endswith(rest) if hunt else data[1:] == rest


def _records(payload: bytes) -> None:
    """Every payload as a record, and every typed read of it: only ProtocolError may come out."""
    try:
        record = decode_record(payload)
        for tag in Tag:
            record.all(tag)
            record.bytes(tag)
            record.str(tag)
            record.int(tag)
    except ProtocolError:
        pass


def main() -> None:
    import atheris  # only here: the target itself runs without it (tests/fuzz call it directly)

    atheris.instrument_all()
    atheris.Setup(sys.argv, fuzz_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()

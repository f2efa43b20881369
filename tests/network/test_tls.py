"""Reading a ClientHello, whole, from a stream: real ones made by Python's ssl module, and broken ones."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import ssl
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentkernel.network.tls import BadHello, read_client_hello


@functools.cache
def client_hello(server_name: str | None) -> bytes:
    """A real ClientHello (one record); with no server name, one without the server_name extension."""
    context = ssl.create_default_context()
    if server_name is None:
        context.check_hostname = False
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def refragment(hello: bytes, *sizes: int) -> bytes:
    """The same ClientHello spread over several records: the first `sizes` bytes each, then the rest."""
    message, cuts, records = hello[5:], [0], b""
    for size in sizes:
        cuts.append(cuts[-1] + size)
    cuts.append(len(message))
    for start, end in itertools.pairwise(cuts):
        records += b"\x16\x03\x01" + struct.pack(">H", end - start) + message[start:end]
    return records


def synthetic_hello(extensions: bytes, *, trailer: bytes = b"") -> bytes:
    body = b"\x03\x03" + b"r" * 32 + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00"
    body += struct.pack(">H", len(extensions)) + extensions
    message = b"\x01" + len(body).to_bytes(3, "big") + body + trailer
    return b"\x16\x03\x01" + struct.pack(">H", len(message)) + message


def sni_extension(*entries: bytes) -> bytes:
    names = b"".join(b"\x00" + struct.pack(">H", len(e)) + e for e in entries)
    data = struct.pack(">H", len(names)) + names
    return b"\x00\x00" + struct.pack(">H", len(data)) + data


async def read(chunks: list[bytes], first: bytes = b"") -> tuple[bytes, str | None]:
    """read_client_hello on a real stream fed `chunks` one write at a time, then closed."""
    reader = asyncio.StreamReader()

    async def feed() -> None:
        for chunk in chunks:
            await asyncio.sleep(0)
            reader.feed_data(chunk)
        reader.feed_eof()

    feeding = asyncio.create_task(feed())
    try:
        return await read_client_hello(reader, first)
    finally:
        await feeding


def run_read(chunks: list[bytes], first: bytes = b"") -> tuple[bytes, str | None]:
    return asyncio.run(read(chunks, first))


def test_hello_in_one_write() -> None:
    hello = client_hello("pypi.org")
    assert run_read([hello]) == (hello, "pypi.org")


def test_hello_one_byte_then_the_rest() -> None:
    hello = client_hello("blocked.example")
    assert run_read([hello[:1], hello[1:]]) == (hello, "blocked.example")
    assert run_read([hello[1:]], first=hello[:1]) == (hello, "blocked.example")


def test_hello_byte_by_byte_over_several_records() -> None:
    records = refragment(client_hello("blocked.example"), 1, 2, 40)
    assert run_read([records[i : i + 1] for i in range(len(records))]) == (records, "blocked.example")


def test_hello_without_server_name() -> None:
    hello = client_hello(None)
    assert run_read([hello]) == (hello, None)


@pytest.mark.parametrize(
    ("hello", "why"),
    [
        (b"\x17\x03\x03\x00\x05hello", "not a TLS handshake"),
        (b"\x16\x02\x00\x00\x05hello", "not a TLS handshake"),
        (b"\x16\x03\x01\x00\x00", "bad record length"),
        (b"\x16\x03\x01\x40\x01" + b"\x00" * 16385, "bad record length"),
        (b"\x16\x03\x01\x00\x04\x02\x00\x00\x00", "not a ClientHello"),
        (b"\x16\x03\x01\x00\x04\x01\x01\x00\x00", "too large"),
        (synthetic_hello(sni_extension(b"a.example"), trailer=b"\x00"), "after the ClientHello"),
        (synthetic_hello(sni_extension(b"a.example") + sni_extension(b"b.example")), "twice"),
        (synthetic_hello(sni_extension(b"a.example", b"b.example")), "more than one"),
        (synthetic_hello(sni_extension(b"")), "empty"),
        (synthetic_hello(sni_extension(b"caf\xc3\xa9.example")), "not ASCII"),
        (synthetic_hello(sni_extension(b"a.example")[:-1]), "truncated"),
    ],
)
def test_malformed_hellos(hello: bytes, why: str) -> None:
    with pytest.raises(BadHello, match=why):
        run_read([hello])


def test_synthetic_hello_parses() -> None:
    hello = synthetic_hello(sni_extension(b"a.example"))
    assert run_read([hello]) == (hello, "a.example")


def test_eof_inside_the_hello() -> None:
    with pytest.raises(asyncio.IncompleteReadError):
        run_read([client_hello("a.example")[:100]])


@settings(max_examples=300)
@given(st.data())
def test_mutated_hellos_never_raise_anything_else(data: st.DataObject) -> None:
    hello = bytearray(client_hello("pypi.org"))
    for _ in range(data.draw(st.integers(1, 4))):
        hello[data.draw(st.integers(0, len(hello) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(1, len(hello)))
    with contextlib.suppress(BadHello, asyncio.IncompleteReadError):
        run_read([bytes(hello[:cut])])


@given(st.binary(max_size=300))
def test_garbage_never_raises_anything_else(garbage: bytes) -> None:
    with contextlib.suppress(BadHello, asyncio.IncompleteReadError):
        run_read([b"\x16\x03\x01" + garbage])

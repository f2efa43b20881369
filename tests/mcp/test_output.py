"""How the MCP server cuts long output for an agent and keeps the rest (no sandbox needed)."""

from __future__ import annotations

import pytest

from agentkernel.errors import AgentkernelError, NoSuchSandboxError
from agentkernel.mcp_server.server import SAVED_LIMIT, Captured, OutputStore, for_agent, text_slice


def captured(data: bytes, limit: int, chunk: int = 4096) -> Captured:
    stream = Captured(limit)
    for start in range(0, len(data), chunk):
        stream.add(data[start : start + chunk])
    return stream


def test_short_output_is_shown_whole() -> None:
    assert captured(b"a\nb\n", 256).shown(256, lambda _: "unused") == ("a\nb\n", False)


def test_long_output_is_cut_at_line_ends_and_counted() -> None:
    data = b"".join(b"line %05d\n" % i for i in range(10_000))
    offsets: list[int] = []
    text, cut = captured(data, 1000).shown(1000, lambda offset: offsets.append(offset) or "read on")
    head, opening, rest = text.partition("[... ")
    marker, _, tail = (opening + rest).partition("\n")
    assert cut and offsets == [len(head)]
    assert data.startswith(head.encode()) and data.endswith(tail.encode())
    assert head.endswith("\n") and tail.startswith("line ") and len(head) + len(tail) <= 1000
    left = len(data) - len(head) - len(tail)
    assert marker == f"[... {left} bytes ({left // 11} lines) left out: read on ...]"


def test_one_long_line_is_cut_at_bytes() -> None:
    data = b"x" * 100_000
    text, cut = captured(data, 1000).shown(1000, lambda _: "r")
    assert cut and text == "x" * 500 + "\n[... 99000 bytes (0 lines) left out: r ...]\n" + "x" * 500


def test_what_is_kept_is_bounded() -> None:
    data = b"y\n" * (SAVED_LIMIT // 2 + 1000)
    stream = captured(data, 1024, chunk=65536)
    assert len(stream.saved) == SAVED_LIMIT and stream.size == len(data)
    assert len(stream.tail) <= 2 * 1024 + 65536
    assert stream.shown(1024, lambda _: "r")[0].endswith("y\n" * 256)


def test_store_keeps_the_newest_within_its_budget() -> None:
    store = OutputStore(count=2, budget=10)
    first = store.keep({"stdout": captured(b"1234", 256), "stderr": captured(b"", 256)})
    second = store.keep({"stdout": captured(b"abcd", 256), "stderr": captured(b"", 256)})
    assert store.get(first, "stdout").saved == b"1234"
    third = store.keep({"stdout": captured(b"xyz", 256), "stderr": captured(b"", 256)})
    with pytest.raises(AgentkernelError, match="run the command again"):
        store.get(first, "stdout")  # over the count
    big = store.keep({"stdout": captured(b"01234567", 256), "stderr": captured(b"", 256)})
    for gone in (second, third):  # over the budget
        with pytest.raises(AgentkernelError):
            store.get(gone, "stdout")
    assert store.get(big, "stdout").saved == b"01234567"


def test_slices_end_on_whole_characters() -> None:
    data = "aé€".encode()  # 1 + 2 + 3 bytes
    assert text_slice(data, 2) == ("utf-8", "a", 1)
    assert text_slice(data, 4) == ("utf-8", "aé", 3)
    assert text_slice(data, 6) == ("utf-8", "aé€", 6)
    assert text_slice(data[3:], 1) == ("base64", "4g==", 1)  # less than a character: still progress
    assert text_slice(b"\xff\xfe", 2) == ("base64", "//4=", 2)


def test_hints_name_tools_not_cli_commands() -> None:
    assert for_agent(str(NoSuchSandboxError("box"))) == (
        "no sandbox named 'box': list_sandboxes shows the sandboxes there are"
    )
    stopped = "sandbox 'b' is not running (status: stopped): start it with `agentkernel start b`"
    assert for_agent(stopped).endswith("start it with start_sandbox")
    for message in (
        "no guest kernel: run `agentkernel setup`",
        "unknown secret 'k': declare [secrets.k] in agentkernel.toml or store it with "
        "`agentkernel secret set k --host HOST`",
    ):
        assert "`" not in for_agent(message) and "agentkernel " not in for_agent(message)

"""The atheris target in fuzz/ keeps working: its function on a few inputs, and a short fuzzing run."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from types import ModuleType

import pytest

from agentkernel.protocol.frames import HEADER, MAGIC, MAX_PAYLOAD, FrameType, Tag, encode, encode_record
from tests.conftest import REPO

TARGET = REPO / "fuzz" / "frames_fuzz.py"


def load_target() -> ModuleType:
    spec = importlib.util.spec_from_file_location("frames_fuzz", TARGET)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


HELLO = encode(0, FrameType.HELLO, encode_record([(Tag.VERSION, 1), (Tag.MAGIC, MAGIC)]))
INPUTS = [
    b"",
    b"\x00",
    b"\x00" + encode(3, FrameType.STDOUT, b"out") + encode(3, FrameType.EXIT),
    b"\x01" + b"noise" + HELLO + encode(0, FrameType.PONG, b"x"),
    b"\xff" + HELLO * 3,
    b"\x00" + HEADER.pack(MAX_PAYLOAD + 1, 1, FrameType.STDOUT, 0),
    b"\x02" + encode(1, FrameType.EXIT, b"\x00\x0a\x00\x00\x00\x08\x01"),  # a record cut short
    bytes(range(256)) * 8,
]


@pytest.mark.parametrize("data", INPUTS)
def test_target_accepts_what_the_decoder_should(data: bytes) -> None:
    load_target().fuzz_one_input(data)


def test_target_catches_a_broken_invariant(monkeypatch: pytest.MonkeyPatch) -> None:
    """The target's checks can fail: with a decoder that loses bytes, the input no longer adds up."""
    target = load_target()
    real = target.FrameDecoder.feed
    monkeypatch.setattr(target.FrameDecoder, "feed", lambda self, data: real(self, data[:-1]))
    with pytest.raises(AssertionError):
        target.fuzz_one_input(b"\x00" + encode(3, FrameType.STDOUT, b"out"))


def test_short_fuzzing_run() -> None:
    pytest.importorskip("atheris")
    done = subprocess.run(
        [sys.executable, str(TARGET), "-runs=2000", "-seed=1"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Done 2000 runs" in done.stderr

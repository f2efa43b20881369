import contextlib
from pathlib import Path

from agentkernel.artifacts import cache


def test_build_once_then_reuse(isolated_home: Path) -> None:
    calls = []

    def build(out: Path) -> None:
        calls.append(out)
        (out / "blob").write_bytes(b"content")

    first, built = cache.get_or_build("thing", "k1", build)
    again, built_again = cache.get_or_build("thing", "k1", build)
    assert (built, built_again) == (True, False)
    assert first == again and (first / "blob").read_bytes() == b"content"
    assert len(calls) == 1


def test_corrupted_entry_is_rebuilt(isolated_home: Path) -> None:
    entry, _ = cache.get_or_build("thing", "k2", lambda out: (out / "blob").write_bytes(b"good"))
    (entry / "blob").write_bytes(b"evil")
    assert cache.lookup("thing", "k2") is None
    entry, built = cache.get_or_build("thing", "k2", lambda out: (out / "blob").write_bytes(b"good"))
    assert built and (entry / "blob").read_bytes() == b"good"


def test_failed_build_leaves_nothing(isolated_home: Path) -> None:
    def broken(out: Path) -> None:
        (out / "half").write_bytes(b"x")
        raise RuntimeError("boom")

    with contextlib.suppress(RuntimeError):
        cache.store("thing", "k3", broken)
    assert list((isolated_home / "cache" / "thing").iterdir()) == []


def test_key_parts_do_not_run_together() -> None:
    assert cache.key_of(["ab", "c"]) != cache.key_of(["a", "bc"])


def test_current_pointer(isolated_home: Path) -> None:
    assert cache.current("thing", "blob") is None
    cache.store("thing", "k4", lambda out: (out / "blob").write_bytes(b"x"))
    cache.set_current("thing", "k4")
    current = cache.current("thing", "blob")
    assert current is not None and current.read_bytes() == b"x"

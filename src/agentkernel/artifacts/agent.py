"""The guest agent: a static binary compiled from the C sources shipped in the package with musl-gcc."""

from __future__ import annotations

import subprocess
from importlib import resources
from pathlib import Path

from agentkernel.artifacts import cache
from agentkernel.artifacts.run import require, run, step

KIND = "agent"
BINARY = "agentkernel-agent"
CFLAGS = ["-static", "-Os", "-Wall", "-Wextra", "-Werror", "-s"]


def sources() -> list[tuple[str, bytes]]:
    guest = resources.files("agentkernel").joinpath("guest")
    return sorted((f.name, f.read_bytes()) for f in guest.iterdir() if f.name.endswith((".c", ".h")))


def cache_key(compiler: str) -> str:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    parts: list[str | bytes] = ["agent-build-v1", " ".join(CFLAGS), version]
    for name, data in sources():
        parts += [name, data]
    return cache.key_of(parts)


def ensure(*, log: Path) -> tuple[Path, bool]:
    """The cached agent binary, compiling it if needed; and whether it was compiled now."""
    compiler = require("musl-gcc", "musl-tools")
    key = cache_key(compiler)
    entry = cache.lookup(KIND, key)
    built = entry is None
    if entry is None:
        with step("Compiling the guest agent"):
            entry = cache.store(KIND, key, lambda out: _compile(compiler, out, log))
    cache.set_current(KIND, key)
    return entry / BINARY, built


def current() -> Path | None:
    return cache.current(KIND, BINARY)


def _compile(compiler: str, out: Path, log: Path) -> None:
    srcdir = out / "src"
    srcdir.mkdir()
    for name, data in sources():
        (srcdir / name).write_bytes(data)
    c_files = sorted(str(p) for p in srcdir.glob("*.c"))
    run([compiler, *CFLAGS, "-o", out / BINARY, *c_files], log=log, what="compiling the guest agent")
    for p in srcdir.iterdir():
        p.unlink()
    srcdir.rmdir()

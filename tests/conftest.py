"""Shared fixtures. Tests that boot VMs use the artifacts `agentkernel setup` built in the data dir."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty AGENTKERNEL_HOME for tests that must not see or touch the real data dir."""
    home = tmp_path / "akhome"
    monkeypatch.setenv("AGENTKERNEL_HOME", str(home))
    yield home


def cli(*args: str, env: dict[str, str] | None = None, input: bytes | None = None, timeout: float = 600):
    """Run the real CLI in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "agentkernel", *args],
        capture_output=True,
        env={**os.environ, **(env or {})},
        input=input,
        timeout=timeout,
    )

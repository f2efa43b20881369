"""Fixtures for the image tests: a private AGENTKERNEL_HOME and a stand-in guest agent."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "home"
    monkeypatch.setenv("AGENTKERNEL_HOME", str(path))
    return path


@pytest.fixture
def agent(tmp_path: Path) -> Path:
    """Any small static executable does: the real agent is compiled elsewhere."""
    path = tmp_path / "agent"
    shutil.copyfile("/bin/busybox", path)
    path.chmod(0o755)
    return path


@pytest.fixture
def log(tmp_path: Path) -> Path:
    return tmp_path / "build.log"

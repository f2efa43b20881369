"""Fixtures: a real API server over the test's own data dir (sharing the built kernel and images)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.api.server import api_server
from tests.vm.conftest import artifacts, cli_home  # noqa: F401  (fixtures)


@pytest.fixture
def api(cli_home: Path, tmp_path: Path) -> Iterator[str]:  # noqa: F811
    """The URL of a server without an API key."""
    with api_server(tmp_path) as url:
        yield url

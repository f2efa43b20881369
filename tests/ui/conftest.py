"""Fixtures for the dashboard's browser tests: a real server with an API key, and headless Chromium
(Debian's `chromium` and `chromium-driver`, driven by Selenium)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.api.server import api_server
from tests.vm.conftest import artifacts, cli_home  # noqa: F401  (fixtures)

KEY = "dashboard-test-key"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


@pytest.fixture
def server(cli_home: Path, tmp_path: Path) -> Iterator[str]:  # noqa: F811
    """The URL of a server that needs the key KEY."""
    with api_server(tmp_path, api_key=KEY) as url:
        yield url


@pytest.fixture
def screenshots(request: pytest.FixtureRequest) -> Path:
    """Where a test keeps its screenshots: $AGENTKERNEL_TEST_ARTIFACTS (default: test-artifacts/ in
    the repository, which git ignores) /ui/<test>, emptied first."""
    root = Path(os.environ.get("AGENTKERNEL_TEST_ARTIFACTS") or request.config.rootpath / "test-artifacts")
    where = root / "ui" / request.node.name
    shutil.rmtree(where, ignore_errors=True)
    where.mkdir(parents=True)
    return where


@pytest.fixture
def browser() -> Iterator[object]:
    """A headless Chromium driven by Selenium (skipped where either is missing)."""
    webdriver = pytest.importorskip(
        "selenium.webdriver", reason="selenium is not installed (pip install selenium)"
    )
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        pytest.skip("no chromium / chromedriver: apt-get install -y chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,900",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()

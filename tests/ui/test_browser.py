"""The dashboard in a real browser (headless Chromium): log in, see a sandbox appear, and use its
terminal (xterm.js over the WebSocket attach) against a real VM. Screenshots of each page are kept
(see the `screenshots` fixture)."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agentkernel.client import Client
from tests.ui.conftest import KEY

pytest.importorskip("selenium", reason="selenium is not installed (pip install selenium)")
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

WAIT = 60.0


def wait_for(
    what: str, check: Callable[[], Any], timeout: float = WAIT, seen: Callable[[], Any] = str
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; seen: {seen()}")
        time.sleep(0.2)


def log_in(driver: Any, url: str, key: str) -> None:
    driver.get(f"{url}/ui/")
    wait_for("the login page", lambda: driver.current_url.endswith("/ui/login"))
    driver.find_element(By.ID, "key").send_keys(key)
    driver.find_element(By.ID, "login-submit").click()


def screen(driver: Any) -> list[str]:
    """The terminal's lines, as xterm.js holds them."""
    lines: list[str] = driver.execute_script(
        "const b = window.agentkernelTerminal.buffer.active; const out = [];"
        "for (let i = 0; i < b.length; i++) out.push(b.getLine(i).translateToString(true));"
        "return out;"
    )
    return lines


def typed(driver: Any, text: str) -> None:
    driver.find_element(By.CSS_SELECTOR, "#terminal .xterm-helper-textarea").send_keys(text)


def run(driver: Any, command: str, answer: re.Pattern[str]) -> re.Match[str]:
    """Type `command` and Enter; the new line on the screen that matches `answer` in full."""

    def matches() -> list[re.Match[str]]:
        return [m for line in screen(driver) if (m := answer.fullmatch(line.strip())) is not None]

    before = len(matches())
    typed(driver, command + "\n")
    found: list[re.Match[str]] = wait_for(
        f"the answer to {command!r}", lambda: matches()[before:], seen=lambda: screen(driver)
    )
    return found[-1]


def test_wrong_key_is_refused(server: str, browser: Any, screenshots: Path) -> None:
    log_in(browser, server, "not-the-key")
    error = wait_for("the error", lambda: browser.find_elements(By.ID, "error"))
    assert "wrong API key" in error[0].text
    assert browser.current_url.endswith("/ui/login")
    assert not [c for c in browser.get_cookies() if c["name"] == "agentkernel_session"]
    browser.save_screenshot(str(screenshots / "login-refused.png"))


@pytest.mark.vm
def test_log_in_see_a_sandbox_and_use_its_terminal(server: str, browser: Any, screenshots: Path) -> None:
    log_in(browser, server, KEY)
    wait_for("the list", lambda: browser.find_elements(By.ID, "sandboxes"))
    browser.save_screenshot(str(screenshots / "list-empty.png"))
    with Client(server, api_key=KEY) as api, api.create_sandbox("web", image="base"):
        # the list page learns of it by itself (Server-Sent Events), no reload
        def row() -> str:  # read in the page: every update replaces the rows
            text: str = browser.execute_script(
                "const row = document.querySelector('tr[data-name=\"web\"]');"
                "return row ? row.textContent : '';"
            )
            return text

        wait_for("the new sandbox's row, running", lambda: "running" in row())
        browser.save_screenshot(str(screenshots / "list.png"))
        browser.get(f"{server}/ui/sandboxes/web")
        wait_for("the sandbox page", lambda: browser.find_elements(By.ID, "terminal-open"))
        browser.save_screenshot(str(screenshots / "sandbox.png"))

        browser.find_element(By.ID, "terminal-open").click()
        status = browser.find_element(By.ID, "terminal-status")
        wait_for("the terminal to connect", lambda: status.text == "connected")
        run(browser, "echo hel''lo", re.compile("hello"))  # quoted: the echoed command line is not it
        first = run(browser, "stty size", re.compile(r"(\d+) (\d+)"))
        browser.save_screenshot(str(screenshots / "terminal.png"))

        browser.set_window_size(900, 700)  # the page refits the terminal and sends the new size
        second = run(browser, "stty size", re.compile(r"(\d+) (\d+)"))
        assert (second[1], second[2]) != (first[1], first[2])
        assert int(second[2]) < int(first[2])

        typed(browser, "sleep 600\n")
        time.sleep(1)
        typed(browser, Keys.CONTROL + "c")
        run(browser, "echo status=$?", re.compile("status=130"))  # the sleep died of SIGINT
        typed(browser, "exit 3\n")
        wait_for("the exit code", lambda: status.text == "exited with code 3")
        browser.save_screenshot(str(screenshots / "terminal-exited.png"))
        commands = browser.find_element(By.ID, "commands")  # kept current by the page's event stream

        def ended_shell() -> bool:
            rows = [
                r.find_elements(By.TAG_NAME, "td")
                for r in commands.find_elements(By.CSS_SELECTOR, "tbody tr")
            ]
            return any(len(cells) == 4 and cells[2].text == "3" for cells in rows)

        wait_for("the shell's end in the live commands table", ended_shell, seen=lambda: commands.text)
    browser.get(f"{server}/ui/host")
    wait_for("the host page", lambda: "Acceleration" in browser.page_source)
    browser.save_screenshot(str(screenshots / "host.png"))

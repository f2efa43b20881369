"""The stages of an image build on stderr: `building python: 2/4 packages ... 31s`.

On a terminal the running stage is a live line (a spinner and its elapsed seconds); elsewhere (a log,
CI) each stage gets a line when it starts. Either way a line with its time follows each finished stage,
as `agentkernel setup` reports its steps. Stdout stays for the result.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from types import TracebackType

from rich.text import Text

from agentkernel.artifacts.run import console

POLL_S = 0.2


class BuildProgress(AbstractContextManager["BuildProgress"]):
    """The numbered stages of building image `name`; `stage()` ends the running one, starts the next.

    Stages may be started from another thread (see `stage_on_log_line`). The console is never called
    with the lock held: its refresh thread renders this object, which takes the lock.
    """

    def __init__(self, name: str, total: int) -> None:
        self.name = name
        self.total = total
        self._lock = threading.Lock()
        self._number = 0
        self._title = ""
        self._started = self._stage_started = time.monotonic()
        self._status: AbstractContextManager[object] | None = None

    def __enter__(self) -> BuildProgress:
        self._started = time.monotonic()
        if console.is_terminal:
            self._status = console.status(self)  # rendered again on each refresh: the seconds tick
            self._status.__enter__()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        with self._lock:
            finished = self._finished() if kind is None else None
        if finished:
            console.print(finished)
        if self._status is not None:
            self._status.__exit__(kind, exc, tb)
        if kind is None:
            console.print(f"[green]done[/green] building image {self.name} ({_since(self._started)})")

    def stage(self, title: str) -> None:
        with self._lock:
            finished = self._finished()
            self._number += 1
            self._title = title
            self._stage_started = time.monotonic()
            label = self._label()
        if finished:
            console.print(finished)
        if self._status is None:
            console.print(f"{label} ...")

    def __rich__(self) -> Text:
        with self._lock:
            return Text(f"{self._label()} ... {time.monotonic() - self._stage_started:.0f}s")

    def _label(self) -> str:
        return f"building {self.name}: {self._number}/{self.total} {self._title}"

    def _finished(self) -> str | None:
        """The line for the stage that is ending, if one runs."""
        if not self._number:
            return None
        return f"[green]done[/green] {self._label()} ({_since(self._stage_started)})"


def _since(start: float) -> str:
    return f"{time.monotonic() - start:.1f}s"


@contextmanager
def stage_on_log_line(progress: BuildProgress, log: Path, prefix: bytes, title: str) -> Iterator[None]:
    """While the block runs, start stage `title` once a line starting with `prefix` is appended to
    `log` (a program writing there marks where its own steps begin)."""
    offset = log.stat().st_size if log.exists() else 0
    stop = threading.Event()

    def follow() -> None:
        nonlocal offset
        pending = b""
        while True:
            last = stop.wait(POLL_S)  # once stopped, read what came last too
            try:
                with log.open("rb") as f:
                    f.seek(offset)
                    data = f.read()
            except OSError:
                data = b""
            offset += len(data)
            *lines, pending = (pending + data).split(b"\n")
            if any(line.startswith(prefix) for line in lines):
                progress.stage(title)
                return
            if last:
                return

    thread = threading.Thread(target=follow, name="build-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()

"""Rich consoles made on first use: importing rich costs start-up time that most commands never need."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from rich.console import Console


class _LazyConsole:
    def __init__(self, **options: Any) -> None:
        self._options = options
        self._console: Console | None = None

    def __getattr__(self, name: str) -> Any:
        if self._console is None:
            from rich.console import Console

            self._console = Console(**self._options)
        return getattr(self._console, name)


def lazy_console(*, stderr: bool = False) -> Console:
    return cast("Console", _LazyConsole(stderr=stderr, highlight=False, soft_wrap=True))

"""Signals that end a command which owns a sandbox (`run`, `agent run`) take the clean way out.

SIGTERM, SIGHUP (the terminal closed) and SIGINT would otherwise end the process where it stands and
leave its VM running. Here the first of them cancels the command instead, so the `finally` blocks
that remove the sandbox run, and the process then exits with 128+N, as if killed by it. Later signals
are ignored while that cleanup runs (it takes well under a second).

The cancellation is an anyio cancel scope: it is raised again at every await until the command has
ended, so code that swallows one CancelledError (while closing a connection, say) cannot keep a
cancelled command running.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import anyio
import typer

T = TypeVar("T")
EXIT_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class SignalGuard:
    """The exit-signal handlers of one command; `install` puts them (back) in place."""

    def __init__(self) -> None:
        self.scope = anyio.CancelScope()
        self.received: signal.Signals | None = None

    def install(self) -> None:
        """Handle the exit signals here. Call it again after code that set handlers of its own and
        removed them (asyncio then restores the default action, which would kill the process)."""
        loop = asyncio.get_running_loop()
        for signo in EXIT_SIGNALS:
            loop.add_signal_handler(signo, self._on_signal, signo)

    def uninstall(self) -> None:
        loop = asyncio.get_running_loop()
        for signo in EXIT_SIGNALS:
            loop.remove_signal_handler(signo)

    def _on_signal(self, signo: signal.Signals) -> None:
        if self.received is None:
            self.received = signo
            self.scope.cancel()


def run_until_signalled(main: Callable[[SignalGuard], Coroutine[Any, Any, T]]) -> T:
    """`asyncio.run(main(guard))`; on an exit signal, `main` is cancelled, its cleanup runs, and the
    process exits with 128+N (typer.Exit)."""

    async def guarded() -> T:
        guard = SignalGuard()
        guard.install()
        try:
            with guard.scope:
                result = await main(guard)
                if guard.received is None:
                    return result
        except BaseException:  # what the cancellation caused (a terminal that hung up, say)
            if guard.received is None:
                raise
        finally:
            guard.uninstall()
        signo = guard.received
        assert signo is not None
        with contextlib.suppress(OSError):  # after SIGHUP the terminal may be gone
            print(f"agentkernel: interrupted by {signo.name}", file=sys.stderr)
        raise typer.Exit(128 + signo)

    return asyncio.run(guarded())

"""Connecting a guest process to this terminal: output as it comes, stdin, raw TTY mode and resizes."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import shutil
import signal
import sys
import termios
import threading
import tty
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

from agentkernel.cli.thin_exec import GaveUpError
from agentkernel.protocol.connection import ExitStatus, Process

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
_background: set[asyncio.Future[None]] = set()  # keeps fire-and-forget tasks referenced


def terminal_size() -> tuple[int, int]:
    size = shutil.get_terminal_size((80, 24))
    return size.lines, size.columns


@contextlib.contextmanager
def raw_terminal(enabled: bool) -> Iterator[None]:
    """Put stdin's terminal in raw mode (keys go to the guest as typed) and restore it afterwards."""
    if not enabled or not os.isatty(0):
        yield
        return
    saved = termios.tcgetattr(0)
    tty.setraw(0)
    try:
        yield
    finally:
        termios.tcsetattr(0, termios.TCSADRAIN, saved)


def _stdin_reader(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[bytes]) -> None:
    """Reads stdin in a daemon thread (works for files, pipes and terminals alike)."""
    while True:
        try:
            data = os.read(0, 65536)
        except OSError:
            data = b""
        try:  # blocks while the queue is full: the guest's stdin window paces how fast we read
            asyncio.run_coroutine_threadsafe(queue.put(data), loop).result()
        except RuntimeError:  # the loop has closed: the command is over
            return
        if not data:
            return


async def _forward_stdin(proc: Process) -> None:
    queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=4)
    threading.Thread(target=_stdin_reader, args=(asyncio.get_running_loop(), queue), daemon=True).start()
    while data := await queue.get():
        await proc.write(data)
    await proc.close_stdin()


async def attach_process(
    proc: Process, *, stdin: bool, tty_mode: bool, give_up_after: float | None = None
) -> ExitStatus:
    """Stream the process's output to our stdout/stderr (and our stdin to it) until it exits.

    Off a terminal, SIGINT, SIGTERM, SIGHUP and SIGQUIT are passed on to the process; a second one, or
    `give_up_after` seconds after the first, stops the waiting (GaveUpError)."""
    loop = asyncio.get_running_loop()
    feeder = asyncio.create_task(_forward_stdin(proc)) if stdin else None
    if feeder is None:
        await proc.close_stdin()
    handled: list[signal.Signals] = []

    def on(signo: signal.Signals, action: Callable[[], Coroutine[Any, Any, None]]) -> None:
        loop.add_signal_handler(signo, lambda: _background.add(asyncio.ensure_future(action())))
        handled.append(signo)

    if tty_mode and os.isatty(1):
        on(signal.SIGWINCH, lambda: proc.resize(*terminal_size()))
    given_up: asyncio.Future[tuple[signal.Signals, bool]] = loop.create_future()  # (signal, timed out)
    if not tty_mode:  # on a terminal, ^C reaches the guest as a keystroke; otherwise pass signals on
        forwarded: set[signal.Signals] = set()

        def give_up(signo: signal.Signals, timed_out: bool = False) -> None:
            if not given_up.done():
                given_up.set_result((signo, timed_out))

        async def forward(signo: signal.Signals) -> None:
            if forwarded:  # a second one: the user wants out, answer or not
                give_up(signo)
            elif give_up_after is not None:
                loop.call_later(give_up_after, give_up, signo, True)
            forwarded.add(signo)
            await proc.signal(signo)

        for signo in FORWARDED_SIGNALS:
            on(signo, functools.partial(forward, signo))
    copier = asyncio.create_task(_copy_output(proc))
    try:
        waiting: set[asyncio.Future[Any]] = {copier, given_up}
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if not copier.done():
            copier.cancel()
            signo, timed_out = given_up.result()
            raise GaveUpError(signo, waited=give_up_after if timed_out else None)
        copier.result()
    finally:
        for signo in handled:
            loop.remove_signal_handler(signo)
        if feeder is not None:
            feeder.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await feeder
    assert proc.status is not None
    return proc.status


async def _copy_output(proc: Process) -> None:
    out, err = sys.stdout.buffer, sys.stderr.buffer
    async for chunk in proc.output():
        stream = out if chunk.stream == "stdout" else err
        stream.write(chunk.data)
        stream.flush()

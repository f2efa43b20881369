"""Running long build steps: output to a saved log, a spinner with elapsed time, one-line failures."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from agentkernel import paths
from agentkernel.errors import AgentkernelError, MissingToolError
from agentkernel.terminal import lazy_console

console = lazy_console(stderr=True)


def require(program: str, package: str) -> str:
    """Path of a system program, or a MissingToolError naming the Debian package that provides it."""
    found = shutil.which(program) or next(
        (p for d in ("/usr/sbin", "/sbin") if os.access(p := f"{d}/{program}", os.X_OK)), None
    )
    if not found:
        raise MissingToolError(program, package)
    return found


@contextmanager
def step(title: str) -> Iterator[None]:
    """Show `title` with a spinner while the block runs, then a done line with the time it took."""
    start = time.monotonic()
    if console.is_terminal:
        with console.status(f"{title} ..."):
            yield
    else:
        console.print(f"{title} ...")
        yield
    console.print(f"[green]done[/green] {title} ({time.monotonic() - start:.1f}s)")


def run(
    cmd: Sequence[str | Path],
    *,
    log: Path,
    what: str,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> None:
    """Run `cmd` with its output appended to `log`; on failure raise an error that names the log."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with paths.open_private(log, "ab") as out:
        out.write(f"\n$ {' '.join(map(str, cmd))}\n".encode())
        out.flush()
        full_env = {**os.environ, **env} if env else None
        try:
            proc = subprocess.run(
                [str(c) for c in cmd], cwd=cwd, env=full_env, stdout=out, stderr=out, stdin=subprocess.DEVNULL
            )
        except FileNotFoundError as exc:
            raise AgentkernelError(f"{what} failed: {exc.strerror}: {cmd[0]}") from None
    if proc.returncode != 0:
        raise AgentkernelError(f"{what} failed (exit status {proc.returncode}); see the log: {log}")


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)

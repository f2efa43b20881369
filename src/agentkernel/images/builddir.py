"""Build directories under the data dir's tmp/ that never outlive the process that builds in them.

A build (mmdebstrap above all, which bind-mounts /proc, /sys and /dev into its tree as root) can be
killed at any point. So:

- the builder writes an owner file (its pid and start time, and the session ids of the programs it
  started) into its directory;
- each program runs in a session of its own, and SIGTERM, SIGINT and SIGHUP stop the build: the
  sessions are killed, the mounts under the directory lazily unmounted, and the directory removed;
- after a SIGKILL, the next build (or `agentkernel doctor --repair`) finds the directory of a dead
  owner and does the same.

Unmounting is careful: only mount points under the directory (from /proc/self/mountinfo), deepest
first, never following a symlink; a directory with something still mounted inside is never deleted.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from agentkernel import paths
from agentkernel.artifacts.run import warn
from agentkernel.errors import AgentkernelError
from agentkernel.procs import naming, session_of, start_time

OWNER = ".owner.json"
LEGACY_PREFIX = "image-"
"""Build directories of older versions have no owner file; these are stale once nothing uses them."""
LEGACY_GRACE = 60.0
"""Seconds a directory without an owner file is left alone (its owner may be about to write it)."""
KILL_WAIT = 3.0
OCTAL = re.compile(rb"\\([0-7]{3})")  # mountinfo escapes spaces and such as \040
MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class BuildInterrupted(KeyboardInterrupt):
    """A build stopped by SIGTERM or SIGHUP. A KeyboardInterrupt, so no `except Exception` stops it;
    once the build directory is cleaned it becomes SystemExit(128+N), as if the signal had killed
    the process."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


@dataclass
class Owner:
    pid: int
    start: int  # the process's start time in clock ticks since boot: a reused pid has another
    sessions: list[list[int]] = field(default_factory=list)  # [session id, its leader's start time]

    def alive(self) -> bool:
        return self.start > 0 and start_time(self.pid) == self.start


@dataclass
class Cleaned:
    """What cleaning one stale directory did."""

    path: Path
    killed: list[int]
    unmounted: list[str]
    removed: bool
    problem: str | None = None

    def describe(self) -> str:
        done = [f"killed {len(self.killed)} process(es)"] if self.killed else []
        done += [f"unmounted {len(self.unmounted)} filesystem(s)"] if self.unmounted else []
        done += ["removed it"] if self.removed else [f"left it in place: {self.problem}"]
        return f"stale build directory {self.path}: {', '.join(done)}"


def read_owner(directory: Path) -> Owner | None:
    try:
        data = json.loads((directory / OWNER).read_text())
        return Owner(int(data["pid"]), int(data["start"]), [[int(s), int(t)] for s, t in data["sessions"]])
    except (OSError, ValueError, TypeError, KeyError):
        return None


def _write_owner(directory: Path, owner: Owner) -> None:
    partial = directory / f"{OWNER}.partial"
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"pid": owner.pid, "start": owner.start, "sessions": owner.sessions}, f)
    partial.replace(directory / OWNER)


_lock = threading.Lock()


@contextlib.contextmanager
def build_dir(prefix: str = LEGACY_PREFIX) -> Iterator[Path]:
    """A new directory under tmp/ for one build, removed afterwards whatever happens.

    Stale directories of dead builders are cleaned first. In the main thread, SIGTERM and SIGHUP
    raise BuildInterrupted (SIGINT raises KeyboardInterrupt as usual), so the cleanup runs.
    """
    for cleaned in clean_stale():
        warn(cleaned.describe())
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=paths.tmp_dir()))
    _write_owner(path, Owner(os.getpid(), start_time(os.getpid()) or 0))
    try:
        with _stop_on_signals():
            try:
                yield path
            finally:
                with _signals_deferred():
                    result = _clean(path)
                if not result.removed:
                    warn(result.describe())
    except KeyboardInterrupt as exc:
        signum = exc.signum if isinstance(exc, BuildInterrupted) else signal.SIGINT
        with contextlib.suppress(OSError):  # after SIGHUP the terminal may be gone
            print(f"agentkernel: interrupted by {signal.Signals(signum).name}", file=sys.stderr)
        if isinstance(exc, BuildInterrupted):
            raise SystemExit(128 + signum) from None
        raise


def run(cmd: Sequence[str | Path], *, within: Path, log: Path, what: str) -> None:
    """Run `cmd` in a session of its own, with its output appended to `log`.

    The session is recorded in the owner file of the build directory that holds `within`, and
    killed whole if this process is interrupted (or fails) while waiting for it.
    """
    paths.private_dir(log.parent)
    with paths.open_private(log, "ab") as out:
        out.write(f"\n$ {' '.join(map(str, cmd))}\n".encode())
        out.flush()
        try:
            proc = subprocess.Popen(
                [str(c) for c in cmd],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
        except FileNotFoundError as exc:
            raise AgentkernelError(f"{what} failed: {exc.strerror}: {cmd[0]}") from None
        try:
            _record_session(within, proc.pid)
            returncode = proc.wait()
        except BaseException:
            with _signals_deferred():
                _kill({proc.pid: start_time(proc.pid) or 0}, set())
                proc.wait()
            raise
    if returncode != 0:
        raise AgentkernelError(f"{what} failed (exit status {returncode}); see the log: {log}")


def _record_session(within: Path, sid: int) -> None:
    tmp = paths.tmp_dir().resolve()
    for directory in (within.resolve(), *within.resolve().parents):
        if directory.parent == tmp:
            with _lock:
                owner = read_owner(directory)
                if owner is not None and owner.pid == os.getpid():
                    owner.sessions.append([sid, start_time(sid) or 0])
                    _write_owner(directory, owner)
            return


def stale_dirs() -> list[Path]:
    """Directories under tmp/ whose builder is gone."""
    found = []
    tmp = paths.tmp_dir()
    for entry in sorted(tmp.iterdir()):
        if entry.is_symlink() or not entry.is_dir():
            continue
        owner = read_owner(entry)
        if owner is not None:
            if not owner.alive():
                found.append(entry)
        elif entry.name.startswith(LEGACY_PREFIX) and _legacy_stale(entry):
            found.append(entry)
    return found


def _legacy_stale(entry: Path) -> bool:
    try:
        age = time.time() - entry.stat().st_mtime
    except OSError:
        return False
    return age > LEGACY_GRACE and not users(entry.resolve())


def clean_stale() -> list[Cleaned]:
    """Stop what is left of dead builders under tmp/, unmount what they mounted, remove their files."""
    return [_clean(path) for path in stale_dirs()]


def _clean(path: Path) -> Cleaned:
    real = path.resolve()
    owner = read_owner(path)
    sessions = {sid: leader for sid, leader in owner.sessions} if owner else {}
    killed = _kill(sessions, {real})
    unmounted, left = unmount_under(real)
    if left:
        return Cleaned(path, killed, unmounted, False, f"still mounted inside: {', '.join(left[:3])}")
    shutil.rmtree(path, ignore_errors=True)
    if path.exists():
        return Cleaned(path, killed, unmounted, False, "it could not be removed")
    return Cleaned(path, killed, unmounted, True)


def users(directory: Path) -> list[int]:
    """Processes (not this one) whose command line, working directory or root is in `directory`."""
    return naming(directory, by_cwd=True)


def _members(sessions: dict[int, int]) -> list[int]:
    """Live processes in `sessions` (session id -> its leader's start time), this one excepted.

    A session id cannot be reused while any process is still in that session, so members are the
    builder's; a live leader with another start time means the id was reused: skipped.
    """
    wanted = {sid for sid, leader in sessions.items() if start_time(sid) in (None, leader)}
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and int(entry.name) != os.getpid() and session_of(int(entry.name)) in wanted:
            found.append(int(entry.name))
    return found


def _kill(sessions: dict[int, int], directories: set[Path]) -> list[int]:
    """SIGKILL the members of `sessions` and the users of `directories` until none is left."""
    killed: set[int] = set()
    deadline = time.monotonic() + KILL_WAIT
    while True:
        pids = set(_members(sessions))
        for directory in directories:
            pids.update(users(directory))
        pids = {pid for pid in pids if start_time(pid) is not None}
        if not pids or time.monotonic() > deadline:
            return sorted(killed)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        killed |= pids
        time.sleep(0.05)


def mounts_under(directory: Path) -> list[str]:
    """Mount points strictly inside `directory` (a resolved path), as /proc/self/mountinfo lists them."""
    prefix = os.fsencode(directory) + b"/"
    with open("/proc/self/mountinfo", "rb") as f:
        points = [OCTAL.sub(lambda m: bytes([int(m[1], 8)]), line.split()[4]) for line in f]
    return [os.fsdecode(p) for p in points if p.startswith(prefix)]


def unmount_under(directory: Path) -> tuple[list[str], list[str]]:
    """Lazily unmount everything mounted inside `directory`, deepest (and latest) first.

    Returns what was unmounted and what is still mounted. A mount point reached through a symlink
    (its real path is not the one listed) is left alone: unmounting it could touch another mount.
    """
    done: list[str] = []
    for _ in range(64):  # stacked mounts need a pass each; bounded in case one cannot go
        points = mounts_under(directory)
        if not points:
            return done, []
        progress = False
        for point in sorted(reversed(points), key=lambda p: p.count("/"), reverse=True):
            if os.path.realpath(point) != point:
                continue
            if _umount(point):
                done.append(point)
                progress = True
        if not progress:
            break
    return done, mounts_under(directory)


_libc: Any = None


def _umount(point: str) -> bool:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return bool(_libc.umount2(os.fsencode(point), MNT_DETACH | UMOUNT_NOFOLLOW) == 0)


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into BuildInterrupted while the block runs (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise BuildInterrupted(signum)

    # SIGINT already raises KeyboardInterrupt; a signal the caller ignores (nohup) stays ignored.
    previous = {
        sig: signal.signal(sig, handler)
        for sig in (signal.SIGTERM, signal.SIGHUP)
        if signal.getsignal(sig) is not signal.SIG_IGN
    }
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold the stop signals while the block (a cleanup) runs; raise BuildInterrupted after it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        pending.append(signum)

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
    if pending:
        raise BuildInterrupted(pending[0])

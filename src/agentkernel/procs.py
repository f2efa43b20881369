"""What /proc says of a process, read in one place: whether it still runs, when it started, its
session, its arguments, whether it sees the host's files as this one does; and which processes name a
path.

A process can end between two reads, so every reader answers None or False rather than raise. A
zombie counts as ended: it has exited, and only its exit status is left for its parent. A pid can be
reused by a new process, so a process is named for good by its pid and its start time together.
"""

from __future__ import annotations

import os
from pathlib import Path

ENDED = (b"Z", b"X")


def _stat(pid: int) -> list[bytes] | None:
    """The fields of /proc/PID/stat from field 3 (the state) on; None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return stat[stat.rindex(b")") + 2 :].split()  # the command name may hold spaces and ')'


def running(pid: int) -> bool:
    """Whether `pid` exists and has not exited."""
    fields = _stat(pid)
    return fields is not None and fields[0] not in ENDED


def start_time(pid: int) -> int | None:
    """When `pid` started (field 22: clock ticks after boot); None if it does not run."""
    fields = _stat(pid)
    return None if fields is None or fields[0] in ENDED else int(fields[19])


def sees_files_as_we_do(pid: int) -> bool:
    """Whether process `pid` has this process's mount namespace and root directory, so that a path it
    names is the same file here (False when it cannot be told: the process ended, or hides its /proc)."""
    try:
        theirs = (os.stat(f"/proc/{pid}/ns/mnt"), os.stat(f"/proc/{pid}/root"))
        ours = (os.stat("/proc/self/ns/mnt"), os.stat("/"))
    except OSError:
        return False
    return all((a.st_dev, a.st_ino) == (b.st_dev, b.st_ino) for a, b in zip(theirs, ours, strict=True))


def session_of(pid: int) -> int | None:
    """The session id of `pid` (field 6); None if there is no such process."""
    fields = _stat(pid)
    return None if fields is None else int(fields[3])


def argv(pid: int) -> list[bytes]:
    """The arguments of `pid` ([] if it has ended or cannot be read)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def names(pid: int, path: str | Path) -> bool:
    """Whether an argument of `pid` is `path`, or holds a path below it (`path=DIR/agent0.sock,...`)."""
    needle = os.fsencode(path)
    return any(a == needle or needle + b"/" in a for a in argv(pid))


def naming(*paths: str | Path, by_cwd: bool = False) -> list[int]:
    """Running processes (this one excepted) that name one of `paths` in their arguments, or, with
    `by_cwd`, work or have their root in or below one."""
    needles = [os.fsencode(p) for p in paths]
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or (pid := int(entry.name)) == os.getpid():
            continue
        named = argv(pid)
        if by_cwd:
            for link in ("cwd", "root"):
                try:
                    named.append(os.fsencode(os.readlink(f"/proc/{pid}/{link}")))
                except OSError:
                    continue
        if any(a == n or n + b"/" in a for a in named for n in needles) and running(pid):
            found.append(pid)
    return found

"""The state database's connection, rows and errors, on the standard library only.

`state` builds typed records on top of this; the thin command line (`cli/thin.py`) reads rows here
without importing the record codec's dependencies (the policy's pydantic types).
"""

from __future__ import annotations

import sqlite3
import sys
import time
from contextlib import contextmanager

from agentkernel import paths
from agentkernel.errors import StateBusyError, StateDamagedError, StateError, StateIOError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path
    from typing import Any

DB_NAME = "state.db"
NOTICE_AFTER = 1.0
"""Seconds spent waiting on another process's lock before saying so on stderr."""
BUSY_LIMIT = 60.0
"""Seconds to wait in all for another process's lock before giving up."""
FULL_BELOW = 1 << 20
"""Free bytes under which a write error is put down to a full filesystem."""

SCHEMA = """
CREATE TABLE IF NOT EXISTS sandboxes (
    name TEXT PRIMARY KEY,
    backend TEXT NOT NULL,
    image TEXT NOT NULL,
    image_digest TEXT NOT NULL,
    vcpus INTEGER NOT NULL,
    memory_mb INTEGER NOT NULL,
    profile TEXT NOT NULL,
    status TEXT NOT NULL,
    pid INTEGER,
    rundir TEXT NOT NULL,
    created_at TEXT NOT NULL,
    extra TEXT NOT NULL DEFAULT '{}'
)
"""


class Busy(Exception):
    """Another process holds the database, and the caller asked not to wait (`connect(wait=False)`)."""


def db_path() -> Path:
    return paths.data_dir() / DB_NAME


# Primary SQLite result codes (the low byte of the extended ones).
_BUSY, _LOCKED, _CORRUPT, _NOTADB = 5, 6, 11, 26
_FULL, _IOERR = 13, 10


def _code(exc: sqlite3.Error) -> int:
    return (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF


def _is_busy(exc: sqlite3.Error) -> bool:
    return _code(exc) in (_BUSY, _LOCKED)


def translate(exc: sqlite3.Error | OSError, path: Path, *, busy_limit: float = BUSY_LIMIT) -> StateError:
    """The StateError for a sqlite (or file) error on the database at `path`."""
    if isinstance(exc, OSError):
        where = exc.filename or path.parent
        return StateIOError(
            f"cannot write {where}: {exc.strerror or exc}; free some space or fix it, then try again"
        )
    code = _code(exc)
    if code in (_CORRUPT, _NOTADB):
        return StateDamagedError(path, str(exc))
    if _is_busy(exc):
        return StateBusyError(
            f"the state database {path} is still locked by another process after {busy_limit:g}s: "
            f"try again when it has finished (`fuser {path}` shows which)"
        )
    if code in (_FULL, _IOERR):
        cause = "the filesystem holding it is full" if _full(path.parent) else "an I/O error"
        return StateIOError(
            f"cannot write the state database {path} ({exc}): {cause}; free some space in {path.parent} "
            "and try again"
        )
    return StateIOError(f"cannot use the state database {path}: {exc}")


def _full(directory: Path) -> bool:
    import shutil  # with its compression modules: only on this error path

    try:
        return shutil.disk_usage(directory).free < FULL_BELOW
    except OSError:
        return False


class Db:
    """One connection; each statement waits out another process's lock (up to `busy_limit` seconds),
    saying so after a second; with `wait` False a lock raises Busy at once instead."""

    def __init__(self, conn: sqlite3.Connection, path: Path, *, busy_limit: float, wait: bool) -> None:
        self.conn = conn
        self.path = path
        self.busy_limit = busy_limit
        self.wait = wait

    def execute(self, sql: str, params: Any = ()) -> list[sqlite3.Row]:
        start = time.monotonic()
        noticed = False
        while True:
            try:
                return self.conn.execute(sql, params).fetchall()
            except sqlite3.IntegrityError:
                raise
            except sqlite3.Error as exc:
                if _is_busy(exc) and not self.wait:
                    raise Busy(str(self.path)) from None
                left = self.busy_limit - (time.monotonic() - start)
                if not _is_busy(exc) or left <= 0:
                    raise translate(exc, self.path, busy_limit=self.busy_limit) from None
                if not noticed:
                    print(
                        f"agentkernel: waiting for {self.path}: another agentkernel process is using it "
                        f"(up to {self.busy_limit:g}s) ...",
                        file=sys.stderr,
                        flush=True,
                    )
                    noticed = True
                # sqlite's busy handler does the waiting; statements here are single and autocommit,
                # so running one again after SQLITE_BUSY is safe.
                self.conn.execute(f"PRAGMA busy_timeout = {max(1, int(left * 1000))}")


_ready: set[Path] = set()  # databases this process has already set up


def forget(path: Path) -> None:
    """Set `path` up again on its next use (it was renamed away)."""
    _ready.discard(path)


@contextmanager
def connect(path: Path | None = None, *, busy_limit: float = BUSY_LIMIT, wait: bool = True) -> Iterator[Db]:
    """A connection to the database at `path` (the data dir's), made and set up on first use."""
    path = path or db_path()
    first = path not in _ready or not path.exists()
    try:
        if first:  # else SQLite makes it with the umask's mode (and its -wal and -shm files like it)
            paths.open_private(path, "ab").close()
        conn = sqlite3.connect(path, timeout=NOTICE_AFTER if wait else 0, isolation_level=None)
    except (sqlite3.Error, OSError) as exc:
        raise translate(exc, path, busy_limit=busy_limit) from None
    try:
        db = Db(conn, path, busy_limit=busy_limit, wait=wait)
        if first:
            db.execute("PRAGMA journal_mode=WAL")  # kept in the file: once is enough
            db.execute(SCHEMA)
            _ready.add(path)
        conn.row_factory = sqlite3.Row
        yield db
    finally:
        conn.close()


def all_rows(*, wait: bool = True) -> list[dict[str, Any]]:
    """Every row of the table, oldest first (`extra` still a JSON string)."""
    with connect(wait=wait) as db:
        return [dict(r) for r in db.execute("SELECT * FROM sandboxes ORDER BY created_at, name")]


def row(name: str, *, wait: bool = True) -> dict[str, Any] | None:
    """The row of sandbox `name` (`extra` still a JSON string), or None."""
    with connect(wait=wait) as db:
        found = db.execute("SELECT * FROM sandboxes WHERE name = ?", (name,))
    return dict(found[0]) if found else None

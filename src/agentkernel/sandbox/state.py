"""Sandbox records in SQLite under the data dir, safe for concurrent CLI processes.

Every access opens its own short connection (WAL mode, a busy timeout; `db`, which the thin command
line reads too), so separate processes and threads never share one. Names are unique by primary key:
two `create`s of one name cannot both win.

Every sqlite error becomes a StateError naming the file and what to do, never a traceback. A copy of
each record is also kept as records/<name>.json, so `agentkernel doctor --repair` can rebuild a damaged
database from what is on disk.

A record is typed (`SandboxRecord`); this module is its one codec. The columns of the table hold the
fields every sandbox has had from the start; the others are kept as JSON in its `extra` column, so a
new field needs no schema change, a database written by an older release loads (a field it lacks gets
its default) and keys this release does not know are ignored.
"""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args

from agentkernel import paths
from agentkernel.config import PROFILES, Policy
from agentkernel.errors import NoSuchSandboxError, SandboxExistsError, StateDamagedError, StateError
from agentkernel.sandbox import db as database

DB_NAME = database.DB_NAME
RECORDS_DIR = "records"
NOTICE_AFTER = database.NOTICE_AFTER
BUSY_LIMIT = database.BUSY_LIMIT
"""Seconds to wait in all for another process's lock before giving up (see `database.Db`)."""
FULL_BELOW = database.FULL_BELOW
SCHEMA = database.SCHEMA

Status = Literal["created", "starting", "running", "paused", "stopped", "failed"]
STATUSES: tuple[Status, ...] = get_args(Status)
Owner = dict[str, Any]
"""A process, as `service.owners` marks it: its pid and start time."""


@dataclass(frozen=True)
class Mount:
    """A host directory the sandbox sees at `guest`."""

    host: str
    guest: str
    read_only: bool


@dataclass
class SandboxRecord:
    name: str
    backend: str
    image: str
    image_digest: str
    vcpus: int
    memory_mb: int
    profile: str
    status: Status
    pid: int | None
    rundir: str
    created_at: str
    kernel: str = ""
    image_path: str = ""
    image_format: str = "raw"
    policy: Policy | None = None
    """None in records older than policies: the profile's."""
    mounts: tuple[Mount, ...] = ()
    lifetime_s: float | None = None
    deadline: float | None = None
    """When a running sandbox with a lifetime is stopped (seconds since the epoch)."""
    stop_reason: str | None = None
    pool: str | None = None
    """The pool key of a sandbox the pool daemon keeps ready (`template:KEY` while making a template)."""
    owner: Owner | None = None
    """The process the sandbox exists for; None: it persists (see `service.owners`)."""
    starter: Owner | None = None
    """The process starting it, while it is `starting`."""
    secrets: tuple[dict[str, Any], ...] = ()
    """The records of the secret bindings its gateway brokers (placeholders and sources, no values)."""
    restore_from: str | None = None
    """The snapshot directory its next start resumes from (a fork's first start)."""
    snapshot: str | None = None
    """The snapshot it was forked from."""
    env: dict[str, str] = field(default_factory=dict)
    """Set for every command run in it (below what a command sets)."""
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def effective_policy(self) -> Policy:
        """The policy it runs with: its own, or its profile's in a record older than policies."""
        return self.policy if self.policy is not None else PROFILES[self.profile]


COLUMNS = (
    "name", "backend", "image", "image_digest", "vcpus", "memory_mb", "profile", "status", "pid", "rundir",
    "created_at",
)  # fmt: skip
EXTRA = tuple(f.name for f in fields(SandboxRecord) if f.name not in COLUMNS)
"""The fields kept in the `extra` JSON column."""


def to_row(record: SandboxRecord) -> dict[str, Any]:
    """The record as a row of the table (`extra` as a JSON string)."""
    data = {column: getattr(record, column) for column in COLUMNS}
    data["extra"] = json.dumps(extra_of(record))
    return data


def extra_of(record: SandboxRecord) -> dict[str, Any]:
    """The fields of the record kept in `extra`, as JSON data."""
    return {key: _encoded(key, getattr(record, key)) for key in EXTRA}


def from_row(row: Mapping[str, Any]) -> SandboxRecord:
    """The record of a row (or of its records/<name>.json copy, whose `extra` is an object). Raises
    ValueError or TypeError for a row that cannot be one."""
    extra = row["extra"]
    if isinstance(extra, str):
        extra = json.loads(extra)
    if not isinstance(extra, dict):
        raise ValueError("its extra column is not an object")
    if row["status"] not in STATUSES:
        raise ValueError(f"unknown status {row['status']!r}")
    try:
        known = {
            key: _decoded(key, value) for key, value in extra.items() if key in EXTRA and value is not None
        }
    except (AttributeError, KeyError) as exc:  # a field of the wrong shape (labels not an object...)
        raise ValueError(f"a field of its extra column has the wrong shape ({exc})") from None
    return SandboxRecord(**{column: row[column] for column in COLUMNS}, **known)


def _encoded(key: str, value: Any) -> Any:
    if key == "policy":
        return asdict(value) if value is not None else None
    if key == "mounts":
        return [asdict(mount) for mount in value]
    if key == "secrets":
        return list(value)
    return value


def _decoded(key: str, value: Any) -> Any:
    if key == "policy":
        return Policy.from_record(value)
    if key == "mounts":
        return tuple(Mount(str(m["host"]), str(m["guest"]), bool(m["read_only"])) for m in value)
    if key == "secrets":
        return tuple(dict(s) for s in value)
    if key in ("env", "labels"):
        return {str(k): str(v) for k, v in value.items()}
    if key in ("owner", "starter") and not isinstance(value, dict):
        raise TypeError(f"its {key} is not an object ({value!r})")
    if key == "deadline" and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise TypeError(f"its deadline is not a number ({value!r})")
    return value


def db_path() -> Path:
    return database.db_path()


def records_dir() -> Path:
    return paths.data_dir() / RECORDS_DIR


def translate(exc: sqlite3.Error | OSError, path: Path) -> StateError:
    """The StateError for a sqlite (or file) error on the database at `path`."""
    return database.translate(exc, path, busy_limit=BUSY_LIMIT)


@contextmanager
def _db(path: Path | None = None) -> Iterator[database.Db]:
    with database.connect(path, busy_limit=BUSY_LIMIT) as conn:
        yield conn


def _record(row: sqlite3.Row) -> SandboxRecord:
    data = dict(row)
    try:
        return from_row(data)
    except (ValueError, TypeError, KeyError) as exc:
        raise StateDamagedError(db_path(), f"a bad row for {data.get('name')!r}: {exc}") from None


def insert(record: SandboxRecord) -> None:
    data = to_row(record)
    cols = ", ".join(data)
    marks = ", ".join(f":{k}" for k in data)
    with _db() as db:
        try:
            db.execute(f"INSERT INTO sandboxes ({cols}) VALUES ({marks})", data)
        except sqlite3.IntegrityError:
            raise SandboxExistsError(f"a sandbox named '{record.name}' already exists") from None
    _mirror(record)


def get(name: str) -> SandboxRecord:
    with _db() as db:
        rows = db.execute("SELECT * FROM sandboxes WHERE name = ?", (name,))
    if not rows:
        raise NoSuchSandboxError(name)
    return _record(rows[0])


def exists(name: str) -> bool:
    with _db() as db:
        return bool(db.execute("SELECT 1 FROM sandboxes WHERE name = ?", (name,)))


def all_records() -> list[SandboxRecord]:
    with _db() as db:
        rows = db.execute("SELECT * FROM sandboxes ORDER BY created_at, name")
    return [_record(r) for r in rows]


def update(name: str, **changes: Any) -> None:
    """Change fields of a record (by their `SandboxRecord` names). The caller holds the sandbox's lock:
    fields kept in `extra` are read, changed and written back."""
    unknown = set(changes) - set(COLUMNS) - set(EXTRA)
    if unknown:
        raise TypeError(f"not fields of a sandbox record: {', '.join(sorted(unknown))}")
    columns = {key: value for key, value in changes.items() if key in COLUMNS}
    extras = {key: _encoded(key, value) for key, value in changes.items() if key in EXTRA}
    with _db() as db:
        if extras:
            rows = db.execute("SELECT extra FROM sandboxes WHERE name = ?", (name,))
            if rows:
                columns["extra"] = json.dumps({**json.loads(rows[0]["extra"]), **extras})
        if columns:
            sets = ", ".join(f"{k} = :{k}" for k in columns)
            db.execute(f"UPDATE sandboxes SET {sets} WHERE name = :name", {**columns, "name": name})
        rows = db.execute("SELECT * FROM sandboxes WHERE name = ?", (name,))
    if rows:
        _mirror(_record(rows[0]))


def delete(name: str) -> None:
    with _db() as db:
        db.execute("DELETE FROM sandboxes WHERE name = ?", (name,))
    try:
        (records_dir() / f"{name}.json").unlink(missing_ok=True)
    except OSError as exc:
        raise translate(exc, db_path()) from None


def _mirror(record: SandboxRecord) -> None:
    """Keep records/<name>.json in step with the database (names are validated: safe as file names)."""
    directory = records_dir()
    partial: Path | None = None
    try:
        paths.private_dir(directory)
        fd, name = tempfile.mkstemp(prefix=f".{record.name}.", suffix=".partial", dir=directory)
        partial = Path(name)
        data = to_row(record)
        data["extra"] = json.loads(data["extra"])
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        partial.replace(directory / f"{record.name}.json")
    except OSError as exc:
        if partial is not None:
            partial.unlink(missing_ok=True)
        raise translate(exc, db_path()) from None


def mirrored_records() -> tuple[list[SandboxRecord], list[str]]:
    """The records kept beside the database, and a problem line for each copy that cannot be read."""
    records: list[SandboxRecord] = []
    problems: list[str] = []
    directory = records_dir()
    for path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
        try:
            record = from_row(json.loads(path.read_text()))
            if record.name != path.stem:
                raise ValueError("it does not match its file name")
        except (OSError, ValueError, TypeError, KeyError) as exc:
            problems.append(f"{path}: unreadable record copy ({exc})")
            continue
        records.append(record)
    return records, problems


def check(path: Path | None = None) -> str | None:
    """None if the database at `path` is sound, else what is wrong with it."""
    path = path or db_path()
    if not path.exists():
        return None
    try:
        with _db(path) as db:
            rows = db.execute("PRAGMA quick_check")
            names = {r[1] for r in db.execute("PRAGMA table_info(sandboxes)")}
    except StateDamagedError as exc:
        return exc.short
    result = [str(r[0]) for r in rows]
    if result != ["ok"]:
        return f"the state database {path} is damaged: {'; '.join(result)[:300]}"
    missing = {*COLUMNS, "extra"} - names
    if missing:
        return f"the state database {path} lacks columns {', '.join(sorted(missing))}"
    return None


def set_aside(path: Path | None = None) -> Path:
    """Rename the database (and its WAL) to <name>.damaged-<UTC timestamp>; return the new path."""
    path = path or db_path()
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside = path.with_name(f"{path.name}.damaged-{stamp}")
    n = 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}.damaged-{stamp}-{n}")
    path.rename(aside)
    wal = path.with_name(f"{path.name}-wal")
    if wal.exists():
        wal.rename(aside.with_name(f"{aside.name}-wal"))
    path.with_name(f"{path.name}-shm").unlink(missing_ok=True)
    database.forget(path)
    return aside


def restore(records: list[SandboxRecord]) -> None:
    """Insert `records` into the (new) database, replacing any of the same name, and mirror them."""
    with _db() as db:
        for record in records:
            data = to_row(record)
            cols = ", ".join(data)
            marks = ", ".join(f":{k}" for k in data)
            db.execute(f"INSERT OR REPLACE INTO sandboxes ({cols}) VALUES ({marks})", data)
    for record in records:
        _mirror(record)

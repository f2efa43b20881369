"""Sandbox records in SQLite under the data dir, safe for concurrent CLI processes.

Every access opens its own short connection (WAL mode, a busy timeout), so separate processes and
threads never share one. Names are unique by primary key: two `create`s of one name cannot both win.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from agentkernel import paths
from agentkernel.errors import AgentkernelError

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

STATUSES = ("created", "running", "stopped", "failed")


@dataclass
class SandboxRecord:
    name: str
    backend: str
    image: str
    image_digest: str
    vcpus: int
    memory_mb: int
    profile: str
    status: str
    pid: int | None
    rundir: str
    created_at: str
    extra: dict[str, Any] = field(default_factory=dict)

    def public(self) -> dict[str, Any]:
        """The fields shown to users (`list --json`, the API)."""
        data = asdict(self)
        data.pop("rundir")
        data.update(data.pop("extra"))
        return data


class SandboxExistsError(AgentkernelError):
    pass


class NoSuchSandboxError(AgentkernelError):
    def __init__(self, name: str) -> None:
        super().__init__(f"no sandbox named '{name}' (see `agentkernel list`)")


_ready: set[Path] = set()  # databases this process has already set up


@contextmanager
def _db() -> Iterator[sqlite3.Connection]:
    path = paths.data_dir() / "state.db"
    conn = sqlite3.connect(path, timeout=30, isolation_level=None)
    try:
        if path not in _ready or not path.exists():
            conn.execute("PRAGMA journal_mode=WAL")  # kept in the file: once is enough
            conn.execute(SCHEMA)
            _ready.add(path)
        conn.row_factory = sqlite3.Row
        yield conn
    finally:
        conn.close()


def _record(row: sqlite3.Row) -> SandboxRecord:
    data = dict(row)
    data["extra"] = json.loads(data["extra"])
    return SandboxRecord(**data)


def insert(record: SandboxRecord) -> None:
    data = asdict(record)
    data["extra"] = json.dumps(data["extra"])
    cols = ", ".join(data)
    marks = ", ".join(f":{k}" for k in data)
    with _db() as db:
        try:
            db.execute(f"INSERT INTO sandboxes ({cols}) VALUES ({marks})", data)
        except sqlite3.IntegrityError:
            raise SandboxExistsError(f"a sandbox named '{record.name}' already exists") from None


def get(name: str) -> SandboxRecord:
    with _db() as db:
        row = db.execute("SELECT * FROM sandboxes WHERE name = ?", (name,)).fetchone()
    if row is None:
        raise NoSuchSandboxError(name)
    return _record(row)


def exists(name: str) -> bool:
    with _db() as db:
        return db.execute("SELECT 1 FROM sandboxes WHERE name = ?", (name,)).fetchone() is not None


def all_records() -> list[SandboxRecord]:
    with _db() as db:
        rows = db.execute("SELECT * FROM sandboxes ORDER BY created_at, name").fetchall()
    return [_record(r) for r in rows]


def update(name: str, **changes: Any) -> None:
    if "extra" in changes:
        changes["extra"] = json.dumps(changes["extra"])
    sets = ", ".join(f"{k} = :{k}" for k in changes)
    with _db() as db:
        db.execute(f"UPDATE sandboxes SET {sets} WHERE name = :name", {**changes, "name": name})


def delete(name: str) -> None:
    with _db() as db:
        db.execute("DELETE FROM sandboxes WHERE name = ?", (name,))

"""A cache of built artifacts keyed by the hash of their inputs, each entry verified by content hash.

An entry is a directory `cache/<kind>/<key>/` holding the built files and `manifest.json` with the
sha256 of each. An entry whose files do not match their recorded hashes is removed and rebuilt, never
used. Entries are built in a scratch directory and renamed into place, so a failed or interrupted
build leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from agentkernel import paths
from agentkernel.artifacts.run import warn

MANIFEST = "manifest.json"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def key_of(parts: Iterable[str | bytes]) -> str:
    """A cache key from the inputs of a build (each part length-prefixed, so parts cannot run together)."""
    digest = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        digest.update(len(data).to_bytes(8, "big") + data)
    return digest.hexdigest()[:32]


def lookup(kind: str, key: str) -> Path | None:
    """The verified entry for `key`, or None (a corrupted entry is removed with a warning)."""
    entry = paths.cache_dir() / kind / key
    if not entry.is_dir():
        return None
    if verify(entry):
        return entry
    warn(f"cached {kind} {key} is corrupted (hash mismatch): rebuilding it")
    shutil.rmtree(entry, ignore_errors=True)
    return None


def verify(entry: Path) -> bool:
    try:
        recorded: dict[str, str] = json.loads((entry / MANIFEST).read_text())["files"]
        return bool(recorded) and all(sha256_file(entry / name) == h for name, h in recorded.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def store(kind: str, key: str, build: Callable[[Path], None]) -> Path:
    """Run `build(scratch_dir)`, record the hashes of what it made, and move it into the cache."""
    parent = paths.private_dir(paths.cache_dir() / kind)
    scratch = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=parent))
    try:
        build(scratch)
        files = {p.name: sha256_file(p) for p in sorted(scratch.iterdir()) if p.is_file()}
        for name in files:  # builds copy modes from their trees (vmlinux 0755): the owner's only
            path = scratch / name
            path.chmod(path.stat().st_mode & 0o700)
        paths.write_private(scratch / MANIFEST, json.dumps({"key": key, "files": files}, indent=2))
        entry = parent / key
        shutil.rmtree(entry, ignore_errors=True)
        scratch.rename(entry)
        return entry
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def get_or_build(kind: str, key: str, build: Callable[[Path], None]) -> tuple[Path, bool]:
    """The entry for `key` and whether it was built now (False: taken from the cache)."""
    entry = lookup(kind, key)
    if entry is not None:
        return entry, False
    return store(kind, key, build), True


def set_current(kind: str, key: str) -> None:
    """Record `key` as the entry of `kind` that sandboxes use (written atomically)."""
    pointer = paths.cache_dir() / kind / "current"
    tmp = pointer.with_suffix(".tmp")
    paths.write_private(tmp, key)
    tmp.replace(pointer)


def current(kind: str, filename: str) -> Path | None:
    """The file `filename` of the current entry of `kind`, or None if there is none (not re-verified)."""
    try:
        key = (paths.cache_dir() / kind / "current").read_text().strip()
    except OSError:
        return None
    path = paths.cache_dir() / kind / key / filename
    return path if path.is_file() else None

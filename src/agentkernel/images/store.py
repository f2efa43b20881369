"""The image store: content-addressed ext4 files with names pointing at them.

    images/<sha256>/rootfs.ext4   the image (mode 0444, sparse)
    images/<sha256>/image.json    its ImageRecord (mode 0444)
    images/refs/<quoted name>     the sha256 the name points to

Images are made in scratch() (under paths.tmp_dir(), on the same filesystem) and renamed into place,
so a crash leaves no half image; changes to refs and blobs happen under one lock file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import re
import shutil
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote, unquote

from agentkernel import paths
from agentkernel.artifacts.cache import sha256_file
from agentkernel.artifacts.run import warn
from agentkernel.errors import AgentkernelError, CorruptImageError
from agentkernel.images import builddir
from agentkernel.images.model import Image, ImageConfig, ImageRecord

ROOTFS = "rootfs.ext4"
RECORD = "image.json"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]*(/[A-Za-z0-9][A-Za-z0-9._:@-]*)*")
HOLD_PREFIX = "sandbox/"  # names that keep images alive for the sandboxes that use them
SHA256 = re.compile(r"[0-9a-f]{64}")


def check_name(name: str) -> str:
    """`name` if it is a valid image name (like `python`, `myimg:latest`, `host:5000/team/app:1`)."""
    if len(name) > 255 or not NAME.fullmatch(name):
        raise AgentkernelError(
            f"invalid image name {name!r}: use letters, digits and . _ - : @, with / between parts"
        )
    return name


@contextlib.contextmanager
def scratch() -> Iterator[Path]:
    """A directory for making an image, removed afterwards whatever happens, even when this process
    is killed (builddir cleans up after dead builders)."""
    with builddir.build_dir() as path:
        yield path


def add(
    ext4: Path,
    name: str,
    *,
    source: str,
    recipe_key: str | None = None,
    config: ImageConfig | None = None,
) -> Image:
    """Store `ext4` (moved, not copied: make it in scratch()) and point `name` at it."""
    check_name(name)
    digest = sha256_file(ext4)
    record = ImageRecord(
        digest=digest,
        size_bytes=ext4.stat().st_size,
        created_at=datetime.now(UTC),
        source=source,
        recipe_key=recipe_key,
        config=config or ImageConfig(),
    )
    with _locked():
        blob = _images() / digest
        if not _intact(blob, digest):
            _put_blob(ext4, record, blob)
        ext4.unlink(missing_ok=True)
        previous = _points_to(name)
        _write_ref(name, digest)
        _collect(previous)
    return get(name)


def tag(name: str, new_name: str) -> Image:
    """Point `new_name` at the image `name` points to. A name keeps its image alive: a sandbox that
    must outlive a rebuild or removal of its image holds a name of its own (like `sandbox/ID`)."""
    check_name(new_name)
    with _locked():
        digest = _read_ref(name)
        previous = _points_to(new_name)
        _write_ref(new_name, digest)
        _collect(previous)
    return get(new_name)


def hold(name: str, sandbox: str) -> Image:
    """Keep the image `name` alive for a sandbox, whatever later happens to `name` (rebuild, removal)."""
    return tag(name, HOLD_PREFIX + sandbox)


def release(sandbox: str) -> None:
    """Drop a sandbox's hold; its image goes if no other name refers to it."""
    with contextlib.suppress(AgentkernelError):
        remove(HOLD_PREFIX + sandbox)


def get(name: str) -> Image:
    """The image called `name` (its file is not re-hashed: see verify)."""
    digest = _read_ref(name)
    blob = _images() / digest
    try:
        record = ImageRecord.from_json((blob / RECORD).read_bytes())
    except (OSError, ValueError):
        raise CorruptImageError(
            f"image {name} is damaged (its record is missing or unreadable): {_fix(name)}"
        ) from None
    return Image(**vars(record), name=name, path=blob / ROOTFS)


def list_images() -> list[Image]:
    """All named images, sorted by name; damaged ones are left out with a warning."""
    images = []
    for name in names():
        if name.startswith(HOLD_PREFIX):
            continue
        try:
            images.append(get(name))
        except AgentkernelError as exc:
            warn(str(exc))
    return images


def names() -> list[str]:
    return sorted(unquote(p.name) for p in _refs().iterdir() if not p.name.startswith("."))


def verify(name: str) -> Image:
    """The image called `name` after a full hash check, or CorruptImageError."""
    image = get(name)
    try:
        actual = sha256_file(image.path)
    except OSError:
        raise CorruptImageError(f"image {name} is damaged (its file is missing): {_fix(name)}") from None
    if actual != image.digest:
        raise CorruptImageError(f"image {name} is corrupted (sha256 mismatch): {_fix(name)}")
    return image


def remove(name: str) -> None:
    """Remove the name, and the image itself when no other name points to it."""
    with _locked():
        digest = _read_ref(name)
        _ref_path(name).unlink()
        _collect(digest)


def _collect(digest: str | None) -> None:
    """Delete the image `digest` if no name points to it any more (call with the lock held)."""
    if digest and all(_points_to(other) != digest for other in names()):
        shutil.rmtree(_images() / digest, ignore_errors=True)


def _put_blob(ext4: Path, record: ImageRecord, blob: Path) -> None:
    with scratch() as tmp:
        made = tmp / record.digest
        made.mkdir(mode=0o700)
        _move_sparse(ext4, made / ROOTFS)
        paths.write_private(made / RECORD, record.to_json() + "\n")
        for path in (made / ROOTFS, made / RECORD):
            path.chmod(0o400)  # read-only, and its owner's only
        if blob.exists():  # a damaged copy: move it aside first, a directory cannot be renamed over
            blob.rename(tmp / "damaged")
        made.rename(blob)


def _move_sparse(src: Path, dest: Path) -> None:
    try:
        src.rename(dest)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        subprocess.run(["cp", "--sparse=always", src, dest], check=True, umask=paths.PRIVATE_UMASK)


def _intact(blob: Path, digest: str) -> bool:
    try:
        return ImageRecord.from_json((blob / RECORD).read_bytes()).digest == digest and (
            sha256_file(blob / ROOTFS) == digest
        )
    except (OSError, ValueError):
        return False


def _read_ref(name: str) -> str:
    try:
        digest = _ref_path(name).read_text().strip()
    except FileNotFoundError:
        raise AgentkernelError(
            f"no image named {name}: run `agentkernel setup` or `agentkernel image build/pull`"
        ) from None
    if not SHA256.fullmatch(digest):
        raise CorruptImageError(f"image {name} is damaged (its ref is unreadable): {_fix(name)}")
    return digest


def _points_to(name: str) -> str | None:
    try:
        return _read_ref(name)
    except AgentkernelError:
        return None


def _write_ref(name: str, digest: str) -> None:
    ref = _ref_path(name)
    partial = ref.with_name(f".{ref.name}.partial")
    paths.write_private(partial, digest + "\n")
    partial.replace(ref)


def _ref_path(name: str) -> Path:
    return _refs() / quote(check_name(name), safe="")


def _fix(name: str) -> str:
    return f"run `agentkernel setup` to rebuild it, or `agentkernel image rm {name}`"


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    with paths.open_private(_images() / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _images() -> Path:
    return paths.images_dir()


def _refs() -> Path:
    return paths.private_dir(_images() / "refs")

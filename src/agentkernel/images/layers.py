"""Applying one image layer (a tar stream) onto a root tree, with OCI whiteouts.

A layer is untrusted input. Member names with `..` or a leading `/` are refused; every other path is
resolved inside the root as a chroot would (see safepath), so symlinks from this or earlier layers
cannot lead a write outside it. Whiteouts act on lower layers only: `.wh.NAME` deletes NAME and
`.wh..wh..opq` empties its directory, but entries this layer adds stay, wherever they sit in the tar.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tarfile
from pathlib import Path
from typing import IO

from agentkernel.errors import AgentkernelError
from agentkernel.images.safepath import resolve_in_root, split

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
XATTR = "SCHILY.xattr."


class _Layer:
    def __init__(self, tar: tarfile.TarFile, root: Path, label: str) -> None:
        self.tar = tar
        self.root = root
        self.label = label
        self.added: set[str] = set()
        """Root-relative paths this layer created, with their ancestors: whiteouts spare them."""
        self.as_root = os.geteuid() == 0

    def apply(self, member: tarfile.TarInfo) -> None:
        parts = self._parts(member.name)
        if not parts:
            return  # the root directory itself
        parent = resolve_in_root(self.root, "/".join(parts[:-1]), follow_last=True)
        base = parts[-1]
        if base == OPAQUE:
            self._mark(parent)
            if parent.is_dir() and not parent.is_symlink():
                self._prune(parent)
        elif base.startswith(WHITEOUT):
            name = base[len(WHITEOUT) :]
            if name in ("", ".", ".."):
                raise AgentkernelError(f"{self.label}: refusing whiteout '{member.name}'")
            hidden = parent / name
            if self._rel(hidden) not in self.added and os.path.lexists(hidden):
                _remove(hidden)
        else:
            self._create(member, parent, parent / base)

    def _create(self, member: tarfile.TarInfo, parent: Path, target: Path) -> None:
        parent.mkdir(parents=True, exist_ok=True)
        self._mark(target)
        if member.isdir():
            if os.path.lexists(target) and not (target.is_dir() and not target.is_symlink()):
                _remove(target)
            target.mkdir(exist_ok=True)
        else:
            if os.path.lexists(target):
                _remove(target)
            if member.islnk():
                self._hardlink(member, target)
                return
            if not self._make(member, target):
                return
        self._set_metadata(member, target)

    def _make(self, member: tarfile.TarInfo, target: Path) -> bool:
        """Create a non-directory entry; False when it is skipped (devices without privilege)."""
        if member.isreg():
            source = self.tar.extractfile(member)
            assert source is not None  # a regular member always has content
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as out:
                shutil.copyfileobj(source, out, 1 << 20)
        elif member.issym():
            os.symlink(member.linkname, target)
        elif member.isfifo():
            os.mkfifo(target, 0o600)
        elif member.ischr() or member.isblk():
            kind = 0o020000 if member.ischr() else 0o060000
            try:
                os.mknod(target, kind | 0o600, os.makedev(member.devmajor, member.devminor))
            except PermissionError:
                return False
        else:
            return False
        return True

    def _hardlink(self, member: tarfile.TarInfo, target: Path) -> None:
        parts = self._parts(member.linkname)
        if not parts:
            raise AgentkernelError(f"{self.label}: hardlink '{member.name}' points to the root directory")
        source = resolve_in_root(self.root, "/".join(parts[:-1]), follow_last=True) / parts[-1]
        if not os.path.lexists(source) or (source.is_dir() and not source.is_symlink()):
            raise AgentkernelError(
                f"{self.label}: hardlink '{member.name}' points to '{member.linkname}', which is not a file"
            )
        os.link(source, target, follow_symlinks=False)

    def _set_metadata(self, member: tarfile.TarInfo, target: Path) -> None:
        # Order matters: chown clears setuid bits and file capabilities, so it goes first.
        if self.as_root:
            os.chown(target, member.uid, member.gid, follow_symlinks=False)
        for key, value in member.pax_headers.items():
            if key.startswith(XATTR):
                # Best effort: the host filesystem may not take every namespace.
                with contextlib.suppress(OSError):
                    name, data = key[len(XATTR) :], value.encode("utf-8", "surrogateescape")
                    os.setxattr(target, name, data, follow_symlinks=False)
        if not member.issym():
            os.chmod(target, member.mode & 0o7777)
        os.utime(target, (member.mtime, member.mtime), follow_symlinks=False)

    def _prune(self, directory: Path) -> None:
        """Delete what lower layers put under `directory`, keeping this layer's entries."""
        for child in directory.iterdir():
            if self._rel(child) not in self.added:
                _remove(child)
            elif child.is_dir() and not child.is_symlink():
                self._prune(child)

    def _mark(self, path: Path) -> None:
        rel = Path(self._rel(path))
        self.added.update(p.as_posix() for p in (rel, *rel.parents) if p != Path("."))

    def _rel(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def _parts(self, name: str) -> list[str]:
        if name.startswith("/") or ".." in name.split("/"):
            raise AgentkernelError(f"{self.label}: refusing '{name}': it points outside the image root")
        return split(name)


def apply_layer(stream: IO[bytes], root: Path, label: str) -> None:
    """Extract the tar `stream` (uncompressed, gzip, bzip2 or xz) onto `root`."""
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            layer = _Layer(tar, root, label)
            for member in tar:
                try:
                    layer.apply(member)
                except OSError as exc:
                    raise AgentkernelError(
                        f"{label}: cannot unpack '{member.name}': {exc.strerror or exc}"
                    ) from None
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise AgentkernelError(f"{label} is not a readable tar archive: {exc}") from None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()

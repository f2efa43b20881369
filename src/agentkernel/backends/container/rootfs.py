"""An image as a directory tree, for container engines: extracted once per image digest, then shared.

Our images are ext4 files. `debugfs rdump` copies the tree out without mounting anything (no loop
device, no root-only mount), but it loses some metadata: sticky and set-id bits, FIFOs, hard links
(each becomes a copy). So a second debugfs run lists every directory (`ls -p`: inode, mode, owner,
size of each entry), and that listing is applied to the tree and then checked against it: modes with
all 12 permission bits, owners, sizes, symlinks, FIFOs and hard links are as in the image, or the
extraction fails. Device nodes are left out (a container runtime gives the container its own /dev);
extended attributes (file capabilities, which no-new-privileges voids anyway) are not copied.

The tree is made in a scratch directory and renamed into place, so a tree that exists is complete.
Containers never write to it: podman mounts it as the lower layer of a per-container overlay. For
containers in a user namespace whose root is host uid U (and gid G), the tree's owners are shifted by
U and G (a tree of its own per shift), so that inside the container they are the image's again.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from agentkernel import paths
from agentkernel.artifacts.cache import sha256_file
from agentkernel.artifacts.run import require
from agentkernel.errors import AgentkernelError

ENTRY = re.compile(rb"/(\d+)/(\d+)/(\d+)/(\d+)/([^/]*)/([^/]*)/")
ECHO = b"debugfs: "
SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Entry:
    path: str  # relative to the tree's root, like "etc/passwd"
    inode: int
    mode: int  # st_mode: type and permission bits
    uid: int
    gid: int
    size: int  # regular files: bytes; symlinks: the target's length


def rootfs_dir() -> Path:
    return paths.private_dir(paths.cache_dir() / "rootfs")


def image_digest(image: Path) -> str:
    """The image's sha256: its store directory's name, or (outside the store) its content's."""
    name = image.parent.name
    return name if SHA256.fullmatch(name) else sha256_file(image)


def ensure_tree(image: Path, *, shift: tuple[int, int] = (0, 0)) -> Path:
    """The image's tree, extracted now if it is not yet (concurrent callers each get a whole tree),
    its owners' uids and gids moved up by `shift`."""
    digest = image_digest(image)
    dest = rootfs_dir() / (digest if shift == (0, 0) else f"{digest}-{shift[0]}-{shift[1]}")
    if dest.is_dir():
        return dest
    scratch = Path(tempfile.mkdtemp(prefix="extract-", dir=rootfs_dir()))
    try:
        tree = scratch / "tree"
        extract(image, tree, shift=shift)
        with contextlib.suppress(FileExistsError, OSError):
            tree.rename(dest)  # fails if another process got there first: theirs is as good
        if not dest.is_dir():
            raise AgentkernelError(f"cannot put the extracted image at {dest}")
    finally:
        _remove(scratch)
    return dest


def _remove(path: Path) -> None:
    # rdump leaves directories without write permission for their owner: root ignores that anyway.
    shutil.rmtree(path, ignore_errors=True)


def extract(image: Path, tree: Path, *, shift: tuple[int, int] = (0, 0)) -> list[Entry]:
    """Copy the image's tree to `tree` (which must not exist) with its metadata, owners moved up by
    `shift` (the root directory's too: root's in the image); the entries checked."""
    debugfs = require("debugfs", "e2fsprogs")
    tree.mkdir(mode=0o755)
    _debugfs(debugfs, image, [f'rdump "/" "{_quoted(str(tree))}"'])
    entries = list_image(debugfs, image, _directories(tree))
    apply(tree, entries, shift=shift)
    if shift != (0, 0):
        os.lchown(tree, *shift)
    problems = verify(tree, entries, shift=shift)
    if problems:
        shown = "; ".join(problems[:5])
        raise AgentkernelError(
            f"extracting {image} gave a tree unlike the image ({len(problems)} problems): {shown}"
        )
    return entries


def _directories(tree: Path) -> list[str]:
    found = [""]
    for root, dirs, _files in os.walk(tree):
        rel = os.path.relpath(root, tree)
        found += [d if rel == "." else f"{rel}/{d}" for d in dirs]
    return found


def _quoted(path: str) -> str:
    """A path as a debugfs argument in double quotes; names it cannot quote are refused."""
    if any(c in path for c in '"\\\n\r'):
        raise AgentkernelError(f"cannot extract a path debugfs cannot quote: {path!r}")
    return path


def _debugfs(debugfs: str, image: Path, commands: list[str]) -> bytes:
    with tempfile.NamedTemporaryFile("wb", suffix=".cmds") as cmds:
        cmds.write(b"".join(os.fsencode(c) + b"\n" for c in commands))
        cmds.flush()
        proc = subprocess.run(
            [debugfs, "-f", cmds.name, str(image)], capture_output=True, stdin=subprocess.DEVNULL
        )
    if proc.returncode != 0:
        detail = proc.stderr.decode(errors="replace").strip()[-500:]
        raise AgentkernelError(f"debugfs failed on {image}: {detail}")
    return proc.stdout


def list_image(debugfs: str, image: Path, directories: list[str]) -> list[Entry]:
    """Every entry of the given directories (paths relative to the root), as the image records it."""
    out = _debugfs(debugfs, image, [f'ls -p "/{_quoted(d)}"' for d in directories])
    entries: list[Entry] = []
    current: str | None = None
    pending = list(directories)
    for line in out.splitlines():
        if line.startswith(ECHO):
            current = pending.pop(0)
            continue
        if not line.strip():
            continue
        match = ENTRY.fullmatch(line)
        if match is None or current is None:
            raise AgentkernelError(f"cannot parse the listing of {image}: {line[:100]!r}")
        name = os.fsdecode(match[5])
        if name in (".", ".."):
            continue
        mode = int(match[2], 8)
        size = int(match[6]) if match[6].isdigit() else 0
        path = f"{current}/{name}" if current else name
        entries.append(Entry(path, int(match[1]), mode, int(match[3]), int(match[4]), size))
    if pending:
        raise AgentkernelError(
            f"debugfs listed {len(directories) - len(pending)} of {len(directories)} directories"
        )
    return entries


def apply(tree: Path, entries: list[Entry], *, shift: tuple[int, int] = (0, 0)) -> None:
    """Owners (moved up by `shift`), full modes, FIFOs and hard links from the listing (rdump made
    the rest)."""
    first_of: dict[int, Path] = {}
    as_root = os.geteuid() == 0
    for e in entries:
        path = tree / e.path
        kind = stat.S_IFMT(e.mode)
        if kind == stat.S_IFREG:
            first = first_of.setdefault(e.inode, path)
            if first != path:  # another name of a file already there: a hard link, not a copy
                path.unlink()
                os.link(first, path)
                continue
        elif kind == stat.S_IFIFO:
            os.mkfifo(path)
        elif kind not in (stat.S_IFDIR, stat.S_IFLNK):
            continue  # devices and sockets: see the module's docstring
        if as_root:
            os.lchown(path, e.uid + shift[0], e.gid + shift[1])  # before chmod: chown clears set-id bits
        if kind != stat.S_IFLNK:
            os.chmod(path, stat.S_IMODE(e.mode))


def verify(tree: Path, entries: list[Entry], *, shift: tuple[int, int] = (0, 0)) -> list[str]:
    """How the tree differs from the listing with its owners moved up by `shift` (empty when it matches)."""
    problems = []
    as_root = os.geteuid() == 0
    for e in entries:
        kind = stat.S_IFMT(e.mode)
        if kind not in (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFIFO):
            continue
        try:
            st = (tree / e.path).lstat()
        except OSError as exc:
            problems.append(f"{e.path}: {exc.strerror}")
            continue
        if stat.S_IFMT(st.st_mode) != kind:
            problems.append(f"{e.path}: type {stat.S_IFMT(st.st_mode):o}, not {kind:o}")
        elif kind != stat.S_IFLNK and stat.S_IMODE(st.st_mode) != stat.S_IMODE(e.mode):
            problems.append(f"{e.path}: mode {stat.S_IMODE(st.st_mode):o}, not {stat.S_IMODE(e.mode):o}")
        elif as_root and (st.st_uid, st.st_gid) != (owner := (e.uid + shift[0], e.gid + shift[1])):
            problems.append(f"{e.path}: owner {st.st_uid}:{st.st_gid}, not {owner[0]}:{owner[1]}")
        elif kind in (stat.S_IFREG, stat.S_IFLNK) and st.st_size != e.size:
            problems.append(f"{e.path}: size {st.st_size}, not {e.size}")
    return problems


def tree_digest(tree: Path) -> str:
    """A digest of a tree's names, types, modes, owners and contents (for tests: the cache is unchanged)."""
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(tree):
        dirs.sort()
        for name in sorted(dirs + files):
            path = Path(root) / name
            st = path.lstat()
            digest.update(f"{path.relative_to(tree)}\0{st.st_mode:o}\0{st.st_uid}\0{st.st_gid}\0".encode())
            if stat.S_ISREG(st.st_mode):
                digest.update(sha256_file(path).encode())
            elif stat.S_ISLNK(st.st_mode):
                digest.update(os.fsencode(os.readlink(path)))
    return digest.hexdigest()

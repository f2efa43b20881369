"""Turning a root tree into the ext4 file a sandbox boots from, with the guest agent as its init.

The file is sparse and sized to the content plus headroom: each sandbox writes through its own
copy-on-write overlay on top of it, so the headroom is the guest's free space and costs no disk until
the guest writes. mkfs.ext4 -d fills it from a directory, so no loop mount (and no root) is needed.

The journal stays: the overlay is a sandbox's working disk and outlives the VM process, and a killed VM
must come back to a consistent filesystem. `lazy_journal_init` leaves its blocks as holes (reads of a
hole give zeros, which is what a fresh journal needs), so it costs nothing on disk; inode tables are
zeroed the same way (punched holes) at mkfs time, so no guest ever zeroes them into its overlay.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

from agentkernel.artifacts.run import require, run
from agentkernel.errors import AgentkernelError
from agentkernel.images.progress import BuildProgress
from agentkernel.images.safepath import resolve_in_root

FORMAT = "ext4-v2"  # v2: /mnt exists (host home is mounted there)
"""Names the layout and mkfs options below; part of recipe cache keys, so changing them rebuilds."""

AGENT_PATH = "sbin/agentkernel-agent"
MOUNT_POINTS = {
    "proc": 0o555,
    "sys": 0o555,
    "dev": 0o755,
    "tmp": 0o1777,
    "run": 0o755,
    "workspace": 0o755,
    "mnt": 0o755,
}
BLOCK = 4096
MIB = 1 << 20
MIN_HEADROOM = 256 * MIB
JOURNAL_MIB = 64
INODE_BYTES = 256


def build(
    tree: Path, agent: Path, out: Path, *, log: Path, in_place: bool, progress: BuildProgress | None = None
) -> None:
    """Write the ext4 image of `tree` with `agent` installed to `out` (which must not exist).

    With `in_place` the agent and mount points are added to `tree` itself (a scratch tree of ours);
    otherwise `tree` is copied to a staging directory beside `out` first and left untouched, and
    `progress` is told when the copy is done.
    """
    if not agent.is_file():
        raise AgentkernelError(f"the guest agent binary {agent} does not exist: build it first")
    if in_place:
        _finish(tree, agent, out, log)
        return
    staging = out.with_name(out.name + ".staging")
    staging.mkdir()
    try:
        run(["cp", "-a", "--reflink=auto", f"{tree}/.", staging], log=log, what=f"copying {tree}")
        if progress is not None:
            progress.stage("ext4 image")
        _finish(staging, agent, out, log)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _finish(root: Path, agent: Path, out: Path, log: Path) -> None:
    try:
        install_agent(root, agent)
        ensure_mount_points(root)
    except OSError as exc:  # a tree from elsewhere can be odd in many ways: say so in one line
        raise AgentkernelError(f"cannot prepare the image tree: {exc}") from None
    make_ext4(root, out, log=log)


def install_agent(root: Path, agent: Path) -> None:
    """Put `agent` at /sbin/agentkernel-agent (mode 0755, root-owned), replacing whatever is there."""
    target = resolve_in_root(root, AGENT_PATH, follow_last=False)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    for path in (target, partial):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
    partial.unlink(missing_ok=True)
    shutil.copyfile(agent, partial)
    if os.geteuid() == 0:
        os.chown(partial, 0, 0)
    partial.chmod(0o755)
    partial.replace(target)


def ensure_mount_points(root: Path) -> None:
    """Create the directories the agent mounts over (and /etc), following in-image symlinks."""
    for name, mode in (*MOUNT_POINTS.items(), ("etc", 0o755)):
        path = resolve_in_root(root, name, follow_last=True)
        if path.is_dir():
            continue
        if os.path.lexists(path):
            raise AgentkernelError(f"the image's /{name} is not a directory")
        path.mkdir(parents=True)
        path.chmod(mode)


def make_ext4(root: Path, out: Path, *, log: Path) -> None:
    """mkfs.ext4 -d `root` into a new sparse file `out` sized by `image_size`."""
    mkfs = require("mkfs.ext4", "e2fsprogs")
    size, inodes = image_size(root)
    with out.open("xb") as f:
        f.truncate(size)
    run(
        [
            mkfs, "-q", "-F", "-L", "agentkernel",
            "-T", "default", "-b", str(BLOCK), "-I", str(INODE_BYTES),  # small sizes would get 1K blocks
            "-m", "0",  # no blocks reserved for root: the headroom is all the guest's
            "-N", str(inodes),
            "-J", f"size={JOURNAL_MIB}",
            "-E", "lazy_itable_init=0,lazy_journal_init=1",
            "-d", root, out,
        ],
        log=log,
        what="mkfs.ext4",
    )  # fmt: skip


def image_size(root: Path) -> tuple[int, int]:
    """The file size (bytes) and inode count for `root`: its content, then as much again (at least
    MIN_HEADROOM) for the guest to write, and inodes for as many files again (at least one per 8 KiB)."""
    blocks, entries = _usage(root)
    content = blocks * BLOCK
    headroom = max(MIN_HEADROOM, content // 2)
    inodes = max(2 * entries, (content + headroom) // (2 * BLOCK))
    size = content + headroom + inodes * INODE_BYTES + JOURNAL_MIB * MIB
    return -(-size // MIB) * MIB, inodes


def _usage(root: Path) -> tuple[int, int]:
    """ext4 blocks the tree's content takes (an upper bound) and the number of its entries."""
    blocks = 1
    entries = 1
    seen: set[tuple[int, int]] = set()
    for directory, dirs, files in os.walk(root):
        for name in (*dirs, *files):
            st = os.lstat(os.path.join(directory, name))
            entries += 1
            if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
            if stat.S_ISLNK(st.st_mode) and st.st_size < 60:
                continue  # a fast symlink lives in its inode
            blocks += max(1, -(-st.st_size // BLOCK))
    return blocks, entries

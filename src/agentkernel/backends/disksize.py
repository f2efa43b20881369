"""A sandbox's writable root disk at the size `[resources] disk_mb` asks for.

Images are ext4 filesystems made as small as their files allow. A larger disk is the image's
filesystem grown offline, before the first boot, with e2fsprogs on a raw copy: the file is extended
with `truncate` and `resize2fs` fills it (what it writes is a few MiB of group descriptors and
bitmaps). Firecracker boots that copy; QEMU keeps only what resize2fs changed, as a qcow2 layer over
the image (backends/qemu).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from agentkernel.artifacts.run import require
from agentkernel.backends.base import VMSpec
from agentkernel.errors import AgentkernelError

MIB = 1 << 20


def target_size(spec: VMSpec, image_size: int) -> int | None:
    """The size in bytes `spec`'s writable disk must grow to from the image's `image_size`; None when
    it stays the image's: no size asked for, the image's own, or a read-only root (which has no
    writable disk: its writes go to a tmpfs). A size below the image's is refused."""
    if spec.disk_mb is None or spec.read_only:
        return None
    size = spec.disk_mb * MIB
    if size < image_size:
        raise AgentkernelError(
            f"cannot create the sandbox disk: disk_mb {spec.disk_mb} is less than its image's "
            f"{-(-image_size // MIB)} MiB"
        )
    return size if size > image_size else None


def grow_ext4(raw: Path, size: int) -> None:
    """Extend the raw ext4 file `raw` to `size` bytes and its filesystem to fill it."""
    resize2fs = require("resize2fs", "e2fsprogs")
    os.truncate(raw, size)
    proc = subprocess.run([resize2fs, str(raw)], capture_output=True, text=True)
    if proc.returncode != 0:
        detail = " ".join((proc.stderr or proc.stdout).split())[:300]
        raise AgentkernelError(f"cannot grow the sandbox disk to {size // MIB} MiB: {detail}")

"""The free-space floor under sandbox disks, checked before a sandbox boots.

A QEMU sandbox's disk is reserved whole on the host when the sandbox is created (backends/qemu/backend.py),
so a host disk that fills up later cannot make its writes fail. What still grows on the host while
sandboxes run is the host's own: console logs, records, the audit log, snapshots, and the disks of
sandboxes on other backends. `start` refuses to boot below a floor so that these keep room.

The floor, in MiB: $AGENTKERNEL_MIN_FREE_DISK_MB, else `[resources] min_free_disk_mb` of the
agentkernel.toml found from the current directory, else DEFAULT_FLOOR_MB.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from agentkernel.config import load_config
from agentkernel.errors import AgentkernelError

ENV = "AGENTKERNEL_MIN_FREE_DISK_MB"
DEFAULT_FLOOR_MB = 256
MIB = 1 << 20


def floor_mb() -> int:
    raw = os.environ.get(ENV)
    if raw is None:
        configured = load_config(search_from=Path.cwd())[0].resources.min_free_disk_mb
        return DEFAULT_FLOOR_MB if configured is None else configured
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise AgentkernelError(f"${ENV} must be a whole number of MiB, 0 or more (got {raw!r})")
    return value


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer can still use on the filesystem of `path` (or of its nearest
    existing parent: a sandbox's directory may not exist yet)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def check_floor(path: Path) -> None:
    """Raise unless the filesystem of `path` has at least the floor free."""
    floor = floor_mb()
    free = free_bytes(path)
    if free < floor * MIB:
        raise AgentkernelError(
            f"not enough free disk space to start a sandbox: {free // MIB} MiB free in {path}, "
            f"{floor} MiB needed (resources.min_free_disk_mb in agentkernel.toml, or ${ENV})"
        )

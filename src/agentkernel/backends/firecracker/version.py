"""Which Firecracker release runs here, read once per binary, and the oldest one the backend takes.

Kept apart from the backend (no HTTP client, no network code) so that the pool key and `status`
can ask cheaply.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess

from agentkernel.backends.base import tail_line
from agentkernel.errors import AgentkernelError

MIN_VERSION = (1, 16, 1)
"""The oldest Firecracker release the backend runs with. Every fork sends `vsock_override` in
PUT /snapshot/load, which releases before 1.16.0 refuse (HTTP 400), and 1.16.1 fixes vsock
connections that time out after a restore: on 1.16.0 forks would start, then hang at random."""
VERSION_TIMEOUT = 10.0


def version(binary: str) -> str:
    """The release of `binary` as `firecracker --version` prints it ("1.16.1"), run once per binary
    file (path, inode, size and mtime): every sandbox start and pool key asks."""
    try:
        info = os.stat(binary)
    except OSError as exc:
        raise AgentkernelError(f"cannot read the firecracker binary {binary}: {exc.strerror}") from None
    return _version_of(binary, info.st_ino, info.st_size, info.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _version_of(binary: str, _inode: int, _size: int, _mtime_ns: int) -> str:
    try:
        proc = subprocess.run(
            [binary, "--version"], stdin=subprocess.DEVNULL, capture_output=True, timeout=VERSION_TIMEOUT
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise AgentkernelError(f"cannot run `{binary} --version`: {exc}") from None
    first = (proc.stdout.decode(errors="replace").strip().splitlines() or [""])[0].strip()
    found = re.fullmatch(r"Firecracker v(\d+\.\d+\.\d+\S*)", first)
    if proc.returncode != 0 or found is None:
        shown = first[:100] or tail_line(proc.stderr.decode(errors="replace"))[:200] or "nothing"
        raise AgentkernelError(
            f"cannot tell the version of {binary}: `--version` printed {shown!r}, not 'Firecracker vX.Y.Z'"
        )
    return found.group(1)


def version_tuple(release: str) -> tuple[int, int, int]:
    """(major, minor, patch) of "1.16.1" or "1.17.0-dev"."""
    major, minor, patch = re.findall(r"\d+", release)[:3]
    return int(major), int(minor), int(patch)


def check_version(binary: str) -> str:
    """The binary's release, or one line naming the release found and the one needed."""
    found = version(binary)
    if version_tuple(found) < MIN_VERSION:
        needed = ".".join(map(str, MIN_VERSION))
        raise AgentkernelError(
            f"{binary} is Firecracker {found}; the firecracker backend needs {needed} or newer "
            "(forks need vsock_override in snapshot loads, from 1.16.0, and 1.16.1's fix of vsock "
            "timeouts after a restore)"
        )
    return found


def installed_version() -> str | None:
    """The release of the firecracker on PATH, None when there is none or it does not say; never
    fails (for the pool key and status)."""
    binary = shutil.which("firecracker")
    if binary is None:
        return None
    try:
        return version(binary)
    except AgentkernelError:
        return None


def check_snapshot_version(name: str, taken_with: str | None) -> None:
    """Refuse a snapshot taken with another Firecracker release: Firecracker resumes a snapshot only
    on the software it was taken with (its snapshot doc), and its state format changes between
    minor releases. A snapshot from before versions were recorded counts as another release."""
    binary = shutil.which("firecracker")
    current = check_version(binary) if binary else None
    if current is not None and taken_with != current:
        raise AgentkernelError(
            f"snapshot '{name}' was taken with Firecracker {taken_with or '(an unrecorded release)'} and "
            f"this host runs {current}: Firecracker resumes snapshots only on the release that took them; "
            "take a new snapshot"
        )

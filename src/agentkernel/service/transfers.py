"""Copying one file between the host and a sandbox, as `cp` does it: the full command line and the
pool daemon (for the thin `cp`, `cli/thin_served.py`) both call these, so the two copy alike.

The host side is an open file: the process that asked opens its own paths (so it never reaches a file
through the daemon that it could not open itself), and the sandbox side is named by path. A copy into
a sandbox directory takes the source's name; a file copied to the host is written beside its
destination (`part_file`) and renamed over it when whole, so nothing half-written is left.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from agentkernel.errors import AgentkernelError, NotAFileError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time: the thin CLI)
if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from typing import BinaryIO

    from agentkernel.service.service import SandboxService

CHUNK = 256 * 1024


class HostWriteError(Exception):
    """Writing the host's file failed (its message: the reason, as strerror gives it)."""


async def _chunks(f: BinaryIO) -> AsyncIterator[bytes]:
    while chunk := f.read(CHUNK):
        yield chunk


async def send_file(service: SandboxService, name: str, f: BinaryIO, local_name: str, remote: str) -> None:
    """Open host file `f` (named `local_name`) to `remote` in sandbox `name`, with its mode; into
    `remote` if that is a directory."""
    if remote.endswith("/"):
        remote += local_name
    else:
        with contextlib.suppress(AgentkernelError):
            if (await service.stat(name, remote)).kind == "dir":
                remote = f"{remote}/{local_name}"
    await service.write_file(name, remote, _chunks(f), mode=os.fstat(f.fileno()).st_mode & 0o777)


async def receive_file(service: SandboxService, name: str, remote: str, f: BinaryIO) -> None:
    """Regular file `remote` of sandbox `name` into open host file `f`, given its mode (HostWriteError
    if writing fails)."""
    try:
        info, chunks = await service.open_file(name, remote)
    except NotAFileError:
        raise AgentkernelError(f"cp: {name}:{remote}: not a regular file") from None
    async with contextlib.aclosing(chunks):
        try:
            async for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fchmod(f.fileno(), info.mode & 0o777)
        except OSError as exc:
            raise HostWriteError(exc.strerror or str(exc)) from None


def download_target(name: str, remote: str, local: Path) -> Path:
    """Where a copy of `remote` to host path `local` goes: into `local` if it is a directory."""
    if not local.is_dir():
        return local
    base = remote.rstrip("/").rsplit("/", 1)[-1]
    if not base:
        raise AgentkernelError(f"cp: {name}:{remote} names no file to copy")
    return local / base


def part_file(local: Path) -> Path:
    """Where a download to `local` is written until it is whole."""
    return local.with_name(f".{local.name}.part")


def cannot_write(local: Path, reason: str) -> AgentkernelError:
    return AgentkernelError(f"cp: cannot write {local}: {reason}")


def open_source(local: Path) -> BinaryIO:
    """Host file `local`, opened to be copied into a sandbox."""
    if not local.is_file():
        raise AgentkernelError(f"cp: {local}: not a file")
    try:
        return local.open("rb")
    except OSError as exc:
        raise AgentkernelError(f"cp: cannot read {local}: {exc.strerror or exc}") from None


async def upload(service: SandboxService, name: str, local: Path, remote: str) -> None:
    """Host file `local` to `remote` in sandbox `name` (into it, if it is a directory)."""
    with open_source(local) as f:
        await send_file(service, name, f, local.name, remote)


async def download(service: SandboxService, name: str, remote: str, local: Path) -> None:
    """Regular file `remote` of sandbox `name` to `local` on the host (into it, if it is a directory)."""
    local = download_target(name, remote, local)
    tmp = part_file(local)
    try:
        try:
            f = tmp.open("wb")
        except OSError as exc:
            raise cannot_write(local, exc.strerror or str(exc)) from None
        with f:
            await receive_file(service, name, remote, f)
        tmp.replace(local)
    except HostWriteError as exc:
        raise cannot_write(local, str(exc)) from None
    except OSError as exc:
        raise cannot_write(local, exc.strerror or str(exc)) from None
    finally:
        with contextlib.suppress(OSError):  # not there; or never made (its directory is not one)
            tmp.unlink()

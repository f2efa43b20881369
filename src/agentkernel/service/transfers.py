"""Copying one file between the host and a sandbox, as `cp` does it: the full command line and the
pool daemon (for the thin `cp`, `cli/thin_served.py`) both call these, so the two copy alike.

The host side is an open file: the process that asked opens its own paths (so it never reaches a file
through the daemon that it could not open itself), and the sandbox side is named by path. A copy into
a sandbox directory takes the source's name; a file copied to the host is written to a new file
beside its destination (`Part`) and renamed over it when whole, so nothing half-written is left.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from agentkernel.errors import AgentkernelError, NotAFileError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time: the thin CLI)
if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, AsyncIterator
    from typing import BinaryIO

    from agentkernel.protocol.connection import FileInfo
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


async def open_remote(
    service: SandboxService, name: str, remote: str
) -> tuple[FileInfo, AsyncGenerator[bytes, None]]:
    """Regular file `remote` of sandbox `name`: its metadata and its bytes as they come."""
    try:
        return await service.open_file(name, remote)
    except NotAFileError:
        raise AgentkernelError(f"cp: {name}:{remote}: not a regular file") from None


async def write_chunks(chunks: AsyncIterator[bytes], f: BinaryIO) -> None:
    """`chunks` written to open host file `f` (HostWriteError if writing fails)."""
    try:
        async for chunk in chunks:
            f.write(chunk)
        f.flush()
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


class Part:
    """A new file beside `local` (only this process's, never one that was there) that a download is
    written to until it is whole; removed when closed unless `keep` put it in place. Its `file` is
    open for writing (`cannot_write`'s error if it cannot be made)."""

    def __init__(self, local: Path) -> None:
        self.local = local
        while True:
            self.path = local.with_name(f".{local.name}.{os.urandom(4).hex()}.part")
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except FileExistsError:
                continue
            except OSError as exc:
                raise cannot_write(local, exc) from None
            self.file: BinaryIO = os.fdopen(fd, "wb")
            return

    def keep(self, mode: int) -> None:
        """Give the whole file `mode` (its permission bits) and rename it over `local`."""
        try:
            self.file.flush()
            os.fchmod(self.file.fileno(), mode & 0o777)
            self.path.replace(self.local)
        except OSError as exc:
            raise cannot_write(self.local, exc) from None

    def __enter__(self) -> Part:
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
        with contextlib.suppress(OSError):  # kept: renamed away already
            self.path.unlink()


def cannot_write(local: Path, reason: OSError | str) -> AgentkernelError:
    """The error of a download that cannot write `local`: `reason` is an OSError or its strerror."""
    if isinstance(reason, OSError):
        reason = reason.strerror or str(reason)
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
    info, chunks = await open_remote(service, name, remote)
    async with contextlib.aclosing(chunks):
        with Part(local) as part:
            try:
                await write_chunks(chunks, part.file)
            except HostWriteError as exc:
                raise cannot_write(local, str(exc)) from None
            part.keep(info.mode)

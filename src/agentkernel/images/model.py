"""What the image store records about an image."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from pydantic import BaseModel, ConfigDict


class ImageConfig(BaseModel):
    """The parts of an OCI image config that say how commands run: environment, cwd, default command."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    env: tuple[str, ...] = ()
    workdir: str = ""
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()


class ImageRecord(BaseModel):
    """The contents of `<digest>/image.json`. It describes the blob; names live in refs, since one
    blob may have several."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    digest: str
    """sha256 (hex) of rootfs.ext4."""
    size_bytes: int
    """Apparent size of rootfs.ext4 (the file is sparse: far less is allocated on disk)."""
    created_at: datetime
    source: str
    """Where it came from: `recipe:NAME`, `oci:REF` or `dir:PATH`."""
    recipe_key: str | None = None
    config: ImageConfig = ImageConfig()


class Image(ImageRecord):
    """An image reached through a name."""

    name: str
    path: Path
    """The ext4 file (read-only): the backing file of each sandbox's copy-on-write disk."""

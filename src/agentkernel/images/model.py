"""What the image store records about an image.

Plain dataclasses with their own checks: every sandbox start reads a record, and these stay cheap to
import and to read. A record that fails a check is treated as damaged by the store.
"""

from __future__ import annotations

import json
from collections.abc import Set
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any


@dataclass(frozen=True, kw_only=True)
class ImageConfig:
    """The parts of an OCI image config that say how commands run: environment, cwd, default command."""

    env: tuple[str, ...] = ()
    workdir: str = ""
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, data: object) -> ImageConfig:
        """Checked: ValueError names what is wrong (lists are accepted for the tuples)."""
        fields = _object(data, "config", optional=set(cls.__dataclass_fields__))
        return cls(
            env=_strings(fields.get("env", ()), "env"),
            workdir=_string(fields.get("workdir", ""), "workdir"),
            entrypoint=_strings(fields.get("entrypoint", ()), "entrypoint"),
            cmd=_strings(fields.get("cmd", ()), "cmd"),
        )


@dataclass(frozen=True, kw_only=True)
class ImageRecord:
    """The contents of `<digest>/image.json`. It describes the blob; names live in refs, since one
    blob may have several."""

    digest: str
    """sha256 (hex) of rootfs.ext4."""
    size_bytes: int
    """Apparent size of rootfs.ext4 (the file is sparse: far less is allocated on disk)."""
    created_at: datetime
    source: str
    """Where it came from: `recipe:NAME`, `oci:REF` or `dir:PATH`."""
    recipe_key: str | None = None
    config: ImageConfig = field(default_factory=ImageConfig)

    @classmethod
    def from_json(cls, text: bytes) -> ImageRecord:
        """Parse and check a record; ValueError if it is malformed."""
        data = _object(json.loads(text), "record", required={"digest", "size_bytes", "created_at", "source"},
                       optional={"recipe_key", "config"})  # fmt: skip
        size = data["size_bytes"]
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError("size_bytes: must be a non-negative integer")
        recipe_key = data.get("recipe_key")
        return cls(
            digest=_string(data["digest"], "digest"),
            size_bytes=size,
            created_at=datetime.fromisoformat(_string(data["created_at"], "created_at")),
            source=_string(data["source"], "source"),
            recipe_key=None if recipe_key is None else _string(recipe_key, "recipe_key"),
            config=ImageConfig.from_dict(data.get("config", {})),
        )

    def to_json(self) -> str:
        return json.dumps(self.public(), indent=2)

    def public(self) -> dict[str, Any]:
        """The record as JSON values (what `image list --json` prints)."""
        data = asdict(self)
        data["created_at"] = self.created_at.isoformat().replace("+00:00", "Z")
        data["config"] = {k: list(v) if isinstance(v, tuple) else v for k, v in data["config"].items()}
        return {k: str(v) if isinstance(v, Path) else v for k, v in data.items()}


@dataclass(frozen=True, kw_only=True)
class Image(ImageRecord):
    """An image reached through a name."""

    name: str
    path: Path
    """The ext4 file (read-only): the backing file of each sandbox's copy-on-write disk."""


def _object(
    data: object, what: str, *, required: Set[str] = frozenset(), optional: Set[str] = frozenset()
) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ValueError(f"{what}: must be an object")
    if missing := required - data.keys():
        raise ValueError(f"{what}: {', '.join(sorted(missing))} missing")
    if unknown := data.keys() - required - optional:
        raise ValueError(f"{what}: unknown keys {', '.join(sorted(map(str, unknown)))}")
    return data


def _string(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what}: must be a string")
    return value


def _strings(value: object, what: str) -> tuple[str, ...]:
    if not isinstance(value, list | tuple) or not all(isinstance(item, str) for item in value):
        raise ValueError(f"{what}: must be a list of strings")
    return tuple(value)

"""Hand-made tar layers and OCI image layouts for the image tests."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any

Member = tuple[tarfile.TarInfo, bytes | None]
REF_NAME = "org.opencontainers.image.ref.name"


def file(name: str, data: bytes = b"", mode: int = 0o644, uid: int = 0, gid: int = 0) -> Member:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.uid, info.gid, info.mtime = len(data), mode, uid, gid, 1_700_000_000
    return info, data


def directory(name: str, mode: int = 0o755) -> Member:
    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.DIRTYPE, mode
    return info, None


def symlink(name: str, target: str) -> Member:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info, None


def hardlink(name: str, target: str) -> Member:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.LNKTYPE, target
    return info, None


def device(name: str, major: int, minor: int) -> Member:
    info = tarfile.TarInfo(name)
    info.type, info.devmajor, info.devminor, info.mode = tarfile.CHRTYPE, major, minor, 0o666
    return info, None


def fifo(name: str) -> Member:
    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.FIFOTYPE, 0o644
    return info, None


def tar(*members: Member) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for info, data in members:
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def tree_layer(root: Path) -> bytes:
    """A layer of the directory tree at `root`, as Docker would write it."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for path in sorted(root.rglob("*")):
            archive.add(path, path.relative_to(root).as_posix(), recursive=False)
    return buffer.getvalue()


class Layout:
    """An OCI image layout being written at `path`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        (path / "blobs" / "sha256").mkdir(parents=True)
        (path / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')

    def blob(self, data: bytes, media_type: str) -> dict[str, Any]:
        digest = hashlib.sha256(data).hexdigest()
        (self.path / "blobs" / "sha256" / digest).write_bytes(data)
        return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}

    def image(
        self, *layers: bytes, config: dict[str, Any] | None = None, compress: bool = True
    ) -> dict[str, Any]:
        """Write an image's blobs and return its manifest descriptor."""
        kind = "application/vnd.oci.image.layer.v1.tar" + ("+gzip" if compress else "")
        descriptors = [self.blob(gzip.compress(layer) if compress else layer, kind) for layer in layers]
        diff_ids = [f"sha256:{hashlib.sha256(layer).hexdigest()}" for layer in layers]
        document = {
            "architecture": "amd64",
            "os": "linux",
            "config": config or {},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }
        config_descriptor = self.blob(
            json.dumps(document).encode(), "application/vnd.oci.image.config.v1+json"
        )
        manifest: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": config_descriptor,
            "layers": descriptors,
        }
        return self.blob(json.dumps(manifest).encode(), manifest["mediaType"])

    def nested_index(self, *descriptors: dict[str, Any]) -> dict[str, Any]:
        document: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": list(descriptors),
        }
        return self.blob(json.dumps(document).encode(), document["mediaType"])

    def save(self, *descriptors: dict[str, Any]) -> Path:
        index = {"schemaVersion": 2, "manifests": list(descriptors)}
        (self.path / "index.json").write_text(json.dumps(index))
        return self.path


def tagged(descriptor: dict[str, Any], tag: str) -> dict[str, Any]:
    return {**descriptor, "annotations": {REF_NAME: tag}}


def for_platform(descriptor: dict[str, Any], os: str, arch: str) -> dict[str, Any]:
    return {**descriptor, "platform": {"os": os, "architecture": arch}}

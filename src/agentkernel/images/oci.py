"""Unpacking an OCI image layout (as `skopeo copy ... oci:DIR:TAG` writes it) into a root tree.

index.json -> (image index ->) manifest -> config + layers. Every blob is checked against its digest,
JSON documents are size-bounded, and layers go through layers.apply_layer, which keeps writes inside
the tree.
"""

from __future__ import annotations

import hashlib
import io
import json
import platform
import re
from pathlib import Path
from typing import Any

from agentkernel.errors import AgentkernelError
from agentkernel.images.layers import apply_layer
from agentkernel.images.model import ImageConfig

REF_NAME = "org.opencontainers.image.ref.name"
MAX_JSON = 4 << 20
DIGEST = re.compile(r"(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})")
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
ARCHES = {"x86_64": "amd64", "aarch64": "arm64"}


def host_platform() -> tuple[str, str]:
    """The OCI (os, architecture) of images this host's microVMs run."""
    machine = platform.machine()
    return "linux", ARCHES.get(machine, machine)


def unpack(layout: Path, dest: Path, *, tag: str | None = None) -> ImageConfig:
    """Apply the layers of the image in `layout` onto `dest` and return its config.

    `tag` picks a manifest by its `org.opencontainers.image.ref.name` annotation; where the index
    (or a nested image index) lists several, the one for this host's platform is taken.
    """
    if not (layout / "oci-layout").is_file():
        raise AgentkernelError(f"{layout} is not an OCI image layout (it has no oci-layout file)")
    manifest = _select(layout, _read_json(layout / "index.json"), tag)
    config = _blob_json(layout, _field(manifest, "config", dict))
    dest.mkdir(parents=True, exist_ok=True)
    layers = _descriptors(manifest, "layers")
    for number, descriptor in enumerate(layers, 1):
        _apply_blob(layout, descriptor, dest, f"layer {number}/{len(layers)}")
    return _image_config(config)


def _select(layout: Path, index: dict[str, Any], tag: str | None) -> dict[str, Any]:
    descriptors = _descriptors(index, "manifests")
    if tag is not None:
        tags = [(d.get("annotations") or {}).get(REF_NAME) for d in descriptors]
        descriptors = [d for d, t in zip(descriptors, tags, strict=True) if t == tag]
        if not descriptors:
            known = ", ".join(sorted(str(t) for t in tags if t)) or "none"
            raise AgentkernelError(f"the OCI layout {layout} has no image tagged '{tag}' (tags: {known})")
    for _ in range(4):  # an index may nest indexes; more than a few levels is not a real image
        document = _blob_json(layout, _pick_platform(layout, descriptors))
        if "manifests" not in document:
            return document
        descriptors = _descriptors(document, "manifests")
    raise AgentkernelError(f"the OCI layout {layout} nests image indexes too deeply")


def _pick_platform(layout: Path, descriptors: list[dict[str, Any]]) -> dict[str, Any]:
    if len(descriptors) == 1:
        return descriptors[0]
    wanted = host_platform()
    for descriptor in descriptors:
        plat = descriptor.get("platform") or {}
        if (plat.get("os"), plat.get("architecture")) == wanted:
            return descriptor
    found = sorted({_describe(d) for d in descriptors})
    raise AgentkernelError(
        f"the OCI layout {layout} has no image for {'/'.join(wanted)} (it has: {', '.join(found) or 'none'})"
    )


def _describe(descriptor: dict[str, Any]) -> str:
    plat = descriptor.get("platform") or {}
    if plat:
        return f"{plat.get('os')}/{plat.get('architecture')}"
    return str((descriptor.get("annotations") or {}).get(REF_NAME, "untagged"))


def _blob_path(layout: Path, descriptor: dict[str, Any]) -> tuple[Path, str, int]:
    digest = descriptor.get("digest")
    size = descriptor.get("size")
    if not isinstance(digest, str) or not DIGEST.fullmatch(digest) or not isinstance(size, int):
        raise AgentkernelError(f"the OCI layout {layout} has a malformed descriptor: {descriptor!r:.200}")
    algorithm, hexdigest = digest.split(":")
    path = layout / "blobs" / algorithm / hexdigest
    if not path.is_file():
        raise AgentkernelError(f"the OCI layout {layout} lacks blob {digest}")
    return path, digest, size


def _blob_json(layout: Path, descriptor: dict[str, Any]) -> dict[str, Any]:
    path, digest, size = _blob_path(layout, descriptor)
    if size > MAX_JSON:
        raise AgentkernelError(f"{digest} in {layout} is too large for a manifest or config ({size} bytes)")
    with path.open("rb") as f:
        data = f.read(size + 1)
    if _digest_of(digest, data) != digest:
        raise AgentkernelError(f"blob {digest} in {layout} does not match its digest")
    return _parse_json(data, f"blob {digest}")


def _apply_blob(layout: Path, descriptor: dict[str, Any], dest: Path, label: str) -> None:
    path, digest, _ = _blob_path(layout, descriptor)
    with path.open("rb") as raw:
        if raw.read(4) == ZSTD_MAGIC:
            raise AgentkernelError(f"{label} is zstd-compressed: only gzip and plain tar are supported")
        raw.seek(0)
        hashing = _HashingReader(raw, digest.split(":")[0])
        apply_layer(io.BufferedReader(hashing, 1 << 20), dest, label)
        if hashing.finish() != digest:
            raise AgentkernelError(f"{label} ({digest}) does not match its digest: the blob is corrupted")


class _HashingReader(io.RawIOBase):
    """Hashes what is read through it, so a layer is verified in the same pass that unpacks it."""

    def __init__(self, raw: io.BufferedReader, algorithm: str) -> None:
        self.raw = raw
        self.hash = hashlib.new(algorithm)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        count = self.raw.readinto(buffer)
        self.hash.update(memoryview(buffer)[:count])
        return count

    def finish(self) -> str:
        """The digest of the whole blob (reading what the tar reader left, such as end padding)."""
        while chunk := self.raw.read(1 << 20):
            self.hash.update(chunk)
        return f"{self.hash.name}:{self.hash.hexdigest()}"


def _image_config(document: dict[str, Any]) -> ImageConfig:
    config = document.get("config") or {}
    if not isinstance(config, dict):
        raise AgentkernelError("the image config is malformed: 'config' is not an object")
    try:
        return ImageConfig.from_dict(
            {
                "env": config.get("Env") or (),
                "workdir": config.get("WorkingDir") or "",
                "entrypoint": config.get("Entrypoint") or (),
                "cmd": config.get("Cmd") or (),
            }
        )
    except ValueError as exc:
        raise AgentkernelError(f"the image config is malformed: {exc}") from None


def _digest_of(digest: str, data: bytes) -> str:
    algorithm = digest.split(":")[0]
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_JSON + 1)
    except OSError as exc:
        raise AgentkernelError(f"cannot read {path}: {exc.strerror}") from None
    if len(data) > MAX_JSON:
        raise AgentkernelError(f"{path} is too large")
    return _parse_json(data, str(path))


def _parse_json(data: bytes, what: str) -> dict[str, Any]:
    try:
        document = json.loads(data)
    except ValueError:
        raise AgentkernelError(f"{what} is not valid JSON") from None
    if not isinstance(document, dict):
        raise AgentkernelError(f"{what} is not a JSON object")
    return document


def _descriptors(document: dict[str, Any], key: str) -> list[dict[str, Any]]:
    value: list[Any] = _field(document, key, list)
    if not all(isinstance(d, dict) for d in value):
        raise AgentkernelError(f"malformed OCI document: '{key}' holds something that is not a descriptor")
    return value


def _field(document: dict[str, Any], key: str, kind: type) -> Any:
    value = document.get(key)
    if not isinstance(value, kind):
        raise AgentkernelError(f"malformed OCI document: '{key}' is missing or not a {kind.__name__}")
    return value

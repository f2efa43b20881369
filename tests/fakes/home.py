"""A data dir of its own for a test, with a stand-in guest kernel and `base` image: `create` finds
them where `agentkernel setup` puts the real ones, and the fake backend never reads them."""

from __future__ import annotations

from pathlib import Path

from agentkernel import paths
from agentkernel.artifacts import cache
from agentkernel.artifacts import kernel as kernel_artifact
from agentkernel.images import store

IMAGES = ("base", "python")


def _kernel(out: Path) -> None:
    (out / "vmlinux").write_bytes(b"not a kernel\n")


def populate() -> None:
    """Give the current data dir (AGENTKERNEL_HOME) a kernel and the images in IMAGES."""
    key = "fake"
    cache.store(kernel_artifact.KIND, key, _kernel)
    cache.set_current(kernel_artifact.KIND, key)
    for name in IMAGES:
        # Made beside the store rather than in store.scratch(): a few bytes need none of the build
        # directory's care (its cleanup scans every process), which would cost each test half a second.
        rootfs = paths.private_dir(paths.data_dir() / "fake-images") / f"{name}.ext4"
        rootfs.write_bytes(f"not an ext4 image: {name}\n".encode())
        store.add(rootfs, name, source="tests.fakes")

"""`agentkernel setup`: build (or take from the cache) the guest agent, the kernel and the default images."""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from agentkernel import paths
from agentkernel.artifacts import agent, kernel
from agentkernel.errors import AgentkernelError
from agentkernel.images import DEFAULT_IMAGES, store
from agentkernel.images import make as images_make
from agentkernel.images.model import Image

# program -> Debian package, for everything `setup` runs.
SYSTEM_TOOLS = {
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-img": "qemu-utils",
    "musl-gcc": "musl-tools",
    "mkfs.ext4": "e2fsprogs",
    "debugfs": "e2fsprogs",
    "mmdebstrap": "mmdebstrap",
    "busybox": "busybox-static",
    **kernel.BUILD_TOOLS,
}


@dataclass(frozen=True)
class SetupResult:
    agent: Path
    kernel: Path
    images: list[Image]
    built: list[str]
    log: Path


def missing_packages(tools: dict[str, str] = SYSTEM_TOOLS) -> list[str]:
    """Debian packages whose programs are not on this machine, in a stable order."""
    missing: list[str] = []
    for program, package in tools.items():
        found = shutil.which(program) or any(
            os.access(f"{d}/{program}", os.X_OK) for d in ("/usr/sbin", "/sbin")
        )
        if not found and package not in missing:
            missing.append(package)
    return missing


def check_system() -> None:
    missing = missing_packages()
    if not Path("/usr/include/libelf.h").exists():
        missing.append("libelf-dev")
    if missing:
        names = " ".join(missing)
        raise AgentkernelError(
            f"missing system packages: {names}: install them with `apt-get install -y {names}` "
            "(or run scripts/install-system-deps.sh)"
        )


def new_log() -> Path:
    return paths.logs_dir() / time.strftime("setup-%Y%m%d-%H%M%S.log")


def setup(
    *, kernel_source: str | None = None, images: tuple[str, ...] = DEFAULT_IMAGES, log: Path | None = None
) -> SetupResult:
    check_system()
    kernel.source_identity(kernel_source)  # a bad --kernel-source fails before anything is built
    log = log or new_log()
    built: list[str] = []
    agent_path, agent_built = agent.ensure(log=log)
    if agent_built:
        built.append("agent")
    kernel_path, kernel_built = kernel.ensure(kernel_source, log=log)
    if kernel_built:
        built.append("kernel")
    before = {img.name: img.digest for img in store.list_images()}
    made = images_make.ensure_recipes(list(images), agent_path, log=log)
    built += [f"image {img.name}" for img in made if before.get(img.name) != img.digest]
    return SetupResult(agent_path, kernel_path, made, built, log)

"""Pulling an image from a registry: skopeo copies it to an OCI layout, which is unpacked and built.

Everything happens in one scratch directory that is removed whatever the outcome, and the image
enters the store only when complete. skopeo's failures become one sentence naming the cause.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from agentkernel import paths
from agentkernel.artifacts.run import require, step
from agentkernel.errors import AgentkernelError
from agentkernel.images import builder, oci, store
from agentkernel.images.model import Image
from agentkernel.network.policy import is_loopback_name

COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
REFERENCE = re.compile(
    rf"(?:(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:]+\])(?::[0-9]+)?/)?{COMPONENT}(?:/{COMPONENT})*"
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[0-9a-f]{64})?"
)
FATAL = re.compile(r'level=fatal msg="((?:[^"\\]|\\.)*)"')
POLICIES = (Path("/etc/containers/policy.json"), Path.home() / ".config/containers/policy.json")
TAG = "image"
TIMEOUT = "1h"
UNREACHABLE = (
    "connection refused",
    "no such host",
    "i/o timeout",
    "network is unreachable",
    "no route to host",
    "connection reset",
    "tls handshake timeout",
    "server misbehaving",
)


def pull(ref: str, agent: Path, *, log: Path | None = None, name: str | None = None) -> Image:
    """Pull `ref` (like `python:3.12` or `127.0.0.1:5000/team/app:1`) and store it as `name`
    (default: `ref`, with `:latest` added when it has no tag or digest)."""
    ref = normalize(ref)
    name = store.check_name(name or ref)
    log = log or paths.logs_dir() / "image-pull.log"
    with step(f"Pulling image {ref}"), store.scratch() as tmp:
        layout = tmp / "layout"
        _copy(ref, layout, tmp, log)
        rootfs = tmp / "rootfs"
        config = oci.unpack(layout, rootfs, tag=TAG)
        builder.build(rootfs, agent, tmp / store.ROOTFS, log=log, in_place=True)
        return store.add(tmp / store.ROOTFS, name, source=f"oci:{ref}", config=config)


def normalize(ref: str) -> str:
    """`ref` checked, with `:latest` added when it names neither a tag nor a digest."""
    if not REFERENCE.fullmatch(ref):
        raise AgentkernelError(f"cannot pull {ref!r}: not a valid image reference (like repo/name:tag)")
    last = ref.rsplit("/", 1)[-1]
    return ref if ":" in last or "@" in last else f"{ref}:latest"


def registry_of(ref: str) -> str:
    """The registry host[:port] of `ref`; like Docker, the first part is a host only if it looks like one."""
    first, _, rest = ref.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        return first
    return "docker.io"


def is_loopback(registry: str) -> bool:
    """Whether `registry` is on this machine: such registries are spoken to over plain HTTP."""
    host = registry[1 : registry.find("]")] if registry.startswith("[") else registry.split(":")[0]
    return is_loopback_name(host)


def _copy(ref: str, layout: Path, tmp: Path, log: Path) -> None:
    skopeo = require("skopeo", "skopeo")
    os_name, arch = oci.host_platform()
    cmd = [
        skopeo,
        "--command-timeout", TIMEOUT,
        "--tmpdir", str(tmp),
        "--override-os", os_name,
        "--override-arch", arch,
        *([] if any(p.is_file() for p in POLICIES) else ["--insecure-policy"]),
        "copy",
        *(["--src-tls-verify=false"] if is_loopback(registry_of(ref)) else []),
        f"docker://{ref}",
        f"oci:{layout}:{TAG}",
    ]  # fmt: skip
    log.parent.mkdir(parents=True, exist_ok=True)
    with paths.open_private(log, "ab") as out:
        out.write(f"\n$ {' '.join(cmd)}\n".encode())
        out.flush()
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.PIPE)
        out.write(proc.stderr)
    if proc.returncode != 0:
        raise AgentkernelError(f"cannot pull {ref}: {explain(ref, os.fsdecode(proc.stderr))}")


def explain(ref: str, stderr: str) -> str:
    """One sentence for what skopeo's `stderr` says went wrong."""
    fatal = FATAL.findall(stderr)
    message = fatal[-1].replace('\\"', '"') if fatal else (stderr.strip().splitlines() or ["no output"])[-1]
    lower = message.lower()
    registry = registry_of(ref)
    if "invalid reference format" in lower or "invalid source name" in lower:
        return "not a valid image reference"
    if "manifest unknown" in lower or "name unknown" in lower or "not found" in lower:
        return f"registry {registry} has no such image (unknown repository, tag or digest)"
    if "unauthorized" in lower or "authentication required" in lower or "denied" in lower:
        return f"registry {registry} refused access (authentication required or access denied)"
    if "http response to https client" in lower:
        return f"registry {registry} speaks plain HTTP, which is allowed for loopback registries only"
    if "x509" in lower or "certificate" in lower:
        return f"the TLS certificate of registry {registry} is not trusted"
    for cause in UNREACHABLE:
        if cause in lower:
            return f"registry {registry} is unreachable ({cause})"
    if "timeout" in lower or "deadline exceeded" in lower:
        return f"registry {registry} did not answer in time"
    return f"skopeo failed: {' '.join(message.split())}"

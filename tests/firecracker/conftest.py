"""Fixtures for the Firecracker backend's tests: specs on scratch files, and the fake firecracker
(and jailer) on PATH where a test runs the backend's processes (see fake_firecracker.py for why)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agentkernel import hostinfo
from agentkernel.artifacts import kernel as kernel_artifact
from agentkernel.backends.base import VMSpec
from agentkernel.backends.firecracker import backend as fc
from agentkernel.backends.firecracker.backend import FirecrackerBackend, instance_id
from agentkernel.config import Policy
from agentkernel.hostinfo import Accel
from agentkernel.images import store
from agentkernel.sandbox import state
from tests.conftest import REPO

KVM = Accel("kvm", "")
NO_NETWORK = Policy(
    "moderate", network=False, mount_cwd=False, mount_home=False, pass_env=False, read_only=False
)
MakeSpec = Callable[..., VMSpec]


@pytest.fixture(scope="session")
def artifacts() -> tuple[Path, Path]:
    """The guest kernel and base image `agentkernel setup` built (as tests/vm use them)."""
    vmlinux = kernel_artifact.current()
    if vmlinux is None:
        pytest.fail("no guest kernel: run `agentkernel setup` first (install.sh does)")
    return vmlinux, store.get("base").path


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    """A stand-in kernel and a sparse 64 MiB raw image with data at both ends (0444, as in the store)."""
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"\x7fELF fake kernel")
    image = tmp_path / "image.ext4"
    with image.open("wb") as f:
        f.write(b"head of the image")
        f.seek(64 << 20)
        f.write(b"tail of the image")
    image.chmod(0o444)
    return kernel, image


@pytest.fixture
def make_spec(tmp_path: Path, files: tuple[Path, Path]) -> Iterator[MakeSpec]:
    """VMSpecs over the scratch files, each with a short run directory; whatever process still
    names one of those directories on its command line is killed afterwards."""
    rundirs: list[Path] = []

    def make(name: str = "fc1", **fields: Any) -> VMSpec:
        rundirs.append(Path(tempfile.mkdtemp(prefix="akfc-")))
        fields = {"kernel": files[0], "image": files[1], **fields}
        return VMSpec(name, workdir=tmp_path / "sandboxes" / name, rundir=rundirs[-1], **fields)

    yield make
    for rundir in rundirs:
        kill_processes_naming(str(rundir))
        shutil.rmtree(rundir, ignore_errors=True)


def processes_naming(text: str) -> list[int]:
    """The live (not zombie) processes whose command line contains `text`."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if (
                proc.name.isdigit()
                and text.encode() in (proc / "cmdline").read_bytes()
                and (proc / "stat").read_text().rsplit(")", 1)[-1].split()[0] not in ("Z", "X")
            ):
                found.append(int(proc.name))
        except OSError:
            pass
    return found


def kill_processes_naming(text: str) -> None:
    for pid in processes_naming(text):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


@dataclass
class Fake:
    """The fake firecracker and jailer installed on PATH, and what the fake firecracker recorded."""

    bin: Path
    record: Path

    def requests(self, vm: VMSpec | None = None) -> list[dict[str, Any]]:
        """What every fake firecracker recorded, or only `vm`'s."""
        if not self.record.exists():
            return []
        entries = [json.loads(line) for line in self.record.read_text().splitlines()]
        return [e for e in entries if vm is None or e["id"] == instance_id(vm)]

    def api_calls(self, vm: VMSpec | None = None) -> list[tuple[str, str, Any]]:
        return [(r["method"], r["path"], r["body"]) for r in self.requests(vm) if "method" in r]

    def set_version(self, version: str) -> None:
        """Install a fake firecracker of release `version` (a new file, as an upgrade makes one)."""
        install(self.bin, "firecracker", "fake_firecracker", f"FAKE_FC_VERSION={version} ")


def install(bin_dir: Path, program: str, module: str, env: str = "") -> None:
    """A script `program` in `bin_dir` that runs tests.firecracker.`module`, replacing any before."""
    new = bin_dir / f".{program}.new"
    new.write_text(
        f'#!/bin/sh\n{env}PYTHONPATH="{REPO}" exec "{sys.executable}" -m tests.firecracker.{module} "$@"\n'
    )
    new.chmod(0o755)
    new.replace(bin_dir / program)


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Fake:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for program, module in (("firecracker", "fake_firecracker"), ("jailer", "fake_jailer")):
        install(bin_dir, program, module)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    record = tmp_path / "requests.jsonl"
    monkeypatch.setenv("FAKE_FC_RECORD", str(record))
    return Fake(bin_dir, record)


@pytest.fixture
def backend(fake: Fake) -> FirecrackerBackend:
    return FirecrackerBackend(KVM)


@pytest.fixture
def service(
    isolated_home: Path, fake: Fake, files: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Path]:
    """The service on the fake firecracker, with the scratch kernel and image as `base`; the data dir."""
    kernel, image = files
    monkeypatch.setattr(hostinfo, "accel", lambda: KVM)
    monkeypatch.setattr(kernel_artifact, "current", lambda: kernel)
    monkeypatch.delenv("AGENTKERNEL_JAILER", raising=False)
    copy = tmp_path / "base.ext4"
    fc._copy(image, copy)  # the store moves what it adds
    store.add(copy, "base", source="test")
    try:
        yield isolated_home
    finally:
        for record in state.all_records():
            kill_processes_naming(record.rundir)
            shutil.rmtree(record.rundir, ignore_errors=True)

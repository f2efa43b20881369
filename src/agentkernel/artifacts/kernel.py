"""The guest kernel: an x86_64 vmlinux built from our config on top of `make tinyconfig`.

The source is Debian's linux-source-6.1 package by default, or a tarball, a URL to one, or a local tree.
The cache key covers the config fragment and the source's identity, so a second `setup` skips the build.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

from agentkernel import paths
from agentkernel.artifacts import cache
from agentkernel.artifacts.run import require, run, step
from agentkernel.errors import AgentkernelError

KIND = "kernel"
DEBIAN_SOURCE = Path("/usr/src/linux-source-6.1.tar.xz")
DEBIAN_PACKAGE = "linux-source-6.1"
BUILD_TOOLS = {"make": "make", "gcc": "gcc", "bc": "bc", "bison": "bison", "flex": "flex", "xz": "xz-utils"}


def config_fragment() -> str:
    return resources.files("agentkernel").joinpath("assets/kernel/microvm.config").read_text()


def wanted_symbols(fragment: str) -> dict[str, str]:
    """CONFIG_X -> value for every setting line of the fragment."""
    wanted = {}
    for line in fragment.splitlines():
        line = line.strip()
        if line.startswith("CONFIG_") and "=" in line:
            name, value = line.split("=", 1)
            wanted[name] = value
    return wanted


def missing_symbols(fragment: str, final_config: str) -> list[str]:
    """Settings of the fragment that did not survive `olddefconfig` (unmet dependencies, typos)."""
    have = wanted_symbols(final_config)
    return [
        f"{name}={value}"
        for name, value in wanted_symbols(fragment).items()
        if (name in have if value == "n" else have.get(name) != value)
    ]


def check_build_tools() -> None:
    for program, package in BUILD_TOOLS.items():
        require(program, package)
    if not Path("/usr/include/libelf.h").exists():
        raise AgentkernelError(
            "the kernel build needs libelf headers: install them with `apt-get install -y libelf-dev`"
        )


def source_identity(source: str | None) -> str:
    """A cheap, stable description of the kernel source for the cache key."""
    if source is None:
        if not DEBIAN_SOURCE.exists():
            raise AgentkernelError(
                f"no kernel source: install it with `apt-get install -y {DEBIAN_PACKAGE}` "
                "or pass --kernel-source TARBALL|URL|DIR"
            )
        version = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", DEBIAN_PACKAGE], capture_output=True, text=True
        ).stdout.strip()
        return f"debian:{DEBIAN_PACKAGE}:{version or cache.sha256_file(DEBIAN_SOURCE)}"
    if source.startswith(("http://", "https://")):
        return f"url:{source}"
    path = Path(source)
    if path.is_file():
        return f"tarball:{cache.sha256_file(path)}"
    if (path / "Makefile").is_file():
        head = (path / "Makefile").read_text(errors="replace").splitlines()[:6]
        return f"tree:{path.resolve()}:{'|'.join(head)}"
    raise AgentkernelError(f"--kernel-source {source}: not a tarball, a URL or a kernel source tree")


def cache_key(source: str | None) -> str:
    return cache.key_of(["kernel-build-v1", config_fragment(), source_identity(source)])


def ensure(source: str | None, *, log: Path) -> tuple[Path, bool]:
    """The cached vmlinux for this config and source, building it if needed; and whether it was built."""
    key = cache_key(source)
    entry = cache.lookup(KIND, key)
    built = entry is None
    if entry is None:
        check_build_tools()
        with step(f"Building the guest kernel (a few minutes; log: {log})"):
            entry = cache.store(KIND, key, lambda out: _build(source, out, log))
    cache.set_current(KIND, key)
    return entry / "vmlinux", built


def current() -> Path | None:
    return cache.current(KIND, "vmlinux")


def _build(source: str | None, out: Path, log: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="kernel-", dir=paths.tmp_dir()) as tmp:
        work = Path(tmp)
        tree, objdir = _prepare_source(source, work, log)
        make: list[str | Path] = ["make", "-C", tree, f"O={objdir}", "ARCH=x86_64"]
        fragment_path = work / "microvm.config"
        fragment_path.write_text(config_fragment())
        run([*make, "tinyconfig"], log=log, what="kernel configuration (tinyconfig)")
        run(
            [tree / "scripts/kconfig/merge_config.sh", "-m", "-O", objdir, objdir / ".config", fragment_path],
            log=log,
            what="kernel configuration (merge)",
            cwd=tree,
        )
        run([*make, "olddefconfig"], log=log, what="kernel configuration (olddefconfig)")
        final = (objdir / ".config").read_text()
        if missing := missing_symbols(config_fragment(), final):
            raise AgentkernelError(f"kernel config options did not apply: {', '.join(missing)} (log: {log})")
        run([*make, f"-j{os.cpu_count() or 1}", "vmlinux"], log=log, what="kernel build")
        shutil.copy2(objdir / "vmlinux", out / "vmlinux")
        (out / "config").write_text(final)


def _prepare_source(source: str | None, work: Path, log: Path) -> tuple[Path, Path]:
    """(source tree, object dir): a tarball is unpacked into `work`; a local tree is built out of tree."""
    objdir = work / "obj"
    objdir.mkdir()
    if source is not None and (Path(source) / "Makefile").is_file():
        return Path(source).resolve(), objdir
    tarball = DEBIAN_SOURCE if source is None else Path(source)
    if source is not None and source.startswith(("http://", "https://")):
        tarball = work / "source.tar"
        _download(source, tarball)
    tree = work / "src"
    tree.mkdir()
    run(
        ["tar", "-xf", tarball, "-C", tree, "--strip-components=1"],
        log=log,
        what="unpacking the kernel source",
    )
    return tree, objdir


def _download(url: str, dest: Path) -> None:
    import urllib.error  # imported here: only this rare path needs it, and it is slow to import
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=30) as response, dest.open("wb") as f:
            shutil.copyfileobj(response, f, 1 << 20)
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise AgentkernelError(f"cannot fetch kernel source {url}: {reason}") from None

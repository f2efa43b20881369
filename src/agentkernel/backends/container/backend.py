"""Containers (podman, else docker): sandboxes for hosts without KVM, and for macOS via Docker Desktop.

A container shares the host's kernel, so it is locked down on every path, whatever the profile:
no capabilities but a few (CAPS says why each), no-new-privileges, our own seccomp profile per
security profile (seccomp.py), pids, memory and CPU limits, tmpfs /tmp and /run, no network
device but lo, and a read-only root where the policy says so (else a copy-on-write layer of its own).

The root filesystem is the sandbox's image, extracted to a directory once per image digest
(rootfs.py). Podman runs it with `--rootfs DIR:O`: an overlay whose upper layer belongs to
the container, so no two sandboxes write one file and the shared tree never changes. Docker cannot
use a directory as a root, so there the tree is imported once as an image (untested here: the Docker
engine does not run on our machines).

The guest agent, already in every image at /sbin/agentkernel-agent, is the container's PID 1
(no --init); with AGENTKERNEL_LISTEN it serves the protocol on a Unix socket in the sandbox's rundir,
bind-mounted into the container, where the host connects. `prepare` creates the container, `start`
starts it detached (conmon or dockerd keeps it, not the caller), `cleanup` without keep_disk removes
it and its layer.

Root in a container is never root on the host: every container runs in a user namespace. Podman run
by root maps the container's ids 0-65535 to a range of unprivileged host ids that /etc/subuid and
/etc/subgid reserve for root (scripts/install-system-deps.sh adds one); the image's tree is extracted
with its owners moved into that range, and the sandbox's rundir is given to the container's root.
Podman run by another user is rootless: the container's root is that user. Docker is used only when
its daemon maps ids itself (userns-remap, or rootless mode). An engine that would run containers as
host root is not used at all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import resource
import shutil
import stat
import subprocess
import tarfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from agentkernel import paths, procs
from agentkernel.backends.base import (
    AGENT_PATH,
    MAX_UNIX_PATH,
    VMSpec,
    connect_agent,
    file_tail,
    kill_and_wait,
    kill_tagged,
    tail_line,
)
from agentkernel.backends.container import rootfs, seccomp
from agentkernel.config import MAX_PROCS
from agentkernel.errors import AgentkernelError, EngineUnavailable
from agentkernel.protocol.connection import Connection

GUEST_RUNDIR = "/run/agentkernel"
SOCKET = "agent.sock"
AGENT_PORTS = 16  # host clients at once (the agent takes up to 64 Unix connections)
NAME_PREFIX = "agentkernel-"
PROBE_VERSION = "2"  # bump when the flags change, to probe the engine again
USERNS_SIZE = 65536  # container ids 0-65535 are mapped to host ids
SUBUID, SUBGID = Path("/etc/subuid"), Path("/etc/subgid")

# Capabilities kept (everything else is dropped). Every profile keeps what the agent needs for the
# protocol; moderate and permissive also keep what root needs to manage files of other users.
AGENT_CAPS = (
    "SETUID",  # EXEC's uid: commands may run as another user (agent CLIs that refuse to run as root)
    "SETGID",  # EXEC's gid and setgroups, for the same
    "KILL",  # SIGNAL, timeouts and closing a connection signal process groups of other users
)
FILE_CAPS = (
    "CHOWN",  # package managers (dpkg, pip) and tar give files their owners
    "DAC_OVERRIDE",  # root writes into directories of other users: a mounted workspace, their homes
    "FOWNER",  # chmod/utime on files root does not own (tar, cp -p, package managers)
)
CAPS = {"permissive": AGENT_CAPS + FILE_CAPS, "moderate": AGENT_CAPS + FILE_CAPS, "restrictive": AGENT_CAPS}


@dataclass(frozen=True)
class Engine:
    kind: str  # "podman" or "docker"
    path: str
    version: str
    options: tuple[str, ...]  # global options: podman's runtime, cgroup manager, events backend
    nofile: int  # RLIMIT_NOFILE for the container: the most the host lets us give
    note: str = ""  # why better configurations were passed over
    userns: tuple[int, int] | None = None
    """Host uid and gid the container's root is (ids 0-65535 mapped from there): podman as root.
    None: the engine's own mapping (rootless podman, docker with userns-remap or rootless)."""

    def command(self, *args: str) -> list[str]:
        return [self.path, *self.options, *args]

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run the engine in its own directory: conmon, which outlives this call, writes files such as
        `oom` into its working directory, which would otherwise be the user's project."""
        return subprocess.run(
            self.command(*args),
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=timeout,
            cwd=engine_dir(),
        )

    def describe(self) -> str:
        opts = " ".join(self.options)
        text = f"{self.kind} {self.version}" + (f" ({opts})" if opts else "")
        if self.userns:
            text += f"; container root is host uid {self.userns[0]}, gid {self.userns[1]}"
        return f"{text}; passed over: {self.note}" if self.note else text


# ---- finding an engine that works here ------------------------------------------------------------


def engine_dir() -> Path:
    return paths.private_dir(paths.data_dir() / "containers")


def find_engine() -> Engine:
    """The engine to use: podman (preferred) or docker, in a configuration that passed a probe.

    The result is remembered under the data dir for as long as the engine, its runtimes and the
    host's limits stay the same, so only the first call pays for the probe (a second or so).
    """
    key = _host_key()
    cache = engine_dir() / "engine.json"
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
        saved = json.loads(cache.read_text())
        if saved["key"] == key:
            fields = saved["engine"]
            userns = tuple(fields["userns"]) if fields.get("userns") else None
            engine = Engine(**{**fields, "options": tuple(fields["options"]), "userns": userns})
            if shutil.which(engine.path):
                return engine
    reasons: list[str] = []
    for candidate in _candidates(reasons):
        problem = probe(candidate)
        if problem is None:
            engine = dataclasses.replace(candidate, note="; ".join(reasons))
            paths.write_private(cache, json.dumps({"key": key, "engine": asdict(engine)}))
            return engine
        reasons.append(f"{candidate.describe()}: {problem}")
    raise EngineUnavailable("; ".join(reasons) or "neither podman nor docker is installed")


def _host_key() -> str:
    """What the probe's answer depends on: the engines, the runtimes, cgroups, our limits."""
    parts = [PROBE_VERSION, str(os.geteuid()), str(resource.getrlimit(resource.RLIMIT_NOFILE))]
    for program in ("podman", "docker", "crun", "runc"):
        found = shutil.which(program)
        with contextlib.suppress(OSError):
            if found:
                st = os.stat(found)
                parts.append(f"{found}:{st.st_size}:{st.st_mtime_ns}")
    with contextlib.suppress(OSError):
        parts.append(Path("/proc/self/mountinfo").read_text().count("cgroup2").__str__())
    for ids in (SUBUID, SUBGID):
        with contextlib.suppress(OSError):
            parts.append(ids.read_text())
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


def _nofile() -> int:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)


def _candidates(reasons: list[str]) -> list[Engine]:
    """Configurations to try, best first. Podman's defaults, then, for hosts in cgroup v1/hybrid
    mode (where crun refuses to run), runc with the cgroupfs manager and file events (no systemd)."""
    found: list[Engine] = []
    podman = shutil.which("podman")
    userns = root_userns() if os.geteuid() == 0 else None
    if podman and os.geteuid() == 0 and userns is None:
        reasons.append(
            f"podman runs as root here, and {SUBUID} and {SUBGID} give root no range of {USERNS_SIZE} "
            "ids to map its containers' root to (scripts/install-system-deps.sh adds one)"
        )
    elif podman:
        version = _version(podman, reasons)
        if version:
            fallback = ("--cgroup-manager=cgroupfs", "--events-backend=file")
            found.append(Engine("podman", podman, version, (), _nofile(), userns=userns))
            for runtime in ("crun", "runc"):
                if path := shutil.which(runtime):
                    options = ("--runtime", path, *fallback)
                    found.append(Engine("podman", podman, version, options, _nofile(), userns=userns))
    docker = shutil.which("docker")
    if docker:
        info = subprocess.run(
            [docker, "version", "--format", "{{.Server.Version}}"], capture_output=True, text=True, timeout=30
        )
        if info.returncode == 0 and info.stdout.strip():
            if _docker_maps_ids(docker):
                found.append(Engine("docker", docker, info.stdout.strip(), (), _nofile()))
            else:
                reasons.append(
                    "docker: its containers' root would be the host's root "
                    "(enable userns-remap in its daemon, or run it rootless)"
                )
        else:
            reasons.append(
                f"docker: no engine answers ({_first_line(info.stderr) or 'docker version failed'})"
            )
    return found


def root_userns() -> tuple[int, int] | None:
    """Where root's containers' ids start on the host: the first range of at least USERNS_SIZE ids
    that /etc/subuid and /etc/subgid give root (by name or as 0), or None if either has none."""
    uid, gid = _subordinate_start(SUBUID), _subordinate_start(SUBGID)
    return (uid, gid) if uid is not None and gid is not None else None


def _subordinate_start(path: Path) -> int | None:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        owner, _, rest = line.strip().partition(":")
        start, _, count = rest.partition(":")
        valid = start.isdigit() and count.isdigit()
        if owner in ("root", "0") and valid and int(start) > 0 and int(count) >= USERNS_SIZE:
            return int(start)
    return None


def _docker_maps_ids(docker: str) -> bool:
    """Whether the docker daemon's containers' root is not the host's: it maps ids (userns-remap,
    rootless), or it is Docker Desktop (whose containers run in a VM of its own)."""
    proc = subprocess.run(
        [docker, "info", "--format", "{{json .SecurityOptions}} {{.OperatingSystem}}"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    marks = ("name=userns", "name=rootless", "Docker Desktop")
    return proc.returncode == 0 and any(mark in proc.stdout for mark in marks)


def _version(program: str, reasons: list[str]) -> str | None:
    proc = subprocess.run([program, "--version"], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        reasons.append(f"{program} --version failed: {_first_line(proc.stderr)}")
        return None
    return proc.stdout.split()[-1] if proc.stdout.split() else "unknown"


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = next((x for x in lines if "error" in x.lower()), lines[-1] if lines else "")
    return line[:300]


def probe(engine: Engine) -> str | None:
    """Run a throwaway container with the sandboxes' flags; None if it worked, else why not."""
    busybox = shutil.which("busybox")
    if busybox is None:
        return "busybox not found (apt-get install busybox-static): it is the probe's root filesystem"
    tree = engine_dir() / "probe-rootfs"
    if not (tree / "bin" / "busybox").exists():
        (tree / "bin").mkdir(parents=True, exist_ok=True)
        for sub in ("proc", "sys", "dev", "tmp", "run", "etc"):
            (tree / sub).mkdir(exist_ok=True)
        shutil.copy2(busybox, tree / "bin" / "busybox")
    if engine.userns:
        for path in (tree, *tree.rglob("*")):
            os.lchown(path, *engine.userns)
    try:
        root = _root_args(engine, tree, "probe")
        flags = hardening_flags(
            engine, "restrictive", vcpus=1, memory_mb=64, max_procs=MAX_PROCS["restrictive"], read_only=True
        )
        proc = engine.run("run", "--rm", *flags, *root, "/bin/busybox", "true", timeout=120)
    except (AgentkernelError, OSError, subprocess.SubprocessError) as exc:
        return str(exc)[:300]
    return None if proc.returncode == 0 else _first_line(proc.stderr) or f"exit status {proc.returncode}"


# ---- the container's command line -----------------------------------------------------------------


def hardening_flags(
    engine: Engine, profile: str, *, vcpus: int, memory_mb: int, max_procs: int, read_only: bool
) -> list[str]:
    """The flags every container gets: capabilities, seccomp, limits, no network, tmpfs."""
    if profile not in CAPS:
        raise AgentkernelError(f"unknown security profile {profile!r}")
    flags = [
        "--cap-drop=ALL",
        *(f"--cap-add={cap}" for cap in CAPS[profile]),
        "--security-opt", "no-new-privileges",
        "--security-opt", f"seccomp={seccomp.asset_path(profile)}",
        "--pids-limit", str(max_procs),
        "--memory", f"{memory_mb}m",
        "--memory-swap", f"{memory_mb}m",  # the same: no swap on top
        "--cpus", str(vcpus),
        # The engine's default rlimits exceed what an unprivileged host allows: ask for what we have.
        "--ulimit", f"nofile={engine.nofile}:{engine.nofile}",
        "--ulimit", f"nproc={max_procs}:{max_procs}",
        "--network", "none",
        "--tmpfs", "/tmp:rw,nosuid,nodev,mode=1777",
        "--tmpfs", "/run:rw,nosuid,nodev,mode=755",
        "--user", "0:0",
    ]  # fmt: skip
    if engine.userns:
        uid, gid = engine.userns
        flags += ["--uidmap", f"0:{uid}:{USERNS_SIZE}", "--gidmap", f"0:{gid}:{USERNS_SIZE}"]
    if read_only:
        flags.append("--read-only")
    return flags


def _root_args(engine: Engine, tree: Path, digest: str) -> list[str]:
    """How the container gets its root: podman overlays the tree; docker imports it as an image."""
    if engine.kind == "podman":
        return ["--rootfs", f"{tree}:O"]
    image = f"agentkernel-rootfs:{digest[:32]}"
    if engine.run("image", "inspect", image).returncode != 0:
        _docker_import(engine, tree, image)
    return ["--pull", "never", image]


def _docker_import(engine: Engine, tree: Path, image: str) -> None:
    proc = subprocess.Popen(
        engine.command("import", "-", image), stdin=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdin is not None
    with proc.stdin, tarfile.open(fileobj=proc.stdin, mode="w|") as tar:
        tar.add(tree, arcname=".")
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise AgentkernelError(f"docker import failed: {_first_line(err.decode(errors='replace'))}")


def container_name(spec: VMSpec) -> str:
    """Unique per sandbox and data dir (two data dirs may both have a sandbox `dev`)."""
    tag = hashlib.sha256(str(spec.workdir.absolute()).encode()).hexdigest()[:10]
    return f"{NAME_PREFIX}{spec.name}-{tag}"


def agent_socket(spec: VMSpec) -> Path:
    return spec.rundir / SOCKET


def _id_file(spec: VMSpec) -> Path:
    return spec.workdir / "container.id"


def create_command(engine: Engine, spec: VMSpec, profile: str, root: list[str]) -> list[str]:
    flags = hardening_flags(
        engine,
        profile,
        vcpus=spec.vcpus,
        memory_mb=spec.memory_mb,
        max_procs=spec.max_procs,
        read_only=spec.read_only,
    )
    cmd = [
        "create",
        "--name", container_name(spec),
        "--label", f"agentkernel.sandbox={spec.name}",
        "--hostname", spec.name.replace("_", "-")[:63],
        *flags,
        "--env", f"AGENTKERNEL_LISTEN={GUEST_RUNDIR}/{SOCKET}",
        "--volume", f"{spec.rundir}:{GUEST_RUNDIR}:rw",
    ]  # fmt: skip
    for mount in spec.mounts:
        cmd += ["--volume", f"{mount.host}:{mount.guest}:{'ro' if mount.read_only else 'rw'}"]
    if engine.kind == "podman":
        cmd += ["--log-driver", "k8s-file", "--log-opt", f"path={spec.console_log}"]
    return engine.command(*cmd, *root, AGENT_PATH)


# ---- the backend ----------------------------------------------------------------------------------


class ContainerBackend:
    name = "container"
    agent_ports = AGENT_PORTS

    def __init__(self, engine: Engine | None = None, *, profile: str = "moderate") -> None:
        """`profile` picks the capabilities and seccomp profile of containers made by prepare (their
        pids limit is the spec's max_procs)."""
        if profile not in CAPS:
            raise AgentkernelError(f"unknown security profile {profile!r}")
        self._engine = engine
        self.profile = profile

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = find_engine()
        return self._engine

    def prepare(self, spec: VMSpec) -> None:
        """Create the container (not started) over the image's tree, with its own writable layer."""
        if spec.disk_mb is not None and not spec.read_only:
            raise AgentkernelError(
                "the container backend cannot size a sandbox's disk (its writable layer shares the "
                "host's filesystem): remove [resources] disk_mb from agentkernel.toml or use a VM backend"
            )
        if spec.egress is not None:
            raise AgentkernelError(
                "the container backend has no network yet: use a profile without network "
                "(restrictive) or the qemu backend"
            )
        if len(str(agent_socket(spec))) > MAX_UNIX_PATH:
            raise AgentkernelError(f"run directory path too long for Unix sockets: {spec.rundir}")
        paths.private_dir(spec.workdir)
        self._private_rundir(spec)
        tree = rootfs.ensure_tree(spec.image, shift=self.engine.userns or (0, 0))
        root = _root_args(self.engine, tree, rootfs.image_digest(spec.image))
        self._remove_container(spec)  # one left by a crash, under this sandbox's name
        proc = subprocess.run(
            create_command(self.engine, spec, self.profile, root),
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=120,
        )
        if proc.returncode != 0:
            raise AgentkernelError(f"{self.engine.kind} create failed: {_first_line(proc.stderr)}")
        paths.write_private(_id_file(spec), proc.stdout.strip().splitlines()[-1] + "\n")

    def _private_rundir(self, spec: VMSpec) -> None:
        """The rundir, where the agent makes its socket: the container's root's, and no one else's."""
        paths.private_dir(spec.rundir)
        if self.engine.userns:
            os.chown(spec.rundir, *self.engine.userns)

    def start(self, spec: VMSpec) -> int:
        self._private_rundir(spec)
        agent_socket(spec).unlink(missing_ok=True)
        name = container_name(spec)
        proc = self.engine.run("start", name)
        if proc.returncode != 0:
            raise AgentkernelError(f"the container did not start: {_first_line(proc.stderr)}")
        state = self._state(spec)
        pid = int(state.get("Pid") or 0) if state else 0
        if pid <= 0:
            raise AgentkernelError(f"the container exited at once: {self.console_tail(spec)}")
        return pid

    async def connect(self, spec: VMSpec, pid: int, *, port: int = 0, timeout: float = 30.0) -> Connection:
        """Connect to the agent's socket, waiting for it to listen; fails fast if the container ends.
        Every connection is its own (no shared stream), so `port` only counts clients."""
        sock = agent_socket(spec)

        async def open_socket(remaining: float) -> Connection | None:
            with _socket_path(sock) as path:
                return None if path is None else await Connection.open_unix(path, timeout=remaining)

        async def greet(conn: Connection, remaining: float) -> None:
            # The hostname is the runtime's and the clock the host's: HELLO sets neither.
            await conn.hello(set_clock=False, timeout=remaining)

        return await connect_agent(
            open_socket,
            greet,
            alive=lambda: self.is_alive(spec, pid),
            detail=lambda: self.console_tail(spec),
            what="the container",
            timeout=timeout,
            interval=0.01,
        )

    def is_alive(self, spec: VMSpec, pid: int) -> bool:
        """The pid is this sandbox's agent: checked in /proc (its program and its container's cgroup),
        or by asking the engine where /proc does not show the container (Docker Desktop's VM)."""
        try:
            cgroups = Path(f"/proc/{pid}/cgroup").read_text()
            ident = _id_file(spec).read_text().strip()
        except (OSError, ValueError):
            return self._alive_by_engine(spec, pid) if not Path("/proc/self").exists() else False
        if not procs.running(pid) or procs.argv(pid)[:1] != [AGENT_PATH.encode()]:
            return False
        return ident in cgroups or self._alive_by_engine(spec, pid)

    def _alive_by_engine(self, spec: VMSpec, pid: int) -> bool:
        state = self._state(spec)
        return bool(state and state.get("Running") and int(state.get("Pid") or 0) == pid)

    def _state(self, spec: VMSpec) -> dict[str, Any] | None:
        proc = self.engine.run("inspect", "--format", "{{json .State}}", container_name(spec))
        if proc.returncode != 0:
            return None
        try:
            state = json.loads(proc.stdout)
        except ValueError:
            return None
        return state if isinstance(state, dict) else None

    def kill(self, spec: VMSpec, pid: int | None) -> None:
        """The container (by name when no pid was recorded: a start that was interrupted), then any
        process left that names the sandbox's run directory (an engine client that was starting
        it, a lifetime watchdog)."""
        if pid is None:
            self.engine.run("kill", "--signal", "KILL", container_name(spec))
        elif self.is_alive(spec, pid):
            self.engine.run("kill", "--signal", "KILL", container_name(spec))
            kill_and_wait(pid, lambda: self.is_alive(spec, pid))
        kill_tagged(str(spec.rundir))

    def cleanup(self, spec: VMSpec, *, keep_disk: bool) -> None:
        """Runtime files go; without keep_disk also the container (its writable layer) and logs."""
        shutil.rmtree(spec.rundir, ignore_errors=True)
        if not keep_disk:
            self._remove_container(spec)
            shutil.rmtree(spec.workdir, ignore_errors=True)

    def _remove_container(self, spec: VMSpec) -> None:
        force = ["--force", "--time", "0"] if self.engine.kind == "podman" else ["--force"]
        self.engine.run("rm", *force, container_name(spec))

    def console_tail(self, spec: VMSpec, lines: int = 5) -> str:
        """The agent's last log lines (podman: its log file; docker: `docker logs`), on one line."""
        text = file_tail(spec.console_log).decode(errors="replace")
        if not text:
            proc = self.engine.run("logs", "--tail", str(lines), container_name(spec))
            text = proc.stdout + proc.stderr
        # k8s-file lines are "TIME STREAM F message": keep the message.
        messages = [
            t.split(" ", 3)[3] if t.count(" ") >= 3 and t.split(" ")[1] in ("stdout", "stderr") else t
            for t in text.splitlines()
        ]
        return tail_line("\n".join(messages), lines) or "no output from the container"


@contextlib.contextmanager
def _socket_path(sock: Path) -> Iterator[Path | None]:
    """A path to connect to the agent's socket through (None while there is none yet).

    The rundir is writable by the container's root, which could put a symlink to any socket of the
    host there, or swap one in between a check and a connect: on Linux only the socket file itself,
    opened without following links, is connected to, through /proc/self/fd. (Elsewhere, Docker
    Desktop's containers run in its own VM.)"""
    if not hasattr(os, "O_PATH"):
        yield sock if sock.exists() else None
        return
    try:
        fd = os.open(sock, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        yield None
        return
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            raise AgentkernelError(f"{sock} is not a socket: the container put something else there")
        yield Path(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def status() -> tuple[bool, str]:
    """Whether containers can run here, and how or why not (one line)."""
    try:
        engine = find_engine()
    except EngineUnavailable as exc:
        return False, str(exc)
    except (OSError, subprocess.SubprocessError) as exc:
        return False, f"probing the container engine failed: {exc}"
    return True, engine.describe()

"""Sandbox commands with docker-like habits: run, create, start, stop, rm, ls, exec, attach, cp, logs."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import typer

from agentkernel import hostinfo, paths
from agentkernel.cli.output import console, err_console, print_json
from agentkernel.cli.signals import SignalGuard, run_until_signalled
from agentkernel.cli.streams import attach_process, raw_terminal, terminal_size
from agentkernel.config import load_config, resolve_policy, resolve_resources
from agentkernel.errors import AgentkernelError
from agentkernel.network import brokering
from agentkernel.protocol.client import Connection, ExitStatus, check_arguments
from agentkernel.service import sandboxes

T = TypeVar("T")
COMMAND_SETTINGS = {"allow_interspersed_args": False}
TIMEOUT_EXIT = 124
SIGNAL_GRACE = 3.0
"""Seconds `run` waits for its command to end after passing a signal on, before removing the sandbox."""
LOGIN_SHELL = ["/bin/sh", "-c", "if command -v bash >/dev/null; then exec bash -l; else exec sh -l; fi"]


def _await(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def parse_env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key or "\0" in pair:
            raise AgentkernelError(f"-e {pair!r}: expected KEY=VALUE")
        env[key] = value
    return env


MAX_TIMEOUT = 7 * 86400.0


def check_timeout(timeout: float | None) -> None:
    """`--timeout` is checked before anything boots (typer takes "nan" and "inf" as numbers)."""
    if timeout is not None and not 0 < timeout <= MAX_TIMEOUT:
        raise AgentkernelError(
            f"--timeout must be more than 0 and at most {MAX_TIMEOUT:g} seconds (got {timeout:g})"
        )


def command_args(command: list[str]) -> list[str]:
    """The command after an optional `--` (which stays in the arguments once parsing stops at it)."""
    return command[1:] if command[:1] == ["--"] else command


def _status_exit(status: ExitStatus, timeout: float | None) -> None:
    if status.timed_out:
        err_console.print(f"agentkernel: the command timed out after {timeout:g}s and was killed")
        raise typer.Exit(TIMEOUT_EXIT)
    raise typer.Exit(status.shell_code)


def _note(message: str) -> None:
    """Progress for people at a terminal; scripts reading our stdout never see it."""
    if sys.stderr.isatty():
        err_console.print(f"[dim]{message}[/dim]")


def _warn_isolation(backend: str) -> None:
    """Say, on one line of stderr, when a sandbox is a container rather than a VM: always, so that
    scripts and logs keep it too."""
    if warning := hostinfo.isolation_warning(backend):
        print(f"agentkernel: {warning}", file=sys.stderr, flush=True)


def _note_accel_once() -> None:
    """Say once per data dir, to a person at a terminal, that VMs here run without KVM (slower)."""
    marker = paths.data_dir() / ".told-no-kvm"
    acc = hostinfo.accel()
    if acc.name == "tcg" and sys.stderr.isatty() and not marker.exists():
        err_console.print(f"[yellow]note:[/yellow] no usable KVM, so VMs run under emulation: {acc.note}")
        paths.write_private(marker, "")


async def _exec(
    name: str,
    command: list[str],
    *,
    env: dict[str, str],
    workdir: str | None,
    interactive: bool,
    tty_mode: bool,
    timeout: float | None,
) -> ExitStatus:
    async with sandboxes.session(name) as conn:
        return await _exec_on(
            conn,
            command,
            env=env,
            workdir=workdir,
            interactive=interactive,
            tty_mode=tty_mode,
            timeout=timeout,
        )


async def _exec_on(
    conn: Connection,
    command: list[str],
    *,
    env: dict[str, str],
    workdir: str | None,
    interactive: bool,
    tty_mode: bool,
    timeout: float | None,
    give_up_after: float | None = None,
) -> ExitStatus:
    command = command_args(command)
    if not command:
        raise AgentkernelError("no command given: agentkernel exec NAME -- CMD...")
    if tty_mode:
        env = {"TERM": os.environ.get("TERM", "xterm"), **env}
    proc = await conn.exec(
        command, env=env, cwd=workdir, timeout=timeout, pty=terminal_size() if tty_mode else None
    )
    with raw_terminal(tty_mode):
        return await attach_process(proc, stdin=interactive, tty_mode=tty_mode, give_up_after=give_up_after)


def _options(
    command: list[str],
    *,
    image: str | None,
    backend: str | None,
    vcpus: int | None,
    memory: int | None,
    profile: str | None,
    network: bool | None,
    mount_cwd: bool | None,
    directory: Path | None,
    read_only: bool | None,
    lifetime: float | None,
    secrets: list[str] | None = None,
) -> dict[str, Any]:
    """`sandboxes.create` options from the flags, then agentkernel.toml, then the defaults."""
    config, config_path = load_config(search_from=Path.cwd())
    bindings = brokering.bind(secrets or (), config.secrets, base=config_path.parent if config_path else None)
    chosen, why = sandboxes.choose_image(command, image, config, Path.cwd())
    policy = resolve_policy(
        config, profile=profile, network=network, mount_cwd=mount_cwd, read_only=read_only
    )
    if directory is not None and not directory.is_dir():
        raise AgentkernelError(f"--dir {directory}: no such directory")
    _note(f"image {chosen} ({why}), profile {policy.profile}")
    _note_accel_once()
    vcpus, memory_mb = resolve_resources(config, vcpus=vcpus, memory_mb=memory)
    return {
        "image": chosen,
        "backend": backend or config.sandbox.backend,
        "vcpus": vcpus,
        "memory_mb": memory_mb,
        "policy": policy,
        "mount_dir": directory,
        "lifetime": lifetime,
        "secrets": bindings,
    }


IMAGE = typer.Option(
    None, "--image", metavar="IMAGE", help="Image (default: agentkernel.toml, else detected)."
)
BACKEND = typer.Option(
    None,
    "--backend",
    metavar="BACKEND",
    help="qemu, firecracker or container (default: agentkernel.toml, else a VM: see `status`).",
)
VCPUS = typer.Option(None, "--vcpus", metavar="N", help="Virtual CPUs (default 1).")
MEMORY = typer.Option(None, "--memory", metavar="MB", help="Memory in MB (default 512).")
PROFILE = typer.Option(
    None,
    "--profile",
    metavar="PROFILE",
    help="Security profile: permissive, moderate (default), restrictive.",
)
NETWORK = typer.Option(None, "--network/--no-network", help="Override the profile's network setting.")
MOUNT_CWD = typer.Option(
    None, "--mount-cwd/--no-mount-cwd", help="Share the current directory at /workspace."
)
DIRECTORY = typer.Option(None, "--dir", metavar="DIR", help="Share this directory at /workspace.")
READ_ONLY = typer.Option(None, "--read-only/--read-write", help="Override the profile's read-only root.")
LIFETIME = typer.Option(
    None, "--lifetime", metavar="SECONDS", help="Stop the sandbox this many seconds after it starts."
)
SECRET = typer.Option(
    [],
    "--secret",
    metavar="NAME",
    help="Give the sandbox this secret (agentkernel.toml [secrets.NAME] or `agentkernel secret set`): "
    "it sees a placeholder, the gateway sends the value to the secret's hosts only. Repeatable.",
)


def run(
    command: list[str] = typer.Argument(..., metavar="-- CMD...", help="The command to run."),
    image: str | None = IMAGE,
    backend: str | None = BACKEND,
    vcpus: int | None = VCPUS,
    memory: int | None = MEMORY,
    profile: str | None = PROFILE,
    network: bool | None = NETWORK,
    mount_cwd: bool | None = MOUNT_CWD,
    directory: Path | None = DIRECTORY,
    read_only: bool | None = READ_ONLY,
    lifetime: float | None = LIFETIME,
    secret: list[str] = SECRET,
    timeout: float | None = typer.Option(
        None, "--timeout", metavar="SECONDS", help="Kill the command after this many seconds."
    ),
    env: list[str] = typer.Option(
        [], "--env", "-e", metavar="KEY=VALUE", help="Set KEY=VALUE in the command's environment."
    ),
    workdir: str | None = typer.Option(
        None, "--workdir", "-w", metavar="PATH", help="Working directory in the sandbox."
    ),
    interactive: bool = typer.Option(False, "--interactive", "-i", help="Pass stdin to the command."),
    keep: bool = typer.Option(False, "--keep", help="Keep the sandbox running afterwards."),
    name: str | None = typer.Option(
        None, "--name", metavar="NAME", help="Name for the sandbox (default: run-XXXXXXXX)."
    ),
    no_pool: bool = typer.Option(False, "--no-pool", help="Boot a new sandbox even if the pool has one."),
) -> None:
    """Run a command in a new sandbox, stream its output, exit with its exit code, then remove it.

    When the pool daemon runs (`agentkernel daemon start`) and keeps sandboxes of this kind, one of
    them is taken instead of booting."""
    command = command_args(command)
    if not command:
        raise AgentkernelError("no command given: agentkernel run -- CMD...")
    check_timeout(timeout)
    variables = parse_env(env)
    check_arguments(command, variables)  # before a sandbox is booted for a command that cannot run
    options = _options(
        command,
        image=image,
        backend=backend,
        vcpus=vcpus,
        memory=memory,
        profile=profile,
        network=network,
        mount_cwd=mount_cwd,
        directory=directory,
        read_only=read_only,
        lifetime=lifetime,
        secrets=secret,
    )

    async def go(guard: SignalGuard) -> ExitStatus:
        async with sandboxes.ephemeral(name=name, keep=keep, pool=not no_pool, **options) as (sandbox, conn):
            _warn_isolation(sandboxes.get(sandbox).backend)
            if keep:
                _note(f"sandbox {sandbox} is kept: remove it with `agentkernel rm -f {sandbox}`")
            try:  # while it runs, signals go to the command (a second one gives up on it)
                return await _exec_on(
                    conn,
                    command,
                    env=variables,
                    workdir=workdir,
                    interactive=interactive,
                    tty_mode=False,
                    timeout=timeout,
                    give_up_after=SIGNAL_GRACE,
                )
            finally:
                guard.install()  # the sandbox's removal, next, is not cut short by a signal

    status = run_until_signalled(go)
    _status_exit(status, timeout)


def create(
    name: str = typer.Argument(..., help="Sandbox name."),
    image: str | None = IMAGE,
    backend: str | None = BACKEND,
    vcpus: int | None = VCPUS,
    memory: int | None = MEMORY,
    profile: str | None = PROFILE,
    network: bool | None = NETWORK,
    mount_cwd: bool | None = MOUNT_CWD,
    directory: Path | None = DIRECTORY,
    read_only: bool | None = READ_ONLY,
    lifetime: float | None = LIFETIME,
    secret: list[str] = SECRET,
) -> None:
    """Create a sandbox (its own disk over the image) without starting it."""
    sandboxes.validate_name(name)
    options = _options(
        [],
        image=image,
        backend=backend,
        vcpus=vcpus,
        memory=memory,
        profile=profile,
        network=network,
        mount_cwd=mount_cwd,
        directory=directory,
        read_only=read_only,
        lifetime=lifetime,
        secrets=secret,
    )
    _warn_isolation(sandboxes.create(name, **options).backend)
    console.print(name)


def start(name: str = typer.Argument(..., help="Sandbox name.")) -> None:
    """Boot a sandbox and wait until it answers."""
    _note(f"booting {name} ...")
    _warn_isolation(_await(sandboxes.start(name)).backend)
    console.print(name)


def stop(name: str = typer.Argument(..., help="Sandbox name.")) -> None:
    """Power a sandbox off; its disk is kept for the next start."""
    _await(sandboxes.stop(name))
    console.print(name)


def remove(
    names: list[str] = typer.Argument(..., help="Sandbox names."),
    force: bool = typer.Option(False, "--force", "-f", help="Remove even if running."),
) -> None:
    """Remove sandboxes and everything they have on disk."""
    sandboxes.reap()
    for name in names:
        sandboxes.remove(name, force=force)
        console.print(name)


def list_cmd(
    json_out: bool = typer.Option(False, "--json", help="Print a JSON array."),
    show_all: bool = typer.Option(False, "--all", "-a", help="Include the pool daemon's ready sandboxes."),
) -> None:
    """List sandboxes."""
    records = sandboxes.list_sandboxes(pooled=show_all)
    if json_out:
        print_json([r.public() for r in records])
        return
    if not records:
        console.print("no sandboxes")
        return
    console.print(f"{'NAME':<24} {'STATUS':<8} {'BACKEND':<8} {'IMAGE':<12} {'CPUS':>4} {'MEM':>6}  CREATED")
    for r in records:
        console.print(
            f"{r.name:<24} {r.status:<8} {r.backend:<8} {r.image:<12} {r.vcpus:>4} "
            f"{r.memory_mb:>4}MB  {r.created_at}"
        )


def exec_cmd(
    name: str = typer.Argument(..., help="Sandbox name."),
    command: list[str] = typer.Argument(..., metavar="-- CMD...", help="The command to run."),
    interactive: bool = typer.Option(False, "--interactive", "-i", help="Pass stdin to the command."),
    tty_mode: bool = typer.Option(False, "--tty", "-t", help="Run the command on a terminal."),
    env: list[str] = typer.Option(
        [], "--env", "-e", metavar="KEY=VALUE", help="Set KEY=VALUE in the command's environment."
    ),
    workdir: str | None = typer.Option(
        None, "--workdir", "-w", metavar="PATH", help="Working directory in the sandbox."
    ),
    timeout: float | None = typer.Option(
        None, "--timeout", metavar="SECONDS", help="Kill the command after this many seconds."
    ),
) -> None:
    """Run a command in a running sandbox; exits with its exit code (128+N if killed by signal N)."""
    check_timeout(timeout)
    status = _await(
        _exec(
            name,
            command,
            env=parse_env(env),
            workdir=workdir,
            interactive=interactive,
            tty_mode=tty_mode,
            timeout=timeout,
        )
    )
    _status_exit(status, timeout)


def attach(name: str = typer.Argument(..., help="Sandbox name.")) -> None:
    """Open an interactive shell in a running sandbox."""
    status = _await(
        _exec(name, LOGIN_SHELL, env={}, workdir=None, interactive=True, tty_mode=True, timeout=None)
    )
    raise typer.Exit(status.shell_code)


def _split_remote(spec: str) -> tuple[str | None, str]:
    """`NAME:/path` -> (NAME, /path); a local path -> (None, path)."""
    head, sep, tail = spec.partition(":")
    if sep and head and "/" not in head:
        if not tail.startswith("/"):
            raise AgentkernelError(f"{spec}: the path in the sandbox must be absolute")
        return sandboxes.validate_name(head), tail
    return None, spec


def cp(
    source: str = typer.Argument(..., help="NAME:/path or a local path."),
    dest: str = typer.Argument(..., help="NAME:/path or a local path."),
) -> None:
    """Copy a file between the host and a sandbox (one side is NAME:/path)."""
    src_name, src_path = _split_remote(source)
    dst_name, dst_path = _split_remote(dest)
    if (src_name is None) == (dst_name is None):
        raise AgentkernelError("cp: exactly one of SRC and DST must be NAME:/path")
    if dst_name is not None:
        _await(_upload(dst_name, Path(src_path), dst_path))
    else:
        assert src_name is not None
        _await(_download(src_name, src_path, Path(dst_path)))


async def _read_local(path: Path) -> AsyncIterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(256 * 1024):
            yield chunk


async def _upload(name: str, local: Path, remote: str) -> None:
    if not local.is_file():
        raise AgentkernelError(f"cp: {local}: not a file")
    async with sandboxes.session(name) as conn:
        if remote.endswith("/"):
            remote += local.name
        else:
            with contextlib.suppress(AgentkernelError):
                if (await conn.stat(remote)).kind == "dir":
                    remote = f"{remote}/{local.name}"
        await conn.write_file(remote, _read_local(local), mode=local.stat().st_mode & 0o777)


async def _download(name: str, remote: str, local: Path) -> None:
    if local.is_dir():
        base = remote.rstrip("/").rsplit("/", 1)[-1]
        if not base:
            raise AgentkernelError(f"cp: {name}:{remote} names no file to copy")
        local = local / base
    tmp = local.with_name(f".{local.name}.part")
    async with sandboxes.session(name) as conn:
        info = await conn.stat(remote)
        if info.kind != "file":
            raise AgentkernelError(f"cp: {name}:{remote}: not a regular file")
        try:
            with tmp.open("wb") as f:
                async for chunk in conn.read_file(remote):
                    f.write(chunk)
            tmp.chmod(info.mode & 0o777)
            tmp.replace(local)
        except OSError as exc:
            raise AgentkernelError(f"cp: cannot write {local}: {exc.strerror or exc}") from None
        finally:
            tmp.unlink(missing_ok=True)


def logs(name: str = typer.Argument(..., help="Sandbox name.")) -> None:
    """Print a sandbox's console log (the guest kernel's and agent's messages)."""
    record = sandboxes.get(name)
    log = sandboxes.spec_of(record).console_log
    if log.exists():
        sys.stdout.buffer.write(log.read_bytes())

"""Sandbox commands with docker-like habits: run, create, start, stop, rm, ls, exec, attach, cp, logs."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

import typer

from agentkernel import hostinfo, paths
from agentkernel.backends import registry
from agentkernel.cli import thin
from agentkernel.cli.output import console, err_console, print_json
from agentkernel.cli.signals import SignalGuard, run_until_signalled
from agentkernel.cli.streams import attach_process, raw_terminal, terminal_size
from agentkernel.cli.thin_exec import timed_out_message
from agentkernel.config import load_config
from agentkernel.errors import AgentkernelError, InvalidRequestError
from agentkernel.protocol.connection import Connection, ExitStatus
from agentkernel.sandbox.state import SandboxRecord
from agentkernel.service import checks, transfers
from agentkernel.service.request import SandboxFlags, SandboxRequest
from agentkernel.service.service import CommandSpec, SandboxService, call, exec_on

T = TypeVar("T")
COMMAND_SETTINGS = {"allow_interspersed_args": False}
TIMEOUT_EXIT = 124
SIGNAL_GRACE = 3.0
"""Seconds `run` waits for its command to end after passing a signal on, before removing the sandbox."""
FLAGS = {
    "name": "NAME",
    "image": "--image",
    "vcpus": "--vcpus",
    "memory_mb": "--memory",
    "profile": "--profile",
    "directory": "--dir",
    "lifetime": "--lifetime",
    "secrets": "--secret",
    "env": "--env",
    "labels": "--label",
    "label": "--filter label",
    "timeout": "--timeout",
    "cwd": "--workdir",
    "command": "CMD",
    "publish": "--publish",
    "host": "--publish",
    "host_port": "--publish",
}
"""The service's field names as this command line spells them."""


@contextlib.contextmanager
def as_flags() -> Iterator[None]:
    """The service checks input once for every face and names the field; here, the flag it came in."""
    try:
        yield
    except InvalidRequestError as exc:
        field = exc.field or ""
        if field not in FLAGS:
            raise
        detail = str(exc).removeprefix(f"{field}: ")
        raise InvalidRequestError(FLAGS[field], detail, code=exc.code) from None


def with_service(work: Callable[[SandboxService], Awaitable[T]]) -> T:
    """`work` with the service, for this process (the project is the current directory)."""
    with as_flags():
        return call(work)


def _checked_command(
    command: list[str], *, env: list[str], workdir: str | None, timeout: float | None
) -> CommandSpec:
    """The command and its settings, checked before anything boots (typer takes "nan" and "inf" for
    numbers)."""
    with as_flags():
        return CommandSpec.checked(
            command, env=checks.parse_pairs(env, field="env"), cwd=workdir, timeout=timeout
        )


def command_args(command: list[str]) -> list[str]:
    """The command after an optional `--` (which stays in the arguments once parsing stops at it)."""
    return command[1:] if command[:1] == ["--"] else command


def _status_exit(status: ExitStatus, timeout: float | None) -> None:
    if status.timed_out:
        err_console.print(f"agentkernel: {timed_out_message(timeout)}", highlight=False)
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
    service: SandboxService,
    name: str,
    command: CommandSpec,
    *,
    interactive: bool,
    tty_mode: bool,
    give_up_after: float | None = None,
    conn: Connection | None = None,
) -> ExitStatus:
    """Run `command` in sandbox `name` (on `conn` when given) attached to this terminal."""
    if tty_mode:
        command = replace(command, env={"TERM": os.environ.get("TERM", "xterm"), **command.env})
    proc = await exec_on(
        conn or await service.connection(name), command, pty=terminal_size() if tty_mode else None
    )
    with raw_terminal(tty_mode):
        return await attach_process(proc, stdin=interactive, tty_mode=tty_mode, give_up_after=give_up_after)


def _flags(
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
    secrets: list[str],
    env: Sequence[str] = (),
    labels: Sequence[str] = (),
) -> SandboxFlags:
    with as_flags():
        return SandboxFlags(
            image=image,
            backend=backend,
            vcpus=vcpus,
            memory_mb=memory,
            profile=profile,
            network=network,
            mount_cwd=mount_cwd,
            read_only=read_only,
            directory=directory,
            lifetime=lifetime,
            env=checks.parse_pairs(env, field="env"),
            labels=checks.parse_pairs(labels, field="labels"),
            secrets=tuple(secrets),
        )


async def _resolve(service: SandboxService, flags: SandboxFlags, command: list[str]) -> SandboxRequest:
    """The request of `flags` here (flags, then agentkernel.toml, then the defaults), said at a terminal."""
    request = await service.resolve(flags, command=command)
    _note(f"image {request.image} ({request.image_reason}), profile {request.policy.profile}")
    _note_accel_once()
    return request


IMAGE = typer.Option(
    None, "--image", metavar="IMAGE", help="Image (default: agentkernel.toml, else detected)."
)
BACKEND = typer.Option(
    None,
    "--backend",
    metavar="BACKEND",
    help=f"{', '.join(registry.names())} (default: agentkernel.toml, else a VM: see `status`).",
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
LABEL = typer.Option(
    [], "--label", metavar="KEY=VALUE", help="Label the sandbox (`ls --filter label=KEY=VALUE`). Repeatable."
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
    publish: list[str] = typer.Option(
        [],
        "--publish",
        "-p",
        metavar="[HOST_IP:][HOST_PORT:]GUEST_PORT",
        help="Reach guest port GUEST_PORT at HOST_IP:HOST_PORT (default 127.0.0.1, a free port) while "
        "the command runs. Repeatable.",
    ),
) -> None:
    """Run a command in a new sandbox, stream its output, exit with its exit code, then remove it.

    When the pool daemon runs (`agentkernel daemon start`) and keeps sandboxes of this kind, one of
    them is taken instead of booting."""
    from agentkernel.cli.port_cmds import parse_publish, publish_all  # it builds on this module

    command = command_args(command)
    if not command:
        raise AgentkernelError("no command given: agentkernel run -- CMD...")
    spec = _checked_command(command, env=env, workdir=workdir, timeout=timeout)
    with as_flags():
        published = [parse_publish(p) for p in publish]
    flags = _flags(
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
        async with SandboxService(Path.cwd()) as service:
            request = await _resolve(service, flags, command)
            async with service.ephemeral(request, name=name, keep=keep, pool=not no_pool) as (sandbox, conn):
                _warn_isolation((await service.get(sandbox)).backend)
                if keep:
                    _note(f"sandbox {sandbox} is kept: remove it with `agentkernel rm -f {sandbox}`")
                await publish_all(service, sandbox, published)
                try:  # while it runs, signals go to the command (a second one gives up on it)
                    return await _exec(
                        service,
                        sandbox,
                        spec,
                        interactive=interactive,
                        tty_mode=False,
                        give_up_after=SIGNAL_GRACE,
                        conn=conn,
                    )
                finally:
                    guard.install()  # the sandbox's removal, next, is not cut short by a signal

    with as_flags():
        status = run_until_signalled(go)
    _status_exit(status, timeout)


def create(
    name: str | None = typer.Argument(
        None, help="Sandbox name (default: [sandbox] name in agentkernel.toml)."
    ),
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
    env: list[str] = typer.Option(
        [], "--env", "-e", metavar="KEY=VALUE", help="Set KEY=VALUE for every command in the sandbox."
    ),
    label: list[str] = LABEL,
) -> None:
    """Create a sandbox (its own disk over the image) without starting it."""
    if name is None:
        name = load_config(search_from=Path.cwd())[0].sandbox.name
        if name is None:
            raise AgentkernelError(
                "no sandbox name: agentkernel create NAME, or set [sandbox] name in agentkernel.toml"
            )
    with as_flags():
        checks.validate_name(name)
    flags = _flags(
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
        env=env,
        labels=label,
    )

    async def work(service: SandboxService) -> SandboxRecord:
        return await service.create(await _resolve(service, flags, []), name=name, start=False)

    _warn_isolation(with_service(work).backend)
    console.print(name)


def start(name: str = typer.Argument(..., help="Sandbox name.")) -> None:
    """Boot a sandbox and wait until it answers."""
    _note(f"booting {name} ...")
    _warn_isolation(with_service(lambda service: service.start(name)).backend)
    console.print(name)


def stop(name: str = typer.Argument(..., help="Sandbox name.")) -> None:
    """Power a sandbox off; its disk is kept for the next start."""
    with_service(lambda service: service.stop(name))
    console.print(name)


def remove(
    names: list[str] = typer.Argument(..., help="Sandbox names."),
    force: bool = typer.Option(False, "--force", "-f", help="Remove even if running."),
) -> None:
    """Remove sandboxes and everything they have on disk."""

    async def work(service: SandboxService) -> None:
        await service.reap()
        for name in names:
            await service.remove(name, force=force)
            console.print(name)

    with_service(work)


def list_cmd(
    json_out: bool = typer.Option(False, "--json", help="Print a JSON array."),
    show_all: bool = typer.Option(False, "--all", "-a", help="Include the pool daemon's ready sandboxes."),
    filters: list[str] = typer.Option(
        [], "--filter", "-f", metavar="label=KEY=VALUE", help="Only sandboxes with this label. Repeatable."
    ),
) -> None:
    """List sandboxes."""
    labels = []
    for given in filters:
        kind, sep, label = given.partition("=")
        if kind != "label" or not sep:
            raise InvalidRequestError("--filter", f"{given!r}: expected label=KEY=VALUE")
        labels.append(label)
    with as_flags():
        wanted = checks.parse_labels(labels)
    records = with_service(lambda service: service.list_sandboxes(labels=wanted, pooled=show_all))
    if json_out:
        from agentkernel.sandbox.view import SandboxView  # pydantic: only for --json (start-up time)

        print_json([SandboxView.of(r).to_json() for r in records])
        return
    if not records:
        console.print(thin.NO_SANDBOXES)
        return
    console.print(thin.LIST_HEADER)
    for r in records:
        console.print(thin.list_line(vars(r)))


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
    detach: bool = typer.Option(False, "--detach", "-d", help="Run it in the background; print its id."),
) -> None:
    """Run a command in a running sandbox; exits with its exit code (128+N if killed by signal N).
    With -d it runs in the background, on after this command returns, until it exits or the sandbox
    stops."""
    command = command_args(command)
    if not command:
        raise AgentkernelError("no command given: agentkernel exec NAME -- CMD...")
    if detach and (interactive or tty_mode):
        raise AgentkernelError("--detach runs the command without a terminal or stdin: drop -i and -t")
    spec = _checked_command(command, env=env, workdir=workdir, timeout=timeout)
    if detach:
        started = with_service(lambda service: service.start_command(name, spec))
        print(started.id)
        return
    status = with_service(
        lambda service: _exec(service, name, spec, interactive=interactive, tty_mode=tty_mode)
    )
    _status_exit(status, timeout)


def attach(name: str = typer.Argument(..., help="Sandbox name.")) -> None:
    """Open an interactive shell in a running sandbox."""
    spec = CommandSpec.checked(checks.LOGIN_SHELL)
    status = with_service(lambda service: _exec(service, name, spec, interactive=True, tty_mode=True))
    raise typer.Exit(status.shell_code)


def _split_remote(spec: str) -> tuple[str | None, str]:
    """`NAME:/path` -> (NAME, /path); a local path -> (None, path)."""
    head, sep, tail = spec.partition(":")
    if sep and head and "/" not in head:
        if not tail.startswith("/"):
            raise AgentkernelError(f"{spec}: the path in the sandbox must be absolute")
        with as_flags():
            return checks.validate_name(head), tail
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
        with_service(lambda service: transfers.upload(service, dst_name, Path(src_path), dst_path))
    else:
        assert src_name is not None
        with_service(lambda service: transfers.download(service, src_name, src_path, Path(dst_path)))


def logs(name: str = typer.Argument(..., help="Sandbox name.")) -> None:
    """Print a sandbox's console log (the guest kernel's and agent's messages)."""
    log = with_service(lambda service: service.console_log(name))
    if log.exists():
        sys.stdout.buffer.write(log.read_bytes())

"""`agentkernel run` on the standard library, through the pool daemon: it leases a ready sandbox of the
kind `run` would make here (`pool/thin_runs.py` resolves the request as `run` does), runs the command
in it over the blocking client as `exec` does here (`thin_exec`), and has the daemon remove it.

Any doubt before the command starts is a Fallback to the full `run` with nothing printed: a flag not
taken here (`--keep`, `--name`, `--no-pool`, `-p`, `--secret`, ...), no daemon, no ready sandbox of the
kind, a sandbox it cannot reach (then released first). A leased sandbox is this process's from the
hand-out: removed by the daemon when asked, by its reaper should this process die.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys

from agentkernel.cli import thin_exec
from agentkernel.cli.thin import Fallback
from agentkernel.errors import AgentkernelError
from agentkernel.pool import wire
from agentkernel.service import checks

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (start-up time)
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any

SIGNAL_GRACE = 3.0
"""Seconds `run` waits for its command to end after passing a signal on, before removing the sandbox."""
RELEASE_TIMEOUT = 60.0
VALUED = {
    "--image": "image",
    "--backend": "backend",
    "--profile": "profile",
    "--vcpus": "vcpus",
    "--memory": "memory_mb",
    "--timeout": "timeout",
    "-e": "env",
    "--env": "env",
    "-w": "workdir",
    "--workdir": "workdir",
}
FLAGS = {
    "-i": "interactive",
    "--interactive": "interactive",
    "--network": "network",
    "--no-network": "network",
}


def parse(args: Sequence[str]) -> tuple[thin_exec.Request, dict[str, Any]]:
    """`run`'s arguments as the full command line reads them (options, then the command after an
    optional `--`): the command's request and the sandbox's flags for the lease; else a Fallback."""
    given: dict[str, Any] = {"env": []}
    i = 0
    while i < len(args) and args[i].startswith("-") and args[i] != "--":
        name, eq, value = args[i].partition("=")
        if args[i] in FLAGS:
            given[FLAGS[args[i]]] = args[i] != "--no-network"
        elif name in VALUED and ((eq and name.startswith("--")) or (not eq and i + 1 < len(args))):
            if not eq:
                i += 1
                value = args[i]
            if VALUED[name] == "env":
                given["env"].append(value)
            else:
                given[VALUED[name]] = value
        else:
            raise Fallback(args[i])  # --keep, --name, --no-pool, -p, --help, a spelling not taken here
        i += 1
    command = list(args[i:])
    command = command[1:] if command[:1] == ["--"] else command
    if not command or command[:1] == ["--"]:
        raise Fallback("command")
    try:
        timeout = float(given["timeout"]) if "timeout" in given else None
        request = thin_exec.Request(
            "",
            checks.check_command(command),
            checks.check_env(checks.parse_pairs(given["env"], field="env")),
            checks.guest_path(given["workdir"], field="cwd") if "workdir" in given else None,
            checks.check_timeout(timeout),
        )
        flags = {k: given.get(k) for k in ("image", "backend", "profile", "network")}
        flags |= {k: int(given[k]) if k in given else None for k in ("vcpus", "memory_mb")}
    except (AgentkernelError, ValueError):  # the full command line words it, with its flag names
        raise Fallback("input") from None
    request.interactive = bool(given.get("interactive"))
    return request, flags


def run(args: Sequence[str]) -> int:
    """Run `run` here; its exit status. Fallback before anything is done when this path may not."""
    request, flags = parse(args)
    if not wire.socket_path().exists():
        raise Fallback("no pool daemon")
    with thin_exec.Signals(SIGNAL_GRACE) as signals:
        try:
            return _leased(request, flags, signals)
        except Fallback:
            if signals.received:  # the full `run` would not see it: it ends here, as that one would
                return _interrupted(signals.received[0])
            raise


def _leased(request: thin_exec.Request, flags: dict[str, Any], signals: thin_exec.Signals) -> int:
    lease = {"op": "lease", "cwd": os.getcwd(), "command": request.command, "flags": flags}
    try:
        leased = wire.request(lease, timeout=10.0)
    except AgentkernelError:
        raise Fallback("lease") from None
    name = leased.get("sandbox")
    if not isinstance(name, str):
        raise Fallback("nothing ready")
    request.name = name
    try:
        return _in_leased(request, leased, signals)
    finally:
        for signo in thin_exec.FORWARDED_SIGNALS:  # the removal is not cut short by a signal
            signal.signal(signo, signal.SIG_IGN)
        _release(name)


def _release(name: str) -> None:
    """Have the daemon remove the sandbox; if it cannot (it is gone), remove it here."""
    try:
        wire.request({"op": "release", "sandbox": name}, timeout=RELEASE_TIMEOUT)
    except AgentkernelError:
        from agentkernel.errors import NoSuchSandboxError
        from agentkernel.service import sandboxes

        with contextlib.suppress(NoSuchSandboxError):  # a reaper was first
            sandboxes.remove(name, force=True)


def _interrupted(signo: int) -> int:
    print(f"agentkernel: interrupted by {signal.Signals(signo).name}", file=sys.stderr)
    return 128 + signo


def _in_leased(request: thin_exec.Request, leased: dict[str, Any], signals: thin_exec.Signals) -> int:
    """The command in the leased sandbox; Fallback (the sandbox then released) if it cannot start."""
    row = thin_exec.running_row(request.name)
    with thin_exec.connected(request, row) as (agent, records, command_id):
        _notes(leased)
        if signals.received:  # a signal before the command ran: it is not run, as the full `run`
            return _interrupted(signals.received[0])
        return thin_exec.attached(agent, request, records, command_id, row["pid"], signals)


def _notes(leased: dict[str, Any]) -> None:
    """What the full `run` tells a person at a terminal (on stderr, dim), and once per data dir that
    VMs run without KVM."""
    if not sys.stderr.isatty():
        return
    print(f"\x1b[2m{leased.get('note', '')}\x1b[0m", file=sys.stderr)
    if leased.get("accel") == "tcg":
        from agentkernel import paths

        marker = paths.data_dir() / ".told-no-kvm"
        if not marker.exists():
            note = leased.get("accel_note", "")
            print(f"\x1b[33mnote:\x1b[0m no usable KVM, so VMs run under emulation: {note}", file=sys.stderr)
            paths.write_private(marker, "")

"""The egress gateway process: one per data dir, serving every sandbox with network on.

Each registered sandbox gets a `Gateway` of its own (its policy, secrets and CA; audit entries name
it) and two listening Unix sockets of its own in its run directory, the proxy's and the DNS
resolver's, which only its VMM connects to. Which sandbox a connection belongs to is decided by the
socket it arrives on, never by anything the guest sends.

The service registers a sandbox when it starts and withdraws it when it stops (`launcher`), over
the control socket: one JSON line each way per connection, 0600 in a 0700 directory, and a peer of
another uid is refused (SO_PEERCRED) should the modes ever be widened. The process exits when the
last sandbox is withdrawn, or after IDLE_EXIT seconds with none registered; it keeps no state on
disk, so a crash leaves nothing registered and the launcher registers the running sandboxes anew. A
sandbox whose run directory was removed without a stop, or whose VMM (its pid, once `watch` named
it) is gone, is withdrawn within IDLE_CHECK seconds: its secrets and CA key leave memory with it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import os
import resource
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agentkernel.network import launcher
from agentkernel.network.brokering import Armed, Broker, SecretBinding
from agentkernel.network.dns import Resolver
from agentkernel.network.gateway import MAX_HEAD, Gateway
from agentkernel.network.policy import EgressRules

if TYPE_CHECKING:
    from agentkernel.network.mitm import Issuer

MAX_CONTROL = 1 << 20  # a register message: rules and a few secrets, far below this
CONTROL_TIMEOUT = 10.0
IDLE_EXIT = 30.0  # with no sandbox registered for this long, the process exits
IDLE_CHECK = 1.0


class ControlError(Exception):
    """A control message that cannot be served (answered to the peer, never fatal)."""


@dataclass
class Registered:
    gateway: Gateway
    servers: tuple[asyncio.Server, asyncio.Server]
    sockets: tuple[Path, Path]
    vmm: tuple[int, str] | None = None  # the VMM's pid and start time (/proc), once `watch` named it


def started(pid: int) -> str | None:
    """When process `pid` started (its /proc start time), None if it is gone or a zombie: with the
    pid, what tells the VMM from a later process given the same pid."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def _pid(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ControlError("watch needs sandbox and a pid")
    return value


def _rules(data: Any) -> EgressRules:
    try:
        allow, block = tuple(map(str, data["allow"])), tuple(map(str, data["block"]))
        return EgressRules(allow, block, bool(data["allowlist_only"]))
    except (KeyError, TypeError) as exc:
        raise ControlError(f"bad rules: {exc}") from None


def _brokered(data: Any) -> tuple[Broker | None, Issuer | None]:
    """The Broker and Issuer of a register message's `brokered` part (None, None without secrets)."""
    if data is None:
        return None, None
    from agentkernel.network.mitm import Issuer  # cryptography: only with secrets

    try:
        armed = [_armed(s) for s in data["secrets"]]
        return Broker(armed), Issuer(data["ca_cert"].encode(), data["ca_key"].encode())
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise ControlError(f"bad secrets: {exc}") from None


def _armed(data: dict[str, Any]) -> Armed:
    binding = SecretBinding.from_record({k: v for k, v in data.items() if k != "value"})
    return Armed(binding, data["value"].encode())


class Host:
    def __init__(self, control: Path, lock: Path) -> None:
        self.control, self.lock = control, lock
        self.sandboxes: dict[str, Registered] = {}
        self.done = asyncio.Event()
        self.exiting = False  # the last sandbox was withdrawn: exit once the reply is sent
        self.idle_since = time.monotonic()

    async def register(self, message: dict[str, Any]) -> dict[str, Any]:
        name = message.get("sandbox")
        sock, dns = message.get("socket"), message.get("dns_socket")
        if not isinstance(name, str) or not isinstance(sock, str) or not isinstance(dns, str):
            raise ControlError("register needs sandbox, socket and dns_socket")
        if not (Path(sock).is_absolute() and Path(dns).is_absolute()):
            raise ControlError("socket paths must be absolute")
        rules = _rules(message.get("rules"))
        broker, issuer = _brokered(message.get("brokered"))
        self.withdraw(name)  # a sandbox started again replaces what it had
        gateway = Gateway(name, rules, broker, issuer)
        paths = (Path(sock), Path(dns))
        for path in paths:
            path.unlink(missing_ok=True)
        try:
            proxy = await asyncio.start_unix_server(gateway.handle, path=sock, limit=MAX_HEAD)
        except OSError as exc:
            raise ControlError(f"cannot listen on {sock}: {exc.strerror}") from None
        try:
            resolver = await asyncio.start_unix_server(Resolver(gateway.dns_lookup).handle, path=dns)
        except OSError as exc:
            proxy.close()
            Path(sock).unlink(missing_ok=True)
            raise ControlError(f"cannot listen on {dns}: {exc.strerror}") from None
        self.sandboxes[name] = Registered(gateway, (proxy, resolver), paths)
        return {"ok": True}

    def withdraw(self, name: str) -> bool:
        """Stop serving `name`: its sockets close and go, its connections end. Whether it was there."""
        entry = self.sandboxes.pop(name, None)
        if entry is None:
            return False
        for server in entry.servers:
            server.close()
        entry.gateway.close()
        for path in entry.sockets:
            path.unlink(missing_ok=True)
        if not self.sandboxes:
            self.idle_since = time.monotonic()
        return True

    def status(self) -> dict[str, Any]:
        return {"ok": True, "pid": os.getpid(), "sandboxes": sorted(self.sandboxes)}

    async def serve_control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if launcher.peer_uid(writer.get_extra_info("socket")) != os.getuid():
                return
            line = await asyncio.wait_for(reader.readuntil(b"\n"), CONTROL_TIMEOUT)
            reply = await self._dispatch(line)
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except (asyncio.LimitOverrunError, asyncio.IncompleteReadError, TimeoutError, OSError):
            return
        finally:
            writer.close()
            if self.exiting:
                self.done.set()

    async def _dispatch(self, line: bytes) -> dict[str, Any]:
        try:
            message = json.loads(line)
            if not isinstance(message, dict):
                raise ControlError("a control message is a JSON object")
            op = message.get("op")
            if op == "register":
                return await self.register(message)
            if op == "withdraw":
                name = message.get("sandbox")
                if not isinstance(name, str):
                    raise ControlError("withdraw needs sandbox")
                withdrawn = self.withdraw(name)
                if not self.sandboxes:
                    # The withdrawer holds the launchers' lock: the socket is gone before it is
                    # released, so the next start spawns a new process rather than find this one.
                    self.control.unlink(missing_ok=True)
                    self.exiting = True
                return {"ok": True, "withdrawn": withdrawn, "exiting": self.exiting}
            if op == "status":
                return self.status()
            if op == "watch":
                name, pid = message.get("sandbox"), _pid(message.get("pid"))
                entry = self.sandboxes.get(name) if isinstance(name, str) else None
                if entry is None:
                    raise ControlError(f"{name!r} is not registered")
                entry.vmm = (pid, started(pid) or "")
                return {"ok": True}
            raise ControlError(f"unknown op {op!r}")
        except ValueError:
            return {"ok": False, "error": "a control message is one line of JSON"}
        except ControlError as exc:
            return {"ok": False, "error": str(exc)}

    def finish(self) -> None:
        """Stop taking control connections (the socket goes first, so no one finds a dying gateway)."""
        self.control.unlink(missing_ok=True)
        self.done.set()

    async def housekeeping(self) -> None:
        """Withdraw a sandbox whose proxy socket is gone (its run directory was removed without a
        stop, as `doctor` does) or whose VMM is (killed without a stop). Exit after IDLE_EXIT
        seconds with none registered (a start that died before registering, say), once the
        launchers' lock is free: no start is then between spawning and registering."""
        while not self.done.is_set():
            await asyncio.sleep(IDLE_CHECK)
            for name, entry in list(self.sandboxes.items()):
                vmm_gone = entry.vmm is not None and started(entry.vmm[0]) != entry.vmm[1]
                if vmm_gone or not entry.sockets[0].exists():
                    self.withdraw(name)
            if self.sandboxes or time.monotonic() - self.idle_since < IDLE_EXIT:
                continue
            with open(self.lock, "a") as f:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue
                if not self.sandboxes:
                    self.finish()

    async def run(self) -> None:
        staging = self.control.with_name(".control.tmp")
        staging.unlink(missing_ok=True)
        server = await asyncio.start_unix_server(self.serve_control, path=str(staging), limit=MAX_CONTROL)
        staging.chmod(0o600)
        staging.rename(self.control)  # the control socket appears ready, and private
        loop = asyncio.get_running_loop()
        for signo in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signo, self.finish)
        chores = asyncio.create_task(self.housekeeping())
        async with server:
            await self.done.wait()
        chores.cancel()
        for name in list(self.sandboxes):
            self.withdraw(name)


def main() -> None:
    """Serve this data dir's sandboxes. The control socket's path is derived here, not passed: no
    argument names a path, so no process is mistaken for a helper of a sandbox's run directory."""
    argparse.ArgumentParser(description="agentkernel egress gateway (one per data dir)").parse_args()
    os.umask(0o077)
    # Up to MAX_CONNECTIONS proxied connections (two fds each) and dns.MAX_CONNECTIONS per sandbox.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):  # an unlimited hard limit: the soft one stays
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(Host(launcher.control_path(), launcher.lock_path()).run())


if __name__ == "__main__":
    main()

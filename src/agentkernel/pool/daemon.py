"""The pool daemon: keeps `size` ready sandboxes of each configured kind and hands each out once.

Ready sandboxes are ordinary sandbox records marked with their pool key (hidden from `list`). Where the
backend can snapshot, the first sandbox of a kind is booted once and snapshotted into a template, and
every pooled sandbox is resumed from that template (a fraction of a boot); otherwise each is booted.
A handed-out sandbox belongs to its taker, who removes it: the pool never takes one back.

The main thread serves requests on the socket (an acquire is answered from memory, never waiting
for a boot, and wakes the worker; the thin command line's leases and releases, `thin_runs`, and its
`stop`, `rm` and `cp`, `thin_commands`, are done in threads of their own); the worker thread checks
health (the VMM alive, the agent answering), replaces sandboxes older than the maximum age, and
refills: several sandboxes at once, the emptiest kind first, as many as the host's cores allow
(PER_CORE each) and its free memory holds (each in flight counted at its full guest memory), so a
pooled sandbox is ready again before the one just handed out has finished its command. A kind's
first make waits for its template alone.

Restarted, the daemon adopts the ready sandboxes a previous run left, so none are orphaned, and
removes what it was making when it died: a sandbox not yet ready (a fork, or a template's boot
sandbox, whose VMM is killed with it) and a half-written template snapshot.

Ownership (see service/owners.py): what the daemon makes and keeps ready is the daemon's; an acquire
makes the sandbox the requesting process's (its pid from the socket's peer credentials), in the same
change that takes it out of the pool; an adopted one becomes the new daemon's. The worker also runs the
reaper every few seconds, removing sandboxes whose owner died.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import logging
import os
import signal
import socket
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TextIO, cast

from agentkernel import hostinfo, paths
from agentkernel.backends import registry
from agentkernel.errors import AgentkernelError
from agentkernel.pool import thin_commands, thin_runs, wire
from agentkernel.pool.kinds import Kind
from agentkernel.sandbox import state
from agentkernel.service import audit, owners
from agentkernel.service.service import SandboxService, hand_out, pooled_records, take_over
from agentkernel.service.service import call as _call

log = logging.getLogger("agentkernel.pool")
TEMPLATE_PREFIX = "pool-template-"
PER_CORE = 2
"""Sandboxes made at once per host core: a make waits on the VMM and the agent part of the time."""
MAX_PARALLEL = 64
MEMORY_RESERVE = 512 << 20
"""Bytes of the host's free memory that refills leave to everything else."""

__all__ = ["Kind", "Pool"]


@dataclass
class Slot:
    """The pool of one kind: its ready sandboxes (oldest first), those being made, and counters."""

    kind: Kind
    key: str | None = None
    ready: deque[tuple[str, float]] = field(default_factory=deque)  # (name, ready since)
    making: int = 0  # makes in flight
    templated: bool = False  # its template exists (or its backend has none): makes may run side by side
    handed_out: int = 0
    empty: int = 0  # acquires that found no ready sandbox
    failures: int = 0  # consecutive failed makes (backs off until retry_at)
    retry_at: float = 0.0
    last_error: str | None = None
    template_lock: threading.Lock = field(default_factory=threading.Lock)

    def wanted(self) -> int:
        return self.kind.size - len(self.ready) - self.making

    def public(self) -> dict[str, Any]:
        now = time.time()
        return {
            "image": self.kind.image,
            "size": self.kind.size,
            "vcpus": self.kind.vcpus,
            "memory_mb": self.kind.memory_mb,
            "profile": self.kind.policy.profile,
            "network": self.kind.policy.network,
            "backend": self.kind.backend,
            "key": self.key,
            "ready": [{"name": name, "age_s": round(now - since, 1)} for name, since in self.ready],
            "making": self.making,
            "handed_out": self.handed_out,
            "empty_acquires": self.empty,
            "last_error": self.last_error,
        }


class Pool:
    def __init__(
        self, kinds: list[Kind], *, max_age: float, health_interval: float, parallel: int | None = None
    ) -> None:
        self.slots = [Slot(kind) for kind in kinds]
        self.max_age = max_age
        self.health_interval = health_interval
        self.parallel = min(MAX_PARALLEL, parallel or PER_CORE * hostinfo.cores())
        self.peak_making = 0  # the most makes that were ever in flight at once
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.misses = 0  # acquires for a kind this pool does not keep
        self.started = time.time()

    # -- requests (main thread) ------------------------------------------------------------------

    def acquire(
        self, key: str, taker: owners.Owner, *, backend: str | None = None, counted: bool = True
    ) -> str | None:
        """A ready sandbox of kind `key`, from now on `taker`'s (the process that asked for it); with
        `backend`, only one of that backend. Not `counted`: finding none is not counted as a miss or an
        empty acquire (the asker's fallback asks again, and is)."""
        with self.lock:
            slot = next((s for s in self.slots if s.key == key), None)
            if slot is None:
                self.misses += counted
                return None
            if backend is not None and slot.ready and _backend_of(slot.ready[0][0]) != backend:
                return None
            while slot.ready:
                name, _since = slot.ready.popleft()
                if self._hand_out(name, taker):
                    slot.handed_out += 1
                    self.wake.set()
                    return name
            slot.empty += counted
            self.wake.set()
            return None

    def _hand_out(self, name: str, taker: owners.Owner) -> bool:
        """Make a ready sandbox its taker's (no longer pooled), if it is still alive."""
        try:
            hand_out(name, taker)
        except AgentkernelError as exc:
            log.warning("dropping %s: %s", name, exc)
            _discard(name)
            return False
        log.info("handed out %s", name)
        return True

    def status(self) -> dict[str, Any]:
        with self.lock:
            return {
                "pid": os.getpid(),
                "uptime_s": round(time.time() - self.started, 1),
                "max_age_s": self.max_age,
                "health_interval_s": self.health_interval,
                "parallel": self.parallel,
                "peak_making": self.peak_making,
                "misses": self.misses,
                "pools": [slot.public() for slot in self.slots],
            }

    # -- the worker thread ---------------------------------------------------------------------

    def adopt(self) -> None:
        """Take back the ready sandboxes a previous daemon left; remove pooled ones of other kinds,
        the ones it had not finished making, and its half-written templates."""
        for name in _call(lambda service: service.discard_partial_snapshots()):
            log.info("removed the half-written snapshot %s", name)
        for slot in self.slots:
            slot.key = slot.kind.key()
        keys = {slot.key: slot for slot in self.slots}
        for record in pooled_records():
            mark = record.pool
            assert mark is not None
            kept = keys.get(mark)
            if kept is not None and len(kept.ready) < kept.kind.size and take_over(record.name, mark):
                kept.ready.append((record.name, time.time()))
                log.info("adopted %s", record.name)
            else:
                _discard(record.name)
        templates = {TEMPLATE_PREFIX + str(slot.key) for slot in self.slots}
        _remove_templates(lambda name: name not in templates)

    def work(self) -> None:
        """Refill, check health, retire old sandboxes; until stopped (then wait for the makes in
        flight: what they make is ready, and drained with the rest)."""
        next_check = next_reap = 0.0
        with ThreadPoolExecutor(max_workers=self.parallel, thread_name_prefix="pool-make") as makers:
            while not self.stopping.is_set():
                self.wake.clear()
                if time.monotonic() >= next_reap:
                    _reap()
                    next_reap = time.monotonic() + owners.REAP_INTERVAL
                if time.monotonic() >= next_check:
                    self._check()
                    next_check = time.monotonic() + self.health_interval
                self._refill(makers)
                with self.lock:
                    retries = [s.retry_at for s in self.slots if s.wanted() > 0 and s.retry_at]
                wake_at = min([next_check, next_reap, *retries])
                self.wake.wait(timeout=min(1.0, max(0.0, wake_at - time.monotonic())))

    def _refill(self, makers: ThreadPoolExecutor) -> None:
        """Start makes for the kinds short of their size, emptiest first, while the bounds allow."""
        for slot in self.slots:
            self._rekey(slot)
        free = hostinfo.available_memory() - MEMORY_RESERVE
        while not self.stopping.is_set():
            now = time.monotonic()
            with self.lock:
                in_flight = [s for s in self.slots for _ in range(s.making)]
                if len(in_flight) >= self.parallel:
                    return
                candidates = [
                    s for s in self.slots
                    if s.key is not None and s.wanted() > 0 and s.retry_at <= now
                    and (s.templated or s.making == 0)
                ]  # fmt: skip
                if not candidates:
                    return
                slot = min(candidates, key=lambda s: (len(s.ready) + s.making) / s.kind.size)
                need = sum(s.kind.memory_mb << 20 for s in [*in_flight, slot])
                if need > free:
                    if not in_flight:
                        slot.last_error = (
                            f"waiting for free memory: {max(0, free) >> 20} MiB available to refills, "
                            f"a sandbox needs {slot.kind.memory_mb} MiB"
                        )
                    return
                slot.making += 1
                self.peak_making = max(self.peak_making, len(in_flight) + 1)
                key = slot.key
            assert key is not None
            makers.submit(self._make_one, slot, key)

    def _rekey(self, slot: Slot) -> None:
        """Follow the kind's key: when the image or kernel changed, what is ready is of an old kind."""
        try:
            key = slot.kind.key()
        except AgentkernelError as exc:
            slot.last_error = str(exc)
            return
        if key == slot.key:
            return
        with self.lock:
            old, slot.ready, slot.key, slot.templated = list(slot.ready), deque(), key, False
        for name, _since in old:
            _discard(name)

    def _make_one(self, slot: Slot, key: str) -> None:
        """Make one ready sandbox of `slot` (in a maker thread); a failure backs the kind off."""
        try:
            name = self._make(slot, key)
        except Exception as exc:  # a failed boot must not end the daemon: report it and back off
            with self.lock:
                slot.making -= 1
                slot.failures += 1
                slot.last_error = str(exc) or type(exc).__name__
                slot.retry_at = time.monotonic() + min(60.0, 2.0**slot.failures)
            log.error("cannot make a %s sandbox: %s", slot.kind.image, slot.last_error)
        else:
            with self.lock:
                slot.making -= 1
                slot.failures, slot.last_error, slot.retry_at = 0, None, 0.0
                current = slot.key == key
                if current:
                    slot.ready.append((name, time.time()))
            if current:
                log.info("ready: %s (%s)", name, slot.kind.image)
            else:
                _discard(name)  # the kind changed while it was being made
        finally:
            self.wake.set()

    def _make(self, slot: Slot, key: str) -> str:
        name = SandboxService.new_name()
        kind = slot.kind
        template = None
        if _can_snapshot(kind):
            with slot.template_lock:
                template = _template(kind, key)
        slot.templated = True

        async def make(service: SandboxService) -> None:
            if template is None:
                await service.create(kind.request(), name=name, pool=key, owned=True)
            else:
                await service.fork(template, name, pool=key, owned=True)
            await service.warm_up(name)

        try:
            _call(make)
        except BaseException:
            _discard(name)
            raise
        return name

    def _check(self) -> None:
        """Drop sandboxes that died, stopped answering or are older than the maximum age."""
        now = time.time()
        for slot in self.slots:
            with self.lock:
                entries = list(slot.ready)
            for name, since in entries:
                problem = "older than the maximum age" if now - since > self.max_age else _unhealthy(name)
                if problem is None:
                    continue
                with self.lock:
                    if (name, since) not in slot.ready:
                        continue  # handed out meanwhile
                    slot.ready.remove((name, since))
                log.info("replacing %s: %s", name, problem)
                _discard(name)

    def drain(self) -> None:
        """Remove every ready sandbox, and templates no sandbox uses any more."""
        with self.lock:
            names = [name for slot in self.slots for name, _ in slot.ready]
            for slot in self.slots:
                slot.ready.clear()
        for name in names:
            _discard(name)
        _remove_templates(lambda _name: True)


def _remove_templates(which: Callable[[str], bool]) -> None:
    """Remove the pool's template snapshots `which` selects, except those sandboxes still use."""

    async def remove(service: SandboxService) -> None:
        for snapshot in await service.list_snapshots():
            if snapshot.name.startswith(TEMPLATE_PREFIX) and which(snapshot.name):
                with contextlib.suppress(AgentkernelError):  # refused while sandboxes still use it
                    await service.remove_snapshot(snapshot.name)

    _call(remove)


def _can_snapshot(kind: Kind) -> bool:
    name = kind.backend or hostinfo.choose_backend(needs_network=kind.policy.network)
    return "snapshot" in registry.info(name).capabilities


def _template(kind: Kind, key: str) -> str:
    """The snapshot pooled sandboxes of `kind` resume from, made by booting one sandbox once."""
    name = TEMPLATE_PREFIX + key
    with contextlib.suppress(AgentkernelError):
        return _call(lambda service: service.get_snapshot(name)).name
    source = f"{TEMPLATE_PREFIX}{key[:8]}-boot"
    _discard(source)  # left by a daemon that died while making the template
    _call(
        lambda service: service.template(name, source=source, request=kind.request(), pool=f"template:{key}")
    )
    log.info("template %s made", name)
    return name


def _unhealthy(name: str) -> str | None:
    """Why a ready sandbox cannot be handed out (its VMM is gone, its agent is silent), or None."""

    try:
        _call(lambda service: service.ping(name))
    except (AgentkernelError, OSError, TimeoutError) as exc:
        return str(exc) or type(exc).__name__
    return None


def _backend_of(name: str) -> str | None:
    with contextlib.suppress(AgentkernelError):
        return state.get(name).backend
    return None


def _discard(name: str) -> None:
    with contextlib.suppress(AgentkernelError):
        _call(lambda service: service.remove(name, force=True))


def _reap() -> None:
    try:
        for name in _call(lambda service: service.reap()):
            log.info("removed %s: its owner has died", name)
    except Exception as exc:  # the state database busy or broken: the next pass tries again
        log.error("reaper: %s", exc)


def _peer(writer: asyncio.StreamWriter) -> owners.Owner | None:
    """The owner mark of the process at the other end of a socket connection (SO_PEERCRED)."""
    sock = writer.get_extra_info("socket")
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, _uid, _gid = struct.unpack("3i", creds)
    return owners.of_process(pid)


# -- the process ----------------------------------------------------------------------------------


async def serve(pool: Pool, shutdown: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    # Leases answer from memory and a quick resolve; releases, stops and removes wait for VMs: none
    # waits behind another kind.
    ops = (*thin_runs.OPS, *thin_commands.OPS)
    workers = {op: ThreadPoolExecutor(4, thread_name_prefix=f"pool-{op}") for op in ops}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), timeout=5)
            peer = _peer(writer)
            if (run := wire.parsed(line, thin_runs.OPS)) is not None:  # blocking work: not on this loop
                reply = await loop.run_in_executor(workers[run["op"]], thin_runs.answer, pool, run, peer)
            elif (command := wire.parsed(line, thin_commands.OPS)) is not None:
                # From here the worker has the socket (a copy of it): it watches for the client leaving,
                # and a copy's host file comes on it as ancillary data.
                cast(asyncio.Transport, writer.transport).pause_reading()
                try:
                    connection = os.dup(writer.get_extra_info("socket").fileno())
                except OSError:  # out of file descriptors: nothing done, the full command line does it
                    connection = None
                if connection is None:
                    reply = thin_commands.REFUSED
                else:
                    work = workers[command["op"]]
                    reply = await loop.run_in_executor(work, thin_commands.answer, command, connection)
            else:
                reply = answer(pool, line, shutdown, peer)
        except (ValueError, TimeoutError, OSError, AgentkernelError) as exc:  # a long line, a silent client
            reply = {"ok": False, "error": f"bad request: {exc}"}
        except Exception as exc:  # a bug or a broken database: logged, and answered all the same
            log.exception("request failed")
            reply = {"ok": False, "error": f"the pool daemon failed: {exc}"}
        try:
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
            writer.close()
        except OSError:  # the asker left: what it was handed out is no one's to use
            if isinstance(leased := reply.get("sandbox"), str):
                await loop.run_in_executor(workers["release"], _discard, leased)

    path = wire.socket_path()
    path.unlink(missing_ok=True)
    server = await asyncio.start_unix_server(handle, path=str(path), limit=wire.MAX_REQUEST + 4096)
    path.chmod(0o600)
    async with server:
        await shutdown.wait()
    path.unlink(missing_ok=True)
    for executor in workers.values():
        executor.shutdown(wait=True)


def answer(pool: Pool, line: bytes, shutdown: asyncio.Event, peer: owners.Owner | None) -> dict[str, Any]:
    """The reply to one request line from process `peer`."""
    try:
        message = json.loads(line)
    except ValueError:
        return {"ok": False, "error": "not a JSON line"}
    op = message.get("op") if isinstance(message, dict) else None
    if op == "acquire" and isinstance(message.get("key"), str):
        if peer is None:  # it has already gone: nobody would remove what it is given
            return {"ok": True, "sandbox": None}
        return {"ok": True, "sandbox": pool.acquire(message["key"], peer)}
    if op == "status":
        return {"ok": True, **pool.status()}
    if op == "stop":
        shutdown.set()
        return {"ok": True, "pid": os.getpid()}
    return {"ok": False, "error": f"unknown request {str(op)[:40]!r}"}


def _hold_pid_file() -> TextIO:
    """The pid file, locked for the daemon's life: a second daemon on this data dir refuses to run."""
    f = paths.open_private(wire.pid_file(), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise AgentkernelError("a pool daemon is already running for this data dir") from None
    f.truncate(0)
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def run(kinds: list[Kind], *, max_age: float, health_interval: float, parallel: int | None = None) -> None:
    pid_file = _hold_pid_file()
    pool = Pool(kinds, max_age=max_age, health_interval=health_interval, parallel=parallel)
    audit.record("daemon_start", None, pid=os.getpid(), pools=[k.image for k in kinds])
    pool.adopt()  # before the worker's first reaper pass: what is adopted is this daemon's

    async def main() -> None:
        shutdown = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, shutdown.set)
        worker = threading.Thread(target=pool.work, name="pool-worker", daemon=True)
        worker.start()
        await serve(pool, shutdown)
        pool.stopping.set()
        pool.wake.set()
        await asyncio.to_thread(worker.join)

    try:
        asyncio.run(main())
    finally:
        pool.drain()
        audit.record("daemon_stop", None, pid=os.getpid())
        wire.pid_file().unlink(missing_ok=True)
        pid_file.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m agentkernel.pool.daemon")
    parser.add_argument("spec", help="the pools, as JSON (written by `agentkernel daemon start`)")
    args = parser.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    spec = json.loads(args.spec)
    try:
        run(
            [Kind.from_record(kind) for kind in spec["kinds"]],
            max_age=spec["max_age"],
            health_interval=spec["health_interval"],
            parallel=spec.get("parallel"),
        )
    except AgentkernelError as exc:
        log.error("%s", exc)
        sys.exit(1)


if __name__ == "__main__":
    main()

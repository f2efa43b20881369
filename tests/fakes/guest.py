"""A fake guest: the well-behaved stand-in agent (tests/hostile/guest.py) grown into one that the
service can use like a sandbox's, served by a thread of the test process.

It runs no program: its commands are pretend ones (COMMANDS), and `sh -c` runs a script of them
(`;`-separated, `$VAR` expanded, `>/dev/null` and `>&2` understood). Its files live in a directory
tree, the sandbox's "disk" (`FakeVM.root`), and every guest path is mapped into that tree lexically
(no symlink is ever made there), so nothing outside it is read or written.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import errno
import os
import posixpath
import re
import shlex
import shutil
import signal
import stat
import subprocess
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from agentkernel.protocol.frames import (
    INITIAL_WINDOW,
    Frame,
    FrameType,
    Record,
    Tag,
    decode_record,
    encode_record,
)
from tests.hostile.guest import Agent

T = TypeVar("T")
SHUTDOWN_LINE = b"agentkernel-agent: shutting down\n"
"""What the real agent logs on the console as it powers off (the service reads it as a clean stop)."""
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
FILE_OPS = frozenset(
    {
        FrameType.GET,
        FrameType.PUT,
        FrameType.STAT,
        FrameType.LIST,
        FrameType.MKDIR,
        FrameType.REMOVE,
        FrameType.RENAME,
    }
)
WATCH_POLL = 0.02
"""Seconds between looks at a watched tree (the fake polls where the real agent uses inotify)."""
KIND = {stat.S_IFREG: 1, stat.S_IFDIR: 2, stat.S_IFLNK: 3}
SEED = {"/proc/uptime": b"1.00 1.00\n", "/etc/os-release": b"NAME=fake\n"}
SEED_DIRS = ("/bin", "/etc", "/home", "/proc", "/root", "/tmp", "/usr/bin", "/workspace")


def seed(root: Path) -> None:
    """A fresh guest tree: the directories and files the service and the tests expect."""
    for directory in SEED_DIRS:
        (root / directory.lstrip("/")).mkdir(parents=True, exist_ok=True)
    for path, data in SEED.items():
        (root / path.lstrip("/")).write_bytes(data)


@dataclass
class FakeVM:
    """One running fake sandbox: its stand-in VMM process, its tree, its console log."""

    name: str
    root: Path
    console_log: Path
    vmm: subprocess.Popen[bytes]
    read_only: bool = False
    server: asyncio.AbstractServer | None = None
    agents: set[FakeAgent] = field(default_factory=set)
    jobs: dict[int, Job] = field(default_factory=dict)
    """Background commands: the agent's, not a connection's (they end with the sandbox)."""

    def host_path(self, path: str) -> Path:
        """Where guest `path` is in the tree; a relative path is an error, as in the guest."""
        if not path.startswith("/"):
            raise OSError(errno.EINVAL, "not an absolute path")
        return self.root / posixpath.normpath(path).lstrip("/")

    def writable(self, path: str) -> None:
        """Raise EROFS where a read-only root refuses writes (all but /tmp, a tmpfs)."""
        normal = posixpath.normpath(path)
        if self.read_only and normal != "/tmp" and not normal.startswith("/tmp/"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    def power_off(self) -> None:
        """The guest's SHUTDOWN: log it as the agent does, and end the VMM."""
        with self.console_log.open("ab") as log:
            log.write(SHUTDOWN_LINE)
        with contextlib.suppress(ProcessLookupError):
            self.vmm.send_signal(signal.SIGKILL)


@dataclass
class Command:
    """One pretend command being run: its arguments, environment, and where its output goes."""

    argv: list[str]
    env: dict[str, str]
    cwd: str
    vm: FakeVM
    stdin: asyncio.Queue[bytes]
    out: Callable[[bytes], Awaitable[None]]
    err: Callable[[bytes], Awaitable[None]]


async def _echo(cmd: Command) -> int:
    args = cmd.argv[1:]
    newline = not (args[:1] == ["-n"] and args.pop(0))
    await cmd.out((" ".join(args) + ("\n" if newline else "")).encode(errors="surrogateescape"))
    return 0


async def _cat(cmd: Command) -> int:
    if len(cmd.argv) == 1:
        while data := await cmd.stdin.get():
            await cmd.out(data)
        return 0
    status = 0
    for name in cmd.argv[1:]:
        try:
            await cmd.out(cmd.vm.host_path(posixpath.join(cmd.cwd, name)).read_bytes())
        except OSError as exc:
            await cmd.err(f"cat: {name}: {exc.strerror}\n".encode())
            status = 1
    return status


async def _ls(cmd: Command) -> int:
    target = cmd.argv[1] if len(cmd.argv) > 1 else cmd.cwd
    try:
        names = sorted(os.listdir(cmd.vm.host_path(posixpath.join(cmd.cwd, target))))
    except OSError as exc:
        await cmd.err(f"ls: {target}: {exc.strerror}\n".encode())
        return 2
    await cmd.out("".join(f"{name}\n" for name in names).encode())
    return 0


async def _sleep(cmd: Command) -> int:
    await asyncio.sleep(float(cmd.argv[1]))
    return 0


async def _emit(cmd: Command) -> int:
    await cmd.out(b"y" * int(cmd.argv[1]))
    return 0


async def _env(cmd: Command) -> int:
    await cmd.out("".join(f"{k}={v}\n" for k, v in cmd.env.items()).encode())
    return 0


async def _pwd(cmd: Command) -> int:
    await cmd.out(f"{cmd.cwd}\n".encode())
    return 0


async def _exit(cmd: Command) -> int:
    return int(cmd.argv[1]) if len(cmd.argv) > 1 else 0


async def _status(code: int, _cmd: Command) -> int:
    return code


COMMANDS: dict[str, Callable[[Command], Awaitable[int]]] = {
    "echo": _echo,
    "cat": _cat,
    "ls": _ls,
    "sleep": _sleep,
    "emit": _emit,
    "env": _env,
    "pwd": _pwd,
    "exit": _exit,
    "true": lambda cmd: _status(0, cmd),
    "false": lambda cmd: _status(1, cmd),
}
"""The pretend programs, by name (a path's last part: `/bin/echo` is `echo`); `sh -c` is the shell."""

VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+|\?))")


async def _sh(cmd: Command) -> int:
    """`sh -c SCRIPT`: simple commands separated by `;` or new lines, each run in turn."""
    if cmd.argv[1:2] != ["-c"] or len(cmd.argv) < 3:
        await cmd.err(b"sh: only `sh -c SCRIPT` is supported here\n")
        return 2
    status = 0
    for line in re.split(r"[;\n]", cmd.argv[2]):
        words = shlex.split(_expand(line, {**cmd.env, "PWD": cmd.cwd, "?": str(status)}))
        out, err = cmd.out, cmd.err
        argv = []
        for word in words:
            if word in (">/dev/null", "1>/dev/null"):
                out = _discard
            elif word == "2>/dev/null":
                err = _discard
            elif word == ">&2":
                out = cmd.err
            elif word == "2>&1":
                err = cmd.out
            else:
                argv.append(word)
        if not argv:
            continue
        program = COMMANDS.get(posixpath.basename(argv[0]))
        if program is None:
            await err(f"sh: 1: {argv[0]}: not found\n".encode())
            status = 127
            continue
        status = await program(Command(argv, cmd.env, cmd.cwd, cmd.vm, cmd.stdin, out, err))
        if argv[0] == "exit":
            break
    return status


def _expand(line: str, values: dict[str, str]) -> str:
    return VARIABLE.sub(lambda m: values.get(m[1] or m[2], ""), line)


async def _discard(_data: bytes) -> None:
    pass


COMMANDS["sh"] = _sh

RING = 1 << 16
"""Bytes of output a fake background command keeps (the real agent: 1 MiB), so tests can overflow it."""


@dataclass
class Job:
    """A background command: its output (the last RING bytes of it) and, once it ended, its status."""

    id: int
    argv: list[str]
    stdin: asyncio.Queue[bytes] = field(default_factory=asyncio.Queue)
    kept: bytearray = field(default_factory=bytearray)
    written: int = 0
    stdin_closed: bool = False
    ending: list[tuple[Tag, int | bytes | str]] | None = None
    task: asyncio.Task[None] | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def pid(self) -> int:
        return 5000 + self.id

    @property
    def lost(self) -> int:
        return self.written - len(self.kept)

    async def out(self, data: bytes) -> None:
        self.kept += data
        self.written += len(data)
        del self.kept[:-RING]
        self.changed.set()
        await asyncio.sleep(0)

    def end(self, ending: list[tuple[Tag, int | bytes | str]]) -> None:
        self.ending, self.stdin_closed = ending, True
        self.changed.set()


class FakeAgent(Agent):
    """The agent side of one connection to a fake sandbox."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, vm: FakeVM) -> None:
        super().__init__(reader, writer)
        self.vm = vm
        self.requests: dict[int, Record] = {}  # EXECs whose ARGS are still coming
        self.running: dict[int, asyncio.Task[None]] = {}
        self.uploads: dict[int, asyncio.Queue[bytes]] = {}
        self.watches: dict[int, asyncio.Task[None]] = {}

    async def serve(self) -> None:
        self.vm.agents.add(self)
        try:
            await super().serve()
        finally:
            self.vm.agents.discard(self)

    async def handle(self, frame: Frame) -> None:
        channel = frame.channel
        if frame.type is FrameType.EXEC:
            self.requests[channel] = decode_record(frame.payload)
            self._maybe_exec(channel)
        elif frame.type is FrameType.ARGS and channel in self.requests:
            more = decode_record(frame.payload)
            request = self.requests[channel]
            for tag in (Tag.ARGV, Tag.ENV):
                request.fields.setdefault(tag, []).extend(more.fields.get(tag, []))
            request.fields[Tag.CONTINUED] = more.fields.get(Tag.CONTINUED, [])
            self._maybe_exec(channel)
        elif frame.type in FILE_OPS and channel in self.watches:  # how the host ends a watch
            self.watches.pop(channel).cancel()
            await self._error(channel, errno.EBUSY, "watch ended")
        elif frame.type is FrameType.WATCH:
            self.open(channel)
            self.watches[channel] = asyncio.create_task(self._watch(channel, decode_record(frame.payload)))
            self.tasks.add(self.watches[channel])
            self.watches[channel].add_done_callback(self.tasks.discard)
        elif (frame.type in FILE_OPS or frame.type in JOB_OPS) and channel in self.running:
            # As the agent does: another operation on a busy channel ends the running one (how the
            # host gives one up), and is not run itself.
            self.running.pop(channel).cancel()
            await self._error(channel, errno.EBUSY, "operation ended")
        elif frame.type in FILE_OPS:
            self.open(channel)
            if frame.type is FrameType.PUT:  # its DATA follows at once
                self.uploads[channel] = asyncio.Queue()
            self.track(channel, self._file_op(frame.type, channel, frame.payload))
        elif frame.type is FrameType.DATA and channel in self.uploads:
            self.uploads[channel].put_nowait(frame.payload)
        elif frame.type is FrameType.SIGNAL and channel in self.running:
            self.running.pop(channel).cancel()
            signo = decode_record(frame.payload).int(Tag.SIGNAL, 9) or 9
            await self.end(channel, FrameType.EXIT, encode_record([(Tag.SIGNAL, signo)]))
        elif frame.type in JOB_OPS:
            self.open(channel)
            self.track(channel, self._job_op(frame.type, channel, decode_record(frame.payload)))
        elif frame.type is FrameType.CONNECT and channel in self.running:
            self.running.pop(channel).cancel()
            await self._error(channel, errno.EBUSY, "operation ended")
        elif frame.type is FrameType.CONNECT:
            self.open(channel)
            self.uploads[channel] = asyncio.Queue()
            self.track(channel, self._connect(channel, decode_record(frame.payload)))
        elif frame.type is FrameType.SHUTDOWN:
            self.vm.power_off()
        else:
            await super().handle(frame)

    def open(self, channel: int) -> None:
        self.windows[channel] = INITIAL_WINDOW
        self.granted[channel] = asyncio.Event()
        self.stdin[channel] = asyncio.Queue()

    def track(self, channel: int, work: Coroutine[Any, Any, None]) -> None:
        """Run the channel's work as a task that a SIGNAL or the connection's end cancels."""
        task = self.running[channel] = asyncio.create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _maybe_exec(self, channel: int) -> None:
        request = self.requests[channel]
        if request.int(Tag.CONTINUED):
            return  # the rest comes in ARGS frames
        del self.requests[channel]
        self.open(channel)
        self.track(channel, self._exec(channel, request))

    async def _job_op(self, ftype: FrameType, channel: int, record: Record) -> None:
        """JOBS, ATTACH, INPUT, KILL or WAIT (docs/protocol.md, Background commands)."""
        with contextlib.suppress(ConnectionError):
            try:
                if ftype is FrameType.JOBS:
                    for job in self.vm.jobs.values():
                        await self.send(channel, FrameType.ENTRY, encode_record(_job_entry(job)))
                    await self.end(channel, FrameType.OK, b"")
                    return
                job = self.vm.jobs.get(record.int(Tag.CMD, 0) or 0)
                if job is None:
                    cmd = record.int(Tag.CMD, 0)
                    await self._error(channel, errno.ESRCH, f"no background command {cmd}")
                elif ftype is FrameType.ATTACH:
                    await self._attach(
                        channel, job, record.int(Tag.OFFSET, 0) or 0, record.int(Tag.FOLLOW, 1)
                    )
                elif ftype is FrameType.INPUT:
                    if job.stdin_closed:
                        await self._error(
                            channel, errno.EPIPE, f"background command {job.id}: its stdin is closed"
                        )
                        return
                    data = record.bytes(Tag.DATA) or b""
                    if data:
                        job.stdin.put_nowait(data)
                    if record.int(Tag.EOF):
                        job.stdin_closed = True
                        job.stdin.put_nowait(b"")
                    await self.end(channel, FrameType.OK, encode_record([(Tag.SIZE, len(data))]))
                elif ftype is FrameType.KILL:
                    if job.ending is not None:
                        await self._error(channel, errno.ECHILD, f"background command {job.id} has exited")
                        return
                    assert job.task is not None
                    job.task.cancel()
                    job.end([(Tag.SIGNAL, record.int(Tag.SIGNAL, 9) or 9)])
                    await self.end(channel, FrameType.OK, b"")
                else:
                    while job.ending is None:
                        job.changed.clear()
                        await job.changed.wait()
                    await self.end(channel, FrameType.EXIT, encode_record(job.ending))
            finally:
                self.running.pop(channel, None)

    async def _attach(self, channel: int, job: Job, offset: int, follow: int | None) -> None:
        offset = min(max(offset, job.lost), job.written)
        await self.send(channel, FrameType.STARTED, encode_record([(Tag.PID, job.pid), (Tag.OFFSET, offset)]))
        while True:
            job.changed.clear()
            if offset < job.lost:  # the ring overtook this reader
                await self.end(channel, FrameType.OK, encode_record([(Tag.OFFSET, offset), (Tag.LOST, 1)]))
                return
            if offset < job.written:
                data = bytes(job.kept[offset - job.lost :])
                await self.output(channel, data)
                offset += len(data)
                continue
            if job.ending is not None:
                await self.end(channel, FrameType.EXIT, encode_record(job.ending))
                return
            if not follow:
                await self.end(channel, FrameType.OK, encode_record([(Tag.OFFSET, offset)]))
                return
            await job.changed.wait()

    async def _start_job(
        self, channel: int, request: Record, program: Callable[[Command], Awaitable[int]]
    ) -> None:
        argv = [a.decode(errors="surrogateescape") for a in request.all(Tag.ARGV)]
        job = Job(max(self.vm.jobs, default=0) + 1, argv)
        env = dict(e.decode(errors="surrogateescape").partition("=")[::2] for e in request.all(Tag.ENV))
        cwd = posixpath.normpath(request.str(Tag.CWD, "/") or "/")
        timeout_ms = request.int(Tag.TIMEOUT_MS, 0) or 0

        async def run() -> None:
            try:
                async with asyncio.timeout(timeout_ms / 1000 if timeout_ms > 0 else None):
                    code = await program(Command(argv, env, cwd, self.vm, job.stdin, job.out, job.out))
            except TimeoutError:
                job.end([(Tag.SIGNAL, int(signal.SIGKILL)), (Tag.TIMED_OUT, 1)])
                return
            job.end([(Tag.EXIT_CODE, code)])

        job.task = asyncio.create_task(run())  # the VM's, not this connection's
        self.vm.jobs[job.id] = job
        await self.end(channel, FrameType.OK, encode_record([(Tag.CMD, job.id), (Tag.PID, job.pid)]))

    async def _exec(self, channel: int, request: Record) -> None:
        with contextlib.suppress(ConnectionError):
            try:
                await self._run(channel, request)
            finally:
                self.running.pop(channel, None)

    async def _run(self, channel: int, request: Record) -> None:
        argv = [a.decode(errors="surrogateescape") for a in request.all(Tag.ARGV)]
        env = dict(e.decode(errors="surrogateescape").partition("=")[::2] for e in request.all(Tag.ENV))
        env.setdefault("PATH", DEFAULT_PATH)
        cwd = posixpath.normpath(request.str(Tag.CWD, "/") or "/")
        program = COMMANDS.get(posixpath.basename(argv[0]))
        if program is None or not self.vm.host_path(cwd).is_dir():
            missing = argv[0] if program is None else cwd
            await self._error(channel, errno.ENOENT, f"{missing}: No such file or directory")
            return
        if request.int(Tag.DETACH):
            await self._start_job(channel, request, program)
            return
        await self.started(channel)

        async def out(data: bytes) -> None:
            await self.output(channel, data)

        async def err(data: bytes) -> None:
            await self.output(channel, data, ftype=FrameType.STDERR)

        command = Command(argv, env, cwd, self.vm, self.stdin[channel], out, err)
        timeout_ms = request.int(Tag.TIMEOUT_MS, 0) or 0
        try:
            async with asyncio.timeout(timeout_ms / 1000 if timeout_ms > 0 else None):
                code = await program(command)
        except TimeoutError:
            ending = encode_record([(Tag.SIGNAL, int(signal.SIGKILL)), (Tag.TIMED_OUT, 1)])
            await self.end(channel, FrameType.EXIT, ending)
            return
        await self.end(channel, FrameType.EXIT, encode_record([(Tag.EXIT_CODE, code)]))

    async def _error(self, channel: int, code: int, message: str) -> None:
        await self.end(channel, FrameType.ERROR, encode_record([(Tag.MESSAGE, message), (Tag.ERRNO, code)]))

    async def _file_op(self, ftype: FrameType, channel: int, payload: bytes) -> None:
        record = decode_record(payload)
        path = (record.bytes(Tag.PATH) or b"").decode(errors="surrogateescape")
        try:
            try:
                ok = await self._file(ftype, channel, record, path)
            except OSError as exc:
                await self._error(channel, exc.errno or errno.EIO, f"{path}: {exc.strerror or exc}")
                return
            except ValueError:  # a NUL byte in the path, which no kernel takes
                await self._error(channel, errno.EINVAL, f"{path!r}: {os.strerror(errno.EINVAL)}")
                return
            await self.end(channel, FrameType.OK, encode_record(ok))
        except ConnectionError:
            pass
        finally:
            self.running.pop(channel, None)
            self.uploads.pop(channel, None)

    async def _file(
        self, ftype: FrameType, channel: int, record: Record, path: str
    ) -> list[tuple[Tag, int | bytes | str]]:
        """Do one file operation; the fields of its OK."""
        target = self.vm.host_path(path)
        if ftype is FrameType.STAT:
            return _info(target.stat())
        if ftype is FrameType.LIST:
            for entry in sorted(os.scandir(target), key=lambda e: e.name):
                fields = [(Tag.NAME, os.fsencode(entry.name)), *_info(entry.stat(follow_symlinks=False))]
                await self.send(channel, FrameType.ENTRY, encode_record(fields))
            return []
        if ftype is FrameType.GET:
            return await self._get(channel, target)
        self.vm.writable(path)
        if ftype is FrameType.PUT:
            return await self._put(channel, target, record.int(Tag.MODE, 0o644) or 0o644)
        if ftype is FrameType.MKDIR:
            mode = record.int(Tag.MODE, 0o755) or 0o755
            if record.int(Tag.PARENTS) and target.is_dir():  # as the agent: an existing one is kept
                return []
            if record.int(Tag.PARENTS):
                target.parent.mkdir(0o755, parents=True, exist_ok=True)
            target.mkdir(mode)
            target.chmod(mode)
            return []
        if ftype is FrameType.RENAME:
            to = (record.bytes(Tag.TO) or b"").decode(errors="surrogateescape")
            self.vm.writable(to)
            target.rename(self.vm.host_path(to))
            return []
        if target == self.vm.root:
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target) if record.int(Tag.RECURSIVE) else target.rmdir()
        else:
            target.unlink()
        return []

    async def _connect(self, channel: int, record: Record) -> None:
        """CONNECT: the guest's loopback is the host's here, so a test's server on 127.0.0.1 is the
        guest's server. Bytes both ways under the windows, each side's end passed on as a half-close."""
        port = record.int(Tag.PORT, 0) or 0
        try:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError as exc:
                code = exc.errno or errno.EIO
                await self._error(
                    channel, code, f"connection to 127.0.0.1:{port} in the sandbox: {os.strerror(code)}"
                )
                return
            await self.send(channel, FrameType.STARTED)

            async def up() -> None:
                while data := await self.uploads[channel].get():
                    writer.write(data)
                    await writer.drain()
                    await self.send(channel, FrameType.WINDOW, encode_record([(Tag.BYTES, len(data))]))
                writer.write_eof()

            async def down() -> None:
                while data := await reader.read(65536):
                    await self.output(channel, data, ftype=FrameType.DATA)
                await self.send(channel, FrameType.DATA)

            failed: OSError | None = None
            try:
                async with asyncio.TaskGroup() as tasks:
                    tasks.create_task(up())
                    tasks.create_task(down())
            except* OSError as group:
                failed = next(e for e in group.exceptions if isinstance(e, OSError))
            finally:
                writer.close()
            if failed is None:
                await self.end(channel, FrameType.OK, b"")
            else:
                code = failed.errno or errno.ECONNRESET
                await self._error(channel, code, f"connection to 127.0.0.1:{port}: {os.strerror(code)}")
        except ConnectionError:
            pass
        finally:
            self.running.pop(channel, None)
            self.uploads.pop(channel, None)

    async def _watch(self, channel: int, record: Record) -> None:
        """WATCH by polling: each change between two looks becomes an event (a write is a change
        of size or mtime, chmod one of mode); `gone` and OK when the directory goes."""
        path = (record.bytes(Tag.PATH) or b"").decode(errors="surrogateescape")
        with contextlib.suppress(ConnectionError):
            try:
                target = self.vm.host_path(path)
                if not target.is_dir():
                    code = errno.ENOTDIR if target.exists() else errno.ENOENT
                    await self._error(channel, code, f"{path}: {os.strerror(code)}")
                    return
                await self.send(channel, FrameType.STARTED, b"")
                seen = _tree(target, bool(record.int(Tag.RECURSIVE)))
                while True:
                    await asyncio.sleep(WATCH_POLL)
                    if not target.is_dir():  # as inotify has it: what was in it is removed first
                        for name in sorted(seen, reverse=True):
                            await self._event(channel, name, seen[name][0], 3)
                        await self._event(channel, "", 2, 8)
                        await self.end(channel, FrameType.OK, b"")
                        return
                    now = _tree(target, bool(record.int(Tag.RECURSIVE)))
                    for name in sorted(seen.keys() - now.keys()):
                        await self._event(channel, name, seen[name][0], 3)
                    for name in sorted(now):
                        before = seen.get(name)
                        if before is None:
                            await self._event(channel, name, now[name][0], 1)
                        elif before[1] != now[name][1]:
                            await self._event(channel, name, now[name][0], 2)
                        elif before[2] != now[name][2]:
                            await self._event(channel, name, now[name][0], 6)
                    seen = now
            except OSError as exc:
                await self._error(channel, exc.errno or errno.EIO, f"{path}: {exc.strerror or exc}")
            finally:
                self.watches.pop(channel, None)

    async def _event(self, channel: int, name: str, kind: int, event: int) -> None:
        fields: list[tuple[Tag, int | bytes | str]] = [(Tag.NAME, name), (Tag.KIND, kind), (Tag.EVENT, event)]
        await self.output(channel, encode_record(fields), ftype=FrameType.DATA)

    async def _get(self, channel: int, target: Path) -> list[tuple[Tag, int | bytes | str]]:
        info = target.stat()
        if stat.S_ISDIR(info.st_mode):
            raise OSError(errno.EISDIR, os.strerror(errno.EISDIR))
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        data = target.read_bytes()
        await self.send(channel, FrameType.INFO, encode_record(_info(info)))
        await self.output(channel, data, ftype=FrameType.DATA)
        await self.send(channel, FrameType.DATA)
        return [(Tag.SIZE, len(data))]

    async def _put(self, channel: int, target: Path, mode: int) -> list[tuple[Tag, int | bytes | str]]:
        if not target.parent.is_dir():
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT))
        queue = self.uploads[channel]
        data = bytearray()
        while chunk := await queue.get():
            data += chunk
            await self.send(channel, FrameType.WINDOW, encode_record([(Tag.BYTES, len(chunk))]))
        partial = target.with_name(f".{target.name}.part")
        partial.write_bytes(data)
        partial.chmod(mode)
        partial.replace(target)
        return [(Tag.SIZE, len(data))]


JOB_OPS = frozenset({FrameType.JOBS, FrameType.ATTACH, FrameType.INPUT, FrameType.KILL, FrameType.WAIT})


def _job_entry(job: Job) -> list[tuple[Tag, int | bytes | str]]:
    fields: list[tuple[Tag, int | bytes | str]] = [
        (Tag.CMD, job.id),
        (Tag.PID, job.pid),
        (Tag.STATE, 2 if job.ending is None else 3),
        (Tag.STARTED_NS, 1_700_000_000_000_000_000 + job.id),
        (Tag.OFFSET, job.written),
        (Tag.LOST, job.lost),
        *(job.ending or []),
    ]
    return fields + [(Tag.ARGV, a.encode(errors="surrogateescape")) for a in job.argv]


def _tree(root: Path, recursive: bool) -> dict[str, tuple[int, tuple[int, int], int]]:
    """What a watch compares: each entry's kind, (size, mtime) and mode, by its path below `root`."""
    found: dict[str, tuple[int, tuple[int, int], int]] = {}
    for entry in root.rglob("*") if recursive else root.iterdir():
        try:
            info = entry.lstat()
        except FileNotFoundError:
            continue
        kind = 2 if stat.S_ISDIR(info.st_mode) else 1
        changed = (info.st_size, info.st_mtime_ns) if kind == 1 else (0, 0)
        found[entry.relative_to(root).as_posix()] = (kind, changed, info.st_mode)
    return found


def _info(info: os.stat_result) -> list[tuple[Tag, int | bytes | str]]:
    return [
        (Tag.KIND, KIND.get(stat.S_IFMT(info.st_mode), 4)),
        (Tag.SIZE, info.st_size),
        (Tag.MODE, stat.S_IMODE(info.st_mode)),
        (Tag.MTIME_NS, info.st_mtime_ns),
    ]


class Host:
    """The thread (with its event loop) that serves every fake sandbox this process started.

    A sandbox lives as long as its stand-in VMM process (`sleep`): when that ends, however (a
    SHUTDOWN, `Backend.kill`, a test killing it), its agent stops serving and its connections close.
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.vms: dict[int, FakeVM] = {}
        threading.Thread(target=self.loop.run_forever, name="fake-guests", daemon=True).start()
        atexit.register(self.power_off_all)

    def power_off_all(self) -> None:
        """End every sandbox still running: their VMMs must not outlive the process serving them."""
        for vm in self.running():
            vm.power_off()

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def boot(self, vm: FakeVM, sock: Path) -> None:
        self.call(self._boot(vm, sock))

    async def _boot(self, vm: FakeVM, sock: Path) -> None:
        async def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await FakeAgent(reader, writer, vm).serve()

        vm.server = await asyncio.start_unix_server(connected, path=str(sock))
        self.vms[vm.vmm.pid] = vm
        pidfd = os.pidfd_open(vm.vmm.pid)
        self.loop.add_reader(pidfd, self._ended, vm, pidfd)

    def _ended(self, vm: FakeVM, pidfd: int) -> None:
        """The VMM process ended: reap it, stop serving, drop every connection."""
        self.loop.remove_reader(pidfd)
        os.close(pidfd)
        vm.vmm.wait()
        self.vms.pop(vm.vmm.pid, None)
        if vm.server is not None:
            vm.server.close()
        for agent in list(vm.agents):
            agent.writer.transport.abort()
        for job in vm.jobs.values():  # background commands end with the sandbox
            if job.task is not None:
                job.task.cancel()

    def running(self) -> Iterator[FakeVM]:
        return iter(list(self.vms.values()))


_host: Host | None = None
_host_lock = threading.Lock()


def host() -> Host:
    """This process's guest host, started on first use."""
    global _host
    with _host_lock:
        if _host is None:
            _host = Host()
        return _host

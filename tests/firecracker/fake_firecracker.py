"""A stand-in for the firecracker binary, which cannot run here: no firecracker binary can be had from
the registries this project reaches, and the host's /dev/kvm is a PVM hypervisor without vmx/svm.

Run as `python -m tests.firecracker.fake_firecracker --id ID --api-sock PATH` (the arguments
firecracker takes; the jailer's timing arguments are accepted too). `--version` prints
"Firecracker v<release>" first, as Firecracker does; the release (FAKE_FC_VERSION, 1.16.1) is also
what GET / and GET /version answer, and it decides what the API takes: before 1.16.0,
SnapshotLoadParams has no vsock_override (400, as serde refuses an unknown field), and a snapshot
loads only on the minor release that took it (its state format changes between them). It serves the
REST API on PATH as Firecracker does (HTTP/1.1 on a Unix socket): 204 for an accepted PUT or PATCH,
200 with a body for GET / and GET /version, and 400 with {"fault_message": ...} for a path the API
lacks, a body that firecracker.yaml rejects (strictly: unknown fields too), a body id that differs
from the path's, a file that cannot be opened, a tap device its network namespace lacks, a pre-boot
request after the microVM started (InstanceStart or a snapshot load) or a post-boot one before, or
InstanceStart without a kernel. An existing API socket is refused, as Firecracker refuses it. Paths
it is given resolve as Firecracker's do: relative ones against its working directory. Jailed
(FAKE_FC_ROOT), it checks that the uid the jailer dropped to could bind its API socket: search
permission on every folder from the chroot's root down, and write permission in the last.

On InstanceStart it "boots": it binds the vsock socket (uds_path) at once and, for a short boot time,
closes connections after `CONNECT <port>` (no guest listener yet), then answers `CONNECT 52000` with
`OK <port>` and speaks just enough of the agent protocol: HELLO, PING, and SHUTDOWN, which prints the
kernel's restart line on the console and exits, as Firecracker exits when the guest reboots.
SendCtrlAltDel is accepted and changes nothing, as in our guest (Linux makes it a SIGINT for
init, the agent, which has no handler for it).

Snapshots, as Firecracker's snapshot doc describes them: PATCH /vm pauses (the guest then answers
nothing on vsock until resumed) and resumes. PUT /snapshot/create (Full only) needs a paused
microVM; it writes the state file (JSON here: the configuration but logger and metrics, and the
guest's identity and release) and a sparse memory file of the guest's size, and resets the vsock
device: the guest drops its connections while their host ends stay open, carrying nothing in
either direction (Firecracker's snapshot doc, "Vsock device reset"). Resuming a microVM paused
without a snapshot in between leaves the vsock device waiting for an acknowledgement of a reset that
was never sent (Firecracker 1.16): open host connections carry nothing and new ones are dropped
after CONNECT, until a later snapshot and resume. PUT /snapshot/load is refused once anything but
the logger and metrics is configured, and needs exactly one of mem_backend and mem_file_path; then,
as Firecracker does, a load that fails answers 400 and ends the process. It applies vsock_override
and network_overrides (an override of an interface the snapshot lacks fails), opens the drive at the
path the snapshot recorded, checks the taps, binds the vsock socket (an existing path fails, as bind
does), and is paused, or running with resume_vm. A restored guest's agent says whose memory it runs:
"fake agent (memory of <id of the instance that booted it>)".

Environment:
  FAKE_FC_RECORD=<file>   append every API request (with the instance id) and every HELLO's fields
                          to it (JSON lines)
  FAKE_FC_FAIL=<path>     answer PUT or PATCH <path> with 400
  FAKE_FC_CRASH=start     log an error and exit while handling InstanceStart, without answering
  FAKE_FC_CRASH=boot      answer InstanceStart, then panic (console, log) and exit
  FAKE_FC_CRASH=snapshot  write half a memory file, log an error and exit, while creating a snapshot
  FAKE_FC_BOOT_TIME=<s>   how long the guest boots (0.3 s)
  FAKE_FC_ROOT=<dir>      resolve every path under <dir>, as a jailed firecracker sees its chroot
  FAKE_FC_UID, _GID       the ids a jailed firecracker runs as (set by fake_jailer.py)
  FAKE_FC_VERSION=<x.y.z> the release it is (1.16.1)
  FAKE_FC_NO_RESUME_GATE=1  a release whose resume after a pause without a snapshot keeps vsock working
  FAKE_FC_CONSOLE_FLOOD=<bytes>  print that much on the console while booting
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

from agentkernel.protocol.frames import (
    MAGIC,
    VERSION,
    FieldValue,
    FrameDecoder,
    FrameType,
    Tag,
    decode_record,
    encode,
    encode_record,
)
from tests.firecracker import spec

REASONS = {200: "OK", 204: "No Content", 400: "Bad Request"}
FC_VERSION = os.environ.get("FAKE_FC_VERSION", "1.16.1")
VSOCK_OVERRIDE_SINCE = (1, 16, 0)  # the release that added SnapshotLoadParams.vsock_override
PRE_BOOT_ONLY = "The requested operation is not supported after starting the microVM."
POST_BOOT_ONLY = "The requested operation is not supported before starting the microVM."
POST_BOOT = {("PATCH", "/vm"), ("PUT", "/snapshot/create")}
NOT_SAVED = ("/logger", "/metrics")  # configuration a snapshot does not hold, and all a load allows
SNAPSHOT_MAGIC = "fake firecracker microVM state"
MiB = 1 << 20
CONSOLE_LINE = len("fake guest: console line 000000000\n")


class HostConnection:
    """A host connection to the guest's agent through the hybrid vsock socket. Once the vsock device
    is reset (a snapshot) or gated (a resume without one), it stays open on the host side but is
    dead: nothing the host sends reaches the guest, nothing comes back."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.dead = False

    def write(self, data: bytes) -> None:
        if not self.dead:
            self.writer.write(data)


class LoadError(Exception):
    """A snapshot load that failed: Firecracker answers, then ends the process."""


class FakeFirecracker:
    def __init__(self, instance: str, api_sock: Path) -> None:
        self.instance = instance
        self.api_sock = api_sock
        self.jailed = "FAKE_FC_ROOT" in os.environ
        if self.jailed:
            os.chdir(os.environ["FAKE_FC_ROOT"])  # socket paths inside a jail are short: keep them so
        self.record = os.environ.get("FAKE_FC_RECORD")
        self.config: dict[str, Any] = {}
        self.state = "Not started"  # InstanceInfo's: Not started, Running, Paused
        self.running = asyncio.Event()  # the guest's vCPUs run
        self.booted = False  # the guest's agent listens
        self.guest = instance  # which instance booted the guest whose memory this one runs
        self.vsock_clients: set[HostConnection] = set()
        self.snapshot_since_pause = False  # a snapshot queued the vsock reset the guest acknowledges
        self.vsock_gated = False  # resumed from a pause without a snapshot: host traffic is refused
        self.exit_after_answer = False
        self.log: Any = None

    def path(self, guest_path: str) -> Path:
        """A path as Firecracker was given it, on this host (under the jail's root when jailed)."""
        return Path(guest_path.lstrip("/")) if self.jailed else Path(guest_path)

    def note(self, entry: dict[str, Any]) -> None:
        if self.record:
            with open(self.record, "a") as f:
                f.write(json.dumps({**entry, "id": self.instance}) + "\n")

    def write_log(self, level: str, message: str) -> None:
        if self.log is not None:
            now = dt.datetime.now().isoformat()
            self.log.write(f"{now} [{self.instance}:main:{level}] {message}\n")
            self.log.flush()

    def set_state(self, state: str) -> None:
        self.state = state
        if state == "Running":
            self.running.set()
        else:
            self.running.clear()

    # -- the API ----------------------------------------------------------------------------------

    def dispatch(self, method: str, path: str, raw: bytes) -> tuple[int, dict[str, Any] | None]:
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            return 400, fault("The request body is not valid JSON.")
        self.note({"method": method, "path": path, "body": body})
        if method == "GET" and path == "/":
            return 200, {
                "app_name": "Firecracker",
                "id": self.instance,
                "state": self.state,
                "vmm_version": FC_VERSION,
            }
        if method == "GET" and path == "/version":
            return 200, {"firecracker_version": FC_VERSION}
        try:
            spec.operation(method, path)
        except KeyError:
            return 400, fault(f"Invalid request method and/or path: {method} {path}.")
        errors = spec.body_errors(method, path, body)
        too_new = release(FC_VERSION) < VSOCK_OVERRIDE_SINCE and path == "/snapshot/load"
        if too_new and isinstance(body, dict) and "vsock_override" in body:
            errors.insert(0, "unknown field `vsock_override`")  # what serde says of a field it lacks
        if errors:
            return 400, fault(f"An error occurred when deserializing the json body of a request: {errors[0]}")
        if path == os.environ.get("FAKE_FC_FAIL"):
            return 400, fault(f"Fake failure requested for {path}:\nsecond line of the fault.")
        assert isinstance(body, dict)
        if path == "/actions":
            return self.action(body["action_type"])
        started = self.state != "Not started"
        if (method, path) in POST_BOOT:
            if not started:
                return 400, fault(POST_BOOT_ONLY)
            return self.pause_or_resume(body["state"]) if path == "/vm" else self.create_snapshot(body)
        if started:
            return 400, fault(PRE_BOOT_ONLY)
        if path == "/snapshot/load":
            return self.load_snapshot(body)
        return self.configure(path, body)

    def configure(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any] | None]:
        if path == "/logger":
            self.log = self.path(body["log_path"]).open("w")
            self.write_log("INFO", f"Running Firecracker v{FC_VERSION} (fake)")
        elif path == "/metrics":
            self.path(body["metrics_path"]).touch()
        elif path == "/boot-source" and not self.path(body["kernel_image_path"]).is_file():
            return 400, fault("Cannot open the kernel image: No such file or directory (os error 2)")
        elif problem := self.device_problem(path, body):
            return 400, fault(problem)
        self.config[path] = body
        return 204, None

    def device_problem(self, path: str, body: dict[str, Any]) -> str:
        """Why Firecracker could not open a drive's file or a NIC's tap ("" if it can)."""
        if path.startswith("/drives/"):
            disk = self.path(body["path_on_host"])
            mode = os.R_OK if body["is_read_only"] else os.R_OK | os.W_OK
            if not disk.is_file() or not os.access(disk, mode):
                return f"Unable to open the block device {body['path_on_host']}"
        if path.startswith("/network-interfaces/"):
            return tap_problem(body["host_dev_name"])
        return ""

    def action(self, action: str) -> tuple[int, dict[str, Any] | None]:
        if action != "InstanceStart":
            return 204, None  # SendCtrlAltDel: init ignores it in our guest; FlushMetrics: nothing to flush
        if self.state != "Not started":
            return 400, fault("The microVM is already running.")
        if "/boot-source" not in self.config:
            return 400, fault("Cannot start microvm without kernel configuration.")
        if os.environ.get("FAKE_FC_CRASH") == "start":
            self.write_log("ERROR", "Failed to start microVM: fake start failure")
            os._exit(1)
        self.set_state("Running")
        asyncio.get_running_loop().create_task(self.boot())
        return 204, None

    def pause_or_resume(self, wanted: str) -> tuple[int, dict[str, Any] | None]:
        """A repeated request changes nothing. Resuming what was paused without a snapshot in between
        leaves the vsock device waiting for the guest to acknowledge a reset that was never sent
        (Firecracker 1.16): host connections, open and new, carry nothing from then on."""
        if wanted == "Paused" and self.state == "Running":
            self.snapshot_since_pause = False
        elif wanted == "Resumed" and self.state == "Paused":
            self.vsock_gated = not self.snapshot_since_pause and "FAKE_FC_NO_RESUME_GATE" not in os.environ
            if self.vsock_gated:
                self.kill_host_connections()
        self.set_state("Paused" if wanted == "Paused" else "Running")
        return 204, None

    def kill_host_connections(self) -> None:
        for client in self.vsock_clients:
            client.dead = True

    def create_snapshot(self, body: dict[str, Any]) -> tuple[int, dict[str, Any] | None]:
        if self.state != "Paused":
            return 400, fault("Cannot create a snapshot: the microVM is not paused.")
        if body.get("snapshot_type", "Full") != "Full":
            return 400, fault("The fake firecracker takes Full snapshots only.")
        state_file, memory_file = self.path(body["snapshot_path"]), self.path(body["mem_file_path"])
        for file in (state_file, memory_file):
            if not file.parent.is_dir():
                return 400, fault(f"Cannot create the snapshot file {file}: No such file or directory")
        size = self.config["/machine-config"]["mem_size_mib"] * MiB
        with memory_file.open("wb") as f:  # truncated and overwritten if it exists, as Firecracker does
            f.write(f"fake guest memory of {self.guest}\n".encode())
            if os.environ.get("FAKE_FC_CRASH") == "snapshot":
                self.write_log("ERROR", "Failed to create the snapshot: fake failure while writing memory")
                os._exit(1)
            f.truncate(size)
        saved = {k: v for k, v in self.config.items() if k not in NOT_SAVED}
        state = {"magic": SNAPSHOT_MAGIC, "version": FC_VERSION, "config": saved, "booted": self.booted}
        state_file.write_text(json.dumps(state))
        # The vsock device is reset: the guest's driver drops its connections when it runs again,
        # while their host ends stay open, carrying nothing.
        self.kill_host_connections()
        self.snapshot_since_pause = True
        self.write_log("INFO", "Snapshot created")
        return 204, None

    def load_snapshot(self, body: dict[str, Any]) -> tuple[int, dict[str, Any] | None]:
        if set(self.config) - set(NOT_SAVED):
            return 400, fault(
                "Loading a microVM snapshot not allowed after configuring boot-specific resources."
            )
        if ("mem_backend" in body) == ("mem_file_path" in body):
            return 400, fault("Exactly one of mem_backend and mem_file_path must be given.")
        try:
            self.restore(body)
        except LoadError as exc:
            self.write_log("ERROR", f"Loading the snapshot failed: {exc}")
            self.exit_after_answer = True
            return 400, fault(f"Load snapshot error: {exc}")
        return 204, None

    def restore(self, body: dict[str, Any]) -> None:
        backend = body.get("mem_backend", {"backend_type": "File", "backend_path": body.get("mem_file_path")})
        if backend["backend_type"] != "File":
            raise LoadError("the fake firecracker has no Uffd memory backend")
        try:
            state = json.loads(self.path(body["snapshot_path"]).read_text())
            memory = self.path(backend["backend_path"])
            with memory.open("rb") as f:  # Firecracker maps it privately: only ever read
                header = f.readline()
            size = memory.stat().st_size
        except (OSError, ValueError) as exc:
            raise LoadError(f"cannot read the snapshot files: {exc}") from None
        config = state.get("config", {}) if state.get("magic") == SNAPSHOT_MAGIC else {}
        taken_with = state.get("version", "?")
        if config and release(taken_with)[:2] != release(FC_VERSION)[:2]:  # its state format is another
            raise LoadError(f"the snapshot's state format is of Firecracker {taken_with}, not {FC_VERSION}")
        if size != config.get("/machine-config", {}).get("mem_size_mib", -1) * MiB:
            raise LoadError("the state file or the memory file is not a snapshot's")
        for override in body.get("network_overrides", []):
            key = f"/network-interfaces/{override['iface_id']}"
            if key not in config:
                raise LoadError(f"the snapshot has no network interface {override['iface_id']}")
            config[key] = {**config[key], "host_dev_name": override["host_dev_name"]}
        vsock = config["/vsock"] = {**config["/vsock"], **body.get("vsock_override", {})}
        for path, device in config.items():
            if problem := self.device_problem(path, device):
                raise LoadError(problem)
        uds = self.path(vsock["uds_path"])
        listener = socket.socket(socket.AF_UNIX)
        try:
            listener.bind(str(uds))
        except OSError as exc:
            listener.close()
            raise LoadError(f"cannot bind the vsock socket {vsock['uds_path']}: {exc.strerror}") from None
        self.config.update(config)
        self.guest = header.removeprefix(b"fake guest memory of ").decode().strip()
        self.booted = state["booted"]
        self.set_state("Running" if body.get("resume_vm") else "Paused")
        asyncio.get_running_loop().create_task(self.serve_vsock_on(listener))
        self.write_log("INFO", "Snapshot loaded")

    async def serve_api(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
                method, target, _version = head[0].split(" ")
                headers = dict(line.split(":", 1) for line in head[1:] if line)
                length = int(next((v for k, v in headers.items() if k.lower() == "content-length"), 0))
                status, answer = self.dispatch(method, target, await reader.readexactly(length))
                data = json.dumps(answer).encode() if answer is not None else b""
                extra = f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n" if data else ""
                writer.write(f"HTTP/1.1 {status} {REASONS[status]}\r\n{extra}\r\n".encode() + data)
                await writer.drain()
                if self.exit_after_answer:
                    os._exit(1)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    # -- the "guest" --------------------------------------------------------------------------------

    async def boot(self) -> None:
        vsock = self.config["/vsock"]["uds_path"]
        await asyncio.start_unix_server(self.serve_vsock, path=str(self.path(vsock)))
        await self.finish_boot()

    async def finish_boot(self) -> None:
        await asyncio.sleep(float(os.environ.get("FAKE_FC_BOOT_TIME", "0.3")))
        await self.running.wait()
        flood, line = int(os.environ.get("FAKE_FC_CONSOLE_FLOOD", "0")), 0
        while line * CONSOLE_LINE < flood:
            sys.stdout.write("".join(f"fake guest: console line {n:09d}\n" for n in range(line, line + 1000)))
            line += 1000
        sys.stdout.flush()
        if os.environ.get("FAKE_FC_CRASH") == "boot":
            print("Kernel panic - not syncing: fake guest failure", flush=True)
            self.write_log("ERROR", "Vmm is stopping: the guest panicked (fake)")
            os._exit(1)
        print("fake guest: booted, agent listening on vsock port 52000", flush=True)
        self.booted = True

    async def serve_vsock_on(self, listener: socket.socket) -> None:
        await asyncio.start_unix_server(self.serve_vsock, sock=listener)
        if not self.booted:  # snapshotted while booting: it boots on
            await self.finish_boot()

    async def serve_vsock(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client = HostConnection(writer)
        self.vsock_clients.add(client)
        try:
            await self.agent(reader, client)
        except ConnectionError:
            pass
        finally:
            self.vsock_clients.discard(client)
            writer.close()

    async def agent(self, reader: asyncio.StreamReader, client: HostConnection) -> None:
        line = await reader.readline()
        await self.running.wait()  # a paused guest answers nothing
        if line != b"CONNECT 52000\n" or not self.booted or self.vsock_gated:
            return  # nothing listens on that guest port (yet): Firecracker drops the connection
        client.write(b"OK 1073741824\n")
        decoder = FrameDecoder()
        while data := await reader.read(65536):
            await self.running.wait()
            if client.dead:
                continue  # read and dropped: the guest has no connection for it any more
            for frame in decoder.feed(data):
                if frame.type is FrameType.HELLO:
                    record = decode_record(frame.payload)
                    self.note(
                        {
                            "hello": record.str(Tag.HOSTNAME),
                            "memory_mb": record.int(Tag.MEMORY_MB),
                            "max_procs": record.int(Tag.MAX_PROCS),
                        }
                    )
                    message = (
                        "fake agent"
                        if self.guest == self.instance
                        else f"fake agent (memory of {self.guest})"
                    )
                    reply: list[tuple[Tag, FieldValue]] = [
                        (Tag.VERSION, VERSION),
                        (Tag.MAGIC, MAGIC),
                        (Tag.MESSAGE, message),
                    ]
                    client.write(encode(0, FrameType.HELLO, encode_record(reply)))
                elif frame.type is FrameType.PING:
                    client.write(encode(0, FrameType.PONG, frame.payload))
                elif frame.type is FrameType.SHUTDOWN:
                    print("reboot: Restarting system", flush=True)
                    os._exit(0)


def jailed_uid_may_bind(sock: Path) -> bool:
    """Whether the uid the jailer dropped to (FAKE_FC_UID and _GID; no other groups) could bind
    `sock`, a path relative to the chroot: traverse every folder from the chroot's root down
    and write in the last one. This process runs as root and would be let through anyway."""
    uid, gid = int(os.environ["FAKE_FC_UID"]), int(os.environ["FAKE_FC_GID"])
    folders = [Path("."), *reversed(sock.parents[:-1])]
    for folder in folders:
        info = folder.stat()
        if info.st_uid == uid:
            bits = info.st_mode >> 6
        elif info.st_gid == gid:
            bits = info.st_mode >> 3
        else:
            bits = info.st_mode
        wanted = 0o3 if folder == folders[-1] else 0o1  # write and search, or search
        if uid != 0 and bits & wanted != wanted:
            return False
    return True


def tap_problem(name: str) -> str:
    """Why Firecracker could not open tap `name` in its network namespace ("" if it can). Firecracker
    running with CAP_NET_ADMIN would create a missing one; sandboxes always make theirs first."""
    with open("/proc/net/dev") as f:  # the devices of this process's network namespace
        devices = {line.split(":")[0].strip() for line in f.readlines()[2:]}
    return "" if name in devices else f"Could not open the tap device {name}: no such device"


def release(version: str) -> tuple[int, ...]:
    """(major, minor, patch) of "1.16.1"; () for what is not a release."""
    numbers = version.split("-")[0].split(".")
    return tuple(int(n) for n in numbers) if all(n.isdigit() for n in numbers) else ()


def fault(message: str) -> dict[str, Any]:
    return {"fault_message": message}


async def main() -> None:
    if sys.argv[1:] == ["--version"]:
        print(f"Firecracker v{FC_VERSION}\n")  # the first line as Firecracker prints it
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--id", default="anonymous-instance")
    parser.add_argument("--api-sock", required=True)
    for timing in ("--start-time-us", "--start-time-cpu-us", "--parent-cpu-time-us"):
        parser.add_argument(timing)  # what the jailer adds
    args = parser.parse_args()
    fc = FakeFirecracker(args.id, Path(args.api_sock))
    sock = fc.path(args.api_sock)
    if sock.exists():
        print(f"Failed to open the API socket at {args.api_sock}: Address in use", file=sys.stderr)
        sys.exit(1)
    if fc.jailed and not jailed_uid_may_bind(sock):
        denied = "Permission denied (os error 13)"
        print(f"Failed to open the API socket at {args.api_sock}: {denied}", file=sys.stderr)
        sys.exit(1)
    server = await asyncio.start_unix_server(fc.serve_api, path=str(sock))
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())

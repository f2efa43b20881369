"""A stand-in for the firecracker binary, which cannot run here: no firecracker binary can be had from
the registries this project reaches, and the host's /dev/kvm is a PVM hypervisor without vmx/svm.

Run as `python -m tests.firecracker.fake_firecracker --id ID --api-sock PATH` (the arguments
firecracker takes; the jailer's timing arguments are accepted too). It serves the
REST API on PATH as Firecracker does (HTTP/1.1 on a Unix socket): 204 for an accepted PUT, 200 with a
body for GET / and GET /version, and 400 with {"fault_message": ...} for a path the API lacks, a body
that firecracker.yaml rejects (strictly: unknown fields too), a body id that differs from the path's,
a file that cannot be opened, a pre-boot resource after InstanceStart, or InstanceStart without a
kernel. An existing API socket is refused, as Firecracker refuses it.

On InstanceStart it "boots": it binds the vsock socket (uds_path) at once and, for a short boot time,
closes connections after `CONNECT <port>` (no guest listener yet), then answers `CONNECT 52000` with
`OK <port>` and speaks just enough of the agent protocol: HELLO, PING, and SHUTDOWN, which prints the
kernel's restart line on the console and exits, as Firecracker exits when the guest reboots.
SendCtrlAltDel is accepted and changes nothing, as with our kernel, which has no i8042 driver.

Environment:
  FAKE_FC_RECORD=<file>  append every API request and every HELLO's fields to it (JSON lines)
  FAKE_FC_FAIL=<path>    answer PUT <path> with 400
  FAKE_FC_CRASH=start    log an error and exit while handling InstanceStart, without answering
  FAKE_FC_CRASH=boot     answer InstanceStart, then panic (console, log) and exit
  FAKE_FC_BOOT_TIME=<s>  how long the guest boots (0.3 s)
  FAKE_FC_ROOT=<dir>     resolve every path under <dir>, as a jailed firecracker sees its chroot
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
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
PRE_BOOT_ONLY = "The requested operation is not supported after starting the microVM."


class FakeFirecracker:
    def __init__(self, instance: str, api_sock: Path) -> None:
        self.instance = instance
        self.api_sock = api_sock
        self.jailed = "FAKE_FC_ROOT" in os.environ
        if self.jailed:
            os.chdir(os.environ["FAKE_FC_ROOT"])  # socket paths inside a jail are short: keep them so
        self.record = os.environ.get("FAKE_FC_RECORD")
        self.config: dict[str, Any] = {}
        self.started = False
        self.booted = False
        self.log: Any = None

    def path(self, guest_path: str) -> Path:
        """A path as Firecracker was given it, on this host (under the jail's root when jailed)."""
        return Path(guest_path.lstrip("/")) if self.jailed else Path(guest_path)

    def note(self, entry: dict[str, Any]) -> None:
        if self.record:
            with open(self.record, "a") as f:
                f.write(json.dumps(entry) + "\n")

    def write_log(self, level: str, message: str) -> None:
        if self.log is not None:
            now = dt.datetime.now().isoformat()
            self.log.write(f"{now} [{self.instance}:main:{level}] {message}\n")
            self.log.flush()

    # -- the API ----------------------------------------------------------------------------------

    def dispatch(self, method: str, path: str, raw: bytes) -> tuple[int, dict[str, Any] | None]:
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            return 400, fault("The request body is not valid JSON.")
        self.note({"method": method, "path": path, "body": body})
        if method == "GET" and path == "/":
            state = "Running" if self.started else "Not started"
            return 200, {
                "app_name": "Firecracker",
                "id": self.instance,
                "state": state,
                "vmm_version": "1.17.0",
            }
        if method == "GET" and path == "/version":
            return 200, {"firecracker_version": "1.17.0"}
        try:
            spec.operation(method, path)
        except KeyError:
            return 400, fault(f"Invalid request method and/or path: {method} {path}.")
        if errors := spec.body_errors(method, path, body):
            return 400, fault(f"An error occurred when deserializing the json body of a request: {errors[0]}")
        if path == os.environ.get("FAKE_FC_FAIL"):
            return 400, fault(f"Fake failure requested for {path}:\nsecond line of the fault.")
        if self.started and path != "/actions":
            return 400, fault(PRE_BOOT_ONLY)
        assert isinstance(body, dict)
        if path == "/actions":
            return self.action(body["action_type"])
        return self.configure(path, body)

    def configure(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any] | None]:
        if path == "/logger":
            self.log = self.path(body["log_path"]).open("w")
            self.write_log("INFO", "Running Firecracker v1.17.0 (fake)")
        elif path == "/metrics":
            self.path(body["metrics_path"]).touch()
        elif path == "/boot-source" and not self.path(body["kernel_image_path"]).is_file():
            return 400, fault("Cannot open the kernel image: No such file or directory (os error 2)")
        elif path.startswith("/drives/"):
            disk = self.path(body["path_on_host"])
            mode = os.R_OK if body["is_read_only"] else os.R_OK | os.W_OK
            if not disk.is_file() or not os.access(disk, mode):
                return 400, fault(f"Unable to open the block device {body['path_on_host']}")
        self.config[path] = body
        return 204, None

    def action(self, action: str) -> tuple[int, dict[str, Any] | None]:
        if action != "InstanceStart":
            return 204, None  # SendCtrlAltDel reaches no driver in our guest; FlushMetrics: nothing to flush
        if self.started:
            return 400, fault("The microVM is already running.")
        if "/boot-source" not in self.config:
            return 400, fault("Cannot start microvm without kernel configuration.")
        if os.environ.get("FAKE_FC_CRASH") == "start":
            self.write_log("ERROR", "Failed to start microVM: fake start failure")
            os._exit(1)
        self.started = True
        asyncio.get_running_loop().create_task(self.boot())
        return 204, None

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
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    # -- the "guest" --------------------------------------------------------------------------------

    async def boot(self) -> None:
        vsock = self.config["/vsock"]["uds_path"]
        await asyncio.start_unix_server(self.serve_vsock, path=str(self.path(vsock)))
        await asyncio.sleep(float(os.environ.get("FAKE_FC_BOOT_TIME", "0.3")))
        if os.environ.get("FAKE_FC_CRASH") == "boot":
            print("Kernel panic - not syncing: fake guest failure", flush=True)
            self.write_log("ERROR", "Vmm is stopping: the guest panicked (fake)")
            os._exit(1)
        print("fake guest: booted, agent listening on vsock port 52000", flush=True)
        self.booted = True

    async def serve_vsock(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = await reader.readline()
        if line != b"CONNECT 52000\n" or not self.booted:
            writer.close()  # nothing listens on that guest port (yet): Firecracker drops the connection
            return
        writer.write(b"OK 1073741824\n")
        decoder = FrameDecoder()
        while data := await reader.read(65536):
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
                    reply: list[tuple[Tag, FieldValue]] = [
                        (Tag.VERSION, VERSION),
                        (Tag.MAGIC, MAGIC),
                        (Tag.MESSAGE, "fake agent"),
                    ]
                    writer.write(encode(0, FrameType.HELLO, encode_record(reply)))
                elif frame.type is FrameType.PING:
                    writer.write(encode(0, FrameType.PONG, frame.payload))
                elif frame.type is FrameType.SHUTDOWN:
                    print("reboot: Restarting system", flush=True)
                    os._exit(0)
        writer.close()


def fault(message: str) -> dict[str, Any]:
    return {"fault_message": message}


async def main() -> None:
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
    server = await asyncio.start_unix_server(fc.serve_api, path=str(sock))
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())

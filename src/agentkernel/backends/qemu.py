"""QEMU `-M microvm`: KVM where the host has it, TCG software emulation otherwise.

The guest's root disk is a qcow2 overlay over the immutable image, so no two VMs write one file. QEMU
daemonizes itself, so the VM outlives the process that started it. The agent is reached on Unix
sockets behind virtio-serial ports named `agentkernel.N`, one host client per port: several ports let
several host processes talk to one sandbox at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

from agentkernel import hostinfo
from agentkernel.artifacts.run import require
from agentkernel.backends.base import VMSpec, file_tail, tail_line
from agentkernel.backends.qmp import Qmp
from agentkernel.errors import AgentkernelError
from agentkernel.hostinfo import Accel
from agentkernel.network import launcher as gateway
from agentkernel.protocol.client import AgentConnectionError, Connection

AGENT_PATH = "/sbin/agentkernel-agent"
MAX_UNIX_PATH = 107
AGENT_PORTS = 4
# A host I/O error (a full disk under the overlay) reaches the guest as an I/O error, so the command
# writing fails; QEMU's default (werror=enospc) would pause the VM, and every command in it would hang.
DISK_ERRORS = "werror=report,rerror=report"


def agent_socket(spec: VMSpec, port: int) -> Path:
    return spec.rundir / f"agent{port}.sock"


def pidfile(spec: VMSpec) -> Path:
    return spec.rundir / "qemu.pid"


def disk(spec: VMSpec) -> Path:
    return spec.workdir / "disk.qcow2"


def qmp_socket(spec: VMSpec) -> Path:
    return spec.rundir / "qmp.sock"


def ram_file(spec: VMSpec) -> Path:
    """The guest's RAM, a shared file on tmpfs: a snapshot then saves it without copying it through
    the migration stream, and resumed copies map the snapshot's file privately (copy-on-write)."""
    run_id = hashlib.sha256(str(spec.rundir.absolute()).encode()).hexdigest()[:16]
    return Path("/dev/shm") / f"agentkernel-{os.getuid()}-{run_id}.ram"


def memory_args(spec: VMSpec) -> list[str]:
    saved = spec.restore / "ram" if spec.restore is not None else None
    if saved is not None and saved.exists():
        backend = f"mem-path={saved},share=off"
    else:
        backend = f"mem-path={ram_file(spec)},share=on"
    args = ["-object", f"memory-backend-file,id=mem,size={spec.memory_mb}M,{backend}"]
    return args + (["-incoming", "defer"] if spec.restore is not None else [])


def kernel_cmdline(spec: VMSpec) -> str:
    # reboot=t + -no-reboot: a guest reboot (the agent's power-off) ends the QEMU process.
    mode = "ro" if spec.read_only else "rw"
    args = f"console=ttyS0 reboot=t panic=-1 root=/dev/vda {mode} rootfstype=ext4 quiet init={AGENT_PATH}"
    return f"{args} {gateway.GUEST_IP_ARG}" if spec.egress is not None else args


def network_args(spec: VMSpec) -> list[str]:
    """No network device at all when network is off. When on, user networking with restrict=on drops
    every packet except connections to the proxy address, which go to the egress gateway's socket."""
    if spec.egress is None:
        return []
    forwards = ",".join(
        f"guestfwd=tcp:{address}-cmd:socat STDIO UNIX-CONNECT:{sock}"
        for address, sock in (
            (gateway.GUEST_PROXY, gateway.socket_path(spec.rundir)),
            (gateway.GUEST_DNS, gateway.dns_socket_path(spec.rundir)),
        )
    )
    return [
        "-netdev", f"user,id=net0,restrict=on,ipv6=off,{forwards}",
        "-device", "virtio-net-device,netdev=net0",
    ]  # fmt: skip


def mount_args(spec: VMSpec) -> list[str]:
    args = []
    for i, mount in enumerate(spec.mounts):
        readonly = ",readonly=on" if mount.read_only else ""
        args += [
            "-fsdev", f"local,id=fs{i},path={mount.host},security_model=none{readonly}",
            "-device", f"virtio-9p-device,fsdev=fs{i},mount_tag={mount.tag}",
        ]  # fmt: skip
    return args


def command(
    spec: VMSpec, accel: Accel, *, qemu: str = "qemu-system-x86_64", daemonize: bool = True
) -> list[str]:
    if accel.name == "kvm":
        acc = ["-accel", "kvm", "-cpu", "host"]
    else:
        # Without TSC in the CPU flags the kernel skips its TSC calibration, which under emulation
        # takes about a second on every other boot; timekeeping falls back to jiffies.
        acc = ["-accel", "tcg,thread=multi" if spec.vcpus > 1 else "tcg", "-cpu", "max,-tsc,-rdtscp"]
    readonly = "readonly=on" if spec.read_only else "readonly=off"
    cmd = [
        qemu,
        "-name", f"agentkernel-{spec.name}",
        "-M", "microvm,x-option-roms=off,isa-serial=on,rtc=off,acpi=off,memory-backend=mem",
        *acc,
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-smp", str(spec.vcpus),
        "-m", str(spec.memory_mb),
        "-kernel", str(spec.kernel),
        "-append", kernel_cmdline(spec),
        "-drive", f"id=root,file={disk(spec)},format=qcow2,if=none,discard=unmap,{readonly},{DISK_ERRORS}",
        "-device", "virtio-blk-device,drive=root",
        "-device", "virtio-rng-device",
        "-device", f"virtio-serial-device,max_ports={AGENT_PORTS + 1}",
        "-serial", f"file:{spec.console_log}",
        "-qmp", f"unix:{qmp_socket(spec)},server=on,wait=off",
    ]  # fmt: skip
    cmd += memory_args(spec) + network_args(spec) + mount_args(spec)
    for port in range(AGENT_PORTS):
        cmd += [
            "-chardev", f"socket,id=agent{port},path={agent_socket(spec, port)},server=on,wait=off",
            "-device", f"virtserialport,chardev=agent{port},name=agentkernel.{port}",
        ]  # fmt: skip
    if daemonize:
        cmd += ["-daemonize", "-pidfile", str(pidfile(spec))]
    return cmd


class QemuBackend:
    name = "qemu"
    agent_ports = AGENT_PORTS
    snapshot_disk = "disk.qcow2"
    snapshot_disk_format = "qcow2"

    def __init__(self, accel: Accel | None = None) -> None:
        self.accel = accel or hostinfo.accel()

    def prepare(self, spec: VMSpec) -> None:
        """A qcow2 overlay backed by the read-only image: the VM's writes land in the overlay only."""
        qemu_img = require("qemu-img", "qemu-utils")
        spec.workdir.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(
            [
                qemu_img,
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                str(spec.image),
                "-F",
                spec.image_format,
                str(disk(spec)),
            ],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise AgentkernelError(f"cannot create the sandbox disk: {proc.stderr.strip()}")

    def start(self, spec: VMSpec) -> int:
        qemu = require("qemu-system-x86_64", "qemu-system-x86")
        if len(str(agent_socket(spec, AGENT_PORTS - 1))) > MAX_UNIX_PATH:
            raise AgentkernelError(f"run directory path too long for Unix sockets: {spec.rundir}")
        spec.rundir.mkdir(parents=True, exist_ok=True, mode=0o700)
        spec.console_log.unlink(missing_ok=True)
        if spec.egress is not None:
            require("socat", "socat")
            gateway.start(spec.name, spec.egress, spec.rundir)
        # With -daemonize the first process exits once the VM is set up, reporting start-up errors.
        proc = subprocess.run(
            command(spec, self.accel, qemu=qemu), stdin=subprocess.DEVNULL, capture_output=True, text=True
        )
        try:
            if proc.returncode != 0:
                detail = " ".join(proc.stderr.split())[:500] or f"exit status {proc.returncode}"
                raise AgentkernelError(f"QEMU failed to start: {detail}")
            try:
                pid = int(pidfile(spec).read_text().strip())
            except (OSError, ValueError):
                raise AgentkernelError(f"QEMU started but wrote no pid file at {pidfile(spec)}") from None
            if spec.egress is not None:
                gateway.wait_ready(spec.rundir)
            return pid
        except BaseException:
            gateway.stop(spec.rundir)
            raise

    async def connect(self, spec: VMSpec, pid: int, *, port: int = 0, timeout: float = 60.0) -> Connection:
        """Connect to the agent on `port`, waiting while the VM boots; fails fast if QEMU exits."""
        deadline = time.monotonic() + timeout
        sock = agent_socket(spec, port)
        while True:
            if not self.is_alive(spec, pid):
                raise AgentkernelError(f"the VM is not running: {console_tail(spec)}")
            if sock.exists():
                conn = None
                try:
                    conn = await Connection.open_unix(
                        sock, timeout=max(0.1, deadline - time.monotonic()), shared_stream=True
                    )
                    await conn.hello(
                        hostname=spec.name,
                        max_procs=spec.max_procs,
                        memory_mb=spec.memory_mb,
                        timeout=max(0.1, deadline - time.monotonic()),
                    )
                    return conn
                except AgentConnectionError:
                    if conn is not None:
                        await conn.close()
                    if time.monotonic() > deadline or not self.is_alive(spec, pid):
                        raise AgentConnectionError(
                            f"the agent did not answer within {timeout:g}s: {console_tail(spec)}"
                        ) from None
            if time.monotonic() > deadline:
                raise AgentkernelError(f"the agent did not answer within {timeout:g}s: {console_tail(spec)}")
            await asyncio.sleep(0.005)

    def is_alive(self, spec: VMSpec, pid: int) -> bool:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False
        state = stat.rsplit(")", 1)[-1].split()[0]
        return state not in ("Z", "X") and str(pidfile(spec)).encode() in cmdline

    def kill(self, spec: VMSpec, pid: int) -> None:
        gateway.stop(spec.rundir)
        if self.is_alive(spec, pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 5
            while self.is_alive(spec, pid) and time.monotonic() < deadline:
                time.sleep(0.01)

    def cleanup(self, spec: VMSpec, *, keep_disk: bool) -> None:
        gateway.stop(spec.rundir)
        shutil.rmtree(spec.rundir, ignore_errors=True)
        ram_file(spec).unlink(missing_ok=True)
        if not keep_disk:
            shutil.rmtree(spec.workdir, ignore_errors=True)

    async def snapshot(self, spec: VMSpec, pid: int, dest: Path) -> None:
        """Pause, save devices (and RAM that is not in the shared file) and disk, then run on."""
        if spec.mounts:
            raise AgentkernelError(
                "a sandbox with a shared directory cannot be snapshotted (9p does not migrate)"
            )
        qmp = await Qmp.connect(qmp_socket(spec))
        try:
            await qmp.execute("stop")
            try:
                await qmp.execute("migrate-set-capabilities", capabilities=[IGNORE_SHARED])
                await qmp.execute("migrate", uri=f"exec:cat > {shlex.quote(str(dest / 'state'))}")
                await qmp.wait_migration(timeout=300)
                if spec.restore is None or not (spec.restore / "ram").exists():
                    _copy_sparse(ram_file(spec), dest / "ram")
                self._save_disk(spec, dest / "disk.qcow2")
            finally:
                await qmp.execute("cont")
        finally:
            await qmp.close()

    def _save_disk(self, spec: VMSpec, dest: Path) -> None:
        """The sandbox's disk as a qcow2 over the immutable image (whatever chain it had)."""
        if spec.image_format == "raw":
            _copy_sparse(disk(spec), dest)  # already one overlay over the image
            return
        # A resumed copy's disk lies over a snapshot's disk: flatten it onto the image.
        image = _backing_image(spec.image)
        proc = subprocess.run(
            [require("qemu-img", "qemu-utils"), "convert", "-U", "-q", "-O", "qcow2", "-B", str(image),
             "-F", "raw", str(disk(spec)), str(dest)],
            capture_output=True,
            text=True,
        )  # fmt: skip
        if proc.returncode != 0:
            raise AgentkernelError(f"cannot save the sandbox disk: {proc.stderr.strip()[:300]}")

    async def resume(self, spec: VMSpec, pid: int) -> None:
        assert spec.restore is not None
        qmp = await Qmp.connect(qmp_socket(spec))
        try:
            await qmp.execute("migrate-set-capabilities", capabilities=[IGNORE_SHARED])
            await qmp.execute("migrate-incoming", uri=f"exec:cat {shlex.quote(str(spec.restore / 'state'))}")
            await qmp.wait_migration(timeout=300)
            await qmp.execute("cont")
        finally:
            await qmp.close()


IGNORE_SHARED = {"capability": "x-ignore-shared", "state": True}


def _copy_sparse(src: Path, dest: Path) -> None:
    proc = subprocess.run(["cp", "--sparse=always", str(src), str(dest)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise AgentkernelError(f"cannot copy {src.name}: {proc.stderr.strip()[:300]}")


def _backing_image(qcow2: Path) -> Path:
    """The raw image at the bottom of a qcow2 chain."""
    proc = subprocess.run(
        [require("qemu-img", "qemu-utils"), "info", "-U", "--backing-chain", "--output=json", str(qcow2)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise AgentkernelError(f"cannot read the disk chain of {qcow2}: {proc.stderr.strip()[:300]}")
    return Path(json.loads(proc.stdout)[-1]["filename"])


def console_tail(spec: VMSpec) -> str:
    """The last lines the guest printed on its console, on one line."""
    return tail_line(file_tail(spec.console_log).decode(errors="replace")) or "no console output"

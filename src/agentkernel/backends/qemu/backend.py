"""QEMU `-M microvm`: KVM where the host has it, TCG software emulation otherwise.

The guest's root disk is a qcow2 overlay over the immutable image, so no two VMs write one file. QEMU
daemonizes itself, so the VM outlives the process that started it. The agent is reached on Unix
sockets behind virtio-serial ports named `agentkernel.N`, one host client per port: several ports let
several host processes talk to one sandbox at once.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path

from agentkernel import hostinfo, paths
from agentkernel.artifacts.run import require
from agentkernel.backends import disksize
from agentkernel.backends.base import (
    AGENT_PATH,
    MAX_UNIX_PATH,
    VMSpec,
    connect_agent,
    file_tail,
    kill_tagged,
    runs_naming,
    tail_line,
    vm_greeting,
)
from agentkernel.backends.qemu import tsc
from agentkernel.backends.qemu.qmp import Qmp
from agentkernel.errors import AgentkernelError
from agentkernel.hostinfo import Accel
from agentkernel.network import launcher as gateway
from agentkernel.protocol.connection import Connection
from agentkernel.sandbox.liveness import QEMU_PIDFILE

AGENT_PORTS = 4
# A host I/O error reaches the guest as an I/O error; QEMU's default (werror=enospc) would pause the
# VM on a full host disk, and every command in it would hang.
DISK_ERRORS = "werror=report,rerror=report"
# A writable overlay is made at its full virtual size, so a full host disk never reaches a running
# sandbox. A thin one would fail the guest's writeback, after write(2) has long returned success, so
# only an fsync or syncfs caller would see the error; and the first failed ext4 journal write aborts
# the journal, leaving the root filesystem read-only until the VM restarts. Instead every cluster the
# guest can write is allocated up front with fallocate (no data written: milliseconds), and a guest
# that fills its disk gets ENOSPC from its own filesystem at write(2), which every program reports.
# Extended L2 entries keep an allocated cluster's subclusters marked unwritten, so what the guest has
# not written is still read from the image (QEMU refuses preallocation over a backing file without).
RESERVE = "extended_l2=on,preallocation=falloc"
# Guest discards are dropped: passed down they would punch holes in the reservation.
DISCARD = "discard=ignore"


def agent_socket(spec: VMSpec, port: int) -> Path:
    return spec.rundir / f"agent{port}.sock"


def pidfile(spec: VMSpec) -> Path:
    return spec.rundir / QEMU_PIDFILE


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
    """virtio-9p with security_model=mapped-xattr: what the guest does to owners and modes (chown,
    chmod 4755), and the symlinks, device nodes and FIFOs it makes, are kept in user.virtfs.* extended
    attributes of plain host files that QEMU creates as itself with mode 0600 (directories 0700). The
    guest sees them; the host never applies them. Under security_model=none a guest's chown and
    set-uid bit became real on the host when the VMM ran as root. mapped-xattr rather than mapped-file,
    which keeps the same in .virtfs_metadata directories all over the user's project."""
    args = []
    for i, mount in enumerate(spec.mounts):
        readonly = ",readonly=on" if mount.read_only else ""
        host = str(mount.host).replace(",", ",,")  # a comma would end the option, and start another
        args += [
            "-fsdev", f"local,id=fs{i},path={host},security_model=mapped-xattr{readonly}",
            "-device", f"virtio-9p-device,fsdev=fs{i},mount_tag={mount.tag}",
        ]  # fmt: skip
    return args


def check_mounts(spec: VMSpec) -> None:
    """Refuse to share read-write a directory whose filesystem cannot keep user.* extended attributes
    (where mapped-xattr keeps the guest's owners and modes): the guest could create nothing in it."""
    for mount in spec.mounts:
        if mount.read_only:
            continue
        try:
            os.getxattr(mount.host, "user.virtfs.mode")
        except OSError as exc:
            if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
                raise AgentkernelError(
                    f"cannot share {mount.host} read-write: its filesystem does not support user "
                    "extended attributes, which keep the sandbox's file owners and modes off the host"
                ) from None
            if exc.errno != errno.ENODATA:
                raise AgentkernelError(f"cannot share {mount.host}: {exc.strerror}") from None


# The TCG translation cache, in MiB: QEMU's default under TCG is 1 GiB, which a busy sandbox fills
# with private memory it keeps; an idle one touches 2 to 4 MiB of it either way.
TB_SIZE_MB = 64


MACHINE_FILE = "machine.json"
# One malloc arena for all of QEMU's threads: an arena per thread keeps about 1 MiB more per VM.
ONE_ARENA = "glibc.malloc.arena_max=1"


def qemu_env() -> dict[str, str]:
    tunables = [t for t in (os.environ.get("GLIBC_TUNABLES"), ONE_ARENA) if t]
    return {**os.environ, "GLIBC_TUNABLES": ":".join(tunables)}


PR_SET_THP_DISABLE = 41


def no_huge_pages() -> None:
    """No transparent huge pages for this process and the QEMU it starts (the setting is inherited
    across fork and exec). QEMU asks for them for its TCG translation cache, where each 2 MiB an idle
    guest's code touched would then cost 2 MiB, private to its VM; this process gains nothing from
    them either. Best effort: a kernel without the setting keeps its huge pages."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0)


def guest_tsc_khz(spec: VMSpec) -> int | None:
    """The TSC rate a TCG guest is (or was, for a snapshot it resumes) booted with; None: no TSC.

    A snapshot resumes on the machine it was saved from (its devices must match the saved state),
    and only where the host's TSC runs at the rate its guest kernel was told, or its clock would run
    fast or slow: a snapshot saved without a `MACHINE_FILE` is from a guest without a TSC."""
    if spec.restore is None:
        return tsc.host_khz()
    try:
        machine = json.loads((spec.restore / MACHINE_FILE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise AgentkernelError(f"cannot read the snapshot's {MACHINE_FILE}: {exc}") from None
    saved = machine.get("tsc_khz", 0) if isinstance(machine, dict) else 0  # 0: missing, refused
    if saved is not None and (type(saved) is not int or saved <= 0):
        raise AgentkernelError(
            f"cannot read the snapshot's {MACHINE_FILE}: not an object with tsc_khz a positive whole "
            "number of kHz or null"
        )
    host = tsc.host_khz()
    if saved is not None and (host is None or abs(host - saved) * 1000 > saved):
        here = f"{host} kHz" if host is not None else "no usable TSC"
        raise AgentkernelError(
            f"this snapshot was saved on a host whose TSC runs at {saved} kHz and this host has {here}: "
            "its guest clock would run at the wrong rate here; take a new snapshot on this host"
        )
    return saved


def tcg_accel(spec: VMSpec) -> str:
    return f"tcg,tb-size={TB_SIZE_MB}" + (",thread=multi" if spec.vcpus > 1 else "")


def command(
    spec: VMSpec,
    accel: Accel,
    *,
    qemu: str = "qemu-system-x86_64",
    daemonize: bool = True,
    acpi: bool = False,
) -> list[str]:
    """With `acpi`, devices are described in ACPI tables only (as Firecracker 2.0 gives them), not on
    the kernel command line; the default is acpi=off, how sandboxes boot."""
    append = kernel_cmdline(spec)
    khz = None
    if accel.name == "kvm":
        acc = ["-accel", "kvm", "-cpu", "host"]
    else:
        # A TSC whose rate the kernel is told (tsc.py): no calibration, and a clocksource on which
        # an idle guest stops its tick. Where the host has none to give, no TSC at all: the kernel
        # would spend about a second calibrating it, and keeps time by jiffies.
        khz = guest_tsc_khz(spec)
        if acpi and not khz:
            # QEMU's ACPI microvm is hardware-reduced: Linux starts no PIT tick then, and calibrates
            # its local APIC timer against the TSC alone; without one the boot hangs.
            raise AgentkernelError("cannot boot with ACPI under TCG: this host has no TSC to give the guest")
        cpu = "max" if khz else "max,-tsc,-rdtscp"
        acc = ["-accel", tcg_accel(spec), "-cpu", cpu]
        append += tsc.kernel_args(khz) if khz else ""
    # On a TSC the guest's delays run in real time: the kernel's probe of an absent RTC would then
    # wait seconds, so such a boot gets its RTC.
    rtc = "rtc=on" if acpi or khz else "rtc=off"
    firmware = f"{rtc},acpi=on,auto-kernel-cmdline=off" if acpi else f"{rtc},acpi=off"
    readonly = "readonly=on" if spec.read_only else "readonly=off"
    cmd = [
        qemu,
        "-name", f"agentkernel-{spec.name}",
        "-M", f"microvm,x-option-roms=off,isa-serial=on,{firmware},memory-backend=mem",
        *acc,
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-smp", str(spec.vcpus),
        "-m", str(spec.memory_mb),
        "-kernel", str(spec.kernel),
        "-append", append,
        "-drive", f"id=root,file={disk(spec)},format=qcow2,if=none,{DISCARD},{readonly},{DISK_ERRORS}",
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

    def __init__(self, accel: Accel | None = None, *, acpi: bool = False) -> None:
        self.accel = accel or hostinfo.accel()
        self.acpi = acpi  # devices from ACPI tables, not the command line (see `command`)

    def prepare(self, spec: VMSpec) -> None:
        """A qcow2 overlay backed by the read-only image: the VM's writes land in the overlay only.

        A writable overlay is reserved whole on the host (RESERVE): refused here, in one line, when
        the host has not the room for it. With `spec.disk_mb` larger than the image, it lies over
        the image's filesystem grown to that size (_grown_image)."""
        qemu_img = require("qemu-img", "qemu-utils")
        paths.private_dir(spec.workdir)
        options = []
        backing, backing_format = spec.image, spec.image_format
        if not spec.read_only:
            size = virtual_size(spec.image, spec.image_format)
            grown = disksize.target_size(spec, size)
            free = shutil.disk_usage(spec.workdir).free
            size = grown or size
            if free < size + size // 64:  # the qcow2 tables take well under 1/64 of the data
                raise AgentkernelError(
                    f"cannot create the sandbox disk: its {size >> 20} MiB are reserved on the host "
                    f"and only {free >> 20} MiB are free in {spec.workdir.parent}"
                )
            options = ["-o", RESERVE]
            if grown is not None:
                backing, backing_format = _grown_image(spec, grown), "qcow2"
        proc = subprocess.run(
            [qemu_img, "create", "-q", "-f", "qcow2", *options,
             "-b", str(backing), "-F", backing_format, str(disk(spec))],
            capture_output=True,
            text=True,
            umask=paths.PRIVATE_UMASK,
        )  # fmt: skip
        if proc.returncode != 0:
            detail = proc.stderr.strip().removeprefix("qemu-img: ")
            raise AgentkernelError(f"cannot create the sandbox disk: {' '.join(detail.split())[:300]}")

    def start(self, spec: VMSpec) -> int:
        qemu = require("qemu-system-x86_64", "qemu-system-x86")
        if len(str(agent_socket(spec, AGENT_PORTS - 1))) > MAX_UNIX_PATH:
            raise AgentkernelError(f"run directory path too long for Unix sockets: {spec.rundir}")
        check_mounts(spec)
        paths.private_dir(spec.rundir)
        # QEMU sets umask 027 when it daemonizes: the files it writes are made private beforehand
        # (it truncates or sizes them, keeping their mode), its sockets are made so once it runs.
        paths.open_private(spec.console_log, "wb").close()
        if spec.restore is None or not (spec.restore / "ram").exists():  # not a snapshot's RAM file
            paths.open_private(ram_file(spec), "wb").close()
        if spec.egress is not None:
            require("socat", "socat")
            gateway.start(spec.name, spec.egress, spec.rundir)
        if self.accel.name != "kvm":
            no_huge_pages()
            # What a snapshot of this VM must resume on (guest_tsc_khz).
            machine = {"tsc_khz": guest_tsc_khz(spec)}
            paths.write_private(spec.workdir / MACHINE_FILE, json.dumps(machine))
        # With -daemonize the first process exits once the VM is set up, reporting start-up errors.
        proc = subprocess.run(
            command(spec, self.accel, qemu=qemu, acpi=self.acpi),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=qemu_env(),
        )
        try:
            if proc.returncode != 0:
                detail = " ".join(proc.stderr.split())[:500] or f"exit status {proc.returncode}"
                raise AgentkernelError(f"QEMU failed to start: {detail}")
            try:
                pid = int(pidfile(spec).read_text().strip())
            except (OSError, ValueError):
                raise AgentkernelError(f"QEMU started but wrote no pid file at {pidfile(spec)}") from None
            for sock in (qmp_socket(spec), *(agent_socket(spec, port) for port in range(AGENT_PORTS))):
                with contextlib.suppress(FileNotFoundError):
                    sock.chmod(0o600)
            if spec.egress is not None:
                gateway.watch(spec.name, pid)
            return pid
        except BaseException:
            gateway.stop(spec.name, spec.rundir)
            raise

    async def connect(self, spec: VMSpec, pid: int, *, port: int = 0, timeout: float = 60.0) -> Connection:
        """Connect to the agent on `port`, waiting while the VM boots; fails fast if QEMU exits."""
        sock = agent_socket(spec, port)

        async def open_socket(remaining: float) -> Connection | None:
            if not sock.exists():
                return None
            return await Connection.open_unix(sock, timeout=remaining, shared_stream=True)

        return await connect_agent(
            open_socket,
            vm_greeting(spec),
            alive=lambda: self.is_alive(spec, pid),
            detail=lambda: console_tail(spec),
            what="the VM",
            timeout=timeout,
            interval=0.005,
        )

    def is_alive(self, spec: VMSpec, pid: int) -> bool:
        return runs_naming(pid, pidfile(spec))

    def kill(self, spec: VMSpec, pid: int | None) -> None:
        """The VMM and every helper of the sandbox: found by the run directory in their command
        lines (QEMU's `-pidfile`), so also a VMM whose pid was never recorded or that was still
        daemonizing, the forwarders QEMU spawned, the gateway and a lifetime watchdog."""
        kill_tagged(str(spec.rundir))
        gateway.stop(spec.name, spec.rundir)  # once the VMM is gone (see `launcher._recover`)

    def cleanup(self, spec: VMSpec, *, keep_disk: bool) -> None:
        gateway.stop(spec.name, spec.rundir)
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
                paths.open_private(dest / "state", "wb").close()  # `cat` runs with QEMU's umask (027)
                await qmp.execute("migrate", uri=f"exec:cat > {shlex.quote(str(dest / 'state'))}")
                await qmp.wait_migration(timeout=300)
                if spec.restore is None or not (spec.restore / "ram").exists():
                    _copy_sparse(ram_file(spec), dest / "ram")
                self._save_disk(spec, dest / "disk.qcow2")
                if (spec.workdir / MACHINE_FILE).exists():  # not from a VM started without one
                    paths.write_private(dest / MACHINE_FILE, (spec.workdir / MACHINE_FILE).read_bytes())
            finally:
                await qmp.execute("cont")
        finally:
            await qmp.close()

    def _save_disk(self, spec: VMSpec, dest: Path) -> None:
        """The sandbox's disk as a qcow2 over the immutable image (whatever chain it had)."""
        if spec.image_format == "raw" and not grown_image(spec).exists():
            _copy_sparse(disk(spec), dest)  # already one overlay over the image
            return
        # A resumed copy's disk lies over a snapshot's disk: flatten it onto the image.
        image = _backing_image(spec.image)
        proc = subprocess.run(
            [require("qemu-img", "qemu-utils"), "convert", "-U", "-q", "-O", "qcow2", "-B", str(image),
             "-F", "raw", str(disk(spec)), str(dest)],
            capture_output=True,
            text=True,
            umask=paths.PRIVATE_UMASK,
        )  # fmt: skip
        if proc.returncode != 0:
            raise AgentkernelError(f"cannot save the sandbox disk: {proc.stderr.strip()[:300]}")

    async def pause(self, spec: VMSpec, pid: int) -> None:
        await self._qmp(spec, "stop")

    async def unpause(self, spec: VMSpec, pid: int) -> None:
        await self._qmp(spec, "cont")

    async def _qmp(self, spec: VMSpec, command: str) -> None:
        qmp = await Qmp.connect(qmp_socket(spec))
        try:
            await qmp.execute(command)
        finally:
            await qmp.close()

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


def grown_image(spec: VMSpec) -> Path:
    """The layer between the image and the overlay of a sandbox whose disk is larger than its image."""
    return spec.workdir / "grown.qcow2"


def _grown_image(spec: VMSpec, size: int) -> Path:
    """The image with its filesystem grown to `size` bytes (disksize.grow_ext4 on a sparse raw copy),
    kept as a qcow2 over the image that holds only the clusters the growth changed: a few MiB. The
    overlay over it is then reserved whole like any other (RESERVE); writing those changes into the
    overlay itself with qemu-img would drop its reservation."""
    raw, layer = spec.workdir / "grown.raw", grown_image(spec)
    try:
        _grow_step("-f", spec.image_format, "-O", "raw", str(spec.image), str(raw))
        disksize.grow_ext4(raw, size)
        base = ["-B", str(spec.image), "-F", spec.image_format]
        _grow_step("-f", "raw", "-O", "qcow2", *base, str(raw), str(layer))
    finally:
        raw.unlink(missing_ok=True)
    return layer


def _grow_step(*args: str) -> None:
    """`qemu-img convert` with `args`, for _grown_image."""
    proc = subprocess.run(
        [require("qemu-img", "qemu-utils"), "convert", "-q", *args],
        capture_output=True,
        text=True,
        umask=paths.PRIVATE_UMASK,
    )
    if proc.returncode != 0:
        detail = " ".join(proc.stderr.strip().removeprefix("qemu-img: ").split())[:300]
        raise AgentkernelError(f"cannot grow the sandbox disk: {detail}")


def _copy_sparse(src: Path, dest: Path) -> None:
    cmd = ["cp", "--sparse=always", str(src), str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True, umask=paths.PRIVATE_UMASK)
    if proc.returncode != 0:
        raise AgentkernelError(f"cannot copy {src.name}: {proc.stderr.strip()[:300]}")


def virtual_size(image: Path, image_format: str) -> int:
    """The size of the disk `image` holds, in bytes (a raw file's own, a qcow2's virtual size)."""
    proc = subprocess.run(
        [require("qemu-img", "qemu-utils"), "info", "-U", "-f", image_format, "--output=json", str(image)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise AgentkernelError(f"cannot read the disk image {image}: {proc.stderr.strip()[:300]}")
    size: int = json.loads(proc.stdout)["virtual-size"]
    return size


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

"""Firecracker: hardware-KVM microVMs configured over Firecracker's REST API (docs/firecracker.md).

Same kernel, images, agent and protocol as QEMU. Firecracker takes raw block files only, so the root
disk is the sandbox's own copy of the image made with `cp --reflink=auto --sparse=always`: it shares
blocks where the filesystem can (XFS, btrfs) and copies the used blocks elsewhere; a read-only root
opens the immutable image itself. Firecracker runs detached in its own session, optionally through
its jailer (chroot, uid/gid, cgroup limits, new mount and pid namespaces). The host reaches the agent
through Firecracker's hybrid vsock socket: every connection is an independent agent connection.
With network on, the guest's NIC is a tap device in a network namespace of the sandbox's own, where
nftables lets through only TCP to the proxy address, which socat hands to the egress gateway.
Snapshots are Firecracker's Full snapshots (state and memory files) plus a raw copy of the disk; a
fork maps the memory file privately and gets its own disk copy, vsock socket and tap device.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import ipaddress
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agentkernel import hostinfo, paths
from agentkernel.artifacts.run import require
from agentkernel.backends import disksize
from agentkernel.backends.base import (
    AGENT_PATH,
    MAX_UNIX_PATH,
    VMSpec,
    connect_agent,
    file_tail,
    kill_and_wait,
    kill_tagged,
    runs_naming,
    tagged,
    tail_line,
    vm_greeting,
)
from agentkernel.backends.firecracker.api import FirecrackerAPI
from agentkernel.backends.firecracker.version import check_version
from agentkernel.errors import AgentkernelError, PausedWithoutSnapshotError
from agentkernel.hostinfo import Accel
from agentkernel.network import launcher as gateway
from agentkernel.protocol.connection import Connection

AGENT_PORTS = 1024  # vsock connections are independent; this only bounds the service's port locks
GUEST_CID = 3
ROOT_DRIVE = "rootfs"
IFACE = "eth0"
TAP = "tap0"  # inside the sandbox's own network namespace, so the name never clashes
NETNS_DIR = Path("/run/netns")
JAILER_ENV = "AGENTKERNEL_JAILER"
CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_PARENT = "agentkernel"
CONSOLE_WRITER = str(Path(__file__).with_name("console.py"))
CONSOLE_CAP = 1 << 20  # bytes of console log kept at most (console.py)
DRAIN_TIMEOUT = 2.0  # for the console writer to write what a dead Firecracker printed last
VMM_OVERHEAD_MB = 64  # memory.max headroom over the guest's RAM for Firecracker itself
START_TIMEOUT = 10.0
SNAPSHOT_TIMEOUT = 300.0  # writing or mapping the guest's whole memory
RECOVERY_TIMEOUT = 5.0  # for the agent of a source resumed after a failed snapshot to answer
SNAPSHOT_STATE = "vmstate"  # the files of a snapshot directory: Firecracker's microVM state,
SNAPSHOT_MEMORY = "memory"  # the guest memory (a Full snapshot),
SNAPSHOT_DISK = "rootfs.ext4"  # and a raw copy of the root disk
DRIVE_PATH = "rootfs.ext4"  # the root drive as Firecracker is given it: relative, see disk_link()
NEEDS = "firecracker backend needs the firecracker binary on PATH and hardware KVM (/dev/kvm with vmx/svm)"
NETWORK_NEEDS_ROOT = (
    "a firecracker sandbox with network needs root to create its network namespace, tap device and "
    "nftables rules: run agentkernel as root, or turn the network off (--no-network)"
)


def api_socket(spec: VMSpec) -> Path:
    return spec.rundir / "fc.sock"


def vsock_socket(spec: VMSpec) -> Path:
    return spec.rundir / "v.sock"


def disk(spec: VMSpec) -> Path:
    """The root disk: the sandbox's own copy, or the immutable image itself when it is read-only."""
    return spec.image if spec.read_only else spec.workdir / "rootfs.ext4"


def disk_link(spec: VMSpec) -> Path:
    """A link to the root disk where an unjailed Firecracker runs (its working directory).

    A snapshot records the drive's path as Firecracker was given it and a restore opens that path
    again: the API spec has overrides for the vsock socket and taps but none for drives. So every
    Firecracker is given the same relative path, DRIVE_PATH, which each resolves to its own disk:
    this link in its run directory, or the hard link at the root of its jail (a jail's working
    directory). A snapshot taken jailed restores unjailed and the other way round."""
    return spec.rundir / DRIVE_PATH


def log_file(spec: VMSpec) -> Path:
    return spec.workdir / "firecracker.log"


def metrics_file(spec: VMSpec) -> Path:
    return spec.workdir / "metrics.json"


def forwarder_pidfile(spec: VMSpec) -> Path:
    return spec.rundir / "forwarder.pid"


def jail_link(spec: VMSpec) -> Path:
    """A symlink to the sandbox's jail directory while it has one (cleanup finds the jail by it)."""
    return spec.rundir / "jail"


def jail_root(spec: VMSpec) -> Path | None:
    """The root of the running sandbox's jail; None when it runs unjailed (whatever the environment
    of the process asking says: another one started it)."""
    link = jail_link(spec)
    return link.readlink() / "root" if link.is_symlink() else None


def jail_files(kind: str) -> tuple[str, str]:
    """State and memory file paths at a jail's root: "restore", links to the snapshot a restore loads,
    or "snapshot", what a snapshot writes (then moved out). They differ so that a snapshot of a
    restored VM never overwrites the files it was restored from."""
    return f"/{kind}.{SNAPSHOT_STATE}", f"/{kind}.{SNAPSHOT_MEMORY}"


def instance_id(spec: VMSpec) -> str:
    """The microVM's id (jailer --id, network namespace): readable, unique per run directory, and
    within the jailer's rules (letters, digits and hyphens, at most 64)."""
    digest = hashlib.sha256(str(spec.rundir).encode()).hexdigest()[:12]
    return f"ak-{re.sub(r'[^A-Za-z0-9-]', '-', spec.name)[:32]}-{digest}"


def kernel_cmdline(spec: VMSpec) -> str:
    """The kernel command line of QEMU's sandboxes, for Firecracker's machine: reboot=k resets through
    the i8042 controller, which ends the Firecracker process (the agent's power-off); panic=1
    reboots a second after a panic, which ends it too."""
    mode = "ro" if spec.read_only else "rw"
    args = (
        f"console=ttyS0 reboot=k panic=1 pci=off root=/dev/vda {mode} rootfstype=ext4 quiet init={AGENT_PATH}"
    )
    return f"{args} {gateway.GUEST_IP_ARG}" if spec.egress is not None else args


# -- API request bodies (tests validate each against tests/firecracker/firecracker.yaml) ---------------


@dataclass(frozen=True)
class Layout:
    """The file paths Firecracker is given: absolute host paths (an unjailed Firecracker runs in the
    run directory), or paths inside the jail's chroot. Sockets need no entry: a jail mirrors the run
    directory's path, so theirs are the same either way; nor does the drive (DRIVE_PATH)."""

    kernel: str
    log: str
    metrics: str


def host_layout(spec: VMSpec) -> Layout:
    return Layout(*(str(p.absolute()) for p in (spec.kernel, log_file(spec), metrics_file(spec))))


JAIL_LAYOUT = Layout("/vmlinux", "/firecracker.log", "/metrics.json")


def logger_body(layout: Layout) -> dict[str, Any]:
    return {"log_path": layout.log, "level": "Info", "show_level": True, "show_log_origin": False}


def metrics_body(layout: Layout) -> dict[str, Any]:
    return {"metrics_path": layout.metrics}


def machine_config_body(spec: VMSpec) -> dict[str, Any]:
    return {"vcpu_count": spec.vcpus, "mem_size_mib": spec.memory_mb, "smt": False}


def boot_source_body(spec: VMSpec, layout: Layout) -> dict[str, Any]:
    return {"kernel_image_path": layout.kernel, "boot_args": kernel_cmdline(spec)}


def drive_body(spec: VMSpec) -> dict[str, Any]:
    return {
        "drive_id": ROOT_DRIVE,
        "path_on_host": DRIVE_PATH,
        "is_root_device": True,
        "is_read_only": spec.read_only,
    }


def vsock_body(spec: VMSpec) -> dict[str, Any]:
    return {"guest_cid": GUEST_CID, "uds_path": str(vsock_socket(spec))}


def network_body() -> dict[str, Any]:
    return {"iface_id": IFACE, "host_dev_name": TAP}


def action_body(action: str) -> dict[str, Any]:
    return {"action_type": action}


def config_requests(spec: VMSpec, layout: Layout) -> list[tuple[str, dict[str, Any]]]:
    """Every PUT that configures the microVM, in order, before InstanceStart. The logger comes first
    so that Firecracker logs whatever goes wrong after it to the sandbox's log file. A restore gets
    only the logger and metrics, all Firecracker takes before a snapshot load: the snapshot holds
    the rest."""
    requests = [("/logger", logger_body(layout)), ("/metrics", metrics_body(layout))]
    if spec.restore is not None:
        return requests
    requests += [
        ("/machine-config", machine_config_body(spec)),
        ("/boot-source", boot_source_body(spec, layout)),
        (f"/drives/{ROOT_DRIVE}", drive_body(spec)),
        ("/vsock", vsock_body(spec)),
        ("/entropy", {}),  # virtio-rng, as under QEMU
    ]
    if spec.egress is not None:
        requests.append((f"/network-interfaces/{IFACE}", network_body()))
    return requests


def vm_state_body(state: str) -> dict[str, Any]:
    return {"state": state}  # Paused or Resumed


def snapshot_create_body(vmstate: str, memory: str) -> dict[str, Any]:
    return {"snapshot_type": "Full", "snapshot_path": vmstate, "mem_file_path": memory}


def snapshot_load_body(spec: VMSpec, vmstate: str, memory: str) -> dict[str, Any]:
    """Load a snapshot and run it. The File backend maps the memory file privately: pages are read
    from the shared file and copied on write, so every restore writes only its own memory. The
    vsock socket is this sandbox's (the snapshot names its source's); so is the tap, which has the
    same name in every sandbox's own namespace but is said anyway, so that a restore never depends
    on what its source used. The drive needs no override (see disk_link)."""
    body: dict[str, Any] = {
        "snapshot_path": vmstate,
        "mem_backend": {"backend_type": "File", "backend_path": memory},
        "vsock_override": {"uds_path": str(vsock_socket(spec))},
        "resume_vm": True,
    }
    if spec.egress is not None:
        body["network_overrides"] = [network_body()]
    return body


def restore_files(spec: VMSpec, *, jailed: bool) -> tuple[str, str]:
    """The state and memory files a restore loads, as Firecracker sees them."""
    if jailed:
        return jail_files("restore")
    assert spec.restore is not None
    saved = spec.restore.absolute()
    return str(saved / SNAPSHOT_STATE), str(saved / SNAPSHOT_MEMORY)


# -- network: a namespace with a tap device, nftables, and a forwarder to the gateway ----------------


def netns_name(spec: VMSpec) -> str:
    return instance_id(spec)


def proxy_address() -> tuple[str, int, int]:
    """Where the guest sends proxied traffic (host, port) and the prefix length of its subnet."""
    host, port = gateway.GUEST_PROXY.split(":")
    netmask = gateway.GUEST_IP_ARG.removeprefix("ip=").split(":")[3]
    return host, int(port), ipaddress.IPv4Network(f"0.0.0.0/{netmask}").prefixlen


def nft_ruleset() -> str:
    """The namespace's firewall: the guest reaches TCP to the proxy address and nothing else."""
    host, port, _ = proxy_address()
    return f"""table inet agentkernel {{
  chain input {{ type filter hook input priority filter; policy drop;
    iifname "lo" accept
    iifname "{TAP}" ip daddr {host} tcp dport {port} accept
  }}
  chain forward {{ type filter hook forward priority filter; policy drop; }}
  chain output {{ type filter hook output priority filter; policy drop;
    oifname "lo" accept
    oifname "{TAP}" ip saddr {host} tcp sport {port} accept
  }}
}}"""


def network_commands(spec: VMSpec, *, owner: tuple[int, int] | None = None) -> list[list[str]]:
    """The commands (as root) that wire a sandbox's tap device to its egress gateway: a network
    namespace of its own holding the tap, the proxy address on the host side of the tap, and the
    firewall. `owner` (uid, gid) lets a jailed, unprivileged Firecracker open the tap."""
    ns = netns_name(spec)
    host, _, prefix = proxy_address()
    user = ["user", str(owner[0]), "group", str(owner[1])] if owner else []
    return [
        ["ip", "netns", "add", ns],
        ["ip", "-n", ns, "link", "set", "lo", "up"],
        ["ip", "-n", ns, "tuntap", "add", "dev", TAP, "mode", "tap", *user],
        ["ip", "-n", ns, "addr", "add", f"{host}/{prefix}", "dev", TAP],
        ["ip", "-n", ns, "link", "set", TAP, "up"],
        ["ip", "netns", "exec", ns, "nft", nft_ruleset()],
    ]


def forwarder_command(spec: VMSpec) -> list[str]:
    """socat in the namespace: connections to the proxy address go to the gateway's Unix socket."""
    host, port, _ = proxy_address()
    return [
        "ip", "netns", "exec", netns_name(spec),
        "socat", f"TCP-LISTEN:{port},bind={host},reuseaddr,fork",
        f"UNIX-CONNECT:{gateway.socket_path(spec.rundir)}",
    ]  # fmt: skip


def setup_network(spec: VMSpec, *, owner: tuple[int, int] | None = None) -> None:
    """Create the namespace, tap and firewall and start the forwarder (the gateway runs already)."""
    if os.geteuid() != 0:
        raise AgentkernelError(NETWORK_NEEDS_ROOT)
    require("ip", "iproute2")
    require("nft", "nftables")
    require("socat", "socat")
    teardown_network(spec)  # whatever a killed earlier run left
    for cmd in network_commands(spec, owner=owner):
        _run_network_command(cmd)
    with paths.open_private(spec.rundir / "forwarder.log", "ab") as log:
        forwarder = subprocess.Popen(
            forwarder_command(spec),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    paths.write_private(forwarder_pidfile(spec), str(forwarder.pid))


def _run_network_command(cmd: list[str]) -> None:
    try:
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        detail = " ".join(proc.stderr.split())[:300] or f"exit status {proc.returncode}"
        failed = proc.returncode != 0
    except OSError as exc:
        detail, failed = str(exc), True
    if failed:
        shown = " ".join(cmd[:6]) + (" ..." if len(cmd) > 6 else "")
        raise AgentkernelError(f"cannot set up the sandbox network: `{shown}` failed: {detail}")


def teardown_network(spec: VMSpec) -> None:
    """Stop the forwarder (its whole process group: one child per connection) and delete the
    namespace, which takes the tap device and the firewall with it. Does nothing when there is none."""
    with contextlib.suppress(OSError, ValueError):
        pid = int(forwarder_pidfile(spec).read_text())
        if str(gateway.socket_path(spec.rundir)).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
            os.killpg(pid, signal.SIGKILL)
    forwarder_pidfile(spec).unlink(missing_ok=True)
    if (NETNS_DIR / netns_name(spec)).exists():
        subprocess.run(
            ["ip", "netns", "del", netns_name(spec)], stdin=subprocess.DEVNULL, capture_output=True
        )


# -- the jailer ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Jailer:
    """How each Firecracker process is confined by Firecracker's jailer (Firecracker's docs/jailer.md)."""

    uid: int
    gid: int
    chroot_base: Path

    @classmethod
    def from_env(cls) -> Jailer | None:
        """Jailed when AGENTKERNEL_JAILER=1: as AGENTKERNEL_JAILER_UID/_GID (default 65534, nobody)
        under AGENTKERNEL_JAILER_CHROOT_BASE (default <data dir>/jailer, which must be on the
        filesystem of the sandbox disks: the jail holds hard links to them)."""
        if os.environ.get(JAILER_ENV) != "1":
            return None
        try:
            uid = int(os.environ.get(f"{JAILER_ENV}_UID", "65534"))
            gid = int(os.environ.get(f"{JAILER_ENV}_GID", "65534"))
        except ValueError:
            raise AgentkernelError(f"{JAILER_ENV}_UID and {JAILER_ENV}_GID must be numbers") from None
        base = os.environ.get(f"{JAILER_ENV}_CHROOT_BASE")
        return cls(uid, gid, Path(base) if base else paths.data_dir() / "jailer")

    def jail_dir(self, spec: VMSpec, exec_name: str) -> Path:
        """<chroot base>/<exec file name>/<id>, as the jailer names it; the chroot is its `root`."""
        return self.chroot_base / exec_name / instance_id(spec)

    def argv(self, spec: VMSpec, *, jailer: str, firecracker: str, netns: Path | None) -> list[str]:
        """The jailer command: chroot, uid/gid, cgroup v2 limits (memory and CPU of the VM), a new
        pid namespace, the sandbox's network namespace; Firecracker's own arguments after `--`."""
        memory = (spec.memory_mb + VMM_OVERHEAD_MB) * 1024 * 1024
        argv = [
            jailer,
            "--id", instance_id(spec),
            "--exec-file", firecracker,
            "--uid", str(self.uid),
            "--gid", str(self.gid),
            "--chroot-base-dir", str(self.chroot_base),
            "--cgroup-version", "2",
            "--parent-cgroup", CGROUP_PARENT,
            "--cgroup", f"memory.max={memory}",
            "--cgroup", f"cpu.max={spec.vcpus * 100000} 100000",
            "--new-pid-ns",
        ]  # fmt: skip
        if netns is not None:
            argv += ["--netns", str(netns)]
        return [*argv, "--", "--api-sock", str(api_socket(spec))]

    def build(self, spec: VMSpec, exec_name: str) -> Path:
        """A fresh chroot for one run (the jailer refuses a stale pid file): hard links to the kernel,
        the root disk, the log files and, for a restore, the snapshot's state and memory files, and
        the run directory's path for the sockets, owned by the jail's uid. Returns the chroot."""
        jail = self.jail_dir(spec, exec_name)
        shutil.rmtree(jail, ignore_errors=True)
        root = jail / "root"
        root.mkdir(parents=True)  # the jailer gives it to the jail's uid
        self._socket_dir(root, spec.rundir)
        writable = [log_file(spec), metrics_file(spec)] + ([] if spec.read_only else [disk(spec)])
        links = [
            (spec.kernel, JAIL_LAYOUT.kernel),
            (disk(spec), DRIVE_PATH),
            (log_file(spec), JAIL_LAYOUT.log),
            (metrics_file(spec), JAIL_LAYOUT.metrics),
        ]
        if spec.restore is not None:
            saved = (spec.restore / SNAPSHOT_STATE, spec.restore / SNAPSHOT_MEMORY)
            links += zip(saved, jail_files("restore"), strict=True)
        for source, name in links:
            _link(source, root / name.lstrip("/"), writable=source in writable)
            if source in writable:
                os.chown(source, self.uid, self.gid)
            elif not (mode := source.stat().st_mode) & stat.S_IROTH:
                # The store's files are their owner's only (kernel 0700, image 0400, a snapshot's
                # 0440): the jail reads them as its group.
                os.chown(source, -1, self.gid)
                os.chmod(source, stat.S_IMODE(mode) | stat.S_IRGRP)
        return root

    def _socket_dir(self, root: Path, rundir: Path) -> None:
        """The run directory's path inside the chroot, where the jailed Firecracker binds its sockets.
        Made one component at a time with explicit modes, whatever the umask: the jail's uid must
        traverse every folder on the way (root's, 0711: no listing, no writing) and own the last
        (0700)."""
        parts = rundir.absolute().parts[1:]
        folder = root
        for i, part in enumerate(parts):
            folder = folder / part
            last = i == len(parts) - 1
            folder.mkdir()
            os.chmod(folder, 0o700 if last else 0o711)
            if last:
                os.chown(folder, self.uid, self.gid)


def _link(source: Path, dest: Path, *, writable: bool) -> None:
    """Hard-link `source` into a jail; across filesystems a read-only file is copied instead."""
    try:
        os.link(source, dest)
    except OSError as exc:
        if exc.errno != errno.EXDEV or writable:
            raise AgentkernelError(
                f"cannot link {source} into the jail at {dest}: {exc.strerror} "
                "(the jail must be on the filesystem of the sandbox disks)"
            ) from None
        _copy(source, dest)


def _copy(source: Path, dest: Path) -> None:
    """A copy that shares blocks where the filesystem can (reflink) and keeps holes as holes."""
    proc = subprocess.run(
        ["cp", "--reflink=auto", "--sparse=always", str(source), str(dest)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise AgentkernelError(f"cannot copy {source} to {dest}: {' '.join(proc.stderr.split())[:300]}")


# -- the backend ---------------------------------------------------------------------------------------


def require_host(accel: Accel) -> str:
    """The firecracker binary, or one line saying what this host lacks (a release older than
    MIN_VERSION included)."""
    binary = shutil.which("firecracker")
    if binary and accel.name == "kvm":
        check_version(binary)
        return binary
    missing = ([] if binary else ["no firecracker binary on PATH"]) + ([accel.note] if accel.note else [])
    raise AgentkernelError(f"{NEEDS}: {'; '.join(missing)}")


def check_spec(spec: VMSpec) -> None:
    """Refuse what Firecracker cannot do, before anything is made."""
    if spec.mounts:
        raise AgentkernelError(
            "the firecracker backend cannot share host directories (Firecracker has no virtio-9p): "
            "run without --mount-cwd/--dir, or use --backend qemu"
        )
    if spec.image_format != "raw":
        raise AgentkernelError("the firecracker backend boots raw images only: use --backend qemu")


class FirecrackerBackend:
    """The Backend protocol on Firecracker; `jailer` confines each VMM (Jailer.from_env())."""

    name = "firecracker"
    agent_ports = AGENT_PORTS
    snapshot_disk = SNAPSHOT_DISK
    snapshot_disk_format = "raw"

    def __init__(self, accel: Accel | None = None, *, jailer: Jailer | None = None) -> None:
        self.accel = accel or hostinfo.accel()
        self.jailer = jailer

    def prepare(self, spec: VMSpec) -> None:
        """The sandbox's own raw copy of the image (a read-only root uses the image itself)."""
        require_host(self.accel)
        check_spec(spec)
        paths.private_dir(spec.workdir)
        if not spec.read_only:
            _copy(spec.image, disk(spec))
            disk(spec).chmod(0o600)  # images are read-only files; this copy is the guest's to write
            if (size := disksize.target_size(spec, disk(spec).stat().st_size)) is not None:
                disksize.grow_ext4(disk(spec), size)

    def start(self, spec: VMSpec) -> int:
        """Launch Firecracker (or the jailer) detached, configure the microVM over the API, boot it;
        for a restore, leave it waiting for resume() instead."""
        firecracker = require_host(self.accel)
        check_spec(spec)
        jailer = require("jailer", "jailer (from Firecracker's release)") if self.jailer else None
        if len(str(vsock_socket(spec))) > MAX_UNIX_PATH:
            raise AgentkernelError(f"run directory path too long for Unix sockets: {spec.rundir}")
        paths.private_dir(spec.rundir)
        stale = (api_socket(spec), vsock_socket(spec), jail_link(spec), disk_link(spec), spec.console_log)
        for path in stale:
            path.unlink(missing_ok=True)
        for log in (log_file(spec), metrics_file(spec)):
            log.write_bytes(b"")  # Firecracker writes these from the start without truncating
        pid = None
        try:
            netns = None
            if spec.egress is not None:
                gateway.start(spec.name, spec.egress, spec.rundir)
                owner = (self.jailer.uid, self.jailer.gid) if self.jailer else None
                setup_network(spec, owner=owner)
                netns = NETNS_DIR / netns_name(spec)
            if self.jailer and jailer:
                pid, layout, writer = self._launch_jailed(spec, self.jailer, jailer, firecracker, netns)
            else:
                disk_link(spec).symlink_to(disk(spec).absolute())
                argv = [firecracker, "--id", instance_id(spec), "--api-sock", str(api_socket(spec))]
                if netns is not None:
                    argv = ["ip", "netns", "exec", netns.name, *argv]
                proc, writer = self._launch(spec, argv, cwd=spec.rundir)
                pid, layout = proc.pid, host_layout(spec)
            self._configure(spec, pid, layout, writer)
            if spec.egress is not None:
                gateway.watch(spec.name, pid)
            return pid
        except BaseException:
            if pid is not None:
                self.kill(spec, pid)
            teardown_network(spec)
            gateway.stop(spec.name, spec.rundir)
            raise

    def _launch(
        self, spec: VMSpec, argv: list[str], *, cwd: Path | None = None
    ) -> tuple[subprocess.Popen[bytes], subprocess.Popen[bytes]]:
        """Start `argv` in its own session, and the console writer in another (both outlive the
        caller). The guest's serial console (Firecracker's stdout) and whatever Firecracker prints
        before its logger is set go through a pipe to the writer, which keeps the console log under
        CONSOLE_CAP (console.py). Returns (the process, the writer)."""
        read_end, write_end = os.pipe()
        try:
            writer = subprocess.Popen(
                [sys.executable, "-I", "-S", CONSOLE_WRITER, str(spec.console_log), str(CONSOLE_CAP)],
                stdin=read_end,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            os.close(read_end)
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=write_end,
                stderr=write_end,
                cwd=cwd,
                start_new_session=True,
            )
        finally:
            os.close(write_end)  # the writer ends once every process holding the pipe has
        return proc, writer

    def _launch_jailed(
        self, spec: VMSpec, jail: Jailer, jailer: str, firecracker: str, netns: Path | None
    ) -> tuple[int, Layout, subprocess.Popen[bytes]]:
        """Build the chroot, run the jailer; with --new-pid-ns it exits once it has written the pid.
        Returns Firecracker's pid, its layout and the console writer."""
        exec_name = Path(firecracker).resolve().name
        root = jail.build(spec, exec_name)
        jail_link(spec).symlink_to(root.parent)
        for sock in (api_socket(spec), vsock_socket(spec)):
            sock.symlink_to(root / str(sock).lstrip("/"))
        proc, writer = self._launch(
            spec, jail.argv(spec, jailer=jailer, firecracker=firecracker, netns=netns)
        )
        try:
            code = proc.wait(START_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AgentkernelError(f"the jailer did not finish within {START_TIMEOUT:g}s") from None
        try:
            pid = int((root / f"{exec_name}.pid").read_text())
        except (OSError, ValueError):
            _drained(writer)
            raise AgentkernelError(
                f"the jailer failed (exit status {code}): {_tail(spec.console_log)}"
            ) from None
        return pid, JAIL_LAYOUT, writer

    def _configure(self, spec: VMSpec, pid: int, layout: Layout, writer: subprocess.Popen[bytes]) -> None:
        with FirecrackerAPI(api_socket(spec)) as api:
            deadline = time.monotonic() + START_TIMEOUT
            while not api.ready():
                if not self.is_alive(spec, pid):
                    _drained(writer)
                    raise AgentkernelError(f"firecracker exited at start: {failure_detail(spec)}")
                if time.monotonic() > deadline:
                    raise AgentkernelError(
                        f"firecracker's API did not answer within {START_TIMEOUT:g}s: {failure_detail(spec)}"
                    )
                time.sleep(0.005)
            with self._explained(spec, pid):
                for path, body in config_requests(spec, layout):
                    api.put(path, body)
                if spec.restore is None:
                    api.put("/actions", action_body("InstanceStart"))

    @contextlib.contextmanager
    def _explained(self, spec: VMSpec, pid: int) -> Iterator[None]:
        """Failed requests to Firecracker `pid`: once it has exited, with its log and console tails."""
        try:
            yield
        except AgentkernelError as exc:
            if self.is_alive(spec, pid):
                raise
            raise AgentkernelError(f"{exc}; firecracker exited: {failure_detail(spec)}") from None

    async def snapshot(self, spec: VMSpec, pid: int, dest: Path) -> None:
        """Pause, have Firecracker write its state and memory files, copy the disk while the guest
        cannot write it, and resume, whatever failed (see _snapshot). A snapshot that failed after
        the pause may leave the source without a working vsock: see _recover."""
        try:
            await asyncio.to_thread(self._snapshot, spec, pid, dest)
        except PausedWithoutSnapshotError as exc:
            await self._recover(spec, pid, exc)

    def _snapshot(self, spec: VMSpec, pid: int, dest: Path) -> None:
        """A jailed Firecracker writes into its jail's root; the files are moved out and given back to
        us, so that no jail can write what forks map. Taking a snapshot resets the source's vsock
        device: the guest drops its agent connections (whose commands the agent then kills) while
        their host ends stay open, carrying nothing, until the heartbeat gives them up (see
        protocol.client.HEARTBEAT_TIMEOUT); new connections work."""
        jail = jail_root(spec)
        saved = (dest / SNAPSHOT_STATE, dest / SNAPSHOT_MEMORY)
        if jail is None:
            given = (str(saved[0].absolute()), str(saved[1].absolute()))
            written: list[Path] = []  # straight into dest
        else:
            given = jail_files("snapshot")
            written = [jail / name.lstrip("/") for name in given]
        taken = False
        with FirecrackerAPI(api_socket(spec), timeout=SNAPSHOT_TIMEOUT) as api, self._explained(spec, pid):
            api.patch("/vm", vm_state_body("Paused"))
            try:
                api.put("/snapshot/create", snapshot_create_body(*given))
                taken = True
                if written:  # out of the jail
                    for source, target in zip(written, saved, strict=True):
                        shutil.move(source, target)
                        os.chown(target, os.getuid(), os.getgid())
                _copy(disk(spec), dest / SNAPSHOT_DISK)
                for path in (*saved, dest / SNAPSHOT_DISK):
                    path.chmod(0o440)  # read by forks, written by none
            except AgentkernelError as exc:
                if taken or not self.is_alive(spec, pid):
                    raise
                raise PausedWithoutSnapshotError(str(exc)) from None
            finally:
                for path in written:
                    path.unlink(missing_ok=True)
                if self.is_alive(spec, pid):
                    api.patch("/vm", vm_state_body("Resumed"))

    async def _recover(self, spec: VMSpec, pid: int, failure: PausedWithoutSnapshotError) -> None:
        """After a pause without a snapshot, Firecracker 1.16 resumes a vsock device that refuses
        host traffic until the guest acknowledges a reset that only a snapshot sends: the source
        would run on unreachable. If its agent does not answer within RECOVERY_TIMEOUT, it is
        stopped (its disk is kept: it can be started again), and the error says so."""
        try:
            conn = await self.connect(spec, pid, timeout=RECOVERY_TIMEOUT)
        except AgentkernelError as exc:
            self.kill(spec, pid)
            raise AgentkernelError(
                f"{failure}; the sandbox was stopped, since its agent no longer answered after the "
                f"failed snapshot ({exc}); start it again, its disk is kept"
            ) from None
        await conn.close()
        raise AgentkernelError(str(failure))

    def running_version(self, spec: VMSpec, pid: int) -> str:
        """The release of the sandbox's Firecracker process (GET /version), which may be older than
        the binary on PATH: what a snapshot of it is tied to."""
        with FirecrackerAPI(api_socket(spec)) as api, self._explained(spec, pid):
            answer = api.request("GET", "/version")
        if not isinstance(answer, dict) or not isinstance(answer.get("firecracker_version"), str):
            raise AgentkernelError(f"firecracker API GET /version: unexpected answer {str(answer)[:200]}")
        return str(answer["firecracker_version"]).removeprefix("v")

    async def resume(self, spec: VMSpec, pid: int) -> None:
        """Load `spec.restore` into the Firecracker start() left waiting, and run it."""
        await asyncio.to_thread(self._load, spec, pid)

    def _load(self, spec: VMSpec, pid: int) -> None:
        body = snapshot_load_body(spec, *restore_files(spec, jailed=jail_root(spec) is not None))
        with FirecrackerAPI(api_socket(spec), timeout=SNAPSHOT_TIMEOUT) as api, self._explained(spec, pid):
            api.put("/snapshot/load", body)

    async def connect(self, spec: VMSpec, pid: int, *, port: int = 0, timeout: float = 60.0) -> Connection:
        """A new vsock connection to the agent (`port` is not needed: each connection is independent),
        waiting while the guest boots; fails fast, with Firecracker's log, if Firecracker exits."""
        sock = vsock_socket(spec)

        async def open_socket(remaining: float) -> Connection | None:
            if not sock.exists():
                return None
            return await Connection.open_firecracker(sock, timeout=min(5.0, remaining))

        return await connect_agent(
            open_socket,
            vm_greeting(spec),
            alive=lambda: self.is_alive(spec, pid),
            detail=lambda: failure_detail(spec),
            what="the microVM",
            timeout=timeout,
            interval=0.02,
        )

    def is_alive(self, spec: VMSpec, pid: int) -> bool:
        """`pid` runs (not a zombie) and its command line names this sandbox's API socket. Once it
        has ended, its console writer is given a moment to drain, so whoever reads the console log
        next (the exit reason, `logs`) finds the guest's last words there."""
        if runs_naming(pid, api_socket(spec)):
            return True
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while tagged(str(spec.console_log)) and time.monotonic() < deadline:
            time.sleep(0.01)
        return False

    def kill(self, spec: VMSpec, pid: int | None) -> None:
        """The VMM, found by its pid or, when none was recorded, by its API socket or (under the
        jailer) its instance id; then the gateway and any other helper of the sandbox."""
        if pid is not None:
            kill_and_wait(pid, lambda: self.is_alive(spec, pid))
        kill_tagged(str(spec.rundir), instance_id(spec))
        teardown_network(spec)
        gateway.stop(spec.name, spec.rundir)

    def cleanup(self, spec: VMSpec, *, keep_disk: bool) -> None:
        teardown_network(spec)
        gateway.stop(spec.name, spec.rundir)
        if jail_link(spec).is_symlink():
            jail = jail_link(spec).readlink()
            shutil.rmtree(jail, ignore_errors=True)
            with contextlib.suppress(OSError):
                (CGROUP_ROOT / CGROUP_PARENT / jail.name).rmdir()  # the jailer leaves it behind
        shutil.rmtree(spec.rundir, ignore_errors=True)
        if not keep_disk:
            shutil.rmtree(spec.workdir, ignore_errors=True)


def _drained(writer: subprocess.Popen[bytes]) -> None:
    """Wait for the console writer to end, as it does once the processes writing its pipe have:
    the console log then holds their last words."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        writer.wait(DRAIN_TIMEOUT)


def failure_detail(spec: VMSpec) -> str:
    """Firecracker's last log lines and the guest's last console lines, on one bounded line."""
    return f"firecracker log: {_tail(log_file(spec))} || console: {_tail(spec.console_log)}"


def _tail(path: Path) -> str:
    return tail_line(file_tail(path).decode(errors="replace")) or "none"

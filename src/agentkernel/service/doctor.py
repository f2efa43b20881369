"""`agentkernel doctor`: find what crashes and kills left behind in the data dir, and repair it.

It looks at three things:
- build directories under tmp/ whose builder is dead (processes, mounts, files: see images.builddir);
- the state database: a damaged one is set aside (renamed with a timestamp) and rebuilt from the
  copies of the records kept beside it (records/<name>.json), checked against what runs;
- VMM processes and sandbox disks: a VMM that runs without a record is re-recorded from that copy, or
  stopped when there is none; a record that lost track of its running VMM gets its pid back;
- sandboxes whose owner died with no reaper running since (a client killed, a pool daemon killed
  with no daemon after it to adopt its ready sandboxes): removed.

Without `repair` nothing is changed: each finding is one line saying what `--repair` would do.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
from dataclasses import dataclass, replace
from pathlib import Path

from agentkernel import paths, procs
from agentkernel.backends import get_backend
from agentkernel.backends.base import kill_and_wait
from agentkernel.errors import AgentkernelError
from agentkernel.images import builddir
from agentkernel.pool import control
from agentkernel.sandbox import state
from agentkernel.sandbox.state import SandboxRecord
from agentkernel.service import owners, sandboxes

NAME = rb"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}"
RAM = re.compile(rb"mem-path=(/dev/shm/agentkernel-[0-9]+-[0-9a-f]+\.ram),share=on")
"""A VM's own RAM file (qemu/backend.ram_file); a resumed copy maps its snapshot's file instead, not ours."""


@dataclass(frozen=True)
class Finding:
    message: str
    repaired: bool  # False: only reported (no --repair, or nothing could be done)


@dataclass(frozen=True)
class Vmm:
    """A QEMU process that runs a disk of this data dir's sandbox `name`."""

    pid: int
    name: str
    rundir: Path | None
    ram: Path | None  # its guest RAM file on /dev/shm, which outlives it


def diagnose(*, repair: bool) -> list[Finding]:
    """What is wrong in the data dir; with `repair` each problem is also fixed where it can be."""
    findings = _build_dirs(repair)
    damaged = state.check()
    mirrored, unreadable = state.mirrored_records()
    findings += [Finding(line, False) for line in unreadable]
    if damaged is not None:
        if not repair:
            return [*findings, Finding(f"{damaged}: --repair sets it aside and rebuilds it", False)]
        aside = state.set_aside()
        findings.append(Finding(f"the damaged state database was set aside as {aside}", True))
        known: dict[str, SandboxRecord] = {}
    else:
        known = {r.name: r for r in state.all_records()}
    findings += _records(known, {r.name: r for r in mirrored}, repair=repair)
    if damaged is None:
        findings += _orphans(repair)
    return findings


def _orphans(repair: bool) -> list[Finding]:
    """Sandboxes whose owner has died; a pool daemon's ready ones only when no daemon runs to adopt
    them."""
    daemon = control.running_pid() is not None
    findings = []
    for record in state.all_records():
        mark = owners.dead_owner(record.owner)
        if mark is None or (record.pool and daemon):
            continue
        removed = False
        if repair:
            with contextlib.suppress(AgentkernelError):
                sandboxes.remove(record.name, force=True)
                removed = True
        fix = "removed" if removed else "--repair: removes it"
        findings.append(
            Finding(f"sandbox '{record.name}' outlived its owner (pid {mark['pid']}): {fix}", removed)
        )
    return findings


def _build_dirs(repair: bool) -> list[Finding]:
    if repair:
        return [Finding(c.describe(), c.removed) for c in builddir.clean_stale()]
    findings = []
    for path in builddir.stale_dirs():
        mounts = builddir.mounts_under(path.resolve())
        inside = f", {len(mounts)} filesystem(s) still mounted inside" if mounts else ""
        findings.append(
            Finding(f"stale build directory {path} of a dead build{inside}: --repair removes it", False)
        )
    return findings


def _records(
    known: dict[str, SandboxRecord], mirrored: dict[str, SandboxRecord], *, repair: bool
) -> list[Finding]:
    """Bring the database, the record copies and the running VMMs into line."""
    findings: list[Finding] = []

    def note(problem: str, fix: str) -> None:
        findings.append(Finding(f"{problem}: {fix if repair else '--repair: ' + fix}", repair))

    vmms = _vmms()
    restore: list[SandboxRecord] = []
    for name in sorted(known.keys() | mirrored.keys()):
        record = known.get(name) or mirrored[name]
        vmm = vmms.get(name)
        if vmm is not None and _runs(record, vmm):
            del vmms[name]  # else it is some other VMM on this disk: stopped below
        else:
            vmm = None
        fixed = record if vmm is None else replace(record, status="running", pid=vmm.pid)
        if name not in known and vmm is None and not _workdir(name).exists():
            if repair:
                (state.records_dir() / f"{name}.json").unlink(missing_ok=True)
            note(f"a copy of the record of removed sandbox '{name}' was left behind", "dropped")
        elif name not in known:
            restore.append(fixed)
            note(f"sandbox '{name}' ({fixed.status}) has no record", "re-recorded from its copy")
        elif fixed != record:
            restore.append(fixed)
            note(f"sandbox '{name}' runs as pid {fixed.pid} but its record lost track of it", "re-recorded")
        elif name not in mirrored:
            restore.append(record)
            note(f"sandbox '{name}' has no copy of its record on disk", "written")
    if repair and restore:
        state.restore(restore)
        for record in restore:
            sandboxes.reconcile(record)  # a copy that says running while nothing runs: failed
    for vmm in vmms.values():
        if repair:
            _stop(vmm)
        note(
            f"VMM pid {vmm.pid} runs the disk of sandbox '{vmm.name}', of which no record is left", "stopped"
        )
    findings += _orphan_disks(known.keys() | mirrored.keys())
    return findings


def _runs(record: SandboxRecord, vmm: Vmm) -> bool:
    """Whether `vmm` is the VMM of `record` (started for its run dir)."""
    return get_backend(record.backend).is_alive(sandboxes.spec_of(record), vmm.pid)


def _workdir(name: str) -> Path:
    return paths.data_dir() / "sandboxes" / name


def _vmms() -> dict[str, Vmm]:
    """QEMU processes running a disk under this data dir's sandboxes/, by sandbox name."""
    homes = {os.fsencode(p / "sandboxes") for p in (paths.data_dir(), paths.data_dir().resolve())}
    disk = re.compile(rb"file=(?:" + b"|".join(map(re.escape, homes)) + rb")/(" + NAME + rb")/")
    found: dict[str, Vmm] = {}
    for entry in os.scandir("/proc"):
        args = procs.argv(int(entry.name)) if entry.name.isdigit() else []
        if not args or not os.path.basename(args[0]).startswith(b"qemu-system"):
            continue
        names = [m[1].decode() for arg in args if (m := disk.search(arg))]
        if not names or procs.start_time(int(entry.name)) is None:
            continue
        pidfile = args[args.index(b"-pidfile") + 1] if b"-pidfile" in args[:-1] else None
        ram = next((m[1] for arg in args if (m := RAM.search(arg))), None)
        found[names[0]] = Vmm(
            int(entry.name),
            names[0],
            Path(os.fsdecode(pidfile)).parent if pidfile else None,
            Path(os.fsdecode(ram)) if ram else None,
        )
    return found


def _stop(vmm: Vmm) -> None:
    """Kill a VMM nobody can reach any more, its helpers (gateway, watchdog) and its files."""
    kill_and_wait(vmm.pid, lambda: procs.start_time(vmm.pid) is not None)
    if vmm.rundir is not None and vmm.rundir.parent == paths.runtime_dir():
        for pid in builddir.users(vmm.rundir):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(vmm.rundir, ignore_errors=True)
    if vmm.ram is not None:
        vmm.ram.unlink(missing_ok=True)


def _orphan_disks(named: set[str]) -> list[Finding]:
    directory = paths.data_dir() / "sandboxes"
    if not directory.is_dir():
        return []
    return [
        Finding(
            f"{path} is the disk of sandbox '{path.name}', whose record is lost with no copy on disk: "
            f"it is left in place (remove it with `rm -r {path}` if it is not needed)",
            False,
        )
        for path in sorted(directory.iterdir())
        if path.name not in named
    ]

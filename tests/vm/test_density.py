"""Restored sandboxes at density: forks share the template's RAM and never write it, an idle guest
stops its tick, the VMM keeps no huge pages or per-thread arenas, and the density benchmark runs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from agentkernel.backends.qemu import backend as qemu
from agentkernel.backends.qemu import tsc
from agentkernel.bench import density
from agentkernel.sandbox import state
from tests.conftest import cli
from tests.vm.conftest import BootedVM

pytestmark = pytest.mark.vm


def ok(*args: str) -> bytes:
    result = cli(*args)
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tcg_with_tsc() -> int:
    if qemu.QemuBackend().accel.name == "kvm":
        pytest.skip("KVM guests keep time by kvm-clock: the TCG clock settings do not apply")
    khz = tsc.host_khz()
    if khz is None:
        pytest.skip("this host does not keep time by its TSC: TCG guests get none")
    return khz


def test_forks_map_the_template_privately_and_never_write_it(cli_home: Path) -> None:
    ok("create", "--backend", "qemu", "--no-network", "origin")
    ok("start", "origin")
    ok("snapshot", "create", "origin", "snap")
    ok("rm", "-f", "origin")
    ram = cli_home / "snapshots" / "snap" / "ram"
    before = sha256(ram)
    ok("fork", "snap", "one")
    ok("fork", "snap", "two")
    # 32 MiB of one fork's memory written (dd's buffer), and a file in its page cache and disk.
    write = "dd if=/dev/urandom of=/dev/null bs=32M count=1 2>/dev/null; echo mine > /root/f; sync"
    ok("exec", "one", "--", "sh", "-c", write)
    absent = "test -e /root/f && echo present || echo absent"
    assert ok("exec", "two", "--", "sh", "-c", absent) == b"absent\n"
    ok("fork", "snap", "three")  # after the writes: the template is as it was saved
    assert ok("exec", "three", "--", "sh", "-c", absent) == b"absent\n"
    assert ok("exec", "one", "--", "cat", "/root/f") == b"mine\n"
    one = state.get("one").pid
    assert one is not None
    copied = density.breakdown(one)["private"]["guest_ram"]
    assert copied >= 32 << 20  # the fork's writes are private copies, in its own memory
    assert sha256(ram) == before  # and never reach the template's file
    ok("rm", "-f", "one", "two", "three")
    ok("snapshot", "rm", "snap")


def test_idle_guest_stops_its_tick_and_snapshots_keep_their_clock(cli_home: Path) -> None:
    khz = tcg_with_tsc()
    ok("create", "--backend", "qemu", "--no-network", "clock")
    ok("start", "clock")
    clocksource = "/sys/devices/system/clocksource/clocksource0/current_clocksource"
    probe = f"cat {clocksource}; grep -m1 nohz_mode /proc/timer_list"
    # The kernel boots on "tsc-early" and moves to "tsc" once it has refined the TSC's rate, a
    # second of guest time after boot: on a loaded host the first command can come before that.
    settled = f"i=0; while [ $i -lt 100 ] && grep -qx tsc-early {clocksource}; do sleep 0.1; i=$((i+1)); done"
    out = ok("exec", "clock", "--", "sh", "-c", f"{settled}; {probe}").decode().split()
    assert out[0] == "tsc"
    assert out[-1] != "0"  # NO_HZ is active: the idle guest stops its periodic tick
    ok("snapshot", "create", "clock", "snap")
    machine = json.loads((cli_home / "snapshots" / "snap" / qemu.MACHINE_FILE).read_text())
    assert machine == {"tsc_khz": khz}
    ok("fork", "snap", "copy")
    assert ok("exec", "copy", "--", "sh", "-c", probe).decode().split()[0] == "tsc"
    (cli_home / "snapshots" / "snap" / qemu.MACHINE_FILE).write_text(json.dumps({"tsc_khz": khz * 2}))
    result = cli("fork", "snap", "elsewhere")
    assert result.returncode != 0
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "take a new snapshot on this host" in lines[0], lines
    ok("rm", "-f", "clock", "copy")
    ok("snapshot", "rm", "snap")


def test_vmm_keeps_no_huge_pages_nor_arena_per_thread(vm: BootedVM) -> None:
    if vm.backend.accel.name == "kvm":
        pytest.skip("under KVM there is no translation cache: QEMU keeps its defaults")
    status = Path(f"/proc/{vm.pid}/status").read_text()
    assert "THP_enabled:\t0" in status
    environ = Path(f"/proc/{vm.pid}/environ").read_bytes().split(b"\0")
    assert any(e.startswith(b"GLIBC_TUNABLES=") and b"glibc.malloc.arena_max=1" in e for e in environ)
    cmd = Path(f"/proc/{vm.pid}/cmdline").read_bytes().split(b"\0")
    assert any(arg.startswith(b"tcg,tb-size=") for arg in cmd)


def test_density_figures(cli_home: Path) -> None:
    memory = density.restored_memory((1, 2), settle_s=0.5)
    for count in ("1", "2"):
        row = memory["sandboxes"][count]
        assert row["pss_mib"] > 0 and row["private_mib"] > 0
        assert {"guest_ram", "heap", "qemu_binary"} <= row["private_by_kind_mib"].keys()
    idle = density.idle_cpu(1, seconds=1.0, settle_s=0.5)
    assert idle["sandboxes"] == 1 and idle["cpu_percent_of_one_core"] >= 0
    assert json.loads(ok("snapshot", "list", "--json")) == []  # the benchmark removed its template
    assert json.loads(ok("list", "--json")) == []

"""The host's TSC rate, which TCG gives its guests as their own.

Under TCG a guest's `rdtsc` reads the host's TSC (QEMU's cpu ticks, paused while the VM is stopped,
so a resumed snapshot's TSC runs on from where it was saved). Told the rate on its command line
(`tsc_early_khz=`), the guest kernel skips the calibration that takes about a second under emulation
and gets a continuous clocksource: with it the periodic tick stops while the guest is idle (NO_HZ),
where on jiffies it kept waking QEMU 100 times a second. The rate is measured against the host's
CLOCK_MONOTONIC_RAW (itself the host kernel's TSC reading, so the two agree) once per host boot and
kept in the runtime dir.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import mmap
import os
import time
from collections.abc import Callable
from pathlib import Path

from agentkernel import paths

CACHE = "tsc_khz"
# rdtsc; shl rdx, 32; or rax, rdx; ret
_RDTSC = bytes([0x0F, 0x31, 0x48, 0xC1, 0xE2, 0x20, 0x48, 0x09, 0xD0, 0xC3])
_SAMPLE_S = 0.05


def host_khz() -> int | None:
    """The host's TSC rate in kHz, or None where a guest cannot use it as a clock: a host that does
    not keep time by its own TSC (not x86, or a TSC its kernel found unstable)."""
    return _host_khz(_boot_id())


@functools.lru_cache(maxsize=1)
def _host_khz(boot_id: str) -> int | None:
    clocksource = Path("/sys/devices/system/clocksource/clocksource0/current_clocksource")
    try:
        if clocksource.read_text().strip() != "tsc" or os.uname().machine != "x86_64":
            return None
    except OSError:
        return None
    cache = paths.runtime_dir() / CACHE
    with contextlib.suppress(OSError, ValueError):
        saved_boot, saved = cache.read_text().split()
        if saved_boot == boot_id:
            return int(saved)
    khz = measure()
    if khz is not None:
        with contextlib.suppress(OSError):
            paths.write_private(cache, f"{boot_id} {khz}\n")
    return khz


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def measure(seconds: float = _SAMPLE_S) -> int | None:
    """TSC ticks per millisecond of CLOCK_MONOTONIC_RAW over `seconds`; None if `rdtsc` cannot be run."""
    rdtsc = _rdtsc()
    if rdtsc is None:
        return None

    def sample() -> tuple[int, int]:
        # The clock read most tightly bracketed by two TSC reads, of a few tries.
        best = (1 << 64, 0, 0)
        for _ in range(8):
            before = rdtsc()
            now = time.clock_gettime_ns(time.CLOCK_MONOTONIC_RAW)
            after = rdtsc()
            best = min(best, (after - before, (before + after) // 2, now))
        return best[1], best[2]

    ticks0, ns0 = sample()
    time.sleep(seconds)
    ticks1, ns1 = sample()
    return round((ticks1 - ticks0) * 1_000_000 / (ns1 - ns0)) if ns1 > ns0 else None


@functools.lru_cache(maxsize=1)
def _rdtsc() -> Callable[[], int] | None:
    """`rdtsc` as a function: the instruction in a page made executable once written (never both)."""
    try:
        page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        page.write(_RDTSC)
        address = ctypes.addressof(ctypes.c_char.from_buffer(page))
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        if libc.mprotect(address, mmap.PAGESIZE, mmap.PROT_READ | mmap.PROT_EXEC) != 0:
            return None
    except (OSError, ValueError, AttributeError):
        return None
    function = ctypes.CFUNCTYPE(ctypes.c_uint64)(address)
    _keep.append(page)  # the page must outlive every call
    return lambda: int(function())


_keep: list[mmap.mmap] = []


def kernel_args(khz: int) -> str:
    """The guest kernel's arguments for a TSC of `khz`: its rate, and no watchdog against jiffies
    (which under a loaded host lag behind and would get the TSC marked unstable)."""
    return f" tsc_early_khz={khz} tsc=reliable"

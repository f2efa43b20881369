"""The egress gateway's memory: one shared process with 1, 10 and 100 network sandboxes registered,
its cost per sandbox, and, side by side, the old design's cost of one gateway process per sandbox.

Each run spawns gateway processes of its own, each for a temporary data dir (nothing of the user's
is touched), registers sandboxes with the real control protocol, and sends each sandbox one request
through its own socket (judged and refused: no network is needed) so that the serving code is loaded
and each sandbox's objects exist, as they do in use. PSS counts pages shared between processes once
(each process gets its fair share), so the old design's processes are not charged for the Python
interpreter pages they share. Figures are medians of `runs` runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from agentkernel import metrics, paths
from agentkernel.errors import AgentkernelError
from agentkernel.network import launcher

COUNTS = (1, 10, 100)
OLD_PROCESSES = 10  # one-sandbox processes measured together for the old design's cost
MIB = 1024 * 1024
RULES = {"allow": ["pypi.org"], "block": [], "allowlist_only": True}


@contextlib.contextmanager
def _home(home: Path) -> Iterator[Path]:
    """`home` as the data dir (AGENTKERNEL_HOME) for what runs inside."""
    saved = os.environ.get("AGENTKERNEL_HOME")
    os.environ["AGENTKERNEL_HOME"] = str(home)
    try:
        yield home
    finally:
        if saved is None:
            del os.environ["AGENTKERNEL_HOME"]
        else:
            os.environ["AGENTKERNEL_HOME"] = saved


class _Process:
    """A gateway process of the benchmark's own: the one of the data dir `home`."""

    def __init__(self, home: Path) -> None:
        with _home(home):
            self.control = launcher.control_path()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agentkernel.network.host"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                env=dict(os.environ),
            )  # fmt: skip
        deadline = time.monotonic() + 60
        while not self.control.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AgentkernelError("the egress gateway did not start")
            time.sleep(0.01)

    def register(self, name: str, rundir: Path) -> None:
        paths.private_dir(rundir)
        sock, dns = launcher.socket_path(rundir), launcher.dns_socket_path(rundir)
        message = {"op": "register", "sandbox": name, "rules": RULES, "brokered": None}
        launcher.request({**message, "socket": str(sock), "dns_socket": str(dns)}, self.control)
        _refused_request(sock)

    def memory(self) -> dict[str, int]:
        found = metrics.vmm_memory(self.proc.pid)
        if found is None:
            raise AgentkernelError("the egress gateway exited during the benchmark")
        return found

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        shutil.rmtree(self.control.parent, ignore_errors=True)


def _refused_request(sock: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(sock))
        s.sendall(b"CONNECT 127.0.0.1:9 HTTP/1.1\r\nHost: 127.0.0.1:9\r\n\r\n")
        while s.recv(65536):
            pass


def _shared_run(root: Path) -> dict[int, dict[str, int]]:
    """One shared process, memory after 1, 10 and 100 sandboxes are registered (and served)."""
    process = _Process(root / "shared")
    try:
        found, registered = {}, 0
        for count in COUNTS:
            while registered < count:
                process.register(f"sb-{registered}", root / f"s{registered}")
                registered += 1
            found[count] = process.memory()
        return found
    finally:
        process.close()


def _old_run(root: Path) -> dict[str, int]:
    """OLD_PROCESSES processes serving one sandbox each: their mean memory per process."""
    processes = [_Process(root / f"old{i}") for i in range(OLD_PROCESSES)]  # a data dir each
    try:
        for i, process in enumerate(processes):
            process.register(f"old-{i}", root / f"o{i}")
        totals = [p.memory() for p in processes]
        return {k: sum(t[k] for t in totals) // OLD_PROCESSES for k in ("pss", "rss")}
    finally:
        for process in processes:
            process.close()


def gateway_memory(runs: int = 3) -> dict[str, Any]:
    """The egress gateway's memory figures (MiB; the per-sandbox cost in KiB), medians of `runs`."""
    shared: list[dict[int, dict[str, int]]] = []
    old: list[dict[str, int]] = []
    for _ in range(runs):
        with tempfile.TemporaryDirectory(dir=paths.runtime_dir(), prefix="gwbench-") as tmp:
            shared.append(_shared_run(Path(tmp)))
            old.append(_old_run(Path(tmp)))

    def median(values: list[int]) -> float:
        return float(statistics.median(values))

    pss = {n: median([r[n]["pss"] for r in shared]) for n in COUNTS}
    rss = {n: median([r[n]["rss"] for r in shared]) for n in COUNTS}
    old_pss = median([r["pss"] for r in old])
    per_sandbox = (pss[COUNTS[-1]] - pss[COUNTS[0]]) / (COUNTS[-1] - COUNTS[0])
    return {
        "gateway_pss_mib": {str(n): round(pss[n] / MIB, 2) for n in COUNTS},
        "gateway_rss_mib": {str(n): round(rss[n] / MIB, 2) for n in COUNTS},
        "per_sandbox_kib": round(per_sandbox / 1024, 1),
        "old_per_sandbox_pss_mib": round(old_pss / MIB, 2),
        "old_pss_mib_at_100": round(100 * old_pss / MIB, 1),
        "old_over_shared_at_100": round(100 * old_pss / pss[100], 1),
        "runs": runs,
    }


def main() -> None:
    figures = gateway_memory(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
    pss = figures["gateway_pss_mib"]
    print(f"shared gateway PSS: {pss['1']} MiB with 1 sandbox, {pss['10']} with 10, {pss['100']} with 100")
    print(f"per sandbox: {figures['per_sandbox_kib']} KiB in the shared process")
    print(
        f"old design: {figures['old_per_sandbox_pss_mib']} MiB per sandbox (one process each), "
        f"{figures['old_pss_mib_at_100']} MiB for 100 = {figures['old_over_shared_at_100']}x the shared one"
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()

"""Starting and stopping a sandbox's egress gateway: a detached process, like the VMM it serves."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from agentkernel.errors import AgentkernelError
from agentkernel.network.policy import EgressRules

GUEST_PROXY = "10.0.2.100:3128"  # where the guest sends proxied traffic; the VMM forwards it here
GUEST_DNS = "10.0.2.100:53"  # DNS over TCP, answered by the gateway
RESOLV_CONF = "nameserver 10.0.2.100\noptions use-vc\n"  # the guest's resolver: TCP to the gateway
GUEST_IP_ARG = "ip=10.0.2.15::10.0.2.2:255.255.255.0::eth0:off"


def socket_path(rundir: Path) -> Path:
    return rundir / "gateway.sock"


def dns_socket_path(rundir: Path) -> Path:
    return rundir / "dns.sock"


def proxy_env() -> dict[str, str]:
    """What exec'd commands need to find the way out (the only one there is)."""
    proxy = f"http://{GUEST_PROXY}"
    local = "localhost,127.0.0.1,::1"
    return {
        "http_proxy": proxy,
        "https_proxy": proxy,
        "HTTP_PROXY": proxy,
        "HTTPS_PROXY": proxy,
        "no_proxy": local,
        "NO_PROXY": local,
    }


def start(sandbox: str, rules: EgressRules, rundir: Path) -> int:
    sock = socket_path(rundir)
    sock.unlink(missing_ok=True)
    dns_socket_path(rundir).unlink(missing_ok=True)
    with (rundir / "gateway.log").open("ab") as log:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "agentkernel.network.gateway",
                "--sandbox", sandbox, "--socket", str(sock), "--dns-socket", str(dns_socket_path(rundir)),
                "--rules", json.dumps(asdict(rules)),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )  # fmt: skip
    (rundir / "gateway.pid").write_text(str(proc.pid))
    return proc.pid


def wait_ready(rundir: Path, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    pid = int((rundir / "gateway.pid").read_text())
    while not socket_path(rundir).exists():
        if time.monotonic() > deadline or not _running(pid):
            raise AgentkernelError(f"the egress gateway did not start: see {rundir / 'gateway.log'}")
        time.sleep(0.01)


def _running(pid: int) -> bool:
    """Whether `pid` exists and is not a zombie (it is our child, just started: no reuse to fear)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def stop(rundir: Path) -> None:
    pid = _pid(rundir)
    if pid:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    (rundir / "gateway.pid").unlink(missing_ok=True)


def _pid(rundir: Path) -> int | None:
    """The gateway's pid if it runs (checked against its command line: pids get reused)."""
    try:
        pid = int((rundir / "gateway.pid").read_text())
        if str(socket_path(rundir)).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
            return pid
    except (OSError, ValueError):
        pass
    return None

"""Starting and stopping a sandbox's egress gateway: a detached process, like the VMM it serves."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from agentkernel import paths, procs
from agentkernel.errors import AgentkernelError
from agentkernel.network import brokering
from agentkernel.network.policy import EgressRules

GUEST_PROXY = "10.0.2.100:3128"  # where the guest sends proxied traffic; the VMM forwards it here
GUEST_DNS = "10.0.2.100:53"  # DNS over TCP, answered by the gateway
RESOLV_CONF = "nameserver 10.0.2.100\noptions use-vc\n"  # the guest's resolver: TCP to the gateway
GUEST_IP_ARG = "ip=10.0.2.15::10.0.2.2:255.255.255.0::eth0:off"
GUEST_CA_DIR = "/run/agentkernel"  # a tmpfs in the guest: there with a read-only root too
GUEST_CA = f"{GUEST_CA_DIR}/sandbox-ca.pem"  # the sandbox CA alone
GUEST_CA_BUNDLE = f"{GUEST_CA_DIR}/ca-bundle.pem"  # the guest's own trust store and the sandbox CA


def socket_path(rundir: Path) -> Path:
    return rundir / "gateway.sock"


def dns_socket_path(rundir: Path) -> Path:
    return rundir / "dns.sock"


def ca_cert_path(rundir: Path) -> Path:
    """The sandbox CA's certificate (public), made anew by each `start` of a sandbox with secrets."""
    return rundir / "sandbox-ca.pem"


def trust_env() -> dict[str, str]:
    """What makes the guest's TLS clients trust the sandbox CA, for a sandbox with secrets."""
    return {
        "SSL_CERT_FILE": GUEST_CA_BUNDLE,
        "REQUESTS_CA_BUNDLE": GUEST_CA_BUNDLE,
        "CURL_CA_BUNDLE": GUEST_CA_BUNDLE,
        "NODE_EXTRA_CA_CERTS": GUEST_CA,
    }


def trust_script(ca_pem: str) -> str:
    """A shell script for the guest: install the sandbox CA at GUEST_CA, build GUEST_CA_BUNDLE from
    the image's trust store (as it was before any CA was added) and the CA, and make that bundle the
    system store where the root is writable. Idempotent: each start replaces the previous CA."""
    return f"""set -e
umask 022
mkdir -p {GUEST_CA_DIR}
cat > {GUEST_CA} <<'AGENTKERNEL_CA'
{ca_pem.strip()}
AGENTKERNEL_CA
system=
for f in /etc/ssl/certs/ca-certificates.crt /etc/pki/tls/certs/ca-bundle.crt /etc/ssl/cert.pem; do
    if [ -f "$f" ]; then system=$f; break; fi
done
base=$system
if [ -n "$system" ] && [ -f "$system.agentkernel-orig" ]; then base=$system.agentkernel-orig; fi
{{ if [ -n "$base" ]; then cat "$base"; echo; fi; cat {GUEST_CA}; }} > {GUEST_CA_BUNDLE}
if [ -n "$system" ] && [ -w "$system" ]; then
    [ -f "$system.agentkernel-orig" ] || cp "$system" "$system.agentkernel-orig"
    cat {GUEST_CA_BUNDLE} > "$system"
fi
"""


COMMAND_ID = re.compile(r"c-[0-9a-f]{8}")  # as `protocol.connection.new_command_id` makes them
COMMAND_PASSWORD = "agentkernel"  # some clients (urllib, wget) send proxy credentials only with one


def proxy_env(command: str | None = None) -> dict[str, str]:
    """What exec'd commands need to find the way out (the only one there is). With `command`, its
    id rides in the proxy address's userinfo: clients send it as Proxy-Authorization, and the gateway
    writes it in its audit entries (as the guest claims it: see `gateway.claimed_command`)."""
    userinfo = f"{command}:{COMMAND_PASSWORD}@" if command else ""
    proxy = f"http://{userinfo}{GUEST_PROXY}"
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
    """Start the gateway. With secrets, their values are read here (AgentkernelError if one cannot
    be) and, with a new CA's key, reach the gateway on its stdin: never argv, env or a file."""
    brokered = _brokered(sandbox, rules, rundir) if rules.secrets else None
    sock = socket_path(rundir)
    sock.unlink(missing_ok=True)
    dns_socket_path(rundir).unlink(missing_ok=True)
    plain = {"allow": rules.allow, "block": rules.block, "allowlist_only": rules.allowlist_only}
    with paths.open_private(rundir / "gateway.log", "ab") as log:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "agentkernel.network.gateway",
                "--sandbox", sandbox, "--socket", str(sock), "--dns-socket", str(dns_socket_path(rundir)),
                "--rules", json.dumps(plain), *(["--secrets-from-stdin"] if brokered else []),
            ],
            stdin=subprocess.PIPE if brokered else subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )  # fmt: skip
    if brokered is not None and proc.stdin is not None:
        with contextlib.suppress(BrokenPipeError), proc.stdin:
            proc.stdin.write(brokered)
    paths.write_private(rundir / "gateway.pid", str(proc.pid))
    return proc.pid


def _brokered(sandbox: str, rules: EgressRules, rundir: Path) -> bytes:
    """The gateway's secrets document; writes the new CA's certificate to `ca_cert_path`."""
    from agentkernel.network import mitm  # cryptography: only for sandboxes with secrets

    armed = [{**b.record(), "value": brokering.read_value(b)} for b in rules.secrets]
    cert, key = mitm.make_ca(sandbox)
    paths.write_private(ca_cert_path(rundir), cert)
    return json.dumps({"secrets": armed, "ca_cert": cert.decode(), "ca_key": key.decode()}).encode()


def wait_ready(rundir: Path, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    pid = int((rundir / "gateway.pid").read_text())
    while not socket_path(rundir).exists():
        if time.monotonic() > deadline or not procs.running(
            pid
        ):  # our child, just started: no pid reuse to fear
            raise AgentkernelError(f"the egress gateway did not start: see {rundir / 'gateway.log'}")
        time.sleep(0.01)


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

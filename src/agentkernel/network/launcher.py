"""Registering a sandbox with the egress gateway, and withdrawing it: one gateway process per data
dir (`host`) serves every sandbox with network on, each on sockets of its own in its run directory.

The first start spawns the process (detached, like a VMM); it exits when the last sandbox is
withdrawn. Starts and stops take one lock (`lock_path`), so two starts never spawn two processes and
a stop never races the process's exit. When no gateway answers, a start spawns one and registers the
running sandboxes with network on again, from their records: the gateway keeps nothing on disk, so
one that died left nothing registered, and a sandbox stopped meanwhile is not registered again."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from agentkernel import paths
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


def ca_key_path(rundir: Path) -> Path:
    """The sandbox CA's key (0600, owner only, like the secret store): what lets a restarted gateway
    serve a running sandbox again with the CA its guest already trusts."""
    return rundir / "sandbox-ca.key"


def gateway_dir() -> Path:
    """The gateway's private directory (0700): one per data dir, named from the data dir's path."""
    tag = hashlib.sha256(str(paths.data_dir().resolve()).encode()).hexdigest()[:12]
    return paths.private_dir(paths.runtime_dir() / f"gateway-{tag}")


def control_path() -> Path:
    return gateway_dir() / "control.sock"


def lock_path() -> Path:
    return gateway_dir() / "lock"


def log_path() -> Path:
    return paths.logs_dir() / "gateway.log"


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


START_TIMEOUT = 60.0  # a Python start on a loaded host can take tens of seconds
CONTROL_TIMEOUT = 10.0
HUNG_TIMEOUT = 30.0


def start(sandbox: str, rules: EgressRules, rundir: Path) -> None:
    """Register the sandbox with the gateway (spawning it if none runs); its sockets listen when
    this returns. With secrets, their values are read here (AgentkernelError if one cannot be) and,
    with a new CA's key, reach the gateway over the control socket: never argv, env or a log."""
    brokered = _brokered(sandbox, rules, rundir, new_ca=True) if rules.secrets else None
    with _locked():
        if not _answers():
            _spawn()
            _recover(exclude=sandbox)
        _register(sandbox, rules, rundir, brokered)


def watch(sandbox: str, pid: int) -> None:
    """Name the sandbox's VMM to the gateway, once it runs: should it die without a stop, the
    gateway withdraws the sandbox (and forgets its secrets) by itself. Best effort: without it,
    the sandbox is withdrawn once its run directory goes."""
    with contextlib.suppress(OSError, AgentkernelError):
        request({"op": "watch", "sandbox": sandbox, "pid": pid})


def _answers() -> bool:
    """Whether the gateway runs and answers. One that is slow (a loaded host) gets HUNG_TIMEOUT more
    before it is taken for hung, killed and replaced."""
    try:
        request({"op": "status"})
    except TimeoutError:
        return status(HUNG_TIMEOUT) is not None
    except OSError:  # no socket, or no process behind it
        return False
    return True


def stop(sandbox: str, rundir: Path) -> None:
    """Withdraw the sandbox, and remove its sockets and CA key. Nothing to do without its sockets (a
    sandbox without network, or stopped already); a gateway that died holds nothing to withdraw."""
    sockets = (socket_path(rundir), dns_socket_path(rundir))
    if any(path.exists() for path in sockets):
        with _locked(), contextlib.suppress(OSError, AgentkernelError):
            request({"op": "withdraw", "sandbox": sandbox})
    for path in (*sockets, ca_key_path(rundir)):
        path.unlink(missing_ok=True)


def status(timeout: float | None = None) -> dict[str, Any] | None:
    """The running gateway's pid and registered sandboxes; None when none answers."""
    try:
        return request({"op": "status"}, timeout=timeout)
    except (OSError, AgentkernelError):
        return None


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    with paths.open_private(lock_path(), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a connected Unix socket (from the kernel)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


def request(
    message: dict[str, Any], control: Path | None = None, *, timeout: float | None = None
) -> dict[str, Any]:
    """One control request to the gateway at `control` (this data dir's by default) and its reply:
    OSError when none answers (TimeoutError when it does not in time), AgentkernelError when it
    refuses. The peer must be of this uid."""
    path = control or control_path()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout or CONTROL_TIMEOUT)
        sock.connect(str(path))
        if peer_uid(sock) != os.getuid():
            raise AgentkernelError(f"{path} is served by another user: refusing it")
        sock.sendall(json.dumps(message).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            if not (chunk := sock.recv(65536)):
                raise ConnectionResetError("the egress gateway closed the control connection")
            data += chunk
    reply: dict[str, Any] = json.loads(data)
    if not reply.get("ok"):
        raise AgentkernelError(f"the egress gateway refused: {reply.get('error')}")
    return reply


def pid_path() -> Path:
    return gateway_dir() / "pid"


def _kill_previous() -> None:
    """SIGKILL the gateway process spawned last for this data dir, if it still runs (hung: it did not
    answer): two would fight over the sandboxes' sockets. Checked by its arguments and data dir."""
    try:
        pid = int(pid_path().read_text())
        ours = b"agentkernel.network.host" in Path(f"/proc/{pid}/cmdline").read_bytes()
        home = b"AGENTKERNEL_HOME=" + os.fsencode(paths.data_dir())
        if ours and home in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
            os.kill(pid, signal.SIGKILL)
    except (OSError, ValueError):
        pass


def _spawn() -> None:
    """Start the gateway process and wait until its control socket answers."""
    _kill_previous()
    control_path().unlink(missing_ok=True)  # a dead gateway's
    # Its data dir (and runtime dir) come by the environment: it derives its paths from them and
    # writes the audit log there. It works in / so that it keeps no user folder busy.
    env = {**os.environ, "AGENTKERNEL_HOME": str(paths.data_dir())}
    with paths.open_private(log_path(), "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agentkernel.network.host"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd="/", env=env, start_new_session=True,
        )  # fmt: skip
    paths.write_private(pid_path(), str(proc.pid))
    # Reaped whenever it exits: a long-lived caller (the API server) is left no zombie.
    threading.Thread(target=proc.wait, name="gateway-reaper", daemon=True).start()
    deadline = time.monotonic() + START_TIMEOUT
    while status() is None:
        if proc.returncode is not None or time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()  # a gateway starting this late would serve sockets no one registered
            raise AgentkernelError(f"the egress gateway did not start: see {log_path()}")
        time.sleep(0.01)


def _register(sandbox: str, rules: EgressRules, rundir: Path, brokered: dict[str, Any] | None) -> None:
    plain = {"allow": rules.allow, "block": rules.block, "allowlist_only": rules.allowlist_only}
    try:
        request(
            {
                "op": "register", "sandbox": sandbox, "rules": plain, "brokered": brokered,
                "socket": str(socket_path(rundir)), "dns_socket": str(dns_socket_path(rundir)),
            }
        )  # fmt: skip
    except OSError as exc:
        raise AgentkernelError(f"the egress gateway did not answer: {exc}; see {log_path()}") from None


def _brokered(sandbox: str, rules: EgressRules, rundir: Path, *, new_ca: bool) -> dict[str, Any]:
    """The gateway's secrets document. A new CA writes its certificate to `ca_cert_path` and its key
    to `ca_key_path`; otherwise the sandbox's current CA is read from there."""
    armed = [{**b.record(), "value": brokering.read_value(b)} for b in rules.secrets]
    if new_ca:
        from agentkernel.network import mitm  # cryptography: only for sandboxes with secrets

        cert, key = mitm.make_ca(sandbox)
        paths.private_dir(rundir)
        paths.write_private(ca_cert_path(rundir), cert)
        paths.write_private(ca_key_path(rundir), key)
    else:
        try:
            cert, key = ca_cert_path(rundir).read_bytes(), ca_key_path(rundir).read_bytes()
        except OSError as exc:
            raise AgentkernelError(f"the sandbox CA is gone: {exc.strerror}") from None
    return {"secrets": armed, "ca_cert": cert.decode(), "ca_key": key.decode()}


def _recover(*, exclude: str) -> None:
    """Register again every running sandbox with network on (but `exclude`, about to register), from
    its record: after the gateway died, they have no way out until this. One that cannot be (its
    secret is gone) stays without network, which the audit log records."""
    from agentkernel.service import audit
    from agentkernel.service.sandboxes import running_with_network  # the service imports this module

    for name, rules, rundir, pid in running_with_network():
        if name == exclude:
            continue
        try:
            brokered = _brokered(name, rules, rundir, new_ca=False) if rules.secrets else None
            _register(name, rules, rundir, brokered)
            watch(name, pid)
        except AgentkernelError as exc:
            audit.record("gateway_recovery", name, ok=False, reason=str(exc))
        else:
            audit.record("gateway_recovery", name, ok=True)

"""Every error a user can meet, in one tree. Each reaches the CLI as one line (exit status 1) and the
HTTP API as a problem document: its class carries the HTTP `status` and the problem `code`, so the API's
mapping is a lookup (`api/problems.py`), and `field` names the input it is about, when there is one.

    AgentkernelError                     422 operation_failed
    ├── InvalidRequestError              422 invalid_field (or the code given: invalid_path, ...)
    │   └── UnknownImageError            422 unknown_image
    ├── NoSuchSandboxError               404 sandbox_not_found
    ├── SandboxExistsError               409 sandbox_exists
    ├── SandboxStateError                409 sandbox_state
    │   └── SandboxNotRunningError       409 sandbox_not_running
    ├── NotAFileError                    409 not_a_file
    ├── FileOpError                      by errno: 404 file_not_found, 403 permission_denied, ...
    ├── ExecError                        422 command_not_found (ENOENT) or exec_failed
    │   ├── ArgumentsTooLongError        422 arguments_too_long
    │   └── WorkingDirectoryError        422 invalid_cwd
    ├── BackgroundCommandError           by errno: 404 background_command_not_found, 409 ...
    ├── PortForwardError                 409 port_forward_failed (the host address is taken, ...)
    │   ├── PortsNotAllowedError         403 ports_not_allowed (the sandbox's profile refuses)
    │   └── GuestPortError               502 guest_port_unreachable (nothing listens in the guest)
    ├── AgentConnectionError             502 agent_unreachable
    │   └── ProtocolError                (the agent broke the protocol)
    ├── VMMError                         502 vmm_failed
    │   ├── QmpError
    │   ├── FirecrackerAPIError
    │   └── PausedWithoutSnapshotError
    ├── CorruptImageError                500 image_corrupt
    ├── UnavailableError                 503 unavailable
    │   ├── MissingToolError             503 missing_tool
    │   ├── EngineUnavailable            503 engine_unavailable
    │   └── DaemonUnavailable            503 pool_unavailable
    ├── StateError                       503 state_unavailable
    │   ├── StateBusyError
    │   ├── StateDamagedError
    │   └── StateIOError
    └── FleetError                       502 fleet_failed (a router of many hosts: fleet/)
        ├── EtcdUnavailable              503 etcd_unavailable
        ├── FleetFullError               503 fleet_full
        ├── NoSuchNodeError              404 node_not_found
        ├── NoSuchSnapshotError          404 snapshot_not_found (no live node holds it)
        ├── NodeUnreachableError         502 node_unreachable (or node_auth_failed)
        └── SandboxLostError             410 sandbox_lost

The CLI adds one of its own (`cli.thin_exec.GaveUpError`, a second Ctrl-C), which never reaches a server.
The SDK's own errors (`agentkernel.client.ClientError` and below) are the client's side of this: an
`ApiError` carries the `code` a server sent.
"""

from __future__ import annotations

import errno as errnos
from pathlib import Path


class AgentkernelError(Exception):
    """An expected failure: the CLI prints its message on one line and exits non-zero."""

    exit_code = 1
    status = 422
    code = "operation_failed"
    field: str | None = None


class InvalidRequestError(AgentkernelError):
    """Bad input; `field` names the parameter it came in, `code` says what kind of problem it is."""

    code = "invalid_field"

    def __init__(self, field: str, message: str, *, code: str | None = None) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        if code is not None:
            self.code = code


class UnknownImageError(InvalidRequestError):
    code = "unknown_image"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(field, message)


class NoSuchSandboxError(AgentkernelError):
    status, code, field = 404, "sandbox_not_found", "name"

    def __init__(self, name: str) -> None:
        super().__init__(f"no sandbox named '{name}' (see `agentkernel list`)")


class SandboxExistsError(AgentkernelError):
    status, code, field = 409, "sandbox_exists", "name"


class SandboxStateError(AgentkernelError):
    """The sandbox is in the wrong state for the request (say, removing a running one)."""

    status, code = 409, "sandbox_state"


class SandboxNotRunningError(SandboxStateError):
    code = "sandbox_not_running"

    def __init__(self, name: str, status: str) -> None:
        then = "resume it first" if status == "paused" else "start it first"
        super().__init__(f"sandbox '{name}' is not running (status: {status}): {then}")
        self.sandbox_status = status


class NotAFileError(AgentkernelError):
    status, code, field = 409, "not_a_file", "path"

    def __init__(self, path: str, kind: str) -> None:
        super().__init__(f"{path} is not a regular file (it is a {kind})")
        self.kind = kind


FILE_ERRNOS = {
    errnos.ENOENT: (404, "file_not_found"),
    errnos.EACCES: (403, "permission_denied"),
    errnos.EPERM: (403, "permission_denied"),
    errnos.EEXIST: (409, "file_exists"),
    errnos.ENOTEMPTY: (409, "directory_not_empty"),
    errnos.EISDIR: (409, "is_a_directory"),
    errnos.ENOTDIR: (409, "not_a_directory"),
    errnos.ENOSPC: (507, "no_space"),
    errnos.EROFS: (409, "read_only_filesystem"),
}


class FileOpError(AgentkernelError):
    """The guest refused a file operation (no such file, permission denied, ...)."""

    code, field = "file_error", "path"

    def __init__(self, message: str, errno: int | None) -> None:
        super().__init__(message)
        self.errno = errno
        self.status, self.code = FILE_ERRNOS.get(errno or 0, (self.status, self.code))


class ExecError(AgentkernelError):
    """The agent could not start the command (for example: no such file)."""

    code, field = "exec_failed", "command"

    def __init__(self, message: str, errno: int | None) -> None:
        super().__init__(message)
        self.errno = errno
        if errno == errnos.ENOENT:
            self.code = "command_not_found"


class ArgumentsTooLongError(ExecError):
    """A command's argv and env are over Linux's execve limits (ARG_MAX, MAX_ARG_STRLEN)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, errnos.E2BIG)
        self.code = "arguments_too_long"


class AgentConnectionError(AgentkernelError):
    """The connection to a sandbox's agent failed or broke."""

    status, code = 502, "agent_unreachable"


class ProtocolError(AgentConnectionError):
    """The agent broke the protocol (`what` says how): the connection cannot be trusted any more.
    Raised wherever bytes from the guest are parsed (protocol/frames.py)."""

    def __init__(self, what: str) -> None:
        super().__init__(f"the sandbox agent broke the protocol: {what}")
        self.what = what


class VMMError(AgentkernelError):
    """The virtual machine monitor refused or failed an operation."""

    status, code = 502, "vmm_failed"


class QmpError(VMMError):
    """QEMU's monitor (QMP) refused a command or could not be reached."""


class FirecrackerAPIError(VMMError):
    """Firecracker answered a request with an error status (`http_status`, its own)."""

    def __init__(self, method: str, path: str, http_status: int, fault: str) -> None:
        super().__init__(f"firecracker refused {method} {path} (HTTP {http_status}): {fault}")
        self.http_status = http_status
        self.fault = fault


class PausedWithoutSnapshotError(VMMError):
    """A snapshot failed after the microVM was paused and before Firecracker wrote it."""


class CorruptImageError(AgentkernelError):
    """An image whose file is missing or no longer matches its digest."""

    status, code = 500, "image_corrupt"


class UnavailableError(AgentkernelError):
    """Something the operation needs is not there on this host (a program, an engine, a daemon)."""

    status, code = 503, "unavailable"


class MissingToolError(UnavailableError):
    """A system program is missing; the message names the package that provides it."""

    code = "missing_tool"

    def __init__(self, program: str, package: str) -> None:
        super().__init__(
            f"'{program}' is not installed: install it with `apt-get install -y {package}` "
            "(or run scripts/install-system-deps.sh)"
        )
        self.program = program
        self.package = package


class EngineUnavailable(UnavailableError):
    """No container engine works here; the message says why, on one line."""

    code = "engine_unavailable"


class DaemonUnavailable(UnavailableError):
    """The pool daemon is not running or does not answer."""

    code = "pool_unavailable"


class StateError(AgentkernelError):
    """The state database cannot be used; the message names the file and what to do."""

    status, code = 503, "state_unavailable"


class StateBusyError(StateError):
    """Another process held the database for longer than the state module's BUSY_LIMIT."""


class StateDamagedError(StateError):
    """The database file is not a (sound) SQLite database."""

    def __init__(self, path: Path, detail: str) -> None:
        super().__init__(
            f"the state database {path} is damaged ({detail}): run `agentkernel doctor --repair` to set "
            "it aside and rebuild it from the sandboxes on disk"
        )
        self.short = f"the state database {path} is damaged ({detail})"


class StateIOError(StateError):
    """The database file cannot be read or written: a full disk, permissions, an I/O error."""


class WorkingDirectoryError(ExecError):
    """The command's working directory is missing in the guest, or is not a directory."""

    code, field = "invalid_cwd", "cwd"

    def __init__(self, message: str, errno: int | None) -> None:
        super().__init__(message, errno)
        self.code = "invalid_cwd"


BACKGROUND_ERRNOS = {
    errnos.ESRCH: (404, "background_command_not_found"),
    errnos.ECHILD: (409, "background_command_exited"),
    errnos.EPIPE: (409, "stdin_closed"),
    errnos.EAGAIN: (409, "stdin_full"),
}


class BackgroundCommandError(AgentkernelError):
    """A request about a background command failed: no such command, it has exited, its stdin is
    closed or full (`errno` says which)."""

    code, field = "background_command_failed", "command_id"

    def __init__(self, message: str, errno: int | None) -> None:
        super().__init__(message)
        self.errno = errno
        self.status, self.code = BACKGROUND_ERRNOS.get(errno or 0, (self.status, self.code))


class PortForwardError(AgentkernelError):
    """A port of a sandbox could not be forwarded to the host: the host address is taken or cannot
    be bound, or the forwarder could not be started."""

    status, code, field = 409, "port_forward_failed", "port"

    def __init__(self, message: str, *, field: str = "port") -> None:
        super().__init__(message)
        self.field = field


class PortsNotAllowedError(PortForwardError):
    """The sandbox's policy forwards no ports, or none to an address beyond the host's loopback."""

    status, code = 403, "ports_not_allowed"


class GuestPortError(PortForwardError):
    """A connection to a port in the guest failed there: nothing listens on it (ECONNREFUSED), or the
    guest's server reset it (`errno` says which)."""

    status, code = 502, "guest_port_unreachable"

    def __init__(self, message: str, errno: int | None) -> None:
        super().__init__(message)
        self.errno = errno


class FleetError(AgentkernelError):
    """A router of many hosts (`serve --fleet`) could not do what a single host would have."""

    status, code = 502, "fleet_failed"


class EtcdUnavailable(FleetError):
    """No etcd member answered; the message lists the URLs tried."""

    status, code = 503, "etcd_unavailable"


class FleetFullError(FleetError):
    """No live node has room for the sandbox (or no node is registered at all)."""

    status, code = 503, "fleet_full"


class NoSuchNodeError(FleetError):
    status, code, field = 404, "node_not_found", "node"

    def __init__(self, node: str) -> None:
        super().__init__(f"no node named '{node}' is registered (see `agentkernel fleet nodes`)")


class NoSuchSnapshotError(FleetError):
    status, code, field = 404, "snapshot_not_found", "snapshot"

    def __init__(self, snapshot: str) -> None:
        super().__init__(
            f"no live node holds a snapshot named '{snapshot}' (see `agentkernel fleet nodes --json`)"
        )


class NodeUnreachableError(FleetError):
    """A registered node did not answer the router, or refused its key (code node_auth_failed)."""

    code = "node_unreachable"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class SandboxLostError(FleetError):
    """The sandbox's node stopped renewing its registration: the sandbox is gone with it."""

    status, code, field = 410, "sandbox_lost", "name"


def os_error_text(exc: OSError) -> str:
    """How an error on the host's side (a full disk, a file it may not read or write) is worded."""
    where = f"{exc.filename}: " if exc.filename else ""
    return f"{where}{exc.strerror or exc}"

"""Input checks of the sandbox service, each defined once for every face (CLI, HTTP API, MCP, pool).

Every check raises InvalidRequestError naming the field it is about; a face that calls the field
something else (the CLI's `--memory` for `memory_mb`) shows its own name for it (see `InvalidRequestError`).
On the standard library only: the thin command line (`cli/thin.py`) imports it too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from agentkernel.errors import InvalidRequestError
from agentkernel.names import SANDBOX_NAME

NAME_RE = SANDBOX_NAME
"""Sandbox (and snapshot) names: 1 to 63 letters, digits, '.', '_' or '-', starting with a letter or
digit; safe as file names."""
LOGIN_SHELL = ("/bin/sh", "-c", "if command -v bash >/dev/null; then exec bash -l; else exec sh -l; fi")
"""What `attach` runs when no command is given: the image's login shell, bash where it has one."""
MAX_PATH = 4096
MAX_TIMEOUT = 7 * 86400.0
"""Seconds a command may be given to run before it is killed."""
LIFETIME_RANGE = (1.0, 30 * 86400.0)
"""Seconds a sandbox may run after each start before it is stopped."""


def validate_name(name: str, *, field: str = "name") -> str:
    if not NAME_RE.fullmatch(name):
        raise InvalidRequestError(
            field,
            f"invalid sandbox name {_shown(name)}: use 1 to 63 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit",
            code="invalid_name",
        )
    return name


def guest_path(path: str, *, field: str = "path") -> str:
    """`path` normalized as an absolute path in the guest; no NUL, no `..`, bounded in length.

    The path is only ever resolved by the guest: this just refuses what cannot be meant honestly.
    """
    problem = None
    if not path.startswith("/"):
        problem = f"must be an absolute path in the sandbox (got {_shown(path)})"
    elif "\0" in path:
        problem = "must not contain NUL"
    elif len(path.encode()) > MAX_PATH:
        problem = f"longer than {MAX_PATH} bytes"
    parts = [part for part in path.split("/") if part not in ("", ".")]
    if ".." in parts:
        problem = f"must not contain '..' segments (got {_shown(path)})"
    if problem:
        raise InvalidRequestError(field, problem, code="invalid_path")
    return "/" + "/".join(parts)


def check_command(command: Sequence[str], *, field: str = "command") -> list[str]:
    if not command:
        raise InvalidRequestError(field, "must hold at least the program to run")
    if any("\0" in arg for arg in command):
        raise InvalidRequestError(field, "arguments must not contain NUL")
    return list(command)


def check_env(env: Mapping[str, str] | None, *, field: str = "env") -> dict[str, str]:
    checked = {}
    for key, value in (env or {}).items():
        if not key or "=" in key or "\0" in key or "\0" in value:
            raise InvalidRequestError(field, f"{_shown(key)}: names must be non-empty without '=' or NUL")
        checked[key] = value
    return checked


def check_labels(labels: Mapping[str, str] | None, *, field: str = "labels") -> dict[str, str]:
    """Labels are short printable key=value pairs, kept with the sandbox to find it by."""
    checked = {}
    for key, value in (labels or {}).items():
        if not NAME_RE.fullmatch(key):
            raise InvalidRequestError(
                field, f"{_shown(key)}: keys are 1 to 63 letters, digits, '.', '_' or '-'"
            )
        if len(value) > 256 or not value.isprintable():
            raise InvalidRequestError(field, f"{key}: values are at most 256 printable characters")
        checked[key] = value
    return checked


def parse_pairs(pairs: Sequence[str], *, field: str) -> dict[str, str]:
    """`KEY=VALUE` strings (the CLI's `-e`, `--label`, the API's `?label=`) as a dict."""
    parsed = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key or "\0" in pair:
            raise InvalidRequestError(field, f"{_shown(pair)}: expected KEY=VALUE")
        parsed[key] = value
    return parsed


def parse_labels(pairs: Sequence[str], *, field: str = "label") -> dict[str, str]:
    return check_labels(parse_pairs(pairs, field=field), field=field)


def check_timeout(timeout: float | None, *, field: str = "timeout") -> float | None:
    """A command's timeout in seconds (NaN and infinity refused too)."""
    if timeout is not None and not 0 < timeout <= MAX_TIMEOUT:
        raise InvalidRequestError(
            field, f"must be more than 0 and at most {MAX_TIMEOUT:g} seconds (got {timeout:g})"
        )
    return timeout


def check_range(value: int, bounds: tuple[int, int], *, field: str, unit: str = "") -> int:
    low, high = bounds
    if not low <= value <= high:
        raise InvalidRequestError(field, f"must be between {low} and {high}{unit} (got {value})")
    return value


def check_lifetime(lifetime: float | None, *, field: str = "lifetime") -> float | None:
    low, high = LIFETIME_RANGE
    if lifetime is not None and not low <= lifetime <= high:
        raise InvalidRequestError(field, f"must be between 1 second and 30 days (got {lifetime:g})")
    return lifetime


def _shown(text: str) -> str:
    return repr(text if len(text) <= 80 else text[:77] + "...")


def check_port(port: int, *, field: str = "port", ephemeral: bool = False) -> int:
    """A TCP port: 1 to 65535 (0 too with `ephemeral`: the host picks a free one)."""
    low = 0 if ephemeral else 1
    if isinstance(port, bool) or not isinstance(port, int) or not low <= port <= 65535:
        raise InvalidRequestError(field, f"must be a port number from {low} to 65535 (got {port!r})")
    return port


def check_bind_address(address: str, *, field: str = "host") -> str:
    """A host address to listen on: an IPv4 or IPv6 address, as written by `ipaddress` ("localhost"
    is 127.0.0.1)."""
    import ipaddress  # only when a port is forwarded

    if address == "localhost":
        return "127.0.0.1"
    try:
        return str(ipaddress.ip_address(address.strip("[]")))
    except ValueError:
        raise InvalidRequestError(
            field, f"must be an IP address of this host, like 127.0.0.1 or 0.0.0.0 (got {_shown(address)})"
        ) from None

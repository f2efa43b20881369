"""A client for Firecracker's REST API on its Unix socket (the API spec: tests/firecracker/firecracker.yaml).

Every failure becomes one AgentkernelError line naming the request: an error response carries
`{"fault_message": ...}` (the spec's Error definition), which is quoted; a socket that does not answer
is named with the transport error.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from agentkernel.errors import AgentkernelError, FirecrackerAPIError

MAX_DETAIL = 500  # characters of an error body quoted in a message


class FirecrackerAPI:
    """Requests to one Firecracker process. Use as a context manager, or call close()."""

    def __init__(self, socket: Path, *, timeout: float = 10.0) -> None:
        self.socket = socket
        self._client = httpx.Client(
            transport=httpx.HTTPTransport(uds=str(socket)), base_url="http://localhost", timeout=timeout
        )

    def __enter__(self) -> FirecrackerAPI:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """Send one request; the decoded JSON answer, or None for an empty one (204)."""
        try:
            response = self._client.request(method, path, json=body)
        except httpx.TransportError as exc:
            detail = str(exc) or type(exc).__name__
            raise AgentkernelError(
                f"firecracker API {method} {path}: no answer on {self.socket}: {detail}"
            ) from None
        if response.status_code >= 300:
            raise FirecrackerAPIError(method, path, response.status_code, fault_message(response.content))
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            raise AgentkernelError(f"firecracker API {method} {path}: the answer is not JSON") from None

    def put(self, path: str, body: dict[str, Any]) -> None:
        self.request("PUT", path, body)

    def patch(self, path: str, body: dict[str, Any]) -> None:
        self.request("PATCH", path, body)

    def ready(self) -> bool:
        """Whether the API answers yet (GET / describes the instance once the socket is up)."""
        if not self.socket.exists():
            return False
        try:
            return self._client.get("/").status_code == 200
        except httpx.TransportError:
            return False


def fault_message(content: bytes) -> str:
    """The error body's fault_message (or the raw body) on one bounded line."""
    text = content.decode(errors="replace")
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("fault_message"), str):
        text = data["fault_message"]
    return " ".join(text.split())[:MAX_DETAIL] or "no error message"

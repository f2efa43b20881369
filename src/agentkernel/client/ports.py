"""Ports of a sandbox reached from the SDK's side (`Sandbox.get_host`, `AsyncSandbox.get_host`)."""

from __future__ import annotations

from typing import Any


def port_body(port: int, bind: str | None, host_port: int | None) -> dict[str, Any]:
    """The body of POST /sandboxes/{name}/ports."""
    body: dict[str, Any] = {"port": port}
    if bind is not None:
        body["host"] = bind
    if host_port is not None:
        body["host_port"] = host_port
    return body


def host_address(answer: dict[str, Any]) -> str:
    """`host:port` from the API's answer (an IPv6 address in brackets)."""
    host, port = str(answer["host"]), int(answer["port"])
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

"""What the service reports as it works (a sandbox started, a command ended), for the process that
exports metrics: a server sets `sink` to `agentkernel.metrics` when it serves /metrics. Elsewhere (the
CLI) nothing is counted that no one could read, and prometheus-client is never imported."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, Protocol

StartMode = Literal["cold", "restore", "pool"]


class Sink(Protocol):
    def observe_start(self, mode: StartMode, seconds: float) -> None: ...

    def start_failed(self, mode: StartMode) -> None: ...

    def observe_operation(self, event: str, fields: Mapping[str, Any]) -> None: ...


sink: Sink | None = None


def started(mode: StartMode, seconds: float) -> None:
    if sink is not None:
        sink.observe_start(mode, seconds)


def start_failed(mode: StartMode) -> None:
    if sink is not None:
        sink.start_failed(mode)


def operation(event: str, fields: Mapping[str, Any]) -> None:
    if sink is not None:
        sink.observe_operation(event, fields)

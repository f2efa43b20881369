"""Prometheus metrics of `agentkernel serve`, scraped at /metrics (each metric is listed in docs/api.md).

Two kinds: counters and histograms this process moves as it works (`observe_start`, `start_failed`,
`observe_exec`), and gauges and counters computed when scraped from what other processes leave behind:
the state database (sandboxes by status, the VMMs' memory), the pool daemon's status and the audit
log, which the egress gateways (each a process of its own) append their decisions to.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import typing
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from agentkernel.errors import AgentkernelError
from agentkernel.pool import wire
from agentkernel.sandbox import state
from agentkernel.service import audit
from agentkernel.service.observers import StartMode

log = logging.getLogger("agentkernel.metrics")

"""How a sandbox came up: booted, restored from a snapshot, or taken ready from the pool daemon."""
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
START_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)
EXEC_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
POOL_TIMEOUT = 0.5
"""Seconds a scrape waits for the pool daemon's status; a daemon slower than that counts as down."""

REGISTRY = CollectorRegistry()

_starts = Histogram(
    "agentkernel_sandbox_start_seconds",
    "Seconds from asking for a running sandbox to having one, by how it came up.",
    ["mode"],
    buckets=START_BUCKETS,
    registry=REGISTRY,
)
_start_failures = Counter(
    "agentkernel_sandbox_start_failures",
    "Sandbox starts that failed, by how the sandbox was to come up.",
    ["mode"],
    registry=REGISTRY,
)
_execs = Counter(
    "agentkernel_execs",
    "Commands run in sandboxes, by outcome: ok (it ran and exited) or error (it could not be run).",
    ["outcome"],
    registry=REGISTRY,
)
_exec_seconds = Histogram(
    "agentkernel_exec_seconds",
    "Seconds from starting a command in a sandbox to its exit.",
    buckets=EXEC_BUCKETS,
    registry=REGISTRY,
)

for _mode in typing.get_args(StartMode):  # every series exists from the start, at 0
    _starts.labels(mode=_mode)
    _start_failures.labels(mode=_mode)
for _outcome in ("ok", "error"):
    _execs.labels(outcome=_outcome)


def observe_start(mode: StartMode, seconds: float) -> None:
    """A sandbox is running after `seconds`."""
    _starts.labels(mode=mode).observe(seconds)


def start_failed(mode: StartMode) -> None:
    _start_failures.labels(mode=mode).inc()


def observe_exec(seconds: float, ok: bool) -> None:
    """A command ended after `seconds`; `ok` is False when it could not be run at all (a non-zero exit
    is still ok: the command ran)."""
    _execs.labels(outcome="ok" if ok else "error").inc()
    if ok:
        _exec_seconds.observe(seconds)


def observe_operation(event: str, fields: Mapping[str, Any]) -> None:
    """A sandbox connection's observer (`protocol.client.Observer`): counts each command as it ends,
    whoever ran it (exec, run, attach, MCP)."""
    if event == "exec":
        duration = fields.get("duration_s")
        observe_exec(float(duration) if isinstance(duration, int | float) else 0.0, ok="error" not in fields)


def _status_gauges() -> Iterator[GaugeMetricFamily]:
    records = state.all_records()
    by_status = GaugeMetricFamily(
        "agentkernel_sandboxes",
        "Sandboxes by status (those the pool keeps ready not included).",
        labels=["status"],
    )
    counts = collections.Counter[str](r.status for r in records if not r.pool)
    for status in state.STATUSES:  # each one, 0 included, so a status that empties shows it
        by_status.add_metric([status], counts[status])
    yield by_status
    memory = GaugeMetricFamily(
        "agentkernel_vmm_memory_bytes",
        "Memory of each running sandbox's VMM process on the host: rss (resident) and pss (resident, "
        "shared pages divided among their users).",
        labels=["sandbox", "kind"],
    )
    for record in records:
        usage = vmm_memory(record.pid) if record.status in ("running", "paused") and record.pid else None
        if usage is not None:
            for kind, value in usage.items():
                memory.add_metric([record.name, kind], value)
    yield memory


def vmm_memory(pid: int) -> dict[str, int] | None:
    """RSS and PSS in bytes of process `pid` from /proc/PID/smaps_rollup; None if it has gone."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    found = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("Rss", "Pss"):
            found[key.lower()] = int(rest.split()[0]) * 1024
    return found or None


def pool_status() -> dict[str, Any]:
    """The pool daemon's status; AgentkernelError if it does not run or answer within POOL_TIMEOUT."""
    return wire.request({"op": "status"}, timeout=POOL_TIMEOUT)


def _pool_metrics() -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    up = GaugeMetricFamily("agentkernel_pool_up", "1 if the pool daemon runs and answers, else 0.")
    try:
        status = pool_status()
    except AgentkernelError:
        up.add_metric([], 0)
        yield up
        return
    up.add_metric([], 1)
    yield up
    labels = ["image", "profile", "backend"]
    ready = GaugeMetricFamily(
        "agentkernel_pool_ready", "Ready sandboxes the pool holds, by kind.", labels=labels
    )
    size = GaugeMetricFamily("agentkernel_pool_size", "Ready sandboxes the pool aims to hold.", labels=labels)
    handed = CounterMetricFamily(
        "agentkernel_pool_handouts", "Ready sandboxes handed out since the daemon started.", labels=labels
    )
    empty = CounterMetricFamily(
        "agentkernel_pool_empty_acquires", "Asks for a sandbox of a kind the pool had none of.", labels=labels
    )
    failing = GaugeMetricFamily(
        "agentkernel_pool_failing", "1 if the pool's last attempt to make a sandbox failed.", labels=labels
    )
    for pool in status.get("pools", []):
        kind = [str(pool.get("image")), str(pool.get("profile")), str(pool.get("backend"))]
        ready.add_metric(kind, len(pool.get("ready", [])))
        size.add_metric(kind, pool.get("size", 0))
        handed.add_metric(kind, pool.get("handed_out", 0))
        empty.add_metric(kind, pool.get("empty_acquires", 0))
        failing.add_metric(kind, 1 if pool.get("last_error") else 0)
    misses = CounterMetricFamily(
        "agentkernel_pool_misses", "Asks for a kind of sandbox the pool does not make at all."
    )
    misses.add_metric([], status.get("misses", 0))
    yield from (ready, size, handed, empty, failing, misses)


class EgressLog:
    """Egress decisions counted from the audit log, read on from where the last scrape stopped."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.offset = 0
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()

    def read(self, path: Path) -> dict[tuple[str, str], int]:
        with self.lock:
            try:
                with path.open("rb") as f:
                    if f.seek(0, 2) < self.offset:  # the log was replaced: count it afresh
                        self.offset, self.counts = 0, collections.Counter()
                    f.seek(self.offset)
                    data = f.read()
            except FileNotFoundError:
                return dict(self.counts)
            complete = data[: data.rfind(b"\n") + 1]  # a line being written is counted next time
            self.offset += len(complete)
            for line in complete.splitlines():
                self._count(line)
            return dict(self.counts)

    def _count(self, line: bytes) -> None:
        if b'"network"' not in line:
            return
        try:
            entry = json.loads(line)
        except ValueError:
            return
        if isinstance(entry, dict) and entry.get("event") == "network":
            decision = "allowed" if entry.get("allowed") else "refused"
            self.counts[decision, str(entry.get("reason") or "")] += 1


_egress = EgressLog()


def _egress_metrics() -> Iterator[CounterMetricFamily]:
    family = CounterMetricFamily(
        "agentkernel_egress_connections",
        "Connections sandboxes asked the egress gateway for, by decision (allowed, refused) and reason.",
        labels=["decision", "reason"],
    )
    for (decision, reason), count in sorted(_egress.read(audit.log_path()).items()):
        family.add_metric([decision, reason], count)
    yield family


class _ScrapeTime(Collector):
    """The metrics read when scraped; a source that fails is logged and left out, not the scrape."""

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        for source in (_status_gauges, _pool_metrics, _egress_metrics):
            try:
                yield from list(source())
            except (AgentkernelError, OSError) as exc:
                log.warning("metrics: %s left out: %s", source.__name__, exc)


REGISTRY.register(_ScrapeTime())


def exposition() -> bytes:
    """All metrics in the Prometheus text format (CONTENT_TYPE)."""
    return generate_latest(REGISTRY)

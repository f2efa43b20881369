"""/metrics on a real server: the Prometheus text parses, it needs the API key, and its numbers
move with real work in a real sandbox."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agentkernel import metrics
from agentkernel.client import Client
from agentkernel.pool import wire
from tests.api.server import api_server

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str, key: str | None = None) -> Samples:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    answer = httpx.get(f"{url}/metrics", headers=headers, timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(answer.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_need_the_key_and_parse(cli_home: Path, tmp_path: Path) -> None:
    with api_server(tmp_path, api_key="s3cret") as url:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            assert httpx.get(f"{url}/metrics", headers=headers).status_code == 401
        samples = scrape(url, "s3cret")
    names = {name for name, _ in samples}
    assert {"agentkernel_sandboxes", "agentkernel_pool_up", "agentkernel_execs_total"} <= names
    assert value(samples, "agentkernel_sandboxes", status="running") == 0
    assert value(samples, "agentkernel_pool_up") == 0  # no pool daemon in this data dir


@pytest.mark.vm
def test_counters_move_after_real_work(api: str) -> None:
    before = scrape(api)
    with Client(api) as ak, ak.create_sandbox("metered", image="base", profile="moderate") as box:
        # the link-local metadata address: the egress gateway refuses it, and says why in the audit log
        ask = "GET http://169.254.169.254/latest/meta-data/ HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n"
        fetch = box.exec(["sh", "-c", f"printf '{ask}' | nc -w 10 10.0.2.100 3128"])
        assert "403" in fetch.stdout.splitlines()[0], fetch
        during = scrape(api)
    after = scrape(api)

    assert value(before, "agentkernel_sandboxes", status="running") == 0
    assert value(during, "agentkernel_sandboxes", status="running") == 1
    assert value(after, "agentkernel_sandboxes", status="running") == 0
    assert value(during, "agentkernel_vmm_memory_bytes", sandbox="metered", kind="rss") > 16 << 20
    assert value(during, "agentkernel_vmm_memory_bytes", sandbox="metered", kind="pss") > 0
    refused = {
        labels: v for (name, labels), v in during.items() if name == "agentkernel_egress_connections_total"
    }
    assert any(dict(labels)["decision"] == "refused" and v >= 1 for labels, v in refused.items()), refused


@pytest.mark.vm
def test_start_and_exec_counters_move(api: str) -> None:
    before = scrape(api)
    with Client(api) as ak, ak.create_sandbox("counted", image="base") as box:
        assert box.exec(["true"]).exit_code == 0
    after = scrape(api)
    assert (
        value(after, "agentkernel_execs_total", outcome="ok")
        == value(before, "agentkernel_execs_total", outcome="ok") + 1
    )
    assert (
        value(after, "agentkernel_exec_seconds_count") == value(before, "agentkernel_exec_seconds_count") + 1
    )
    assert value(after, "agentkernel_sandbox_start_seconds_count", mode="cold") == (
        value(before, "agentkernel_sandbox_start_seconds_count", mode="cold") + 1
    )


def _network(allowed: bool, reason: str) -> bytes:
    entry = {"event": "network", "sandbox": "s", "allowed": allowed, "reason": reason}
    return (json.dumps(entry) + "\n").encode()


def test_egress_counts_read_the_audit_log_on_from_the_last_scrape(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    counter = metrics.EgressLog()
    assert counter.read(log) == {}  # no log yet
    log.write_bytes(_network(False, "private address") + b'{"event": "start"}\n' + _network(True, "allowed"))
    assert counter.read(log) == {("refused", "private address"): 1, ("allowed", "allowed"): 1}
    with log.open("ab") as f:  # a line still being written is counted once it is whole
        f.write(_network(False, "private address")[:20])
    assert counter.read(log) == {("refused", "private address"): 1, ("allowed", "allowed"): 1}
    with log.open("ab") as f:
        f.write(_network(False, "private address")[20:])
    assert counter.read(log)[("refused", "private address")] == 2
    log.write_bytes(_network(False, "blocked domain"))  # replaced by a shorter log: counted afresh
    assert counter.read(log) == {("refused", "blocked domain"): 1}


def test_pool_metrics_from_the_daemons_status(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pool gauges and counters as the daemon's status reports them (a stand-in daemon on the
    real socket path: a real one would boot a VM per ready sandbox)."""
    monkeypatch.setenv("AGENTKERNEL_HOME", str(tmp_path))
    pool = {"image": "base", "profile": "moderate", "backend": "qemu", "size": 2, "handed_out": 5}
    status = {"ok": True, "misses": 3, "pools": [{**pool, "ready": [{"name": "p1"}], "empty_acquires": 1}]}
    path = wire.socket_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with socket.socket(socket.AF_UNIX) as server, contextlib.ExitStack() as cleanup:
        server.bind(str(path))
        cleanup.callback(path.unlink)
        server.listen()

        def answer() -> None:
            conn, _ = server.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(json.dumps(status).encode() + b"\n")

        daemon = threading.Thread(target=answer)
        daemon.start()
        text = metrics.exposition().decode()
        daemon.join(5)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    kind = {"image": "base", "profile": "moderate", "backend": "qemu"}
    assert value(samples, "agentkernel_pool_up") == 1
    assert value(samples, "agentkernel_pool_ready", **kind) == 1
    assert value(samples, "agentkernel_pool_size", **kind) == 2
    assert value(samples, "agentkernel_pool_handouts_total", **kind) == 5
    assert value(samples, "agentkernel_pool_empty_acquires_total", **kind) == 1
    assert value(samples, "agentkernel_pool_failing", **kind) == 0
    assert value(samples, "agentkernel_pool_misses_total") == 3


def test_a_connections_exec_events_count_commands() -> None:
    def counts() -> tuple[float, float, float]:
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(metrics.exposition().decode())
            for s in family.samples
        }
        return (
            value(samples, "agentkernel_execs_total", outcome="ok"),
            value(samples, "agentkernel_execs_total", outcome="error"),
            value(samples, "agentkernel_exec_seconds_sum"),
        )

    ok, error, seconds = counts()
    metrics.observe_operation("exec", {"argv": ["true"], "exit_code": 1, "duration_s": 0.25})
    metrics.observe_operation("exec", {"argv": ["nope"], "error": "no such file"})
    metrics.observe_operation("file_read", {"path": "/etc/hosts", "size": 10})
    assert counts() == (ok + 1, error + 1, seconds + 0.25)

"""`agentkernel bench` prints figures (it asserts nothing about speed) and leaves nothing behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import cli

pytestmark = pytest.mark.vm


def test_bench_reports_every_figure(cli_home: Path) -> None:
    result = cli("bench", "--runs", "1", "--json")
    assert result.returncode == 0, result.stderr.decode()
    figures = json.loads(result.stdout)
    for key in ("bare_qemu_boot_to_agent_s", "run_to_command_start_s", "exec_round_trip_true_s", "stop_s",
                "first_exec_in_new_vm_s", "cli_start_s"):  # fmt: skip
        assert figures[key] > 0, key
    snap = figures["snapshots"]
    assert snap["forks"] == 10
    assert snap["restore_to_ready_s"] > 0 and 0 < snap["restored_pss_bytes_mean"] < snap["cold_pss_bytes"] * 4
    assert json.loads(cli("list", "--json").stdout) == []
    assert json.loads(cli("snapshot", "list", "--json").stdout) == []
    pool = figures["pool"]
    for key in ("pool_run_true_s", "cold_run_true_s", "cli_pool_run_true_s", "cli_cold_run_true_s"):
        assert pool[key] > 0, key
    assert cli("daemon", "status").returncode == 1  # the daemon it started is gone


@pytest.mark.parametrize(("mode", "count"), [("snapshot", 12), ("pool", 4), ("cold", 2)])
def test_stress_checks_every_sandbox_and_leaves_nothing(cli_home: Path, mode: str, count: int) -> None:
    result = cli("bench", "stress", "--count", str(count), "--concurrency", "3", "--mode", mode, "--json")
    assert result.returncode == 0, result.stderr.decode()
    figures = json.loads(result.stdout)
    assert (figures["count"], figures["succeeded"], figures["failed"]) == (count, count, 0)
    assert figures["leaks"] == {
        "processes": 0, "open_files": 0, "sockets": 0, "disk_files": 0, "network_devices": 0
    }  # fmt: skip
    for stage in ("start", "exec", "remove"):
        p = figures["stages"][stage]
        assert 0 < p["p50"] <= p["p95"] <= p["p99"], stage
    assert figures["peak_host_rss_bytes"] > 0 and figures["total_s"] > 0
    assert json.loads(cli("list", "--all", "--json").stdout) == []
    assert json.loads(cli("snapshot", "list", "--json").stdout) == []
    assert list((cli_home / "locks").iterdir()) == []


def test_stress_reports_bad_input_in_one_line(cli_home: Path) -> None:
    result = cli("bench", "stress", "--count", "2", "--mode", "warm")
    assert result.returncode != 0
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "unknown stress mode" in lines[0], lines

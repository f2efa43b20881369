"""`agentkernel bench` prints figures (it asserts nothing about speed) and leaves nothing behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import cli

pytestmark = pytest.mark.vm


def test_bench_reports_every_figure(cli_home: Path) -> None:
    # Started in a Python project (where `run` would choose `python`): it measures in a directory
    # of its own with the image named, so its pool and `run` agree.
    Path("pyproject.toml").write_text("[project]\nname = 'x'\n")
    result = cli("bench", "--runs", "1", "--count", "3", "--idle-seconds", "2", "--json")
    assert result.returncode == 0, result.stderr.decode()
    figures = json.loads(result.stdout)
    print(json.dumps(figures["table"], indent=1))
    table = figures["table"]
    rows = (
        "run_over_bare_boot",
        "pool_over_cold_cli",
        "cli_start_over_python",
        "cli_cost_over_python",
        "restored_pss_mib",
        "pool_fill_s",
        "idle_cpu_percent",
        "stress_s",
        "stress_network_s",
    )
    assert set(rows) <= set(table), set(table)
    for name, row in table.items():
        assert row["target"] > 0 and "holds" in row, name
        assert row["holds"] is None or row["holds"] == (row["value"] <= row["target"]), name
    assert table["run_over_bare_boot"]["holds"] is not None  # measured in full in this run
    for name in ("pool_fill_s", "restored_pss_mib", "idle_cpu_percent", "stress_s"):
        assert table[name]["count"] == 3 and table[name]["holds"] is None, name  # fewer than 100
    assert table["cli_cost_over_python"]["value"] > 0
    costs = table["cli_cost_over_python"]
    assert costs["each"].keys() == costs["without_daemon"].keys() == {"ls", "exec", "stop", "rm", "cp"}
    fill = figures["fill"]
    assert fill["fill_s"] > 0 and 1 <= fill["peak_making"] <= fill["parallel"]
    for key in ("stress", "stress_network"):
        assert (figures[key]["succeeded"], figures[key]["count"]) == (3, 3), figures[key]
        assert not any(figures[key]["leaks"].values()), figures[key]["leaks"]
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

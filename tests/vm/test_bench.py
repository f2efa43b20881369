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
    for key in ("bare_qemu_boot_to_agent_s", "run_to_command_start_s", "exec_round_trip_true_s", "stop_s"):
        assert figures[key] > 0, key
    snap = figures["snapshots"]
    assert snap["forks"] == 10
    assert snap["restore_to_ready_s"] > 0 and 0 < snap["restored_pss_bytes_mean"] < snap["cold_pss_bytes"] * 4
    assert json.loads(cli("list", "--json").stdout) == []
    assert json.loads(cli("snapshot", "list", "--json").stdout) == []

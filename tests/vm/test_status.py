"""`agentkernel status --json` on this machine, after `agentkernel setup` (which install.sh runs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agentkernel import hostinfo
from tests.conftest import cli

pytestmark = pytest.mark.vm


def test_status_json_reports_accel_kernel_and_images() -> None:
    result = cli("status", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    acc = hostinfo.accel()
    assert info["accel"] == acc.name
    assert info["kvm_note"] == acc.note
    if Path("/dev/kvm").exists() and acc.name == "tcg" and "PVM" in acc.note:
        assert "vmx/svm" in info["kvm_note"]
    assert info["backends"]["qemu"] == {"available": True, "reason": info["backends"]["qemu"]["reason"]}
    assert Path(info["kernel"]).is_file()
    images = {img["name"]: img for img in info["images"]}
    assert {"base", "python", "node"} <= images.keys()
    for img in images.values():
        assert Path(img["path"]).is_file() and img["size_bytes"] > 0


def test_status_human_form() -> None:
    result = cli("status")
    assert result.returncode == 0
    text = result.stdout.decode()
    assert "acceleration:" in text and "backend qemu:" in text and "kernel:" in text

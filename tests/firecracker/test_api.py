"""The API client against a real HTTP server on a Unix socket: the fake firecracker (fake_firecracker.py),
which stands in for Firecracker because no firecracker binary and no hardware KVM exist here. It
answers with the spec's status codes and error bodies, and refuses what the spec refuses."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentkernel.backends.firecracker import backend as fc
from agentkernel.backends.firecracker.api import FirecrackerAPI, fault_message
from agentkernel.errors import AgentkernelError, FirecrackerAPIError
from tests.conftest import REPO
from tests.firecracker.conftest import Fake, MakeSpec


@pytest.fixture
def api(fake: Fake, make_spec: MakeSpec, monkeypatch: pytest.MonkeyPatch) -> Iterator[FirecrackerAPI]:
    monkeypatch.setenv("FAKE_FC_FAIL", "/mmds/config")
    sock = make_spec().rundir / "api.sock"
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.firecracker.fake_firecracker",
            "--id",
            "apitest",
            "--api-sock",
            str(sock),
        ],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        cwd=sock.parent,  # as the backend runs firecracker: in the run directory
    )
    client = FirecrackerAPI(sock)
    try:
        deadline = time.monotonic() + 30
        while not client.ready():
            assert server.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        yield client
    finally:
        client.close()
        server.kill()
        server.wait()


def test_configure_and_start(api: FirecrackerAPI, fake: Fake, make_spec: MakeSpec) -> None:
    vm = make_spec()
    vm.workdir.mkdir(parents=True)
    (api.socket.parent / fc.DRIVE_PATH).write_bytes(b"disk")  # the drive's path is relative
    assert api.request("GET", "/")["state"] == "Not started"
    for path, body in fc.config_requests(vm, fc.host_layout(vm)):
        api.put(path, body)
    api.put("/actions", fc.action_body("InstanceStart"))
    assert api.request("GET", "/")["state"] == "Running"
    assert [(m, p) for m, p, _ in fake.api_calls() if m == "PUT"][-2:] == [
        ("PUT", "/entropy"),
        ("PUT", "/actions"),
    ]
    assert "Running Firecracker" in fc.log_file(vm).read_text()
    with pytest.raises(FirecrackerAPIError, match="not supported after starting the microVM"):
        api.put("/machine-config", fc.machine_config_body(vm))


@pytest.mark.parametrize(
    ("path", "body", "fault"),
    [
        ("/machine-config", {"vcpu_count": 64, "mem_size_mib": 128}, "vcpu_count: 64 is greater than"),
        ("/no-such-thing", {}, "Invalid request method and/or path: PUT /no-such-thing."),
        (
            "/drives/rootfs",
            {"drive_id": "rootfs", "is_root_device": True, "path_on_host": "/nope", "is_read_only": True},
            "Unable to open the block device /nope",
        ),
        ("/mmds/config", {"network_interfaces": ["eth0"]}, "Fake failure requested for /mmds/config: second"),
        ("/actions", {"action_type": "InstanceStart"}, "Cannot start microvm without kernel configuration."),
    ],
)
def test_error_answers_become_one_line(
    api: FirecrackerAPI, path: str, body: dict[str, object], fault: str
) -> None:
    with pytest.raises(FirecrackerAPIError) as info:
        api.put(path, body)
    message = str(info.value)
    assert message.startswith(f"firecracker refused PUT {path} (HTTP 400): ")
    assert fault in message
    assert "\n" not in message and info.value.http_status == 400


def test_no_server_is_one_line_naming_the_request(tmp_path: Path) -> None:
    with FirecrackerAPI(tmp_path / "absent.sock") as api, pytest.raises(AgentkernelError) as info:
        api.put("/actions", fc.action_body("SendCtrlAltDel"))
    assert str(info.value).startswith(
        f"firecracker API PUT /actions: no answer on {tmp_path / 'absent.sock'}: "
    )
    assert "\n" not in str(info.value)
    assert not FirecrackerAPI(tmp_path / "absent.sock").ready()


def test_fault_message() -> None:
    assert fault_message(b'{"fault_message": "bad\\n  input"}') == "bad input"
    assert fault_message(b"<html>\nnot json</html>") == "<html> not json</html>"
    assert fault_message(b"") == "no error message"
    assert len(fault_message(b'{"fault_message": "' + b"x" * 5000 + b'"}')) == 500

"""The real CLI in subprocesses, driving real sandboxes: life cycle, I/O, exit codes, files, failures."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import cli

pytestmark = pytest.mark.vm


def ok(*args: str, input: bytes | None = None) -> bytes:
    result = cli(*args, input=input)
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout


def sandbox_list() -> dict[str, dict[str, object]]:
    return {s["name"]: s for s in json.loads(ok("list", "--json"))}


def qemu_pids_for(rundir: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if rundir.encode() in (proc / "cmdline").read_bytes():
                    pids.append(int(proc.name))
            except OSError:
                pass
    return pids


@pytest.fixture
def running(cli_home: Path) -> str:
    ok("create", "box")
    ok("start", "box")
    return "box"


def test_lifecycle_across_processes(cli_home: Path) -> None:
    ok("create", "life")
    listed = sandbox_list()["life"]
    assert listed["status"] == "stopped"
    assert {"name", "status", "backend", "image", "created_at"} <= listed.keys()
    ok("start", "life")
    assert sandbox_list()["life"]["status"] == "running"
    ok("exec", "life", "--", "sh", "-c", "echo kept > /root/file; sync")
    ok("stop", "life")
    assert sandbox_list()["life"]["status"] == "stopped"
    ok("start", "life")
    assert ok("exec", "life", "--", "cat", "/root/file") == b"kept\n"
    rundir = json.loads(ok("list", "--json"))[0]
    workdir = cli_home / "sandboxes" / "life"
    assert workdir.is_dir()
    ok("rm", "-f", "life")
    assert "life" not in sandbox_list()
    assert not workdir.exists()
    assert rundir  # the record had a run dir; nothing may be left of the sandbox below
    assert not list((cli_home / "sandboxes").iterdir())


def test_exit_codes_and_streams(running: str) -> None:
    result = cli("exec", running, "--", "sh", "-c", "echo out; echo err >&2; exit 3")
    assert (result.returncode, result.stdout, result.stderr) == (3, b"out\n", b"err\n")
    assert cli("exec", running, "--", "sh", "-c", "kill -9 $$").returncode == 137
    assert cli("exec", running, "--", "true").returncode == 0
    missing = cli("exec", running, "--", "/no/such")
    assert missing.returncode == 127
    assert b"exec: /no/such: no such file" in missing.stderr and b"Traceback" not in missing.stderr
    unknown = cli("exec", running, "--", "python4")
    assert (unknown.returncode, unknown.stderr.strip()) == (
        127,
        b"agentkernel: error: exec: python4: command not found",
    )


def test_env_workdir_and_timeout(running: str) -> None:
    out = ok(
        "exec", "-e", "GREETING=hi there", "-w", "/tmp", running, "--", "sh", "-c", 'echo "$GREETING" $PWD'
    )
    assert out == b"hi there /tmp\n"
    start = time.monotonic()
    slow = cli("exec", "--timeout", "1", running, "--", "sleep", "30")
    assert slow.returncode == 124
    assert b"timed out" in slow.stderr
    assert time.monotonic() - start < 20


def test_stdin_and_ten_megabytes(running: str) -> None:
    data = os.urandom(2 << 20)
    assert ok("exec", "-i", running, "--", "cat", input=data) == data
    big = ok("exec", running, "--", "sh", "-c", "yes 0123456789abcdef | head -c 10485760")
    assert big == b"0123456789abcdef\n" * (10485760 // 17) + b"0123456789abcdef\n"[: 10485760 % 17]


def test_binary_cp_round_trip(running: str, tmp_path: Path) -> None:
    src = tmp_path / "blob.bin"
    src.write_bytes(os.urandom(3 << 20) + bytes(range(256)))
    ok("cp", str(src), f"{running}:/tmp/blob.bin")
    assert (
        ok("exec", running, "--", "sh", "-c", "wc -c < /tmp/blob.bin").strip()
        == str(src.stat().st_size).encode()
    )
    back = tmp_path / "back.bin"
    ok("cp", f"{running}:/tmp/blob.bin", str(back))
    assert back.read_bytes() == src.read_bytes()
    missing = cli("cp", f"{running}:/nope", str(tmp_path / "x"))
    assert missing.returncode != 0 and not (tmp_path / "x").exists()


def test_concurrent_execs(running: str) -> None:
    def one(i: int) -> subprocess.CompletedProcess[bytes]:
        return cli("exec", running, "--", "sh", "-c", f"sleep 1; echo job{i}")

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(one, range(6)))
    assert [(r.returncode, r.stdout) for r in results] == [(0, f"job{i}\n".encode()) for i in range(6)]


def test_reconcile_after_vmm_killed(running: str, cli_home: Path) -> None:
    pid = sandbox_list()[running]["pid"]
    assert isinstance(pid, int)
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.2)
    assert sandbox_list()[running]["status"] == "failed"
    failed = cli("exec", running, "--", "true")
    assert failed.returncode != 0 and b"not running" in failed.stderr
    ok("rm", running)
    assert running not in sandbox_list()


def test_remove_leaves_nothing(cli_home: Path) -> None:
    ok("create", "gone")
    ok("start", "gone")
    records = json.loads(ok("list", "--json"))
    pid = records[0]["pid"]
    run_dirs = [d for d in Path(f"/tmp/agentkernel-{os.getuid()}").iterdir() if pid in qemu_pids_for(str(d))]
    assert len(run_dirs) == 1
    ok("rm", "-f", "gone")
    assert not run_dirs[0].exists()
    assert qemu_pids_for(str(run_dirs[0])) == []
    assert not (cli_home / "sandboxes" / "gone").exists()


def test_run_is_ephemeral(cli_home: Path) -> None:
    result = cli("run", "--", "sh", "-c", "echo hello; exit 4")
    assert (result.returncode, result.stdout) == (4, b"hello\n")
    assert sandbox_list() == {}
    kept = cli("run", "--keep", "--name", "keeper", "--", "true")
    assert kept.returncode == 0
    assert sandbox_list()["keeper"]["status"] == "running"


def test_logs(running: str) -> None:
    assert b"agentkernel-agent" in ok("logs", running)


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("create", ""), "invalid sandbox name"),
        (("create", "../x"), "invalid sandbox name"),
        (("create", "x" * 64), "invalid sandbox name"),
        (("create", "a;rm -rf /"), "invalid sandbox name"),
        (("create", "ok-name", "--image", "no-such-image"), "no image named no-such-image"),
        (("create", "ok-name", "--memory", "1"), "--memory: must be between"),
        (("start", "unknown"), "no sandbox named 'unknown'"),
        (("exec", "unknown", "--", "true"), "no sandbox named 'unknown'"),
        (("rm", "unknown"), "no sandbox named 'unknown'"),
        (("cp", "unknown:/etc/passwd", "/tmp/x"), "no sandbox named 'unknown'"),
        (("run", "--image", "no-such-image", "--", "true"), "no image named no-such-image"),
        (("run", "--memory", "1", "--", "true"), "--memory: must be between"),
        (("run", "--name", "bad/name", "--", "true"), "invalid sandbox name"),
        (("run", "--vcpus", "0", "--", "true"), "--vcpus: must be between 1 and 32 (got 0)"),
        (("run", "--timeout", "nan", "--", "true"), "--timeout: must be more than 0"),
        (("run", "--timeout", "-1", "--", "true"), "--timeout: must be more than 0"),
        (("exec", "--timeout", "inf", "unknown", "--", "true"), "--timeout: must be more than 0"),
        (("cp", "unknown:/", "."), "names no file"),
    ],
)
def test_bad_input_is_one_line(cli_home: Path, args: tuple[str, ...], says: str) -> None:
    result = cli(*args)
    assert result.returncode != 0
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("agentkernel: error:") and says in lines[0], lines[0]
    assert sandbox_list() == {}
    assert not (cli_home / "sandboxes").exists() or not list((cli_home / "sandboxes").iterdir())
    assert not (cli_home / "locks").exists() or not list((cli_home / "locks").iterdir())


def test_exec_on_stopped_sandbox(cli_home: Path) -> None:
    ok("create", "idle")
    result = cli("exec", "idle", "--", "true")
    assert result.returncode != 0
    assert result.stderr.decode().strip() == (
        "agentkernel: error: sandbox 'idle' is not running (status: stopped): start it first"
    )


def test_bad_config_names_file_key_and_reason(cli_home: Path) -> None:
    Path("agentkernel.toml").write_text("[resources]\nmemory_mb = 1\n")
    result = cli("run", "--", "true")
    assert result.returncode != 0
    assert result.stderr.decode().strip() == (
        "agentkernel: error: agentkernel.toml: resources.memory_mb: must be at least 64 (got 1)"
    )


def test_signals_reach_the_guest_process(running: str) -> None:
    # The signal goes to the command's process group: "ready" comes only after the background child
    # has exec'd sleep, or a child caught between fork and exec would run the trap too.
    proc = subprocess.Popen(
        [sys.executable, "-m", "agentkernel", "exec", running, "--", "sh", "-c",
         'trap "echo got INT; exit 9" INT; sleep 30 & sleep 0.3; echo ready; wait'],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"ready\n"
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=30)
    assert (proc.returncode, out) == (9, b"got INT\n")


def test_a_second_signal_stops_waiting_for_a_command_that_ignores_the_first(running: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "agentkernel", "exec", running, "--", "sh", "-c",
         'trap "" TERM; echo ready; sleep 60'],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"ready\n"
    proc.send_signal(signal.SIGTERM)  # forwarded, and ignored by the guest's shell
    time.sleep(0.5)
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM
    assert err.decode().strip() == (
        "agentkernel: error: stopped waiting for the command after a second SIGTERM; "
        "it may still run in the sandbox"
    )


def test_image_removed_under_a_sandbox_stays_until_the_sandbox_goes(cli_home: Path, tmp_path: Path) -> None:
    # This test needs an image store of its own, not the shared one.
    (cli_home / "images").unlink()
    tree = tmp_path / "tree"
    (tree / "bin").mkdir(parents=True)
    shutil.copy("/bin/busybox", tree / "bin" / "busybox")
    (tree / "bin" / "sh").symlink_to("busybox")
    ok("image", "build", "--from", str(tree), "mine")
    blobs = [p for p in (cli_home / "images").iterdir() if len(p.name) == 64]
    assert len(blobs) == 1
    ok("create", "--image", "mine", "holder")
    ok("image", "rm", "mine")
    assert "mine" not in ok("image", "list").decode()
    ok("start", "holder")  # its image's file is still there
    assert ok("exec", "holder", "--", "sh", "-c", "echo alive") == b"alive\n"
    ok("rm", "-f", "holder")
    assert not blobs[0].exists()

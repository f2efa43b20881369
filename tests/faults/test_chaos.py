"""Chaos: agentkernel processes SIGKILLed at random moments of random operations.

A seeded random loop (the seed is printed; AGENTKERNEL_CHAOS_SEED replays one) picks an operation
(`run`, `create`, `start`, `rm -f`, `serve` with a `POST /run` in flight, the pool daemon), spawns
it, waits a random moment and SIGKILLs it. After every kill these must hold:

- no VMM without a record (every QEMU process of this data dir belongs to a record's run directory),
  and no process at all in a run directory no record has;
- no record `running` without its VMM, and no record `starting` once its starter is dead;
- no sandbox with an owner (ephemeral) whose owner is dead, once the reaper has run (`list` runs it);
- `rm -f` of every sandbox leaves nothing: no process, no run directory, no disk directory.

The data dir and the run directories are this test's own (AGENTKERNEL_HOME, XDG_RUNTIME_DIR), so
whatever is found there is this test's doing.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agentkernel import paths
from agentkernel.backends import get_backend
from agentkernel.backends.base import tagged
from agentkernel.sandbox import state
from agentkernel.service import owners, sandboxes
from tests.conftest import cli

pytestmark = pytest.mark.vm

MAX_KILLS = 25
MAX_SECONDS = 330.0  # the loop's bound; with the final checks the test stays well under 8 minutes
TIMEOUT = 120.0
KILL_WINDOW = 1.5  # seconds after spawning (after the request, for `serve`) within which the kill comes
DAEMON_WINDOW = 6.0  # the pool daemon's work (a template, then forks) takes longer: a wider window
QEMU = ("--backend", "qemu")


@pytest.fixture
def runtime(cli_home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Run directories of this test's own, on a short path (Unix socket paths are limited)."""
    base = Path(tempfile.mkdtemp(prefix="akc-", dir="/tmp"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(base))
    yield paths.runtime_dir()
    cli("daemon", "stop", timeout=TIMEOUT)
    subprocess.run(["rm", "-rf", str(base)], check=False)


def ok(*args: str) -> str:
    result = cli(*args, timeout=TIMEOUT)
    assert result.returncode == 0, f"{' '.join(args)}: {result.stderr.decode()}"
    return result.stdout.decode()


def spawn(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "agentkernel", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )


def vmm_rundirs(home: Path) -> dict[int, str]:
    """QEMU processes running a sandbox disk of data dir `home`: pid -> run dir (from -pidfile)."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0") if proc.name.isdigit() else []
        except OSError:
            continue
        if args and b"qemu-system" in args[0] and any(str(home).encode() in a for a in args):
            found[int(proc.name)] = os.fsdecode(Path(os.fsdecode(args[args.index(b"-pidfile") + 1])).parent)
    return found


def network(rng: random.Random) -> tuple[str, ...]:
    """With or without the egress gateway (and the forwarders QEMU spawns for it)."""
    return () if rng.random() < 0.5 else ("--no-network",)


class Chaos:
    def __init__(self, home: Path, runtime: Path, rng: random.Random) -> None:
        self.home, self.runtime, self.rng = home, runtime, rng
        self.count = 0

    def name(self) -> str:
        self.count += 1
        return f"chaos-{self.count}"

    # Each operation returns whether its victim was still running when it was killed.

    def op_run(self) -> bool:
        return self.kill(spawn("run", *QEMU, *network(self.rng), "--no-pool", "--", "sleep", "20"))

    def op_create(self) -> bool:
        return self.kill(spawn("create", *QEMU, *network(self.rng), self.name()))

    def op_start(self) -> bool:
        name = self.name()
        ok("create", *QEMU, *network(self.rng), name)
        return self.kill(spawn("start", name))

    def op_rm(self) -> bool:
        name = self.name()
        ok("create", *QEMU, *network(self.rng), name)
        ok("start", name)
        return self.kill(spawn("rm", "-f", name))

    def op_serve(self) -> bool:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if k != "AGENTKERNEL_API_KEY"}
        server = spawn("serve", "--port", str(port), env=env)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=5).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "the API server did not start"
                time.sleep(0.1)
        body = json.dumps({"command": ["sleep", "20"]}).encode()
        request = urllib.request.Request(f"{base}/run", body, {"Content-Type": "application/json"})

        def post() -> None:
            with contextlib.suppress(OSError):  # the server is killed under it
                urllib.request.urlopen(request, timeout=TIMEOUT).close()

        threading.Thread(target=post, daemon=True).start()
        return self.kill(server)

    def op_daemon(self) -> bool:
        pool = ("daemon", "start", *QEMU, "--no-network", "--size", "1")
        ok(*pool)
        pid = int(Path(self.home / "daemon.pid").read_text())
        time.sleep(self.rng.uniform(0, DAEMON_WINDOW))
        alive = owners.start_time(pid) is not None
        os.kill(pid, signal.SIGKILL)
        # A new daemon removes what the dead one was making; stopped, it removes what it made.
        ok(*pool)
        ok("daemon", "stop")
        return alive

    def kill(self, victim: subprocess.Popen[bytes]) -> bool:
        time.sleep(self.rng.uniform(0, KILL_WINDOW))
        alive = victim.poll() is None
        victim.kill()
        victim.wait()
        return alive

    # -- the invariants ----------------------------------------------------------------------

    def broken(self) -> list[str]:
        found = []
        records = sandboxes.list_sandboxes(pooled=True)  # the reaper and reconcile run, as in `list`
        rundirs = {r.rundir for r in records}
        for pid, rundir in vmm_rundirs(self.home).items():
            if rundir not in rundirs:
                found.append(f"VMM pid {pid} ({rundir}) has no record")
        for entry in self.runtime.iterdir():
            if str(entry) not in rundirs and (pids := tagged(str(entry))):
                found.append(f"processes {pids} run in {entry}, which no record has")
        for r in records:
            spec = sandboxes.spec_of(r)
            if r.status == "running" and (r.pid is None or not get_backend(r.backend).is_alive(spec, r.pid)):
                found.append(f"sandbox {r.name} is running without its VMM (pid {r.pid})")
            if r.status == "starting":
                found.append(f"sandbox {r.name} is starting, but nothing starts it")
            if not r.pool and owners.dead_owner(r.owner) is not None:
                found.append(f"sandbox {r.name} outlived its owner {r.owner}")
        return found

    def remove_all(self) -> list[str]:
        """`rm -f` every sandbox; what any of them left."""
        found = []
        for r in state.all_records():
            result = cli("rm", "-f", r.name, timeout=TIMEOUT)
            if result.returncode != 0:
                found.append(f"rm -f {r.name} failed: {result.stderr.decode().strip()}")
            workdir = self.home / "sandboxes" / r.name
            if pids := tagged(r.rundir):
                found.append(f"rm -f {r.name} left processes {pids}")
            found += [f"rm -f {r.name} left {p}" for p in (Path(r.rundir), workdir) if p.exists()]
        if pids := list(vmm_rundirs(self.home)):
            found.append(f"VMMs {pids} run with no sandbox left (killed by the test)")
            for pid in pids:  # so that every later check starts clean, and none is leaked
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        return found


def test_chaos(cli_home: Path, runtime: Path) -> None:
    seed = int(os.environ.get("AGENTKERNEL_CHAOS_SEED") or time.time_ns() % 2**32)
    print(f"chaos seed: {seed} (AGENTKERNEL_CHAOS_SEED={seed} replays it)", flush=True)
    rng = random.Random(seed)
    chaos = Chaos(cli_home, runtime, rng)
    ops: dict[str, Callable[[], bool]] = {
        "run": chaos.op_run,
        "create": chaos.op_create,
        "start": chaos.op_start,
        "rm": chaos.op_rm,
        "serve": chaos.op_serve,
        "daemon": chaos.op_daemon,
    }
    kills, done, broken = 0, 0, []
    began = time.monotonic()
    while kills < MAX_KILLS and time.monotonic() - began < MAX_SECONDS:
        op = rng.choice(list(ops))
        killed = ops[op]()
        kills += killed
        done += not killed
        found = chaos.broken()
        found += chaos.remove_all()
        broken += [f"after killing {op} (kill {kills}): {line}" for line in found]
        print(f"{op}: {'killed' if killed else 'had finished'}; {len(found)} broken", flush=True)
    print(f"chaos seed {seed}: {kills} kills survived, {done} operations finished first, "
          f"{len(broken)} invariants broken", flush=True)  # fmt: skip
    for line in broken:
        print(line, flush=True)
    assert kills >= 5, f"only {kills} kills in {MAX_SECONDS:g}s: the machine is too slow to mean much"
    assert not broken, f"seed {seed}: " + "; ".join(broken)

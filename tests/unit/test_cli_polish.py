"""The CLI's surface, through the real CLI in subprocesses: option placeholders that read as words,
shell completion, and the stages an image build shows."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import typer

from agentkernel.cli.app import app
from agentkernel.images.progress import BuildProgress, stage_on_log_line
from tests.conftest import cli

TYPE_PLACEHOLDER = re.compile(r"<(str|int|float|path|text|int range|float range)>|\b(TEXT|INTEGER|FLOAT)\b")


def command_paths() -> list[list[str]]:
    """Every visible command and group, as the words that name it."""
    found: list[list[str]] = []

    def walk(command: object, path: list[str]) -> None:
        found.append(path)
        for name, sub in getattr(command, "commands", {}).items():
            if not sub.hidden:
                walk(sub, [*path, name])

    walk(typer.main.get_command(app), [])
    return found


HELP_OF_EACH = """
import json, sys
from agentkernel.cli.app import app
for path in json.loads(sys.argv[1]):
    print("=== " + " ".join(path), flush=True)
    app([*path, "--help"], standalone_mode=False, prog_name="agentkernel")
"""


def test_every_option_shows_a_word_for_its_value() -> None:
    paths = command_paths()
    assert len(paths) > 40 and ["daemon", "start"] in paths
    # One process prints the help of every command (one each would take minutes on a busy machine).
    result = subprocess.run(
        [sys.executable, "-c", HELP_OF_EACH, json.dumps(paths)],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200", "TERM": "dumb"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    rows: dict[str, list[str]] = {}
    for block in result.stdout.split("=== ")[1:]:
        name, _, text = block.partition("\n")
        assert "Usage: agentkernel" in text, name
        rows[name] = [line for line in text.splitlines() if re.match(r"│ +-", line)]
    assert len(rows) == len(paths)
    bad = [f"{name}: {row}" for name, lines in rows.items() for row in lines if TYPE_PLACEHOLDER.search(row)]
    assert not bad, "\n".join(bad)
    assert re.search(r"--memory +MB ", "\n".join(rows["run"]))
    assert re.search(r"--timeout +SECONDS ", "\n".join(rows["exec"]))
    assert re.search(r"--image +IMAGE\[=N\] ", "\n".join(rows["daemon start"]))


def test_bash_completion_is_offered_and_completes() -> None:
    assert "--show-completion" in cli("--help", env={"COLUMNS": "200"}).stdout.decode()
    # The shell is detected from the parent process, as it is when a user runs it.
    script = subprocess.run(
        ["bash", "-c", f"{sys.executable} -m agentkernel --show-completion"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert script.returncode == 0, script.stderr
    assert "complete -o default -F _agentkernel_completion agentkernel" in script.stdout
    assert "_AGENTKERNEL_COMPLETE=complete_bash" in script.stdout

    completion = {"_AGENTKERNEL_COMPLETE": "complete_bash", "COMP_CWORD": "2"}
    words = cli(env={**completion, "COMP_WORDS": "agentkernel image bu"}).stdout.decode().split()
    assert words == ["build"]
    words = cli(env={**completion, "COMP_WORDS": "agentkernel run --mem"}).stdout.decode().split()
    assert words == ["--memory"]


@pytest.fixture
def build_home(tmp_path: Path) -> dict[str, str]:
    """A data dir of its own with a stand-in agent where `image build` looks for the built one."""
    if not shutil.which("busybox") or not shutil.which("mkfs.ext4"):
        pytest.skip("busybox-static and e2fsprogs are needed to build the base image")
    home = tmp_path / "home"
    entry = home / "cache" / "agent" / "test"
    entry.mkdir(parents=True)
    shutil.copyfile("/bin/busybox", entry / "agentkernel-agent")
    (entry / "agentkernel-agent").chmod(0o755)
    (home / "cache" / "agent" / "current").write_text("test")
    return {"AGENTKERNEL_HOME": str(home)}


def test_image_build_shows_numbered_stages_on_stderr(build_home: dict[str, str], tmp_path: Path) -> None:
    built = cli("image", "build", "base", env=build_home)
    assert built.returncode == 0, built.stderr.decode()
    err = built.stderr.decode()
    for stage in ("1/3 busybox tree", "2/3 ext4 image", "3/3 store"):
        assert f"building base: {stage} ...\n" in err  # not a terminal: a line as each one starts
        assert re.search(rf"done building base: {stage} \(\d+\.\d+s\)\n", err), err
    assert re.search(r"done building image base \(\d+\.\d+s\)\n$", err), err
    assert re.fullmatch(r"base [0-9a-f]{64}\n", built.stdout.decode())  # stdout: only the result

    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "motd").write_text("hi\n")
    built = cli("image", "build", "--from", str(tree), "mine", env=build_home)
    assert built.returncode == 0, built.stderr.decode()
    assert [line for line in built.stderr.decode().splitlines() if line.endswith(" ...")] == [
        f"building mine: 1/3 copy {tree} ...",
        "building mine: 2/3 ext4 image ...",
        "building mine: 3/3 store ...",
    ]


def test_a_stage_starts_when_the_program_logs_its_mark(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """mmdebstrap's own steps (its base, then the recipe's packages) are found in its log as it runs;
    what the log held before is not looked at."""
    log = tmp_path / "build.log"
    log.write_text("I: installing remaining packages inside the chroot...\n")  # an earlier build's
    writer = (
        "import sys, time\n"
        "log = open(sys.argv[1], 'a', buffering=1)\n"
        "log.write('I: installing essential packages...\\n'); time.sleep(1)\n"
        "log.write('I: installing remaining packages inside the chroot...\\n'); time.sleep(60)\n"
    )
    with BuildProgress("python", 4) as progress:
        progress.stage("Debian base (mmdebstrap)")
        with stage_on_log_line(progress, log, b"I: installing remaining packages", "packages"):
            proc = subprocess.Popen([sys.executable, "-c", writer, str(log)])
            try:
                time.sleep(0.5)
                assert "1/4 Debian base" in progress._label()
                deadline = time.monotonic() + 30
                while "2/4 packages" not in progress._label():
                    assert time.monotonic() < deadline, "the mark in the log did not start the stage"
                    time.sleep(0.05)
                assert proc.poll() is None  # while the program still runs
            finally:
                proc.kill()
                proc.wait()
        progress.stage("ext4 image")
    err = capsys.readouterr().err
    assert err.index("1/4 Debian base (mmdebstrap) ...") < err.index("2/4 packages ...") < err.index("3/4")
    assert re.search(r"done building python: 2/4 packages \(\d+\.\ds\)", err), err
    assert all(t.name != "build-progress" for t in threading.enumerate())  # the follower is gone

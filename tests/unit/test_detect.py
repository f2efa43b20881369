from __future__ import annotations

from pathlib import Path

import pytest

from agentkernel.detect import detect_image, program_of


@pytest.mark.parametrize(
    ("command", "image", "reason"),
    [
        (["python", "x.py"], "python", "command is python"),
        (["python3", "-m", "http.server"], "python", "command is python3"),
        (["/usr/bin/python3.12", "-V"], "python", "command is python3.12"),
        (["pip", "install", "x"], "python", "command is pip"),
        (["pip3", "list"], "python", "command is pip3"),
        (["pytest", "-q"], "python", "command is pytest"),
        (["uv", "run", "app"], "python", "command is uv"),
        (["poetry", "install"], "python", "command is poetry"),
        (["ipython"], "python", "command is ipython"),
        (["node", "index.js"], "node", "command is node"),
        (["npm", "test"], "node", "command is npm"),
        (["npx", "tsc"], "node", "command is npx"),
        (["yarn"], "node", "command is yarn"),
        (["./node_modules/.bin/../../pnpm", "i"], "node", "command is pnpm"),
        (["cargo", "test"], "rust", "command is cargo"),
        (["rustc", "main.rs"], "rust", "command is rustc"),
        (["go", "test", "./..."], "go", "command is go"),
        (["gofmt", "-l", "."], "go", "command is gofmt"),
        # env, assignments and shells are looked through
        (["env", "PYTHONPATH=.", "pytest"], "python", "command is pytest"),
        (["/usr/bin/env", "-i", "-u", "HOME", "A=1", "B=2", "npm", "ci"], "node", "command is npm"),
        (["env", "--", "cargo", "build"], "rust", "command is cargo"),
        (["RUST_LOG=debug", "cargo", "run"], "rust", "command is cargo"),
        (["sh", "-c", "pytest -x tests"], "python", "command is pytest"),
        (["bash", "-c", "CGO_ENABLED=0 go build ./..."], "go", "command is go"),
        (["/bin/bash", "-lc", "npm ci && npm test"], "node", "command is npm"),
        (["bash", "-e", "-o", "pipefail", "-c", "uv sync"], "python", "command is uv"),
        (["sh", "-c", "env X=1 sh -c 'node server.js'"], "node", "command is node"),
        # nothing to go on
        (["ls", "-l"], "base", "default"),
        (["sh", "-c", "echo hi"], "base", "default"),
        (["sh", "script.sh"], "base", "default"),
        (["bash", "--norc"], "base", "default"),
        (["sh", "-c"], "base", "default"),
        (["sh", "-c", ""], "base", "default"),
        (["sh", "-c", "echo 'unbalanced"], "base", "default"),
        (["env"], "base", "default"),
        (["A=1"], "base", "default"),
        ([""], "base", "default"),
        ([], "base", "default"),
        (["pythonic"], "base", "default"),
    ],
)
def test_command(tmp_path: Path, command: list[str], image: str, reason: str) -> None:
    assert detect_image(command, tmp_path) == (image, reason)


@pytest.mark.parametrize(
    ("files", "image", "reason"),
    [
        (["pyproject.toml"], "python", "found pyproject.toml"),
        (["requirements.txt"], "python", "found requirements.txt"),
        (["setup.py"], "python", "found setup.py"),
        (["Pipfile"], "python", "found Pipfile"),
        (["package.json"], "node", "found package.json"),
        (["Cargo.toml"], "rust", "found Cargo.toml"),
        (["go.mod"], "go", "found go.mod"),
        (["package.json", "pyproject.toml"], "python", "found pyproject.toml"),  # the first in order
        (["go.mod", "Cargo.toml"], "rust", "found Cargo.toml"),
        (["README.md", "Makefile"], "base", "default"),
        ([], "base", "default"),
    ],
)
def test_project_files(tmp_path: Path, files: list[str], image: str, reason: str) -> None:
    for name in files:
        (tmp_path / name).write_text("")
    assert detect_image(["make"], tmp_path) == (image, reason)


def test_command_beats_project_files(tmp_path: Path) -> None:
    (tmp_path / "package.json").write_text("{}")
    assert detect_image(["pytest"], tmp_path) == ("python", "command is pytest")


def test_marker_must_be_a_file(tmp_path: Path) -> None:
    (tmp_path / "go.mod").mkdir()
    assert detect_image(["make"], tmp_path) == ("base", "default")


def test_missing_project_dir(tmp_path: Path) -> None:
    assert detect_image(["make"], tmp_path / "nope") == ("base", "default")


@pytest.mark.parametrize(
    ("procfile", "image", "reason"),
    [
        ("web: node server.js\nworker: python worker.py\n", "node", "Procfile process web runs node"),
        (
            "# comment\n\nrelease: python3 manage.py\n",
            "python",
            "Procfile process release runs python3",
        ),
        ("web: env PORT=80 bin/../cargo run\n", "rust", "Procfile process web runs cargo"),
        ("web: sh -c 'go run .'\n", "go", "Procfile process web runs go"),
        ("web: gunicorn app:app\nworker: python w.py\n", "base", "default"),  # only the first process
        ("not a procfile\n", "base", "default"),
        ("", "base", "default"),
    ],
)
def test_procfile(tmp_path: Path, procfile: str, image: str, reason: str) -> None:
    (tmp_path / "Procfile").write_text(procfile)
    assert detect_image(["make"], tmp_path) == (image, reason)


def test_project_files_beat_procfile(tmp_path: Path) -> None:
    (tmp_path / "Procfile").write_text("web: node server.js\n")
    (tmp_path / "requirements.txt").write_text("flask\n")
    assert detect_image(["make"], tmp_path) == ("python", "found requirements.txt")


def test_binary_procfile_is_harmless(tmp_path: Path) -> None:
    (tmp_path / "Procfile").write_bytes(b"\xff\xfe\x00web: \x80\n")
    assert detect_image(["make"], tmp_path) == ("base", "default")


@pytest.mark.parametrize(
    ("command", "program"),
    [
        (["ls"], "ls"),
        (["env", "-C", "/tmp", "make"], "make"),
        (["zsh", "-c", "# only a comment"], None),
        (["sh", "-c", "X=1"], None),
        (("dash", "-c", "exec nohup node app.js"), "node"),
        (["sh", "-c", "cd sub && pytest"], "cd"),  # only the first word counts
    ],
)
def test_program_of(command: list[str], program: str | None) -> None:
    assert program_of(command) == program

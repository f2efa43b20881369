"""The command line's input surface under arbitrary input (Hypothesis): every invocation succeeds, or
exits non-zero with exactly one line on stderr, never a traceback, never a hang.

The CLI runs in-process through `agentkernel.cli.app.main` (as the `agentkernel` script does), with its
streams replaced by ones that encode as a real pipe's do; a few cases run as real processes too, to
show that both give the same result. The data dir is an empty one: no sandbox, image or kernel exists,
so nothing boots.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import tomlkit
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentkernel.cli.app import main
from agentkernel.config import FILENAME
from agentkernel.service.checks import NAME_RE

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("isolated_home")]
fuzz = settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])

# Command-line arguments as a process gets them: any text but NUL, bytes that are not UTF-8 included
# (Python hands those over as lone surrogates).
characters = st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",))
undecodable = st.integers(0x80, 0xFF).map(lambda b: chr(0xDC00 + b))
args = st.text(characters | undecodable, max_size=40)
names = st.from_regex(NAME_RE, fullmatch=True) | args
paths = st.sampled_from(["/", "/root/x", "/tmp/", ".", "..", "rel/path", "/a/../b"]) | args
numbers = st.sampled_from(["0", "-1", "1e999", "nan", "inf", "-inf", "99999999999999999999", "1.5"]) | args


def invoke(argv: list[str]) -> tuple[int, str]:
    """Run the CLI in this process: its exit code and what it wrote to stderr. stdout and stderr
    encode as a pipe's do: UTF-8, strict on stdout and backslashreplace on stderr."""
    out, err = io.BytesIO(), io.BytesIO()
    saved = sys.stdout, sys.stderr, sys.argv
    sys.stdout = io.TextIOWrapper(out, encoding="utf-8", errors="strict", write_through=True)
    sys.stderr = io.TextIOWrapper(err, encoding="utf-8", errors="backslashreplace", write_through=True)
    sys.argv = ["agentkernel", *argv]
    try:
        main()
    except SystemExit as exc:
        code = exc.code
    else:
        raise AssertionError("main() returned instead of exiting")
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
            stream.detach()
        sys.stdout, sys.stderr, sys.argv = saved
    assert isinstance(code, int), f"exit status {code!r}"
    return code, err.getvalue().decode()


def separately(argv: list[str], cwd: Path | None = None) -> tuple[int, str]:
    """Run the real `agentkernel` in a process of its own: its exit code and stderr."""
    done = subprocess.run(
        [sys.executable, "-m", "agentkernel", *argv], capture_output=True, cwd=cwd, env=os.environ, timeout=60
    )
    return done.returncode, done.stderr.decode()


def check(argv: list[str]) -> tuple[int, str]:
    code, err = invoke(argv)
    assert "Traceback" not in err
    if code != 0:
        assert err.endswith("\n") and err.count("\n") == 1, f"{argv!r}: stderr is not one line: {err!r}"
        assert err.startswith("agentkernel: "), err
    return code, err


@pytest.mark.parametrize(
    "argv",
    [["start", "\udc80"], ["stop", "\udc80"], ["rm", "\udc80"], ["cp", "box:/", "."]],
)
def test_names_that_are_not_utf8_and_copies_of_no_file(argv: list[str]) -> None:
    check(argv)


@fuzz
@given(st.sampled_from(["start", "stop", "rm", "rm -f", "logs", "create", "attach", "snapshot rm"]), names)
def test_sandbox_names(command: str, name: str) -> None:
    check([*command.split(), name])


@fuzz
@given(names, names, st.sampled_from(["snapshot create", "fork"]))
def test_two_names(first: str, second: str, command: str) -> None:
    check([*command.split(), first, second])


@fuzz
@given(names, st.lists(args, max_size=3))
def test_exec_into_a_name(name: str, command: list[str]) -> None:
    check(["exec", name, "--", *command] if command else ["exec", name])


remote = st.builds(lambda name, path: f"{name}:{path}", names, paths)


@fuzz
@given(remote | paths, remote | paths)
def test_cp_paths(source: str, dest: str) -> None:
    check(["cp", source, dest])


@fuzz
@given(
    st.from_regex(r"[a-z0-9.:/@_-]{1,30}", fullmatch=True) | args, st.sampled_from(["create", "run", "rm"])
)
def test_image_references(ref: str, command: str) -> None:
    argv = {
        "create": ["create", "box", "--image", ref],
        "run": ["run", "--image", ref, "--", "true"],
        "rm": ["image", "rm", ref],
    }[command]
    check(argv)


@fuzz
@given(st.lists(st.builds(lambda k, v: f"{k}={v}", args, args) | args, min_size=1, max_size=3), names)
def test_environment_variables(pairs: list[str], name: str) -> None:
    env = [a for pair in pairs for a in ("-e", pair)]
    check(["run", *env, "--", "true"])
    check(["exec", *env, name, "--", "true"])


@fuzz
@given(st.sampled_from(["--vcpus", "--memory", "--lifetime", "--timeout"]), numbers)
def test_numeric_options(option: str, value: str) -> None:
    if option == "--timeout":
        check(["run", option, value, "--", "true"])
    else:
        check(["create", "box", option, value])


# agentkernel.toml: the sections and keys it knows, with values of any TOML type, and keys it does not.
KEYS = {
    "sandbox": ["name", "base_image"],
    "agent": ["preferred"],
    "resources": ["vcpus", "memory_mb", "disk_mb"],
    "security": ["profile", "network", "mount_cwd", "mount_home", "pass_env", "read_only", "domains"],
    "network": ["vsock_cid"],
}
scalars = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.floats(),
    st.booleans(),
    st.text(max_size=30),
    st.sampled_from(["python:3.12", "restrictive", "claude", "*.pypi.org", "pypi.org", "2"]),
    st.datetimes(),
    st.dates(),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3), max_leaves=6)
domains = st.dictionaries(
    st.sampled_from(["allow", "block", "allowlist_only"]) | st.text(max_size=10), values
)


@st.composite
def documents(draw: st.DrawFn) -> dict[str, Any]:
    sections = draw(st.lists(st.sampled_from(list(KEYS)) | st.text(max_size=10), unique=True, max_size=4))
    doc: dict[str, Any] = {}
    for section in sections:
        keys = draw(st.lists(st.sampled_from(KEYS.get(section, ["x"])) | st.text(max_size=10), max_size=4))
        table = {key: draw(domains if key == "domains" else values) for key in keys}
        doc[section] = table if draw(st.booleans()) else draw(values)
    return doc


@fuzz
@given(documents() | st.text(max_size=200), st.sampled_from([["create", "box"], ["run", "--", "true"]]))
def test_config_files(tmp_path: Path, document: dict[str, Any] | str, argv: list[str]) -> None:
    text = document if isinstance(document, str) else tomlkit.dumps(document)
    (tmp_path / FILENAME).write_text(text, encoding="utf-8")
    with contextlib.chdir(tmp_path):
        check(argv)


@pytest.mark.parametrize(
    "argv",
    [
        ["start", "a\nb"],
        ["create", "\udcff"],
        ["cp", "box:rel", "."],
        ["cp", "a", "b"],
        ["run", "-e", "=x", "--", "true"],
        ["create", "box", "--vcpus", "many"],
        ["create", "box", "--image", "../x"],
        ["image", "rm", "no such"],
        ["fork", "snap", "-bad"],
        ["list", "--json"],
    ],
)
def test_in_process_matches_a_real_process(argv: list[str]) -> None:
    assert check(argv) == separately(argv)


def test_config_file_in_process_matches_a_real_process(tmp_path: Path) -> None:
    (tmp_path / FILENAME).write_text('[resources]\nvcpus = "2"\n[security]\nnetwrk = true\n')
    with contextlib.chdir(tmp_path):
        code, err = check(["create", "box"])
    assert (code, err) == separately(["create", "box"], tmp_path)
    assert code == 1
    assert "resources.vcpus: must be an integer" in err and "security.netwrk: unknown key" in err

"""The thin command line reads `exec`, `run`, `stop` and `rm` arguments exactly as the full (Typer)
command line does, or not at all: for every argument vector drawn from a vocabulary of their options,
values and odd tokens, the thin parse is a Fallback or equals what click's own parser makes of it."""

from __future__ import annotations

from typing import Any

import pytest
import typer
from hypothesis import given, settings
from hypothesis import strategies as st

from agentkernel.cli import thin_exec, thin_run, thin_served
from agentkernel.cli.app import app
from agentkernel.cli.sandbox_cmds import command_args
from agentkernel.cli.thin import Fallback

TOKENS = [
    "--", "-", "-i", "--interactive", "-t", "-it", "-d", "-e", "--env", "-e", "A=1", "B=x y", "--env=C=2",
    "-eD=3", "-w", "--workdir", "/tmp", "--workdir=/etc", "rel", "--timeout", "2", "--timeout=0.5",
    "nan", "--help", "box", "echo", "hi", "--image", "base", "--image=python", "--no-network", "--network",
    "--vcpus", "2", "--memory", "256", "--profile", "restrictive", "--backend", "qemu", "--keep",
    "--name", "--no-pool", "-p", "8000", "--lifetime", "--", "-x",
]  # fmt: skip


def full_params(name: str, args: list[str]) -> dict[str, Any] | None:
    """What click makes of `agentkernel NAME ARGS` (None: it refuses them, or they ask for help)."""
    group: Any = typer.main.get_command(app)
    command = group.get_command(typer.Context(group), name)
    assert command is not None
    try:
        params: dict[str, Any] = command.make_context(name, list(args)).params
    except (typer.TyperException, typer.Exit, typer.Abort):  # usage errors, --help
        return None
    return params


def thin_exec_or_none(args: list[str]) -> thin_exec.Request | None:
    try:
        return thin_exec.parse(args)
    except Fallback:
        return None


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(TOKENS), max_size=8))
def test_exec_is_parsed_as_click_parses_it(tokens: list[str]) -> None:
    request = thin_exec_or_none(tokens)
    if request is None:
        return
    params = full_params("exec", tokens)
    assert params is not None, tokens  # thin took what the full CLI refuses
    assert not params["tty_mode"] and not params["detach"]
    assert request.name == params["name"]
    assert request.command == command_args(list(params["command"]))
    assert request.env == dict(e.split("=", 1) for e in params["env"])
    assert request.cwd == params["workdir"]
    assert request.timeout == params["timeout"]
    assert request.interactive == params["interactive"]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(TOKENS), max_size=8))
def test_run_is_parsed_as_click_parses_it(tokens: list[str]) -> None:
    try:
        request, flags = thin_run.parse(tokens)
    except Fallback:
        return
    params = full_params("run", tokens)
    assert params is not None, tokens
    assert not params["keep"] and params["name"] is None and not params["no_pool"] and not params["publish"]
    assert request.command == command_args(list(params["command"]))
    assert request.env == dict(e.split("=", 1) for e in params["env"])
    assert request.cwd == params["workdir"]
    assert request.timeout == params["timeout"]
    assert request.interactive == params["interactive"]
    assert flags == {
        "image": params["image"],
        "backend": params["backend"],
        "profile": params["profile"],
        "network": params["network"],
        "vcpus": params["vcpus"],
        "memory_mb": params["memory"],
    }


@pytest.mark.parametrize(
    "args",
    [
        ["box", "--", "echo", "hi"],
        ["-e", "A=1", "-w", "/tmp", "--timeout", "2", "box", "echo", "hi"],
        ["-i", "box", "--", "--", "x"],
        ["--env=A=1", "--workdir=/etc", "box", "--", "-x"],
    ],
)
def test_common_exec_forms_are_taken(args: list[str]) -> None:
    assert thin_exec_or_none(args) is not None
    test_exec_is_parsed_as_click_parses_it.hypothesis.inner_test(args)  # type: ignore[attr-defined]


NAME_TOKENS = [
    "box",
    "b.2",
    "-f",
    "--force",
    "--force=1",
    "-ff",
    "--",
    "-",
    "--help",
    "-x",
    "Bad!",
    ".x",
    "a" * 64,
]


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(["stop", "rm", "remove"]), st.lists(st.sampled_from(NAME_TOKENS), max_size=6))
def test_stop_and_rm_are_parsed_as_click_parses_them(command: str, tokens: list[str]) -> None:
    try:
        request = thin_served.parse(command, tokens)
    except Fallback:
        return
    params = full_params(command, tokens)
    assert params is not None, tokens
    if command == "stop":
        assert request == {"op": "stop_sandbox", "names": [params["name"]]}
    else:
        assert request == {"op": "remove_sandboxes", "names": list(params["names"]), "force": params["force"]}


@pytest.mark.parametrize(
    ("command", "args"),
    [
        ("stop", ["box"]),
        ("rm", ["box"]),
        ("rm", ["-f", "box", "b.2"]),
        ("rm", ["box", "--force"]),
        ("rm", ["--", "box"]),
    ],
)
def test_common_stop_and_rm_forms_are_taken(command: str, args: list[str]) -> None:
    thin_served.parse(command, args)  # no Fallback
    test_stop_and_rm_are_parsed_as_click_parses_them.hypothesis.inner_test(command, args)  # type: ignore[attr-defined]


CP_TOKENS = [
    "box:/etc/hostname",
    "box:/tmp/",
    "box:rel",
    "Bad!:/x",
    "f.txt",
    "./d/",
    "a/b:/c",
    ":x",
    "-",
    "--",
    "-r",
    "x:",
]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(CP_TOKENS), max_size=3))
def test_cp_is_parsed_as_click_parses_it(tokens: list[str]) -> None:
    try:
        request, local = thin_served.parse_copy(tokens)
    except Fallback:
        return
    params = full_params("cp", tokens)
    assert params is not None, tokens
    remote = f"{request['sandbox']}:{request['remote']}"
    assert (params["source"], params["dest"]) == ((local, remote) if request["upload"] else (remote, local))

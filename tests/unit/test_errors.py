"""The error tree: every error the service raises is defined in errors.py, drawn in its docstring, and
carries the HTTP status and problem code the API answers with."""

from __future__ import annotations

import ast
import errno
from pathlib import Path

import pytest

from agentkernel import errors
from agentkernel.api.problems import from_exception
from agentkernel.errors import AgentkernelError, ExecError, FileOpError, InvalidRequestError

SRC = Path(errors.__file__).parent


def _subclasses(cls: type[AgentkernelError]) -> list[type[AgentkernelError]]:
    found = []
    for sub in cls.__subclasses__():
        found += [sub, *_subclasses(sub)]
    return found


def test_every_error_class_of_the_package_is_defined_in_errors_py() -> None:
    """A new error class elsewhere would escape the tree (and the API's lookup): only the CLI's own
    and the SDK's (client side) may live outside."""
    outside = []
    for path in SRC.rglob("*.py"):
        if path.name == "errors.py" or "client" in path.relative_to(SRC).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.name.endswith("Error") and node.name != "GaveUpError":
                bases = {ast.unparse(b) for b in node.bases}
                if bases & {"AgentkernelError", *(c.__name__ for c in _subclasses(AgentkernelError))}:
                    outside.append(f"{path.relative_to(SRC)}:{node.name}")
    assert outside == []


def test_the_docstring_draws_every_class() -> None:
    doc = errors.__doc__ or ""
    defined = [c for c in _subclasses(AgentkernelError) if c.__module__ == "agentkernel.errors"]
    assert defined
    assert [c.__name__ for c in defined if c.__name__ not in doc] == []


@pytest.mark.parametrize(
    "cls", [c for c in _subclasses(AgentkernelError) if c.__module__ == "agentkernel.errors"]
)
def test_every_class_carries_a_status_and_a_code(cls: type[AgentkernelError]) -> None:
    assert 400 <= cls.status < 600
    assert cls.code and cls.code.replace("_", "").isalpha() and cls.code.islower()


def test_the_api_maps_an_error_by_what_it_carries() -> None:
    missing = errors.NoSuchSandboxError("box")
    p = from_exception(missing)
    assert (p.status, p.code, p.field) == (404, "sandbox_not_found", "name")
    p = from_exception(InvalidRequestError("vcpus", "must be between 1 and 32", code="out_of_range"))
    assert (p.status, p.code, p.field, p.detail) == (
        422,
        "out_of_range",
        "vcpus",
        "vcpus: must be between 1 and 32",
    )
    p = from_exception(errors.StateBusyError("busy"))
    assert (p.status, p.code) == (503, "state_unavailable")


def test_file_and_exec_errors_take_their_code_from_the_errno() -> None:
    assert (FileOpError("gone", errno.ENOENT).status, FileOpError("gone", errno.ENOENT).code) == (
        404,
        "file_not_found",
    )
    assert FileOpError("full", errno.ENOSPC).status == 507
    assert (FileOpError("odd", errno.EIO).status, FileOpError("odd", errno.EIO).code) == (422, "file_error")
    assert ExecError("python4: not found", errno.ENOENT).code == "command_not_found"
    assert ExecError("denied", errno.EACCES).code == "exec_failed"
    assert errors.ArgumentsTooLongError("too long").code == "arguments_too_long"

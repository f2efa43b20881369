"""File modes as every face shows and takes them, and the bounds of file operations.

A mode is one representation on every face (HTTP API, SDK, MCP, CLI): the permission bits as an octal
string, "0644". Output always has four digits; input takes one to four octal digits with an optional
leading 0 ("644", "0644", "4755"), as chmod(1) does. Inside the service a mode is an int.
"""

from __future__ import annotations

import re

from agentkernel.errors import InvalidRequestError

MODE_PATTERN = r"^0?[0-7]{1,4}$"
MODE_DESCRIPTION = 'Permission bits as an octal string, as chmod takes them: "644" or "0644".'
MAX_DEPTH = 32
"""Deepest recursive listing (levels below the directory)."""

_MODE = re.compile(MODE_PATTERN)


def format_mode(mode: int) -> str:
    """The mode as every face shows it: "0644"."""
    return f"{mode & 0o7777:04o}"


def parse_mode(text: str, *, field: str = "mode") -> int:
    """An octal mode string ("644", "0644") as an int; a clear error for anything else."""
    if not _MODE.fullmatch(text):
        raise InvalidRequestError(field, f"must be octal permission bits like 0644 (got {text[:20]!r})")
    return int(text, 8)


def check_depth(depth: int, *, field: str = "depth") -> int:
    if not 1 <= depth <= MAX_DEPTH:
        raise InvalidRequestError(field, f"must be between 1 and {MAX_DEPTH} (got {depth})")
    return depth

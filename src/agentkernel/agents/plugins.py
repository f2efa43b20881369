"""`agentkernel plugin`: agentkernel's MCP server (and, for Claude Code, a skill) in agents' configs.

Each target's config is merged, never replaced: only our own entry (`agentkernel`) is added or brought
up to date, keys the user added to it are kept, and everything else in the file stays as it was (TOML
keeps its comments too). A file that does not parse is reported and left alone. Writes are atomic.

A project's configs are committed and shared, so they start the server as `agentkernel` found on
PATH and hold no path of this machine. The user's own configs (--global) name this installation's
script by its absolute path: agents started outside a shell (an editor, a desktop launcher) often
lack the PATH entry of a virtualenv or ~/.local/bin, and these files never leave the machine.
"""

from __future__ import annotations

import difflib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import tomlkit
import tomlkit.exceptions

from agentkernel.errors import AgentkernelError

SERVER = "agentkernel"
TARGETS = ("claude", "codex", "gemini", "opencode", "mcp")
SKILL = """\
---
name: agentkernel
description: >-
  Run commands that could harm this machine (untrusted code, installs, test suites, scripts from
  the internet) in an isolated microVM sandbox with agentkernel instead of on the host.
---

# Sandboxed commands with agentkernel

agentkernel runs each command in a microVM: its own Linux kernel and disk, isolated from this machine.

- One-off command: the `run_command` tool of the `agentkernel` MCP server (or `agentkernel run -- CMD`
  in a shell). It starts a fresh sandbox and removes it afterwards.
- Several steps that share state: `create_sandbox`, then `exec_in_sandbox`, `write_file`, `read_file`
  and `list_files` on it; `remove_sandbox` when done.
- Pick the image that has the tools: `python`, `node`, `rust`, `go` or `base` (busybox).
- Give `timeout` for commands that might hang. Output is cut at 256 KiB per stream.
"""

Kind = Literal["json", "toml", "text"]
Action = Literal["create", "update", "unchanged", "skipped"]


@dataclass(frozen=True)
class Location:
    """One file of a target: `keys` lead to our entry in a JSON or TOML file; text is a whole file."""

    path: Path
    kind: Kind
    keys: tuple[str, ...]
    value: dict[str, Any] | str
    template: tuple[tuple[str, str], ...] = ()
    """Top-level keys a new file starts with."""

    @property
    def what(self) -> str:
        return ".".join(self.keys) if self.keys else "file"


@dataclass(frozen=True)
class Change:
    location: Location
    action: Action
    detail: str = ""
    old: str | None = None
    """The file's text before, if it exists."""
    new: str | None = None
    """Its text after a create or update."""

    def diff(self) -> str:
        """The change as a unified diff (a new file against /dev/null); empty if nothing changes."""
        if self.new is None:
            return ""
        path = str(self.location.path)
        lines = difflib.unified_diff(
            (self.old or "").splitlines(keepends=True),
            self.new.splitlines(keepends=True),
            path if self.old is not None else "/dev/null",
            path,
        )
        return "".join(
            line if line.endswith("\n") else line + "\n\\ No newline at end of file\n" for line in lines
        )


def mcp_command(*, global_: bool) -> list[str]:
    """How an agent starts our MCP server: for a project, `agentkernel` from PATH; for the user's own
    config, this installation's script by absolute path (see the module's docstring)."""
    if not global_:
        return [SERVER, "mcp-server"]
    script = Path(sys.executable).parent / "agentkernel"
    if script.is_file():
        return [str(script), "mcp-server"]
    return [sys.executable, "-m", "agentkernel", "mcp-server"]


def path_warning(*, global_: bool) -> str | None:
    """Why a project's config would not start the server on this machine, if it would not."""
    if global_ or shutil.which(SERVER):
        return None
    where = Path(sys.executable).parent
    return (
        f"`{SERVER}` is not on PATH, and the project's config starts it from there: add {where} to "
        "PATH (or install agentkernel with pipx or uv tool)"
    )


def locations(
    target: str, *, global_: bool, project_dir: Path, home: Path, environ: Mapping[str, str]
) -> list[Location]:
    """The files `plugin install TARGET` writes, in the project or (`global_`) in the user's home."""
    command = mcp_command(global_=global_)
    stdio = {"command": command[0], "args": command[1:]}
    base = home if global_ else project_dir
    if target == "claude":
        config = home / ".claude.json" if global_ else project_dir / ".mcp.json"
        return [
            Location(config, "json", ("mcpServers", SERVER), stdio),
            Location(base / ".claude" / "skills" / SERVER / "SKILL.md", "text", (), SKILL),
        ]
    if target == "gemini":
        return [Location(base / ".gemini" / "settings.json", "json", ("mcpServers", SERVER), stdio)]
    if target == "codex":
        codex_home = Path(environ["CODEX_HOME"]) if global_ and environ.get("CODEX_HOME") else base / ".codex"
        return [Location(codex_home / "config.toml", "toml", ("mcp_servers", SERVER), stdio)]
    if target == "opencode":
        config_home = Path(environ.get("XDG_CONFIG_HOME") or home / ".config")
        path = config_home / "opencode" / "opencode.json" if global_ else project_dir / "opencode.json"
        entry = {"type": "local", "command": command, "enabled": True}
        schema = (("$schema", "https://opencode.ai/config.json"),)
        return [Location(path, "json", ("mcp", SERVER), entry, template=schema)]
    if target == "mcp":
        if global_:
            raise AgentkernelError(
                "plugin mcp writes the project's .mcp.json; there is no global one "
                "(use claude, codex, gemini or opencode with --global)"
            )
        return [Location(project_dir / ".mcp.json", "json", ("mcpServers", SERVER), stdio)]
    raise AgentkernelError(f"unknown plugin target {target!r}: use {', '.join(TARGETS)}")


def install(location: Location, *, dry_run: bool) -> Change:
    """Merge our entry into `location`'s file (written unless `dry_run`)."""
    exists = location.path.exists()
    if location.kind == "text":
        assert isinstance(location.value, str)
        old_text = _read(location.path) if exists else None
        if old_text == location.value:
            return Change(location, "unchanged")
        if old_text is not None:
            return Change(location, "skipped", "it exists with other content; left as it is")
        new_text = location.value
    else:
        old_text = _read(location.path) if exists else None
        merged = _merged(location, old_text or "")
        if merged is None:
            return Change(location, "unchanged")
        new_text = merged
    if not dry_run:
        _write(location.path, new_text)
    return Change(location, "update" if exists else "create", location.what, old_text, new_text)


def is_installed(location: Location) -> bool:
    """Whether our entry (or our file) is in `location`."""
    if not location.path.exists():
        return False
    text = _read(location.path)
    if location.kind == "text":
        return True
    try:
        node: Any = json.loads(text) if location.kind == "json" else tomlkit.parse(text)
        for key in location.keys:
            node = node[key]
    except (ValueError, KeyError, TypeError, tomlkit.exceptions.TOMLKitError):
        return False
    return True


def _merged(location: Location, text: str) -> str | None:
    """The file's new text with our entry merged in, or None if it already has it as it should be."""
    assert isinstance(location.value, dict)
    doc: Any
    try:
        doc = (json.loads(text) if text.strip() else {}) if location.kind == "json" else tomlkit.parse(text)
    except (ValueError, tomlkit.exceptions.TOMLKitError) as exc:
        raise AgentkernelError(
            f"{location.path}: cannot parse it ({str(exc).splitlines()[0]}): fix it, or add the "
            f"{location.what} entry by hand; nothing was changed"
        ) from None
    if not isinstance(doc, dict):
        raise AgentkernelError(f"{location.path}: expected a {location.kind.upper()} object at the top")
    if not text.strip():
        doc.update(location.template)
    parent = doc
    for key in location.keys[:-1]:
        if key not in parent:
            parent[key] = tomlkit.table(is_super_table=True) if location.kind == "toml" else {}
        parent = parent[key]
        if not isinstance(parent, dict):
            raise AgentkernelError(f"{location.path}: {key} is not a table; nothing was changed")
    current = parent.get(location.keys[-1])
    if current is not None and not isinstance(current, dict):
        raise AgentkernelError(f"{location.path}: {location.what} is not a table; nothing was changed")
    merged = {**(_plain(current) if current else {}), **location.value}
    if current is not None and _plain(current) == merged:
        return None
    if location.kind == "json":
        parent[location.keys[-1]] = merged
        return json.dumps(doc, indent=2) + "\n"
    table = current if current is not None else tomlkit.table()
    for key, value in location.value.items():
        table[key] = value
    parent[location.keys[-1]] = table
    return tomlkit.dumps(doc)


def _plain(value: Any) -> dict[str, Any]:
    """A tomlkit table (or a JSON object) as plain values, for comparing."""
    plain: dict[str, Any] = json.loads(json.dumps(value))
    return plain


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise AgentkernelError(f"{path}: cannot read it: {exc}") from None


def _write(path: Path, text: str) -> None:
    """Replace `path` with `text` in one step (keeping its permissions), making its directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o7777 if path.exists() else 0o644
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

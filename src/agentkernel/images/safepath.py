"""Resolving paths inside an untrusted root tree as if it were `/`, so nothing escapes it.

Image trees come from registries and layers we do not trust: a symlink `etc -> /etc` or `x -> ../../..`
must lead to the tree's own `etc` or root, never to the host's. Every write into a tree goes through here.
"""

from __future__ import annotations

import os
from collections import deque
from pathlib import Path

from agentkernel.errors import AgentkernelError

MAX_SYMLINKS = 40


def split(path: str) -> list[str]:
    """The components of `path`, without empty and `.` components."""
    return [p for p in path.split("/") if p not in ("", ".")]


def resolve_in_root(root: Path, path: str, *, follow_last: bool) -> Path:
    """The host path of `path` inside `root`, following symlinks as a chroot at `root` would.

    `..` stops at the root and absolute symlink targets restart at the root. With `follow_last`
    false the final component is not followed (it is what gets created, replaced or removed).
    Components that do not exist are taken as they are.
    """
    todo = deque(split(path))
    done: list[str] = []
    hops = 0
    while todo:
        part = todo.popleft()
        if part == "..":
            if done:
                done.pop()
            continue
        here = root.joinpath(*done, part)
        if (todo or follow_last) and here.is_symlink():
            hops += 1
            if hops > MAX_SYMLINKS:
                raise AgentkernelError(f"too many levels of symbolic links in '{path}' inside the image")
            target = os.readlink(here)
            if target.startswith("/"):
                done = []
            todo.extendleft(reversed(split(target)))
            continue
        done.append(part)
    return root.joinpath(*done)

"""Reading ext4 images without mounting them, through debugfs."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path


def debugfs(image: Path, request: str) -> str:
    result = subprocess.run(
        ["debugfs", "-R", request, str(image)], capture_output=True, text=True, check=True
    )
    return result.stdout


def stat(image: Path, path: str) -> dict[str, str]:
    """Type, mode, owner and link target of `path` in `image` ({} when it does not exist)."""
    out = debugfs(image, f"stat {path}")
    found = re.search(r"Type: (\w+)\s+Mode:\s+(\d+)", out)
    if not found:
        return {}
    owner = re.search(r"User:\s+(\d+)\s+Group:\s+(\d+)", out)
    target = re.search(r'Fast link dest: "(.*)"', out)
    return {
        "type": found[1],
        "mode": f"{int(found[2], 8):o}",
        "uid": owner[1] if owner else "",
        "gid": owner[2] if owner else "",
        "target": target[1] if target else "",
    }


def cat(image: Path, path: str) -> bytes:
    return subprocess.run(
        ["debugfs", "-R", f"cat {path}", str(image)], capture_output=True, check=True
    ).stdout


def is_clean(image: Path) -> bool:
    return subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True).returncode == 0

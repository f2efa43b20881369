"""The secret store: named values and the hosts they may be sent to, private to their owner.

One JSON file per secret, mode 0600, in `secrets/` under the data dir (mode 0700). Values are only
ever read by the process that starts a sandbox's egress gateway; `agentkernel secret ls` shows names
and hosts, never values.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agentkernel import paths
from agentkernel.errors import AgentkernelError


def store_dir() -> Path:
    return paths.private_dir(paths.data_dir() / "secrets")


def _path(name: str) -> Path:
    from agentkernel.network.brokering import check_name

    return store_dir() / f"{check_name(name)}.json"


def _load(name: str) -> dict[str, Any] | None:
    try:
        data = json.loads(_path(name).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise AgentkernelError(f"secret store: cannot read {name}: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("value"), str):
        raise AgentkernelError(f"secret store: {name} is damaged: set it again")
    return data


def put(name: str, value: str, hosts: Sequence[str]) -> None:
    from agentkernel.network.policy import normalise_pattern

    if not hosts:
        raise AgentkernelError(f"secret {name} has no hosts: give at least one --host")
    patterns = [normalise_pattern(h) for h in hosts]
    path = _path(name)
    tmp = path.with_suffix(".tmp")
    with paths.open_private(tmp, "w") as f:
        f.write(json.dumps({"value": value, "hosts": patterns}))
    os.replace(tmp, path)


def value(name: str) -> str | None:
    data = _load(name)
    return None if data is None else str(data["value"])


def hosts(name: str) -> tuple[str, ...] | None:
    data = _load(name)
    return None if data is None else tuple(map(str, data.get("hosts", ())))


def names() -> list[str]:
    return sorted(p.stem for p in store_dir().glob("*.json"))


def remove(name: str) -> bool:
    try:
        _path(name).unlink()
    except FileNotFoundError:
        return False
    return True

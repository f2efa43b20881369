"""The host's apt sources for a Debian suite, so recipe builds use the mirror the host is set up with."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

APT = Path("/etc/apt")


def debian_sources(suite: str) -> list[str]:
    """One-line `deb URI SUITE COMPONENTS` entries for `suite` and its -updates/-security suites.

    Empty when the host has none (another distribution): mmdebstrap then uses deb.debian.org.
    """
    entries: list[str] = []
    for uri, suites, components in _entries():
        for name in suites:
            line = f"deb {uri} {name} {' '.join(components) or 'main'}"
            if (name == suite or name.startswith(f"{suite}-")) and line not in entries:
                entries.append(line)
    return entries


def _entries() -> Iterator[tuple[str, list[str], list[str]]]:
    one_line = [APT / "sources.list", *sorted((APT / "sources.list.d").glob("*.list"))]
    for path in one_line:
        for line in _read(path).splitlines():
            words = line.split("#", 1)[0].split()
            if words[:1] != ["deb"]:
                continue
            if len(words) > 1 and words[1].startswith("["):  # options: [arch=... signed-by=...]
                end = next((i for i, w in enumerate(words) if w.endswith("]")), len(words) - 1)
                words = words[:1] + words[end + 1 :]
            if len(words) >= 3:
                yield words[1], [words[2]], words[3:]
    for path in sorted((APT / "sources.list.d").glob("*.sources")):
        for stanza in _read(path).split("\n\n"):
            fields = _deb822(stanza)
            if "deb" in fields.get("types", "").split() and fields.get("enabled", "yes") != "no":
                for uri in fields.get("uris", "").split():
                    yield uri, fields.get("suites", "").split(), fields.get("components", "").split()


def _deb822(stanza: str) -> dict[str, str]:
    """The fields of one deb822 stanza, keys lowercased, continuation lines joined."""
    fields: dict[str, str] = {}
    key = ""
    for line in stanza.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        if line[0] in " \t" and key:
            fields[key] += " " + line.strip()
        elif ":" in line:
            key, value = line.split(":", 1)
            key = key.strip().lower()
            fields[key] = value.strip()
    return fields


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
import typing
from pathlib import Path

import pytest

from agentkernel.config import (
    MEMORY_MB_RANGE,
    PROFILES,
    REMOVED,
    VCPUS_RANGE,
    Config,
    Policy,
    find_config,
    image_name,
    load_config,
    resolve_policy,
    resolve_resources,
)
from agentkernel.errors import AgentkernelError

SEED_EXAMPLE = """
[sandbox]
name = "my-project"
base_image = "python:3.12-alpine"  # Or use runtime shorthand

[agent]
preferred = "claude"      # claude, gemini, codex, opencode

[resources]
vcpus = 2
memory_mb = 512

[security]
profile = "restrictive"   # permissive, moderate, restrictive
network = false           # Override: disable network
mount_cwd = false         # Override: mount current directory
"""


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """tmp_path as the current directory, so messages name the file as `agentkernel.toml`."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write(directory: Path, text: str) -> Path:
    path = directory / "agentkernel.toml"
    path.write_text(text)
    return path


def test_seed_example(in_tmp: Path) -> None:
    path = write(in_tmp, SEED_EXAMPLE)
    config, found = load_config(path)
    assert found == path
    assert config.sandbox.name == "my-project"
    assert config.sandbox.base_image == "python"
    assert config.agent.preferred == "claude"
    assert (config.resources.vcpus, config.resources.memory_mb, config.resources.disk_mb) == (2, 512, None)
    assert config.security.profile == "restrictive"
    assert config.security.network is False
    assert config.security.mount_home is None


def test_seed_example_with_a_vsock_cid_names_the_removed_key(in_tmp: Path) -> None:
    path = write(
        in_tmp, SEED_EXAMPLE + "\n[network]\nvsock_cid = 3             # Auto-assigned if not specified\n"
    )
    with pytest.raises(AgentkernelError) as info:
        load_config(path)
    assert str(info.value) == (
        "agentkernel.toml: network.vsock_cid: no longer supported: vsock CIDs are allocated per sandbox"
    )


def test_full_schema(in_tmp: Path) -> None:
    text = """
        [resources]
        disk_mb = 2048
        [security]
        mount_home = true
        pass_env = true
        read_only = false
        [security.domains]
        allow = ["*.PyPI.org", "files.pythonhosted.org"]
        block = ["evil.example"]
        allowlist_only = true
    """
    config, _ = load_config(write(in_tmp, text))
    assert config.resources.disk_mb == 2048
    assert config.security.profile == "moderate"
    assert (config.security.mount_home, config.security.pass_env, config.security.read_only) == (
        True,
        True,
        False,
    )
    domains = config.security.domains
    assert domains.allow == ("*.pypi.org", "files.pythonhosted.org")
    assert domains.block == ("evil.example",)
    assert domains.allowlist_only is True


def test_empty_file_gives_defaults(in_tmp: Path) -> None:
    config, _ = load_config(write(in_tmp, ""))
    assert config == Config()
    assert config.security.profile == "moderate"
    assert config.security.domains.allow == ()


@pytest.mark.parametrize(
    ("value", "image"),
    [
        ("python:3.12-alpine", "python"),
        ("python", "python"),
        ("node:20", "node"),
        ("rust:1.80-slim", "rust"),
        ("golang:1.22", "go"),
        ("go", "go"),
        ("python@sha256:" + "a" * 64, "python"),
        ("base", "base"),
        ("myimg:latest", "myimg:latest"),
        ("ghcr.io/team/python:3.12", "ghcr.io/team/python:3.12"),  # a registry: not a runtime shorthand
        ("pythonic:1", "pythonic:1"),
    ],
)
def test_image_name(value: str, image: str) -> None:
    assert image_name(value) == image


ERRORS = [
    # (file contents, the exact message after "agentkernel.toml: ")
    ("netwrk = 1", "netwrk: unknown key"),
    ("[sandboxx]\nname = 'x'", "sandboxx: unknown key"),
    ("[security]\nnetwrk = false", "security.netwrk: unknown key"),
    ("[security.domains]\nallowlist = true", "security.domains.allowlist: unknown key"),
    ('[sandbox]\n"odd key\\n" = 1', 'sandbox."odd key\\n": unknown key'),
    ("[resources]\nmemory_mb = 1", "resources.memory_mb: must be at least 64 (got 1)"),
    ("[resources]\nmemory_mb = 65537", "resources.memory_mb: must be at most 65536 (got 65537)"),
    ("[resources]\nvcpus = 0", "resources.vcpus: must be at least 1 (got 0)"),
    ("[resources]\nvcpus = 33", "resources.vcpus: must be at most 32 (got 33)"),
    ("[resources]\ndisk_mb = 10", "resources.disk_mb: must be at least 64 (got 10)"),
    # removed keys: refused whatever their value, with the reason; a problem with the rest too
    (
        "[network]\nvsock_cid = 2",
        "network.vsock_cid: no longer supported: vsock CIDs are allocated per sandbox",
    ),
    (
        "[network]\nvsock_cid = 'x'",
        "network.vsock_cid: no longer supported: vsock CIDs are allocated per sandbox",
    ),
    (
        "[network]\nvsock_cid = 3\nother = 1",
        "network.vsock_cid: no longer supported: vsock CIDs are allocated per sandbox; network: unknown key",
    ),
    (
        "[resources]\nvcpus = 0\n[network]\nvsock_cid = 3",
        "network.vsock_cid: no longer supported: vsock CIDs are allocated per sandbox;"
        " resources.vcpus: must be at least 1 (got 0)",
    ),
    ("[network]", "network: unknown key"),
    ("network = 5", "network: unknown key"),
    ("[resources]\ndisk_mb = 1048577", "resources.disk_mb: must be at most 1048576 (got 1048577)"),
    ('[resources]\nvcpus = "2"', 'resources.vcpus: must be an integer (got "2")'),
    ("[resources]\nvcpus = 2.0", "resources.vcpus: must be an integer (got 2.0)"),
    ("[resources]\nvcpus = true", "resources.vcpus: must be an integer (got true)"),
    ("[security]\nnetwork = 1", "security.network: must be true or false (got 1)"),
    ('[security]\nmount_cwd = "no"', 'security.mount_cwd: must be true or false (got "no")'),
    ("[sandbox]\nname = 5", "sandbox.name: must be a string (got 5)"),
    ("resources = 5", "resources: must be a table (got 5)"),
    ("[security.domains]\nallow = 'pypi.org'", 'security.domains.allow: must be a list (got "pypi.org")'),
    ("[security.domains]\nblock = [1]", "security.domains.block[0]: must be a string (got 1)"),
    (
        "[security.domains]\nallow = ['pypi.org', 'not a domain']",
        "security.domains.allow[1]: must be a domain pattern (like pypi.org or *.pypi.org)"
        ' (got "not a domain")',
    ),
    (
        '[agent]\npreferred = "chatgpt"',
        'agent.preferred: must be one of claude, gemini, codex, opencode (got "chatgpt")',
    ),
    (
        '[security]\nprofile = "paranoid"',
        'security.profile: must be one of permissive, moderate, restrictive (got "paranoid")',
    ),
    (
        '[sandbox]\nbase_image = "no spaces"',
        'sandbox.base_image: must be an image name (like python or myimg:latest) (got "no spaces")',
    ),
    (
        '[sandbox]\nname = "-x"',
        "sandbox.name: must be 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit"
        ' (got "-x")',
    ),
    (
        "[resources]\nvcpus = 0\nmemory_mb = 1",
        "resources.vcpus: must be at least 1 (got 0); resources.memory_mb: must be at least 64 (got 1)",
    ),
    # TOML syntax: the line (and column when tomllib knows it)
    ("[sandbox\nname = 1", "line 1, column 9: invalid TOML: expected ']' at the end of a table declaration"),
    (
        "[agent]\npreferred claude",
        "line 2, column 11: invalid TOML: expected '=' after a key in a key/value pair",
    ),
    ("vcpus = 1\nvcpus = 2\n", "line 2, column 10: invalid TOML: cannot overwrite a value"),
    ("vcpus = 1\nvcpus = 2", "line 2: invalid TOML: cannot overwrite a value"),  # at the end: no column
    ("[resources]\nvcpus =", "line 2: invalid TOML: invalid value"),
]


@pytest.mark.parametrize(("text", "message"), ERRORS)
def test_errors_are_one_line_naming_file_key_and_reason(in_tmp: Path, text: str, message: str) -> None:
    path = write(in_tmp, text)
    with pytest.raises(AgentkernelError) as info:
        load_config(path)
    assert str(info.value) == f"agentkernel.toml: {message}"
    assert "\n" not in str(info.value)


def test_long_values_are_cut_short(in_tmp: Path) -> None:
    with pytest.raises(AgentkernelError) as info:
        load_config(write(in_tmp, f'[resources]\nvcpus = "{"x" * 200}"'))
    assert str(info.value) == f'agentkernel.toml: resources.vcpus: must be an integer (got "{"x" * 56}...)'


def test_file_outside_cwd_is_named_by_its_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    other = tmp_path / "elsewhere"
    other.mkdir()
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    path = write(other, "[resources]\nvcpus = 0")
    with pytest.raises(AgentkernelError, match=r"^/.*/elsewhere/agentkernel\.toml: resources\.vcpus: "):
        load_config(path)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("missing.toml", "missing.toml: file not found"),
        ("subdir", "subdir: cannot read: Is a directory"),
        ("latin1.toml", "latin1.toml: not UTF-8 text"),
    ],
)
def test_unreadable_files(in_tmp: Path, name: str, message: str) -> None:
    (in_tmp / "subdir").mkdir()
    (in_tmp / "latin1.toml").write_bytes(b"[sandbox]\nname = 'caf\xe9'\n")
    with pytest.raises(AgentkernelError) as info:
        load_config(Path(name))
    assert str(info.value) == message


def test_search_finds_the_nearest_file_in_parents(tmp_path: Path) -> None:
    deep = tmp_path / "a" / "b" / "c"
    deep.mkdir(parents=True)
    top = write(tmp_path, "[resources]\nvcpus = 4")
    config, found = load_config(search_from=deep)
    assert (config.resources.vcpus, found) == (4, top)
    near = write(tmp_path / "a", "[resources]\nvcpus = 8")
    config, found = load_config(search_from=deep)
    assert (config.resources.vcpus, found) == (8, near)


def test_search_defaults_to_cwd(in_tmp: Path) -> None:
    path = write(in_tmp, "[resources]\nvcpus = 3")
    config, found = load_config()
    assert config.resources.vcpus == 3
    assert found is not None and found.resolve() == path.resolve()


def test_search_stops_at_the_repository_root(tmp_path: Path) -> None:
    write(tmp_path, "[resources]\nvcpus = 4")  # above the repository: ignored
    repo = tmp_path / "repo"
    (repo / ".git").mkdir(parents=True)
    (repo / "src").mkdir()
    assert find_config(repo / "src") is None
    assert load_config(search_from=repo / "src") == (Config(), None)
    inside = write(repo, "")  # the repository root itself is searched
    assert find_config(repo / "src") == inside


def test_search_ignores_a_directory_of_that_name(tmp_path: Path) -> None:
    (tmp_path / ".git").mkdir()
    (tmp_path / "agentkernel.toml").mkdir()
    assert find_config(tmp_path) is None


def test_search_reports_errors_of_the_found_file(tmp_path: Path) -> None:
    (tmp_path / ".git").mkdir()
    write(tmp_path, "[security]\nnetwrk = true")
    with pytest.raises(AgentkernelError, match=r"agentkernel\.toml: security\.netwrk: unknown key$"):
        load_config(search_from=tmp_path)


def test_profiles_match_the_seed_table() -> None:
    table = {
        # network, mount_cwd, mount_home, pass_env, read_only
        "permissive": (True, True, True, True, False),
        "moderate": (True, False, False, False, False),
        "restrictive": (False, False, False, False, True),
    }
    for name, row in table.items():
        policy = PROFILES[name]
        assert policy.profile == name
        assert (policy.network, policy.mount_cwd, policy.mount_home, policy.pass_env, policy.read_only) == row


def config_of(text: str, tmp_path: Path) -> Config:
    return load_config(write(tmp_path, text))[0]


@pytest.mark.parametrize(
    ("text", "flags", "expected"),
    [
        ("", {}, PROFILES["moderate"]),
        ('[security]\nprofile = "restrictive"', {}, PROFILES["restrictive"]),
        ('[security]\nprofile = "restrictive"', {"profile": "permissive"}, PROFILES["permissive"]),
        # config overrides the profile
        (
            '[security]\nprofile = "restrictive"\nnetwork = true',
            {},
            Policy(
                "restrictive", network=True, mount_cwd=False, mount_home=False, pass_env=False, read_only=True
            ),
        ),
        # a config override still applies under a profile picked by a flag
        (
            "[security]\nmount_cwd = true",
            {"profile": "restrictive"},
            Policy(
                "restrictive", network=False, mount_cwd=True, mount_home=False, pass_env=False, read_only=True
            ),
        ),
        # flags override the config
        (
            "[security]\nnetwork = true\nread_only = true",
            {"network": False, "read_only": False, "pass_env": True, "mount_home": True},
            Policy(
                "moderate", network=False, mount_cwd=False, mount_home=True, pass_env=True, read_only=False
            ),
        ),
        (
            '[security]\nprofile = "permissive"',
            {"mount_cwd": False},
            Policy(
                "permissive", network=True, mount_cwd=False, mount_home=True, pass_env=True, read_only=False
            ),
        ),
    ],
)
def test_resolve_policy(tmp_path: Path, text: str, flags: dict[str, object], expected: Policy) -> None:
    assert resolve_policy(config_of(text, tmp_path), **flags) == expected  # type: ignore[arg-type]


def test_resolve_policy_carries_the_domains(tmp_path: Path) -> None:
    config = config_of('[security.domains]\nallow = ["*.pypi.org"]\nallowlist_only = true', tmp_path)
    policy = resolve_policy(config)
    assert policy.domains.allow == ("*.pypi.org",)
    assert policy.domains.allowlist_only is True


def test_resolve_policy_rejects_an_unknown_profile() -> None:
    with pytest.raises(AgentkernelError) as info:
        resolve_policy(Config(), profile="paranoid")
    assert str(info.value) == "unknown security profile 'paranoid': use permissive, moderate or restrictive"


def test_models_are_frozen() -> None:
    config = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.security.profile = "permissive"


# Every key of agentkernel.toml and the function that reads it: the file promises that nothing in it
# is silently ignored, so a key is either read (here) or refused (config.REMOVED).
READERS = {
    "sandbox.name": "agentkernel.cli.sandbox_cmds:create",
    "sandbox.base_image": "agentkernel.service.sandboxes:choose_image",
    "sandbox.backend": "agentkernel.service.request:resolve",
    "agent.preferred": "agentkernel.cli.agent_cmds:run",
    "resources.vcpus": "agentkernel.config:resolve_resources",
    "resources.memory_mb": "agentkernel.config:resolve_resources",
    "resources.disk_mb": "agentkernel.service.request:resolve",
    "resources.min_free_disk_mb": "agentkernel.service.diskspace:floor_mb",
    "security.profile": "agentkernel.config:resolve_policy",
    "security.network": "agentkernel.config:resolve_policy",
    "security.mount_cwd": "agentkernel.config:resolve_policy",
    "security.mount_home": "agentkernel.config:resolve_policy",
    "security.pass_env": "agentkernel.config:resolve_policy",
    "security.read_only": "agentkernel.config:resolve_policy",
    "security.ports": "agentkernel.service.ports:check_allowed",
    "security.domains": "agentkernel.config:resolve_policy",
    "security.domains.allow": "agentkernel.service.sandboxes:spec_of",
    "security.domains.block": "agentkernel.service.sandboxes:spec_of",
    "security.domains.allowlist_only": "agentkernel.service.sandboxes:spec_of",
    "secrets.NAME.from_env": "agentkernel.network.brokering:_from_declaration",
    "secrets.NAME.from_file": "agentkernel.network.brokering:_from_declaration",
    "secrets.NAME.hosts": "agentkernel.network.brokering:_from_declaration",
    "secrets.NAME.in_url": "agentkernel.network.brokering:_from_declaration",
    "secrets.NAME.in_body": "agentkernel.network.brokering:_from_declaration",
    "secrets.NAME.upstream_ca": "agentkernel.network.brokering:_from_declaration",
    "pool.images": "agentkernel.pool.kinds:targets",
    "pool.size": "agentkernel.pool.kinds:targets",
    "pool.sizes": "agentkernel.pool.kinds:targets",
    "pool.parallel": "agentkernel.pool.kinds:plan",
}


def config_keys(cls: type, prefix: str = "") -> list[str]:
    """Every key a file can set, as dotted paths: each field of each section (tables in tables too,
    a table of tables like [secrets.NAME] with NAME standing for its names)."""
    keys = []
    hints = typing.get_type_hints(cls, include_extras=True)
    for field in dataclasses.fields(cls):
        key, hint = prefix + field.name, hints[field.name]
        if typing.get_origin(hint) is dict and dataclasses.is_dataclass(typing.get_args(hint)[1]):
            keys += config_keys(typing.get_args(hint)[1], f"{key}.NAME.")
        elif dataclasses.is_dataclass(hint):
            keys += ([key] if prefix else []) + config_keys(hint, f"{key}.")
        else:
            keys.append(key)
    return keys


def test_every_key_is_read_or_refused() -> None:
    keys = config_keys(Config)
    assert set(keys) == set(READERS), "a key without a reader: read it (and add it here) or refuse it"
    for key, reader in READERS.items():
        module, function = reader.split(":")
        source = inspect.getsource(getattr(importlib.import_module(module), function))
        assert re.search(rf"\.{key.rsplit('.', 1)[1]}\b", source), f"{reader} does not read {key}"
    removed = {f"{section}.{key}" for section, key in REMOVED}
    assert removed == {"network.vsock_cid"}
    assert not removed & set(keys)


@pytest.mark.parametrize(("section", "key"), list(REMOVED))
def test_every_removed_key_is_refused_by_name(in_tmp: Path, section: str, key: str) -> None:
    with pytest.raises(AgentkernelError) as info:
        load_config(write(in_tmp, f"[{section}]\n{key} = 1\n"))
    assert (
        str(info.value) == f"agentkernel.toml: {section}.{key}: no longer supported: {REMOVED[section, key]}"
    )


@pytest.mark.parametrize(
    ("text", "flags", "defaults", "expected"),
    [
        ("", {}, None, (1, 512)),
        ("", {}, (2, 2048), (2, 2048)),  # an agent's defaults
        ("[resources]\nvcpus = 4", {}, (2, 2048), (4, 2048)),
        ("[resources]\nvcpus = 4\nmemory_mb = 1024", {"vcpus": 3}, (2, 2048), (3, 1024)),
        ("[resources]\nmemory_mb = 1024", {"memory_mb": 4096}, None, (1, 4096)),
    ],
)
def test_resolve_resources(
    tmp_path: Path,
    text: str,
    flags: dict[str, int],
    defaults: tuple[int, int] | None,
    expected: tuple[int, int],
) -> None:
    given: dict[str, int | None] = {"vcpus": None, "memory_mb": None, **flags}
    config = config_of(text, tmp_path)
    if defaults is None:
        assert resolve_resources(config, **given) == expected
    else:
        assert resolve_resources(config, **given, defaults=defaults) == expected


@pytest.mark.parametrize(("key", "bounds"), [("vcpus", VCPUS_RANGE), ("memory_mb", MEMORY_MB_RANGE)])
def test_file_bounds_are_the_ranges(in_tmp: Path, key: str, bounds: tuple[int, int]) -> None:
    low, high = bounds
    for value in (low, high):
        config, _ = load_config(write(in_tmp, f"[resources]\n{key} = {value}"))
        assert getattr(config.resources, key) == value
    for value, reason in ((low - 1, f"at least {low}"), (high + 1, f"at most {high}")):
        with pytest.raises(AgentkernelError, match=rf"resources\.{key}: must be {reason} "):
            load_config(write(in_tmp, f"[resources]\n{key} = {value}"))

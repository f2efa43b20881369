"""Building ext4 images: the base recipe from busybox-static, caching by recipe key, directories."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agentkernel import paths
from agentkernel.errors import AgentkernelError, CorruptImageError
from agentkernel.images import store
from agentkernel.images.make import build_from_dir, build_recipe, ensure_recipes
from agentkernel.images.recipes import RECIPES, get_recipe, recipe_key
from tests.images.ext4_tools import cat, debugfs, is_clean, stat


def test_base_image_content(agent: Path, log: Path) -> None:
    image = build_recipe("base", agent, log=log)
    assert image.source == "recipe:base" and image.recipe_key == recipe_key(RECIPES["base"], agent)
    assert is_clean(image.path)

    bin_listing = debugfs(image.path, "ls -l /bin")
    assert " busybox" in bin_listing and " sh" in bin_listing
    assert stat(image.path, "/bin/busybox")["mode"] == "755"
    assert stat(image.path, "/bin/sh") | {"mode": ""} == {
        "type": "symlink", "mode": "", "uid": "0", "gid": "0", "target": "/bin/busybox",
    }  # fmt: skip
    agent_stat = stat(image.path, "/sbin/agentkernel-agent")
    assert (agent_stat["type"], agent_stat["mode"], agent_stat["uid"]) == ("regular", "755", "0")
    assert cat(image.path, "/sbin/agentkernel-agent") == agent.read_bytes()
    for mount_point in ("/proc", "/sys", "/dev", "/run", "/workspace", "/etc"):
        assert stat(image.path, mount_point)["type"] == "directory", mount_point
    assert stat(image.path, "/tmp")["mode"] == "1777"
    assert cat(image.path, "/etc/passwd").startswith(b"root:x:0:0:")

    size = image.path.stat()
    assert size.st_size == image.size_bytes >= 256 << 20  # headroom for the guest's writes
    assert size.st_blocks * 512 < 16 << 20  # sparse: a few MB of busybox, not the headroom


def test_ensure_recipes_skips_cached_and_rebuilds_corrupted(agent: Path, log: Path) -> None:
    (first,) = ensure_recipes(["base"], agent, log=log)
    (again,) = ensure_recipes(["base"], agent, log=log)
    assert again == first  # same created_at: not rebuilt

    os.chmod(first.path, 0o644)
    with first.path.open("r+b") as f:
        f.seek(1024 + 100)  # inside the superblock
        f.write(b"\xff" * 8)
    with pytest.raises(CorruptImageError):
        store.verify("base")
    (rebuilt,) = ensure_recipes(["base"], agent, log=log)
    assert rebuilt.created_at > first.created_at
    assert store.verify("base") == rebuilt


def test_a_new_agent_changes_the_key(agent: Path, log: Path, tmp_path: Path) -> None:
    (first,) = ensure_recipes(["base"], agent, log=log)
    other = tmp_path / "agent2"
    other.write_bytes(agent.read_bytes() + b"\0")
    other.chmod(0o755)
    (second,) = ensure_recipes(["base"], other, log=log)
    assert second.recipe_key != first.recipe_key and second.digest != first.digest
    assert not first.path.exists()  # nothing else named it


def test_unknown_recipe_fails_before_building(agent: Path, log: Path) -> None:
    with pytest.raises(AgentkernelError, match="no recipe named nope: the recipes are base, python"):
        ensure_recipes(["base", "nope"], agent, log=log)
    assert store.list_images() == []


def test_recipe_keys_cover_their_definition(agent: Path) -> None:
    keys = {recipe_key(recipe, agent) for recipe in RECIPES.values()}
    assert len(keys) == len(RECIPES)
    assert recipe_key(get_recipe("python"), agent) == recipe_key(get_recipe("python"), agent)


def test_build_from_dir_copies_and_keeps_writes_inside(agent: Path, log: Path, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "app").mkdir(parents=True)
    (tree / "app/main.sh").write_text("echo hi\n")
    os.chown(tree / "app/main.sh", 1234, 5678)
    (tree / "app/main.sh").chmod(0o4750)
    os.link(tree / "app/main.sh", tree / "app/hard")
    outside = tmp_path / "outside"
    (tree / "sbin").symlink_to(outside)  # the agent must land in the image's /tmp/.../outside
    (tree / "workspace").symlink_to("/app")

    image = build_from_dir(tree, "mine:1", agent, log=log)
    assert not outside.exists()
    assert sorted(p.name for p in tree.iterdir()) == ["app", "sbin", "workspace"]  # source untouched
    assert image.source == f"dir:{tree}"
    main = stat(image.path, "/app/main.sh")
    assert (main["mode"], main["uid"], main["gid"]) == ("4750", "1234", "5678")
    assert "Links: 2" in debugfs(image.path, "stat /app/hard")
    assert cat(image.path, f"{outside}/agentkernel-agent") == agent.read_bytes()
    assert stat(image.path, "/workspace")["type"] == "symlink"
    assert os.listdir(paths.tmp_dir()) == []


def test_build_from_dir_errors(agent: Path, log: Path, tmp_path: Path) -> None:
    with pytest.raises(AgentkernelError, match="is not a directory"):
        build_from_dir(tmp_path / "missing", "x", agent, log=log)
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "proc").write_text("not a dir")
    with pytest.raises(AgentkernelError, match="the image's /proc is not a directory"):
        build_from_dir(tree, "x", agent, log=log)
    with pytest.raises(AgentkernelError, match=r"guest agent binary .* does not exist"):
        build_from_dir(tree, "x", tmp_path / "no-agent", log=log)
    assert os.listdir(paths.tmp_dir()) == []
    assert store.list_images() == []

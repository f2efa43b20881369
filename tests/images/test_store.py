"""The image store: add, get, list, verify, remove; names; corruption; nothing left half-made."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from agentkernel import paths
from agentkernel.errors import AgentkernelError, CorruptImageError
from agentkernel.images import store
from agentkernel.images.model import ImageConfig


def make_file(content: bytes) -> Path:
    """A stand-in for a built ext4 file, made where builds make them (store.add moves it)."""
    path = paths.tmp_dir() / f"made-{len(os.listdir(paths.tmp_dir()))}.ext4"
    path.write_bytes(content)
    return path


def test_add_get_list(home: Path) -> None:
    config = ImageConfig(env=("A=1",), workdir="/w", cmd=("sh",))
    image = store.add(make_file(b"one"), "myimg:latest", source="dir:/x", recipe_key="k", config=config)
    assert image.name == "myimg:latest"
    assert image.path.read_bytes() == b"one"
    assert image.path == home / "images" / image.digest / "rootfs.ext4"
    assert (image.size_bytes, image.source, image.recipe_key, image.config) == (3, "dir:/x", "k", config)
    assert store.get("myimg:latest") == image
    assert [i.name for i in store.list_images()] == ["myimg:latest"]
    for path in (image.path, image.path.with_name("image.json")):
        assert stat.S_IMODE(path.stat().st_mode) == 0o400
    assert os.listdir(paths.tmp_dir()) == []


def test_unknown_name() -> None:
    with pytest.raises(AgentkernelError, match=r"no image named nope: run `agentkernel setup`"):
        store.get("nope")
    with pytest.raises(AgentkernelError, match="no image named nope"):
        store.remove("nope")


@pytest.mark.parametrize("name", ["../x", "/abs", "a//b", ".hidden", "a/../b", "", "a b", "x" * 256, "a/"])
def test_invalid_names(name: str) -> None:
    with pytest.raises(AgentkernelError, match="invalid image name"):
        store.add(make_file(b"x"), name, source="test")


def test_names_with_registries_and_tags() -> None:
    for name in ("python", "myimg:latest", "127.0.0.1:5000/team/app:1", "app@sha256:" + "a" * 64):
        assert store.add(make_file(name.encode()), name, source="test").name == name
    assert [i.name for i in store.list_images()] == sorted(
        ["python", "myimg:latest", "127.0.0.1:5000/team/app:1", "app@sha256:" + "a" * 64]
    )


def test_same_content_is_stored_once_and_removed_with_its_last_name() -> None:
    first = store.add(make_file(b"same"), "a", source="test")
    second = store.add(make_file(b"same"), "b", source="test")
    assert first.digest == second.digest and first.path == second.path
    store.remove("a")
    assert first.path.exists()
    assert [i.name for i in store.list_images()] == ["b"]
    store.remove("b")
    assert not first.path.parent.exists()
    assert store.list_images() == []


def test_a_name_moved_to_new_content_frees_the_old_image_unless_another_name_holds_it() -> None:
    old = store.add(make_file(b"v1"), "app", source="test")
    store.tag("app", "sandbox/1")
    new = store.add(make_file(b"v2"), "app", source="test")
    assert store.get("app").digest == new.digest != old.digest
    assert store.get("sandbox/1").path.read_bytes() == b"v1"
    store.add(make_file(b"v3"), "sandbox/1", source="test")
    assert not old.path.exists()
    with pytest.raises(AgentkernelError, match="no image named gone"):
        store.tag("gone", "x")


def test_verify_detects_corruption_and_add_repairs_it() -> None:
    image = store.add(make_file(b"good content"), "img", source="test")
    assert store.verify("img") == image
    os.chmod(image.path, 0o644)
    image.path.write_bytes(b"bad content!")
    with pytest.raises(CorruptImageError, match=r"image img is corrupted \(sha256 mismatch\)"):
        store.verify("img")
    store.add(make_file(b"good content"), "img", source="test")
    assert store.verify("img").path.read_bytes() == b"good content"


def test_missing_file_and_damaged_record() -> None:
    image = store.add(make_file(b"content"), "img", source="test")
    image.path.unlink()
    with pytest.raises(CorruptImageError, match="its file is missing"):
        store.verify("img")
    image.path.with_name("image.json").unlink()
    with pytest.raises(CorruptImageError, match="record is missing or unreadable"):
        store.get("img")
    assert store.list_images() == []  # left out, with a warning

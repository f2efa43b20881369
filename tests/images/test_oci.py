"""Unpacking hand-made OCI layouts: layer order, whiteouts, links, metadata and hostile members."""

from __future__ import annotations

import os
import stat
import uuid
from pathlib import Path

import pytest

from agentkernel.errors import AgentkernelError
from agentkernel.images import oci
from agentkernel.images.model import ImageConfig
from tests.images.oci_layouts import (
    Layout,
    Member,
    device,
    directory,
    fifo,
    file,
    for_platform,
    hardlink,
    symlink,
    tagged,
    tar,
)

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (ownership, device nodes)")


def unpack(tmp_path: Path, *layers: bytes, compress: bool = True) -> Path:
    layout = Layout(tmp_path / "layout")
    layout.save(layout.image(*layers, compress=compress))
    root = tmp_path / "root"
    oci.unpack(layout.path, root)
    return root


def listing(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


def test_layers_apply_in_order_with_whiteouts_and_opaque_dirs(tmp_path: Path) -> None:
    lower = tar(
        directory("a"),
        file("a/keep", b"keep"),
        file("a/gone", b"gone"),
        directory("a/sub"),
        file("a/sub/x", b"x"),
        directory("o"),
        file("o/old", b"old"),
        directory("o/olddir"),
        file("o/olddir/y", b"y"),
        file("top", b"top"),
        file("changed", b"v1"),
    )
    upper = tar(
        file("a/.wh.gone"),
        file("o/new", b"added before the opaque marker"),
        file("o/.wh..wh..opq"),
        directory("o/olddir"),  # declared again: its lower contents are hidden all the same
        file("o/olddir/fresh", b"fresh"),
        directory("o/newdir"),
        file("o/newdir/z", b"z"),
        file(".wh.top"),
        file("changed", b"v2"),
    )
    root = unpack(tmp_path, lower, upper)
    assert listing(root) == {
        "a", "a/keep", "a/sub", "a/sub/x",
        "o", "o/new", "o/olddir", "o/olddir/fresh", "o/newdir", "o/newdir/z",
        "changed",
    }  # fmt: skip
    assert (root / "changed").read_bytes() == b"v2"
    assert (root / "o/new").read_bytes() == b"added before the opaque marker"


def test_whiteout_of_a_directory_and_a_replaced_type(tmp_path: Path) -> None:
    lower = tar(directory("d"), file("d/f", b"f"), directory("was_dir"), file("was_dir/f"), file("was_file"))
    upper = tar(file(".wh.d"), file("was_dir", b"now a file"), directory("was_file"), file("was_file/in"))
    root = unpack(tmp_path, lower, upper, compress=False)
    assert listing(root) == {"was_dir", "was_file", "was_file/in"}
    assert (root / "was_dir").read_bytes() == b"now a file"


def test_whiteout_spares_entries_of_its_own_layer(tmp_path: Path) -> None:
    root = unpack(tmp_path, tar(file("x", b"lower")), tar(file("x", b"upper"), file(".wh.x")))
    assert (root / "x").read_bytes() == b"upper"


@as_root
def test_links_metadata_and_special_files(tmp_path: Path) -> None:
    layer = tar(
        directory("bin"),
        file("bin/tool", b"#!/bin/sh\n", mode=0o4755, uid=1000, gid=1001),
        hardlink("bin/tool2", "bin/tool"),
        symlink("bin/sh", "tool"),
        symlink("abs", "/bin/tool"),
        directory("dev"),
        device("dev/null", 1, 3),
        fifo("pipe"),
    )
    root = unpack(tmp_path, layer)
    tool = (root / "bin/tool").stat()
    assert stat.S_IMODE(tool.st_mode) == 0o4755
    assert (tool.st_uid, tool.st_gid) == (1000, 1001)
    assert (root / "bin/tool2").stat().st_ino == tool.st_ino
    assert os.readlink(root / "bin/sh") == "tool"
    assert os.readlink(root / "abs") == "/bin/tool"
    null = (root / "dev/null").lstat()
    assert stat.S_ISCHR(null.st_mode) and os.major(null.st_rdev) == 1 and os.minor(null.st_rdev) == 3
    assert stat.S_ISFIFO((root / "pipe").lstat().st_mode)


def test_hardlink_to_a_lower_layer_file(tmp_path: Path) -> None:
    root = unpack(tmp_path, tar(file("f", b"data")), tar(hardlink("g", "f")))
    assert (root / "g").stat().st_ino == (root / "f").stat().st_ino


@pytest.mark.parametrize(
    "member",
    [
        file("../escape", b"x"),
        file("a/../../escape", b"x"),
        file("/abs", b"x"),
        hardlink("link", "../../etc/passwd"),
        hardlink("link", "/etc/passwd"),
        file("dir/.wh..."),
    ],
    ids=["dotdot", "nested-dotdot", "absolute", "hardlink-dotdot", "hardlink-absolute", "whiteout-dotdot"],
)
def test_hostile_members_are_refused(tmp_path: Path, member: Member) -> None:
    with pytest.raises(AgentkernelError, match="refusing"):
        unpack(tmp_path, tar(directory("dir"), member))
    assert not (tmp_path / "escape").exists()


def test_symlinks_in_paths_resolve_inside_the_root(tmp_path: Path) -> None:
    outside = tmp_path / f"outside-{uuid.uuid4().hex}"
    layer = tar(
        symlink("abs", str(outside)),
        file("abs/pwned", b"x"),
        symlink("up", "../../../../../.."),
        directory("up/tmp"),
        file("up/tmp/pwned", b"x"),
    )
    lower_then = tar(directory("etc"), symlink("etc/passwd", "/etc/shadow"), hardlink("hl", "etc/passwd"))
    root = unpack(tmp_path, layer, lower_then)
    assert not outside.exists()
    assert (root / outside.relative_to("/") / "pwned").read_bytes() == b"x"
    assert (root / "tmp/pwned").is_file()
    assert os.readlink(root / "hl") == "/etc/shadow"  # the hardlink links the symlink, not its target


def test_symlink_loop_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(AgentkernelError, match="too many levels"):
        unpack(tmp_path, tar(symlink("loop", "loop"), file("loop/x")))


def test_config_platform_and_tag_selection(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "layout")
    config = {
        "Env": ["PATH=/usr/bin", "A=1"],
        "WorkingDir": "/app",
        "Entrypoint": ["/bin/sh"],
        "Cmd": ["-c", "x"],
    }
    amd64 = layout.image(tar(file("which", b"amd64")), config=config)
    arm64 = layout.image(tar(file("which", b"arm64")))
    other = layout.image(tar(file("which", b"other")))
    index = layout.nested_index(for_platform(arm64, "linux", "arm64"), for_platform(amd64, "linux", "amd64"))
    layout.save(tagged(index, "multi"), tagged(other, "other"))

    got = oci.unpack(layout.path, tmp_path / "multi", tag="multi")
    assert (tmp_path / "multi/which").read_bytes() == b"amd64"
    assert got == ImageConfig(
        env=("PATH=/usr/bin", "A=1"), workdir="/app", entrypoint=("/bin/sh",), cmd=("-c", "x")
    )
    assert oci.unpack(layout.path, tmp_path / "other", tag="other") == ImageConfig()
    assert (tmp_path / "other/which").read_bytes() == b"other"
    with pytest.raises(AgentkernelError, match=r"no image tagged 'nope' \(tags: multi, other\)"):
        oci.unpack(layout.path, tmp_path / "nope", tag="nope")
    with pytest.raises(AgentkernelError, match="no image for linux/amd64"):
        oci.unpack(layout.path, tmp_path / "untagged")


def test_a_corrupted_layer_is_detected(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "layout")
    layout.save(layout.image(tar(file("f", b"a" * 10000)), compress=False))
    blob = max((layout.path / "blobs/sha256").iterdir(), key=lambda p: p.stat().st_size)
    data = bytearray(blob.read_bytes())
    data[600] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(AgentkernelError, match="does not match its digest"):
        oci.unpack(layout.path, tmp_path / "root")


def test_not_a_layout(tmp_path: Path) -> None:
    with pytest.raises(AgentkernelError, match="not an OCI image layout"):
        oci.unpack(tmp_path, tmp_path / "root")

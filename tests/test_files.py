"""Atomic writes: all or nothing, and readable by others like any normally written file."""

import os
from pathlib import Path

from vaelab.files import replace_dir, staging_dir, write_text_atomic


def test_atomic_writes_keep_the_usual_permissions(tmp_path: Path):
    mask = os.umask(0o022)
    try:
        assert write_text_atomic(tmp_path / "a.yaml", "x").stat().st_mode & 0o777 == 0o644
        assert staging_dir(tmp_path / "latest").stat().st_mode & 0o777 == 0o755
    finally:
        os.umask(mask)


def test_replace_dir_swaps_the_whole_folder(tmp_path: Path):
    target = tmp_path / "latest"
    target.mkdir()
    (target / "old.ckpt").write_text("old")
    new = staging_dir(target)
    (new / "model.ckpt").write_text("new")
    replace_dir(new, target)
    assert sorted(p.name for p in target.iterdir()) == ["model.ckpt"]
    assert [p.name for p in tmp_path.iterdir()] == ["latest"]  # no staging or .old folders left behind

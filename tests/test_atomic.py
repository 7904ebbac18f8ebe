"""`--overwrite` replaces only what taskprune wrote; outputs get the user's umask."""

import os
import stat

import pytest

from taskprune.atomic import OutputExistsError, atomic_dir, check_replaceable


def test_missing_and_empty_paths_are_replaceable(tmp_path):
    check_replaceable(tmp_path / "nothing", "checkpoint", overwrite=False)
    (tmp_path / "empty").mkdir()
    check_replaceable(tmp_path / "empty", "checkpoint")
    with pytest.raises(OutputExistsError, match="pass --overwrite"):
        check_replaceable(tmp_path / "empty", "checkpoint", overwrite=False)


def test_only_directories_with_the_marker_are_replaced(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "pruning.json").write_text("{}")
    check_replaceable(mine, "checkpoint")
    with pytest.raises(OutputExistsError, match="without profile.json"):
        check_replaceable(mine, "profile")
    other = tmp_path / "other"
    other.mkdir()
    (other / "thesis.tex").write_text("years of work")
    with pytest.raises(OutputExistsError, match=f"{other} is a directory without pruning.json"):
        check_replaceable(other, "checkpoint")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputExistsError, match="is a file"):
        check_replaceable(tmp_path / "file", "checkpoint")
    os.symlink(mine, tmp_path / "link")
    with pytest.raises(OutputExistsError, match="symbolic link"):
        check_replaceable(tmp_path / "link", "checkpoint")
    study = tmp_path / "study"
    study.mkdir()
    (study / "config.yaml").write_text("name: x\n")
    with pytest.raises(OutputExistsError, match="config.yaml \\+ results.sqlite"):
        check_replaceable(study, "study")
    (study / "results.sqlite").write_text("")
    check_replaceable(study, "study")


def test_atomic_dir_replaces_and_refuses(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out, kind="checkpoint") as tmp:
        (tmp / "pruning.json").write_text("1")
    with atomic_dir(out, overwrite=True, kind="checkpoint") as tmp:
        (tmp / "pruning.json").write_text("2")
    assert (out / "pruning.json").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary or old copies left
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("keep")
    with pytest.raises(OutputExistsError):
        with atomic_dir(other, overwrite=True, kind="checkpoint") as tmp:
            raise AssertionError("never reached")
    assert (other / "keep.txt").read_text() == "keep"
    with pytest.raises(RuntimeError):
        with atomic_dir(out, overwrite=True, kind="checkpoint") as tmp:
            (tmp / "pruning.json").write_text("3")
            raise RuntimeError("failure while writing")
    assert (out / "pruning.json").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "out"]


def test_output_directory_gets_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        with atomic_dir(tmp_path / "out", kind="profile") as tmp:
            (tmp / "profile.json").write_text("{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o750

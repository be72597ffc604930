"""Atomic writes: a crash between write and rename leaves the old file whole."""


def test_atomic_write_leaves_the_old_file_whole_when_it_fails(tmp_path, monkeypatch):
    import os

    import pytest

    from ray_cartridges.fsutil import write_text_atomic

    path = tmp_path / "sub" / "eval.json"
    write_text_atomic(path, "old")
    assert path.read_text() == "old"

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        write_text_atomic(path, "new")
    assert path.read_text() == "old"  # never half of the new one
    assert [p.name for p in path.parent.iterdir()] == ["eval.json"]  # no temporary file left behind
    monkeypatch.undo()
    write_text_atomic(path, "new")
    assert path.read_text() == "new"

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


def test_a_stream_that_fails_halfway_leaves_the_old_file_and_no_temporary(tmp_path):
    import pytest

    from ray_cartridges.fsutil import atomic_writer, write_text_atomic

    path = tmp_path / "dataset.jsonl"
    write_text_atomic(path, "old\n")
    with pytest.raises(ValueError, match="bad record"):
        with atomic_writer(path) as fh:
            fh.write("new line 1\n")
            raise ValueError("bad record")
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["dataset.jsonl"]
    with atomic_writer(path) as fh:
        fh.write("a\n")
        fh.write("b\n")
    assert path.read_text() == "a\nb\n"

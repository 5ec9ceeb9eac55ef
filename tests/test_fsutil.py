"""Atomic file and directory writes: a failure keeps what was there, success replaces it whole."""
import json
import os

import pytest

from moelab.fsutil import atomic_directory, pid_alive, write_json_atomic, write_text_atomic


def test_write_text_and_json_replace_whole_files(tmp_path):
    p = tmp_path / "a.json"
    write_text_atomic(p, "old")
    write_json_atomic(p, {"x": 1})
    assert json.loads(p.read_text()) == {"x": 1} and p.read_text().endswith("\n")
    assert sorted(f.name for f in tmp_path.iterdir()) == ["a.json"]


def test_atomic_directory_replaces_the_old_one(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "stale.txt").write_text("from an older write")
    with atomic_directory(final) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".tmp-out-") and tmp != final
        (tmp / "new.txt").write_text("new")
        assert (final / "stale.txt").is_file()  # nothing visible until the block ends
    assert sorted(f.name for f in final.iterdir()) == ["new.txt"]
    assert sorted(f.name for f in tmp_path.iterdir()) == ["out"]


def test_atomic_directory_failure_keeps_the_old_one(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "kept.txt").write_text("kept")
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(final) as tmp:
            (tmp / "half.txt").write_text("half")
            raise KeyboardInterrupt
    assert sorted(f.name for f in final.iterdir()) == ["kept.txt"]
    assert sorted(f.name for f in tmp_path.iterdir()) == ["out"]


def test_atomic_directory_creates_parents(tmp_path):
    with atomic_directory(tmp_path / "a" / "b") as tmp:
        (tmp / "f").write_text("x")
    assert (tmp_path / "a" / "b" / "f").read_text() == "x"


def test_pid_alive():
    assert pid_alive(os.getpid())

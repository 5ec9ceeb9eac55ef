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


def test_run_lock_is_exclusive_and_released_with_its_holder(tmp_path):
    import subprocess
    import sys

    from moelab.errors import MoelabError
    from moelab.fsutil import RunLock

    with RunLock(tmp_path):
        with pytest.raises(MoelabError, match="another moelab process is using this run"):
            RunLock(tmp_path).acquire()
        # another process is refused too (flock is per open file, across processes)
        code = ("import sys; from moelab.fsutil import RunLock\n"
                "try:\n    RunLock(sys.argv[1]).acquire()\nexcept Exception as e:\n"
                "    print(e); sys.exit(3)\n")
        p = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                           text=True)
        assert p.returncode == 3 and "another moelab process" in p.stdout
    RunLock(tmp_path).acquire().release()  # free again once released
    assert (tmp_path / ".lock").read_bytes() == b""  # taking it writes nothing


def test_check_writable_names_the_obstacle(tmp_path):
    from moelab.errors import MoelabError
    from moelab.fsutil import check_writable

    check_writable(tmp_path / "new" / "deeper")  # missing folders are fine: they can be made
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(MoelabError, match=f"is under {blocker}, which is a file"):
        check_writable(blocker / "run", "--out")
    with pytest.raises(MoelabError, match="is a file; expected a directory"):
        check_writable(blocker, "--out")

"""File-system helpers: atomic writes of files and directories, and telling a live writer's
temporary files from a dead one's."""
from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def pid_alive(pid: int) -> bool:
    """Whether a process still runs (used to tell a live writer's temp dir from a dead one's)."""
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_text_atomic(path: str | Path, text: str) -> None:
    """Replace `path` with `text` through a temporary file and a rename: a reader (or a crash)
    sees the old file or the new one, never half of it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves no half-written temporary behind
        raise


def write_json_atomic(path: str | Path, obj: dict) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


@contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield an empty temporary directory next to `final`; when the block ends without an
    exception its files are fsynced and it replaces `final` (a reader sees the old directory or
    the whole new one, never half of it); on any exception it is removed and `final` is kept."""
    final = Path(final)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        for f in tmp.iterdir():  # data on disk before the rename makes it visible
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class RunLock:
    """An exclusive lock on a directory, held by one process at a time (`fcntl.flock` on
    DIR/.lock). The kernel drops it when its holder dies, so a killed run never leaves a stale
    lock behind, and `--resume` after a crash just takes it again."""

    FILE = ".lock"

    def __init__(self, directory: str | Path, what: str = "run"):
        self.directory = Path(directory)
        self.what = what
        self._fh = None

    def acquire(self) -> "RunLock":
        from moelab.errors import MoelabError

        # the file stays empty: taking the lock changes nothing in the directory
        fh = open(self.directory / self.FILE, "a")
        try:
            import fcntl

            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # no fcntl (Windows): no lock, as before
            pass
        except BlockingIOError:
            fh.close()
            raise MoelabError(f"{self.directory}: another moelab process is using this "
                              f"{self.what} (it holds {self.directory / self.FILE}); wait for it "
                              "to finish or choose another directory") from None
        self._fh = fh
        return self

    def release(self) -> None:
        if self._fh is not None:
            self._fh.close()  # closing the descriptor releases the flock
            self._fh = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def check_writable(path: str | Path, what: str = "output directory") -> None:
    """MoelabError naming `path` when it (or, if it does not exist yet, the nearest existing
    folder above it) cannot take new files: a regular file in the way, a read-only file system
    or missing permission. Checked before work starts, so nothing is computed for nothing."""
    from moelab.errors import MoelabError

    path = Path(path).expanduser()
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        where = "is a file" if probe == path else f"is under {probe}, which is a file"
        raise MoelabError(f"{what} {path}: {where}; expected a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise MoelabError(f"{what} {path}: cannot write in {probe} ({_why_not_writable(probe)})")


def _why_not_writable(path: Path) -> str:
    try:
        st = os.statvfs(path)
        if st.f_flag & os.ST_RDONLY:
            return "read-only file system"
    except (OSError, AttributeError):
        pass
    return "permission denied"


def describe_os_error(e: OSError) -> str:
    """One line for a failed file operation: the path(s) and the cause."""
    where = e.filename if e.filename is not None else ""
    if getattr(e, "filename2", None):
        where = f"{where} -> {e.filename2}"
    cause = e.strerror or str(e)
    return f"{where}: {cause}" if where else cause

"""File-system helpers shared by the data pipeline and the checkpoint writer."""
from __future__ import annotations

import os


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

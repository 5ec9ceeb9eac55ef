import os

import pytest
import torch

if not torch.cuda.is_available():
    # The `triton` backend's kernels run in Triton's interpreter on CPU tensors. Set before any
    # test imports them: triton.jit reads it when it decorates a kernel.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _one_thread():
    """Engine tests run hundreds of tiny ops: one intra-op thread is faster for them and keeps
    them fast when other processes compete for the two cores (an OpenMP barrier then waits for a
    descheduled sibling thread on every op)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

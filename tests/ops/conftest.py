import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """Engine tests run hundreds of tiny ops: one intra-op thread is faster for them and keeps
    them fast when other processes compete for the two cores (an OpenMP barrier then waits for a
    descheduled sibling thread on every op)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

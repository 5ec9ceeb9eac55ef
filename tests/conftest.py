import os

import pytest
import torch

# Tests never touch a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
if not torch.cuda.is_available():
    # The `triton` engine backend runs in Triton's interpreter on CPU tensors (tests/ops). Set
    # here, before any test imports triton: triton reads it when it defines its own functions.
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Under `pytest -n 2` on 2 cores, two workers x 2 OpenMP threads oversubscribe the CPU and make
# spin-waiting thread pools tens of times slower: one intra-op thread per worker.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

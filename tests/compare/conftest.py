# The compare tests train on the same small prepared slice of the bundled corpus as the
# training tests (session-scoped), with one intra-op thread per test worker.
from train.conftest import TINY, _one_thread, tiny_data  # noqa: F401

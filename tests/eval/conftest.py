"""A tiny trained-looking run directory (random weights, a real BPE tokenizer) for eval tests."""
import os

import pytest
import torch

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")

from helpers import small_tokenizer, tiny  # noqa: E402

VOCAB = 300  # a byte-level BPE needs >= 257 entries


def make_run(run_dir, *sets, vocab=VOCAB, step=7):
    from moelab.model import MoELM
    from moelab.train.checkpoint import write_checkpoint

    cfg = tiny(f"model.vocab_size={vocab}", "train.seq_len=64", *sets)
    torch.manual_seed(0)
    model = MoELM(cfg.model)
    write_checkpoint(run_dir, step, model, cfg)
    small_tokenizer(run_dir, vocab)
    cfg.save(run_dir / "config.json")
    return model, cfg


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    make_run(run_dir)
    return run_dir


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine two
    threads per op can be ~30x slower than one (spinning on contended cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

"""A tiny trained-looking run directory (random weights, a real BPE tokenizer) for eval tests."""
import os

import pytest
import torch

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")

from helpers import tiny  # noqa: E402

VOCAB = 300  # a byte-level BPE needs >= 257 entries


def make_run(run_dir, *sets, vocab=VOCAB, step=7):
    from moelab.data.corpus import TEST_TITLES, load_default_corpus
    from moelab.data.tokenizer import train_bpe
    from moelab.model import MoELM
    from moelab.train.checkpoint import write_checkpoint

    cfg = tiny(f"model.vocab_size={vocab}", "train.seq_len=64", *sets)
    torch.manual_seed(0)
    model = MoELM(cfg.model)
    write_checkpoint(run_dir, step, model, cfg)
    docs = [d["text"][:20000] for d in load_default_corpus() if d["title"] in TEST_TITLES]
    train_bpe(docs, vocab).save(run_dir / "tokenizer.json")
    cfg.save(run_dir / "config.json")
    return model, cfg


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    make_run(run_dir)
    return run_dir


def register_test_moe() -> str:
    """A minimal routed FFN kind (top-k over linear experts) so routing reports can be tested
    without depending on the MoE layers being written elsewhere."""
    import torch.nn as nn

    from moelab.layers.routers import make_router
    from moelab.registry import FFN

    name = "eval_test_moe"
    if name in FFN:
        return name

    @FFN.register(name)
    class TestMoE(nn.Module):
        def __init__(self, cfg, layer_idx):
            super().__init__()
            f, d = cfg.ffn, cfg.d_model
            self.router = make_router(d, f.n_experts, f.top_k, cfg.router, name="ffn_router")
            self.w_EDD = nn.Parameter(torch.randn(f.n_experts, d, d) * 0.02)

        def forward(self, x_BTD, ctx):
            r = self.router(x_BTD, ctx)
            y_BTD = torch.zeros_like(x_BTD)
            for k in range(r.idx_BTK.shape[-1]):
                w_BTDD = self.w_EDD[r.idx_BTK[..., k]]
                y_BTD = y_BTD + r.weights_BTK[..., k, None] * torch.einsum(
                    "btd,btde->bte", x_BTD, w_BTDD)
            return y_BTD

    return name


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine two
    threads per op can be ~30x slower than one (spinning on contended cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

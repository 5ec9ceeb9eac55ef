"""Fixtures of the MoLE conversion tests (library and CLI): a tiny MoLE trained for 80 steps on
the training tests' prepared slice of the bundled corpus (`tiny_data`, session-scoped, shared
with tests/train and tests/compare), and its conversions into lookup tables."""
from __future__ import annotations

import pytest
import torch

from train.conftest import TINY, VOCAB, tiny_data  # noqa: F401  (tiny_data: a fixture)

# The training tests' tiny model (d 64, 2 layers, 2 heads, vocab 512, seq 64) with a MoLE FFN:
# shared expert 128 plus 4 routed experts of 128; no periodic eval/save (the tests convert the
# final checkpoint), a higher lr so that 80 steps learn enough for the perplexity comparison
# to mean something.
MOLE_SMALL = [*TINY, "model.ffn.expert_dim=128", "model.ffn.n_experts=4", "model.ffn.top_k=4",
              "train.warmup_steps=10", "train.lr=3e-3", "train.eval_every=0",
              "train.save_every=0"]
MOLE_STEPS = 80


def mole_config(*sets: str):
    from moelab.config import load_preset

    return load_preset("mole-tiny").with_overrides(MOLE_SMALL + list(sets))


@pytest.fixture(scope="session")
def mole_cfg():
    """mole_cfg(*extra_sets) -> Config of the small MoLE."""
    return mole_config


@pytest.fixture(scope="session")
def trained_run(tiny_data, tmp_path_factory):
    """A tiny MoLE trained briefly on real text (about 3 s on one core)."""
    from moelab.train.loop import train

    run = tmp_path_factory.mktemp("mole_run") / "run"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(mole_config(), data_dir=tiny_data, out_dir=run, steps=MOLE_STEPS, progress=False,
              tensorboard=False)
    finally:
        torch.set_num_threads(before)
    return run


@pytest.fixture(scope="session")
def converted(trained_run, tmp_path_factory):
    """converted(dtype) -> the trained run converted with that table dtype (once each)."""
    from moelab.export.mole_lut import convert_mole_lut

    root = tmp_path_factory.mktemp("mole_lut")
    done = {}

    def get(dtype):
        if dtype not in done:
            convert_mole_lut(trained_run, root / dtype, dtype=dtype)
            done[dtype] = root / dtype
        return done[dtype]

    return get

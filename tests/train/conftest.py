"""Fixtures of the training tests: a small slice of the bundled corpus prepared with a 512-token
BPE (session-scoped, about a second) and a tiny dense model config that trains at ~100 steps/s
on 2 CPU cores."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

# One val title (macbeth) and one test title (sonnets) of the bundled corpus's fixed split, plus
# train documents of several genres, each cut short so preparing stays fast.
TITLES = ("macbeth", "sonnets", "hamlet", "emma", "paradise lost (no introduction)", "mobydick",
          "King James Bible")
CHARS = 60_000
VOCAB = 512

TINY = [
    "model.d_model=64", "model.n_layers=2", "model.attention.n_heads=2", "model.ffn.d_ff=128",
    f"model.vocab_size={VOCAB}", "model.max_seq_len=64",
    "train.seq_len=64", "train.batch_size=8", "train.warmup_steps=20", "train.lr=2e-3",
    "train.eval_every=50", "train.eval_batches=4", "train.save_every=100",
]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    from moelab.data.corpus import load_default_corpus
    from moelab.data.prepare import prepare_data

    root = tmp_path_factory.mktemp("train_data")
    by_title = {d["title"]: d for d in load_default_corpus()}
    corpus = root / "slice.jsonl"
    with open(corpus, "w", encoding="utf-8") as f:
        for title in TITLES:
            f.write(json.dumps(dict(by_title[title], text=by_title[title]["text"][:CHARS])) + "\n")
    out = root / "data"
    prepare_data(str(corpus), f"bpe:{VOCAB}", out=out, progress=False)
    return out


def tiny_config(*sets: str):
    from moelab.config import load_preset

    return load_preset("dense-tiny").with_overrides(TINY + list(sets))


@pytest.fixture(scope="session")
def tiny_cfg():
    """tiny_cfg(*extra_sets) -> Config."""
    return tiny_config


def read_lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def metrics_of():
    """metrics_of(run_dir) -> (train lines by step, val lines by step)."""

    def split(run_dir):
        lines = read_lines(run_dir)
        train = {r["step"]: r for r in lines if "loss" in r}
        val = {r["step"]: r for r in lines if "val_loss" in r}
        assert len(train) + len(val) == len(lines), "duplicate steps in metrics.jsonl"
        return train, val

    return split


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: these models are tiny (a second thread gains ~20 %), and with
    `pytest -n 2` on 2 cores, two workers x 2 OpenMP threads oversubscribe the CPU, which makes
    spin-waiting thread pools tens of times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

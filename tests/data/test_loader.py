import numpy as np
import pytest
import torch

from moelab.data.loader import TokenLoader, iter_documents
from moelab.errors import DataError


@pytest.mark.parametrize("sampling", ["random", "packed"])
def test_shapes_and_shift(small_data, sampling):
    loader = TokenLoader(small_data[0], "train", batch_size=4, seq_len=32, seed=0,
                         sampling=sampling)
    x, y = loader.get_batch(0)
    assert x.shape == y.shape == (4, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one
    assert int(x.max()) < small_data[1]["vocab_size"]


@pytest.mark.parametrize("sampling", ["random", "packed"])
def test_deterministic_and_resumable(small_data, sampling):
    def make(seed=0):
        return TokenLoader(small_data[0], "train", 8, 16, seed=seed, sampling=sampling)

    a = make()
    batches = [a.get_batch(s) for s in range(6)]
    assert not torch.equal(batches[0][0], batches[1][0])  # different steps differ
    b = make()  # "resumed" at step 4: no iterator to replay
    for step in (4, 5, 2):
        assert all(torch.equal(u, v) for u, v in zip(b.get_batch(step), batches[step]))
    assert torch.equal(a.get_batch(3)[0], batches[3][0])  # repeatable on the same object
    assert not torch.equal(make(seed=1).get_batch(0)[0], batches[0][0])


def test_packed_covers_every_window_once_per_epoch(arange_data):
    seq_len, batch = 7, 12
    loader = TokenLoader(arange_data, "train", batch, seq_len, seed=3, sampling="packed")
    n_windows = loader.n_windows
    assert n_windows == (10_001 - 1) // seq_len
    steps = -(-3 * n_windows // batch)  # three epochs, the last batches straddle epochs
    firsts = np.concatenate([loader.get_batch(s)[0][:, 0].numpy() for s in range(steps)])
    assert np.all(firsts % seq_len == 0)  # windows are aligned and non-overlapping
    windows = firsts // seq_len
    for epoch in range(3):
        seen = windows[epoch * n_windows:(epoch + 1) * n_windows]
        assert sorted(seen.tolist()) == list(range(n_windows)), epoch
    assert not np.array_equal(windows[:n_windows], windows[n_windows:2 * n_windows])


@pytest.mark.parametrize("sampling", ["random", "packed"])
def test_ranks_split_the_global_batch(small_data, sampling):
    full = TokenLoader(small_data[0], "train", 8, 16, seed=5, sampling=sampling)
    for ws in (2, 4):
        parts = [TokenLoader(small_data[0], "train", 8, 16, seed=5, sampling=sampling,
                             rank=r, world_size=ws) for r in range(ws)]
        for step in (0, 7):
            xs = [p.get_batch(step)[0] for p in parts]
            assert all(x.shape == (8 // ws, 16) for x in xs)
            assert torch.equal(torch.cat(xs), full.get_batch(step)[0])
        evals = [p.eval_batches(2) for p in parts]
        for i, (x_full, _) in enumerate(full.eval_batches(2)):
            assert torch.equal(torch.cat([e[i][0] for e in evals]), x_full)


def test_random_windows_cover_the_split(arange_data):
    loader = TokenLoader(arange_data, "train", 64, 10, seed=0)
    starts = np.concatenate([loader.get_batch(s)[0][:, 0].numpy() for s in range(50)])
    assert starts.min() >= 0 and starts.max() <= 10_001 - 11
    assert len(np.unique(starts)) > 2000  # spread over the split, not a few offsets


def test_eval_batches_fixed_and_seed_independent(small_data):
    a = TokenLoader(small_data[0], "val", 4, 32, seed=0).eval_batches(3)
    b = TokenLoader(small_data[0], "val", 4, 32, seed=9, sampling="packed").eval_batches(3)
    assert len(a) == 3
    assert all(torch.equal(u[0], v[0]) and torch.equal(u[1], v[1]) for u, v in zip(a, b))
    firsts = torch.cat([x for x, _ in a])
    assert len({tuple(r.tolist()) for r in firsts}) == 12  # distinct windows


def test_iter_documents(small_data):
    data_dir, meta = small_data
    for split in ("train", "val", "test"):
        docs = list(iter_documents(data_dir, split))
        assert len(docs) == meta["documents"][split]
        assert sum(len(d) + 1 for d in docs) == meta["tokens"][split]  # + the EOS of each
        assert all(d.dtype == np.int64 and meta["eos_id"] not in d for d in docs)
    small_blocks = list(iter_documents(data_dir, "train", block_tokens=1000))
    assert all(np.array_equal(u, v) for u, v in zip(small_blocks, iter_documents(data_dir,
                                                                                  "train")))


def test_state_dict(small_data):
    loader = TokenLoader(small_data[0], "train", 4, 16, seed=1, sampling="packed")
    state = loader.state_dict()
    assert state["seed"] == 1 and state["sampling"] == "packed"
    TokenLoader(small_data[0], "train", 4, 16, seed=1, sampling="packed",
                rank=1, world_size=2).load_state_dict(state)  # world size may change
    with pytest.raises(DataError, match="seed=1 but this run has seed=2"):
        TokenLoader(small_data[0], "train", 4, 16, seed=2, sampling="packed").load_state_dict(
            state)
    with pytest.raises(DataError, match="sampling"):
        TokenLoader(small_data[0], "train", 4, 16, seed=1).load_state_dict(state)


def test_loader_errors(small_data, tmp_path):
    d = small_data[0]
    with pytest.raises(DataError, match="does not exist"):
        TokenLoader(tmp_path / "missing", "train", 4, 16)
    with pytest.raises(DataError, match="not divisible by world_size=3"):
        TokenLoader(d, "train", 4, 16, world_size=3)
    with pytest.raises(DataError, match="rank"):
        TokenLoader(d, "train", 4, 16, rank=2, world_size=2)
    with pytest.raises(DataError, match="sampling"):
        TokenLoader(d, "train", 4, 16, sampling="shuffled")
    with pytest.raises(DataError, match="expected at least seq_len"):
        TokenLoader(d, "val", 4, 10**7)
    with pytest.raises(DataError, match="step"):
        TokenLoader(d, "train", 4, 16).get_batch(-1)


def _write_v2(d, tokens, shard_tokens, vocab_size=1000):
    """A format-2 data dir whose train split is `tokens` cut into shards of `shard_tokens`."""
    from moelab.data.shards import SplitWriter, manifest_sha256, token_dtype, write_meta

    d.mkdir()
    dtype = token_dtype(vocab_size)
    w = SplitWriter(d, "train", dtype, 0, shard_tokens)
    w.write(tokens)
    shards = w.close()
    write_meta(d, {"format": "moelab-shards", "version": 2, "vocab_size": vocab_size,
                   "eos_id": 0, "dtype": dtype.name, "tokens": {"train": len(tokens)},
                   "documents": {"train": int((tokens == 0).sum())}, "shards": {"train": shards},
                   "sha256": {"train": manifest_sha256(shards)},
                   "files": {"train": [s["file"] for s in shards]}})
    return shards


def test_loader_over_three_shards_equals_one(tmp_path):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 1000, size=9_000)
    tokens[rng.random(9_000) < 0.01] = 0  # document ends
    assert len(_write_v2(tmp_path / "three", tokens, 3_100)) == 3
    assert len(_write_v2(tmp_path / "one", tokens, 10_000)) == 1
    for sampling in ("random", "packed"):
        for ws in (1, 2):
            for rank in range(ws):
                a, b = (TokenLoader(tmp_path / n, "train", 8, 33, seed=1, sampling=sampling,
                                    rank=rank, world_size=ws) for n in ("three", "one"))
                for step in (0, 1, 17, 40):  # 40 * 8 * 33 tokens: past the first epoch
                    assert all(torch.equal(u, v) for u, v in zip(a.get_batch(step),
                                                                   b.get_batch(step)))
                for (xa, ya), (xb, yb) in zip(a.eval_batches(3), b.eval_batches(3)):
                    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    docs3 = [d.tolist() for d in iter_documents(tmp_path / "three", "train", block_tokens=1000)]
    docs1 = [d.tolist() for d in iter_documents(tmp_path / "one", "train")]
    assert docs3 == docs1 and sum(map(len, docs1)) + len(docs1) - 1 <= 9_000


def test_sharded_tokens_slices_and_gathers(tmp_path):
    from moelab.data.shards import open_shard

    tokens = np.arange(1, 1000) % 997 + 1
    _write_v2(tmp_path / "s", tokens, 100)
    view = open_shard(tmp_path / "s", "train")
    assert len(view) == len(tokens) and type(view).__name__ == "ShardedTokens"
    for a, b in [(0, 999), (95, 205), (100, 200), (299, 301), (998, 999), (5, 5)]:
        assert np.array_equal(view[a:b], tokens[a:b]), (a, b)
    idx = np.array([[0, 99, 100], [998, 500, 1]])
    assert np.array_equal(view[idx], tokens[idx])
    with pytest.raises(IndexError):
        view[np.array([999])]

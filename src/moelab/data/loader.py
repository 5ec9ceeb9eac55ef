"""Batches from token shards, a pure function of (seed, step).

`TokenLoader.get_batch(step)` keeps no iterator state: resuming a run at step k is calling
`get_batch(k)`. Both sampling modes first build the *global* batch of `batch_size` windows and then
hand rank r rows [r*b/ws, (r+1)*b/ws), so the data seen per step does not depend on world_size.

random: each row is a window starting at a uniform offset in the split; offsets come from a numpy
    Generator seeded by (seed, step) (ranks slice one global draw, see above).
packed: the split is cut into non-overlapping windows (window w holds inputs
    tokens[w*T : w*T+T] and targets shifted by one). Global sample g = step*batch_size + row lies
    in epoch g // n_windows at position g % n_windows of a permutation seeded by (seed, epoch),
    so every window is visited exactly once per epoch and a batch may straddle two epochs.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from moelab.data.shards import load_meta, open_shard
from moelab.errors import DataError

SAMPLING = ("random", "packed")
# Distinct first words of the seed sequences, so the random, packed and eval streams never
# share a Generator state even for equal (seed, step).
_STREAM_RANDOM = 0x5EED_0001
_STREAM_PACKED = 0x5EED_0002


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise DataError(f"loader: {name}={value!r}; expected an integer > 0")
    return int(value)


class TokenLoader:
    """Deterministic (x_BT, y_BT) int64 batches from `{data_dir}/{split}.bin`."""

    def __init__(self, data_dir: str | os.PathLike, split: str, batch_size: int, seq_len: int,
                 seed: int = 0, sampling: str = "random", rank: int = 0,
                 world_size: int = 1) -> None:
        self.data_dir = Path(data_dir).expanduser()
        self.split = split
        self.batch_size = _positive_int("batch_size", batch_size)
        self.seq_len = _positive_int("seq_len", seq_len)
        self.world_size = _positive_int("world_size", world_size)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise DataError(f"loader: seed={seed!r}; expected an integer >= 0")
        self.seed = int(seed)
        if sampling not in SAMPLING:
            raise DataError(f"loader: sampling={sampling!r}; expected one of {SAMPLING}")
        self.sampling = sampling
        if not isinstance(rank, (int, np.integer)) or not 0 <= rank < self.world_size:
            raise DataError(f"loader: rank={rank!r}; expected 0 <= rank < world_size="
                            f"{self.world_size}")
        self.rank = int(rank)
        if self.batch_size % self.world_size:
            raise DataError(f"loader: batch_size={self.batch_size} is not divisible by "
                            f"world_size={self.world_size}; expected a multiple")
        self.local_batch_size = self.batch_size // self.world_size
        self.meta = load_meta(self.data_dir)
        self.tokens_N = open_shard(self.data_dir, split, self.meta)
        n = len(self.tokens_N)
        if n < self.seq_len + 1:
            raise DataError(f"loader: split {split!r} of {self.data_dir} has {n} tokens; "
                            f"expected at least seq_len+1={self.seq_len + 1}")
        self.n_tokens = n
        # packed windows: inputs [w*T, w*T+T), targets one further, so the last token of the
        # split can only be a target
        self.n_windows = (n - 1) // self.seq_len
        self._perm_cache: dict[int, np.ndarray] = {}  # epoch -> permutation; a cache, not state
        self._arange_T1 = np.arange(self.seq_len + 1, dtype=np.int64)

    # ---------------------------------------------------------------------------- batches
    def get_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's rows of the global batch number `step` (any step >= 0, in any order)."""
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise DataError(f"loader: step={step!r}; expected an integer >= 0")
        if self.sampling == "random":
            starts_B = self._random_starts(int(step))
        else:
            starts_B = self._packed_windows(int(step)) * self.seq_len
        lo = self.rank * self.local_batch_size
        return self._gather(starts_B[lo:lo + self.local_batch_size])

    def _random_starts(self, step: int) -> np.ndarray:
        rng = np.random.default_rng([_STREAM_RANDOM, self.seed, step])
        # the largest start still leaves seq_len+1 tokens
        return rng.integers(0, self.n_tokens - self.seq_len, size=self.batch_size,
                            dtype=np.int64)

    def _packed_windows(self, step: int) -> np.ndarray:
        g_B = step * self.batch_size + np.arange(self.batch_size, dtype=np.int64)
        epoch_B, pos_B = np.divmod(g_B, self.n_windows)
        windows_B = np.empty(self.batch_size, dtype=np.int64)
        for epoch in np.unique(epoch_B):  # at most a few epochs per batch
            mask = epoch_B == epoch
            windows_B[mask] = self.permutation(int(epoch))[pos_B[mask]]
        return windows_B

    def permutation(self, epoch: int) -> np.ndarray:
        """The packed-mode window order of `epoch` (a pure function of (seed, epoch))."""
        perm = self._perm_cache.get(epoch)
        if perm is None:
            rng = np.random.default_rng([_STREAM_PACKED, self.seed, epoch])
            perm = rng.permutation(self.n_windows)
            if len(self._perm_cache) >= 4:  # bounded: batches only touch neighbouring epochs
                self._perm_cache.pop(next(iter(self._perm_cache)))
            self._perm_cache[epoch] = perm
        return perm

    def _gather(self, starts_B: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        idx_BT1 = starts_B[:, None] + self._arange_T1[None, :]
        chunk_BT1 = np.asarray(self.tokens_N[idx_BT1], dtype=np.int64)  # one fancy-index read
        # separate contiguous tensors: callers may .view(-1) the targets or edit inputs in place
        x_BT = torch.from_numpy(np.ascontiguousarray(chunk_BT1[:, :-1]))
        y_BT = torch.from_numpy(np.ascontiguousarray(chunk_BT1[:, 1:]))
        return x_BT, y_BT

    def steps_per_epoch(self) -> float:
        """Packed mode: global steps to see every window once (fractional if not a multiple)."""
        return self.n_windows / self.batch_size

    def eval_batches(self, n_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A fixed list of this rank's rows of `n_batches` global batches, for validation.

        Windows are packed-style (non-overlapping) windows spread evenly over the whole split,
        independent of seed and sampling, so runs with different seeds are scored on the same
        tokens. With more rows than windows the windows repeat in order.
        """
        n_batches = _positive_int("n_batches", n_batches)
        rows = n_batches * self.batch_size
        if rows <= self.n_windows:
            windows_R = (np.arange(rows, dtype=np.int64) * self.n_windows) // rows
        else:
            windows_R = np.arange(rows, dtype=np.int64) % self.n_windows
        windows_NB = windows_R.reshape(n_batches, self.batch_size)
        lo = self.rank * self.local_batch_size
        return [self._gather(w_B[lo:lo + self.local_batch_size] * self.seq_len)
                for w_B in windows_NB]

    # ---------------------------------------------------------------------------- resume
    def state_dict(self) -> dict:
        """The settings that fix the batch sequence; store it in checkpoints."""
        return {"split": self.split, "seed": self.seed, "sampling": self.sampling,
                "batch_size": self.batch_size, "seq_len": self.seq_len,
                "n_tokens": self.n_tokens, "shard_sha256": self.meta["sha256"].get(self.split)}

    def load_state_dict(self, state: dict) -> None:
        """Check that a checkpoint's loader settings match this loader (raise DataError if not).

        There is no position to restore: call get_batch(step) with the checkpoint's next step.
        """
        mine = self.state_dict()
        for key, value in state.items():
            if key in mine and mine[key] != value:
                raise DataError(f"loader: checkpoint has {key}={value!r} but this run has "
                                f"{key}={mine[key]!r}; expected the same data settings to resume")

    def __repr__(self) -> str:
        return (f"TokenLoader({str(self.data_dir)!r}, split={self.split!r}, "
                f"batch_size={self.batch_size}, seq_len={self.seq_len}, seed={self.seed}, "
                f"sampling={self.sampling!r}, rank={self.rank}, world_size={self.world_size})")


def iter_documents(data_dir: str | os.PathLike, split: str,
                   block_tokens: int = 1 << 24) -> Iterator[np.ndarray]:
    """Yield each document of `split` as an int64 array of its tokens (EOS not included).

    The shard is scanned in blocks of `block_tokens`, so memory stays bounded for large splits.
    """
    meta = load_meta(data_dir)
    eos = meta["eos_id"]
    tokens_N = open_shard(data_dir, split, meta)
    n = len(tokens_N)
    doc_start = 0
    for block_start in range(0, n, block_tokens):
        block = np.asarray(tokens_N[block_start:block_start + block_tokens])
        for eos_pos in (np.flatnonzero(block == eos) + block_start).tolist():
            yield np.asarray(tokens_N[doc_start:eos_pos], dtype=np.int64)
            doc_start = eos_pos + 1
    if doc_start < n:  # a shard not ending in EOS (not written by moelab): keep the tail
        yield np.asarray(tokens_N[doc_start:n], dtype=np.int64)

"""Fakes with hand-set behaviour: a character tokenizer and a bigram LM whose next-token
probabilities are given explicitly, so expected log-probabilities can be written down."""
import math
from types import SimpleNamespace

import torch
import torch.nn as nn

from moelab.layers.base import KVCache

EOS, SPACE, V = 0, 27, 32


def tid(ch: str) -> int:
    return SPACE if ch == " " else ord(ch) - ord("a") + 1


class CharTok:
    """a..z -> 1..26, space -> 27, EOS 0; optional merge of a two-letter string into one id."""

    eos_id = EOS

    def __init__(self, merge: tuple[str, int] | None = None):
        self.merge = merge

    def encode(self, text):
        ids, i = [], 0
        while i < len(text):
            if self.merge and text.startswith(self.merge[0], i):
                ids.append(self.merge[1])
                i += len(self.merge[0])
            else:
                ids.append(tid(text[i]))
                i += 1
        return ids

    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]

    def decode(self, ids):
        return "".join(" " if i == SPACE else chr(ord("a") + i - 1) for i in ids if 0 < i <= 27)


# next-token probabilities of the bigram model (unlisted tokens get ~0, unlisted rows uniform)
PROBS = {
    EOS: {"a": 0.9, "b": 0.1},
    "a": {"b": 0.3, "c": 0.7},
    "b": {" ": 0.6, "x": 0.4},
    " ": {"c": 0.2, "d": 0.7, "e": 0.1},
    "d": {"d": 0.1, "e": 0.9},
}


class Bigram(nn.Module):
    """logits[t] depend only on token t: a causal LM with hand-set log-probabilities."""

    def __init__(self, probs=None, max_seq_len=64):
        super().__init__()
        table = torch.zeros(V, V)
        for prev, row in (PROBS if probs is None else probs).items():
            p = tid(prev) if isinstance(prev, str) else prev
            table[p] = -60.0
            for ch, prob in row.items():
                table[p, tid(ch)] = math.log(prob)
        self.table = nn.Parameter(table, requires_grad=False)
        self.config = SimpleNamespace(max_seq_len=max_seq_len)
        self.calls = []

    def new_cache(self):
        return KVCache(1)

    def forward(self, idx_BT, cache=None):
        self.calls.append(tuple(idx_BT.shape))
        if cache is not None:
            cache.seq_len += idx_BT.shape[1]
        return SimpleNamespace(logits=self.table[idx_BT])

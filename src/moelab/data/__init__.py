"""Data pipeline: bundled corpus, readers, byte-level BPE, token shards and a deterministic loader.

Typical use::

    from moelab.data import prepare_data, TokenLoader
    prepare_data("default", "bpe:8192", out="data/default")
    loader = TokenLoader("data/default", "train", batch_size=16, seq_len=256, seed=0)
    x_BT, y_BT = loader.get_batch(step)

Names are imported lazily, so `import moelab.data` does not import torch or tokenizers.
"""
from importlib import import_module

_EXPORTS = {
    "load_default_corpus": "corpus", "split_documents": "corpus", "VAL_TITLES": "corpus",
    "TEST_TITLES": "corpus", "StreamSplit": "corpus", "read_corpus": "readers", "Corpus": "readers",
    "Tokenizer": "tokenizer", "train_bpe": "tokenizer", "load_tokenizer": "tokenizer",
    "token_dtype": "shards", "load_meta": "shards", "open_shard": "shards", "verify": "shards",
    "prepare_data": "prepare", "merge_parts": "merge", "ShardedTokens": "shards",
    "TokenLoader": "loader", "iter_documents": "loader",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f"moelab.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'moelab.data' has no attribute {name!r}")

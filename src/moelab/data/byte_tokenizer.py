"""A tokenizer-free fallback: UTF-8 bytes as ids 0..255, EOS = 256.

Used to sample from a model that has no trained tokenizer yet (an untrained preset); any model with
vocab_size >= 257 can run it.
"""
from __future__ import annotations


class ByteTokenizer:
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

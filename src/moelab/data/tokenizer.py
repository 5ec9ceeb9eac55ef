"""Byte-level BPE tokenizer (HF `tokenizers`) behind a small wrapper.

Byte-level means every UTF-8 byte is in the base vocabulary, so any text encodes and decoding
gives back exactly the input (no normalizer, no prefix space, no unknown token). The only special
token is `<|endoftext|>` (id 0), used as the end-of-document separator in shards. Literal
"<|endoftext|>" inside a document is encoded as ordinary bytes, so documents never contain the
EOS id and the shard can be split at EOS without ambiguity.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from moelab.errors import DataError

EOS_TOKEN = "<|endoftext|>"
# EOS candidates for tokenizers trained elsewhere, in order of preference.
_EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<eos>", "<|end_of_text|>", "[SEP]")
MIN_VOCAB = 257  # 256 bytes + EOS
# Characters per piece when a long document is cut for batched encoding (see split_for_encoding).
CHUNK_CHARS = 4096
# A safe cut point: one newline with a printable ASCII non-space character on both sides (see
# split_for_encoding). ASCII only, so Python's and the Rust regex's idea of "space" cannot differ.
_CUT_RE = re.compile(r"(?<=[!-~]\n)(?=[!-~])")


class Tokenizer:
    """Thin wrapper over `tokenizers.Tokenizer` with the API the rest of moelab uses."""

    def __init__(self, hf_tokenizer, eos_token: str | None = None, source: str = "") -> None:
        self.hf = hf_tokenizer
        self.source = source
        if eos_token is None:
            eos_token = next((t for t in _EOS_CANDIDATES if hf_tokenizer.token_to_id(t)
                              is not None), None)
            if eos_token is None:
                raise DataError(
                    f"tokenizer {source or '<in memory>'}: no end-of-text token; expected one of "
                    f"{', '.join(_EOS_CANDIDATES)} in its vocabulary"
                )
        eos_id = hf_tokenizer.token_to_id(eos_token)
        if eos_id is None:
            raise DataError(f"tokenizer {source or '<in memory>'}: eos token {eos_token!r} is not "
                            "in the vocabulary")
        self.eos_token = eos_token
        self.eos_id = int(eos_id)
        # Special-token text inside documents is data, not a separator (module docstring).
        self.hf.encode_special_tokens = True

    @property
    def vocab_size(self) -> int:
        return int(self.hf.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts in parallel (Rust threads); much faster than one joined string."""
        return [e.ids for e in self.hf.encode_batch(list(texts), add_special_tokens=False)]

    def encode_documents(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode whole documents, cutting long ones into pieces so all cores are used.

        The result is identical to `encode_batch(texts)` (see `split_for_encoding`).
        """
        pieces, owners = split_documents(texts)
        out: list[list[int]] = [[] for _ in texts]
        for owner, ids in zip(owners, self.encode_batch(pieces)):
            out[owner].extend(ids)
        return out

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.hf.save(str(path))

    def info(self) -> dict:
        """Small JSON-able description for meta.json."""
        model = type(self.hf.model).__name__
        return {"model": model, "vocab_size": self.vocab_size, "eos_token": self.eos_token,
                "eos_id": self.eos_id}

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def split_documents(texts: Sequence[str]) -> tuple[list[str], list[int]]:
    """Every document cut by `split_for_encoding`: the pieces in order, and for each piece the
    index of the document it came from."""
    pieces: list[str] = []
    owners: list[int] = []
    for i, text in enumerate(texts):
        parts = split_for_encoding(text)
        pieces.extend(parts)
        owners.extend([i] * len(parts))
    return pieces, owners


def split_for_encoding(text: str, chunk_chars: int = CHUNK_CHARS) -> list[str]:
    """Cut `text` into pieces of about `chunk_chars` whose encodings concatenate to its encoding.

    The byte-level pre-tokenizer regex never joins a newline with a non-space character, and a
    lone newline between two printable ASCII characters is a pre-token of its own both inside the text
    and at the end of a piece. BPE merges never cross pre-tokens, so cutting right after such a
    newline leaves the token stream unchanged. (Cutting after a blank line would not: "\\n\\n" at
    the end of a piece is one pre-token, inside the text it is two.) Text without such newlines
    stays in one piece.
    """
    if len(text) <= chunk_chars:
        return [text]
    pieces = []
    start = 0
    while len(text) - start > chunk_chars:
        m = _CUT_RE.search(text, start + chunk_chars)
        if m is None:
            break
        pieces.append(text[start:m.start()])
        start = m.start()
    pieces.append(text[start:])
    return pieces


def _iter_pieces(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        yield from split_for_encoding(text)


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2,
              show_progress: bool = False) -> Tokenizer:
    """Train a byte-level BPE with `vocab_size` entries (EOS included) on `texts`.

    The result can be smaller than `vocab_size` when the texts have too few distinct pairs.
    Training is deterministic for the same texts.
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB:
        raise DataError(f"tokenizer: vocab_size {vocab_size!r} is too small; expected an integer "
                        f">= {MIN_VOCAB} (256 bytes + end-of-text)")
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN],  # first, so it gets id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen or not
        show_progress=show_progress,
    )
    # pieces, not whole documents: word counting runs in parallel over the iterator's items
    hf.train_from_iterator(_iter_pieces(texts), trainer)
    return Tokenizer(hf, EOS_TOKEN, source=f"bpe:{vocab_size}")


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a `tokenizer.json` (or a directory holding one)."""
    from tokenizers import Tokenizer as HFTokenizer

    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise DataError(f"tokenizer: {p} does not exist; expected a tokenizer.json file or a "
                        "directory containing one")
    try:
        hf = HFTokenizer.from_file(str(p))
    except Exception as e:  # the Rust side raises a bare Exception for malformed JSON
        msg = " ".join(str(e).split())[:200]
        raise DataError(f"tokenizer: {p} is not a valid tokenizer.json ({msg})") from e
    return Tokenizer(hf, source=str(p))

"""Shared fixtures: a small prepared dataset (session-scoped) and synthetic shard directories."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from moelab.data.corpus import load_default_corpus
from moelab.data.shards import sha256_file, token_dtype, write_meta

# Two held-out titles (one val, one test) plus train documents of every genre, truncated so
# preparing takes about a second.
SMALL_TITLES = ("macbeth", "sonnets", "hamlet", "emma", "paradise lost (no introduction)",
                "mobydick", "King James Bible")
SMALL_CHARS = 30_000


@pytest.fixture(scope="session")
def default_docs() -> list[dict]:
    return load_default_corpus()


@pytest.fixture(scope="session")
def small_corpus_file(tmp_path_factory, default_docs) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "small.jsonl"
    by_title = {d["title"]: d for d in default_docs}
    with open(path, "w", encoding="utf-8") as f:
        for title in SMALL_TITLES:
            doc = dict(by_title[title], text=by_title[title]["text"][:SMALL_CHARS])
            f.write(json.dumps(doc) + "\n")
    return path


@pytest.fixture(scope="session")
def small_data(tmp_path_factory, small_corpus_file) -> tuple[Path, dict]:
    """(data_dir, meta) of the small corpus prepared with bpe:512."""
    from moelab.data.prepare import prepare_data

    out = tmp_path_factory.mktemp("prepared") / "small"
    meta = prepare_data(str(small_corpus_file), "bpe:512", out=out, progress=False)
    return out, meta


def write_synthetic(data_dir: Path, tokens_by_split: dict[str, np.ndarray], vocab_size: int,
                    eos_id: int = 0) -> dict:
    """Write a data dir whose shards hold exactly `tokens_by_split` (no EOS added)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(vocab_size)
    meta = {"format": "moelab-shards", "version": 1, "vocab_size": vocab_size, "eos_id": eos_id,
            "dtype": dtype.name, "tokens": {}, "documents": {}, "sha256": {}, "files": {}}
    for split, tokens in tokens_by_split.items():
        path = data_dir / f"{split}.bin"
        np.asarray(tokens, dtype=dtype).tofile(path)
        meta["tokens"][split] = int(len(tokens))
        meta["documents"][split] = int(np.sum(np.asarray(tokens) == eos_id))
        meta["sha256"][split] = sha256_file(path)
        meta["files"][split] = path.name
    write_meta(data_dir, meta)
    return meta


@pytest.fixture
def arange_data(tmp_path) -> Path:
    """A data dir whose train shard is 0..N-1 (uint32), so a window is known by its first token."""
    n = 10_001
    write_synthetic(tmp_path / "arange", {"train": np.arange(n), "val": np.arange(1, 300)},
                    vocab_size=100_000, eos_id=0)
    return tmp_path / "arange"


@pytest.fixture
def synthetic():
    """The `write_synthetic` helper, as a fixture (tests do not import conftest)."""
    return write_synthetic

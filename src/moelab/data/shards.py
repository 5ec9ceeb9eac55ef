"""Token shards on disk: `{split}.bin` flat token arrays plus `meta.json`.

A shard is the split's documents, each followed by the EOS token, as raw little-endian uint16
(vocab_size < 65536) or uint32 integers, with no header, so `np.memmap` reads it directly and
a batch is a fancy-indexing gather. `meta.json` records what is needed to read and trust the
shards: dtype, per-split token and document counts, and the SHA-256 of every file.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

import numpy as np

from moelab.errors import DataError

FORMAT = "moelab-shards"
FORMAT_VERSION = 1
META_FILE = "meta.json"
TOKENIZER_FILE = "tokenizer.json"
SPLITS = ("train", "val", "test")
_DTYPES = ("uint16", "uint32")
_REQUIRED = {"vocab_size": int, "eos_id": int, "dtype": str, "tokens": dict, "documents": dict,
             "sha256": dict, "files": dict}


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size < 65536), else uint32."""
    if not isinstance(vocab_size, (int, np.integer)) or vocab_size <= 0:
        raise DataError(f"vocab_size: {vocab_size!r}; expected a positive integer")
    if vocab_size >= 2**32:
        raise DataError(f"vocab_size: {vocab_size} does not fit uint32; expected < 2**32")
    return np.dtype(np.uint16) if vocab_size < 2**16 else np.dtype(np.uint32)


def shard_path(data_dir: str | os.PathLike, split: str) -> Path:
    return Path(data_dir) / f"{split}.bin"


def sha256_file(path: str | os.PathLike, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


class ShardWriter:
    """Append documents to one shard file, hashing and counting as it goes."""

    def __init__(self, path: str | os.PathLike, dtype: np.dtype, eos_id: int) -> None:
        self.path = Path(path)
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.eos_id = int(eos_id)
        self.n_tokens = 0
        self.n_documents = 0
        self._hash = hashlib.sha256()
        self._file = open(self.path, "wb")

    def write_documents(self, docs_ids: Iterable[list[int]]) -> None:
        """Write each document's ids followed by EOS, in one buffer per call."""
        lengths = []
        flat: list[int] = []
        for ids in docs_ids:
            flat.extend(ids)
            flat.append(self.eos_id)
            lengths.append(len(ids) + 1)
        if not lengths:
            return
        tokens_N = np.asarray(flat, dtype=np.int64)
        if tokens_N.size and (tokens_N.min() < 0 or tokens_N.max() > np.iinfo(self.dtype).max):
            raise DataError(f"shard {self.path.name}: token id {int(tokens_N.max())} does not fit "
                            f"{self.dtype.name}; the tokenizer's vocab_size is wrong")
        data = tokens_N.astype(self.dtype).tobytes()
        self._file.write(data)
        self._hash.update(data)
        self.n_tokens += int(tokens_N.size)
        self.n_documents += len(lengths)

    def close(self) -> dict:
        self._file.close()
        return {"tokens": self.n_tokens, "documents": self.n_documents,
                "sha256": self._hash.hexdigest(), "file": self.path.name}


def write_meta(data_dir: str | os.PathLike, meta: dict) -> None:
    path = Path(data_dir) / META_FILE
    path.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def load_meta(data_dir: str | os.PathLike) -> dict:
    """Read and check `meta.json` of a prepared data directory."""
    d = Path(data_dir).expanduser()
    if not d.exists():
        raise DataError(f"data dir {d} does not exist; create it with "
                        f"`moelab data prepare --out {d}`")
    if not d.is_dir():
        raise DataError(f"data dir {d} is a file; expected a directory written by "
                        "`moelab data prepare`")
    path = d / META_FILE
    if not path.is_file():
        raise DataError(f"data dir {d} has no {META_FILE}; expected a directory written by "
                        "`moelab data prepare` (an interrupted prepare leaves none)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(meta, dict):
        raise DataError(f"{path}: top level is {type(meta).__name__}; expected an object")
    for key, typ in _REQUIRED.items():
        if key not in meta:
            raise DataError(f"{path}: missing key '{key}'")
        if not isinstance(meta[key], typ) or isinstance(meta[key], bool):
            raise DataError(f"{path}: '{key}' is {meta[key]!r}; expected {typ.__name__}")
    if meta["dtype"] not in _DTYPES:
        raise DataError(f"{path}: 'dtype' is {meta['dtype']!r}; expected one of {_DTYPES}")
    if meta["vocab_size"] <= 0 or not 0 <= meta["eos_id"] < meta["vocab_size"]:
        raise DataError(f"{path}: eos_id={meta['eos_id']} vocab_size={meta['vocab_size']}; "
                        "expected 0 <= eos_id < vocab_size")
    if np.dtype(meta["dtype"]) != token_dtype(meta["vocab_size"]):
        raise DataError(f"{path}: 'dtype' {meta['dtype']} does not match vocab_size "
                        f"{meta['vocab_size']}; expected {token_dtype(meta['vocab_size']).name}")
    for split, n in meta["tokens"].items():
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise DataError(f"{path}: 'tokens.{split}' is {n!r}; expected a count >= 0")
        if split not in meta["files"] or not isinstance(meta["files"][split], str):
            raise DataError(f"{path}: 'files.{split}' is missing; expected the shard file name")
    return meta


def _check_split(meta: dict, split: str, where: Path) -> None:
    if split not in meta["tokens"]:
        raise DataError(f"data dir {where}: no split {split!r}; expected one of "
                        f"{sorted(meta['tokens'])}")


def open_shard(data_dir: str | os.PathLike, split: str, meta: dict | None = None) -> np.ndarray:
    """Memory-map the `split` shard read-only, after checking its size against meta.json."""
    d = Path(data_dir).expanduser()
    meta = load_meta(d) if meta is None else meta
    _check_split(meta, split, d)
    path = d / meta["files"][split]
    dtype = np.dtype(meta["dtype"]).newbyteorder("<")
    expected = meta["tokens"][split]
    if not path.is_file():
        raise DataError(f"shard {path} is missing; expected {expected} tokens "
                        "(prepare the data again)")
    size = path.stat().st_size
    if size != expected * dtype.itemsize:
        found = size / dtype.itemsize
        found_s = str(int(found)) if found == int(found) else f"{found:.1f}"
        raise DataError(f"shard {path}: expected {expected} {dtype.name} tokens, found {found_s} "
                        "(file truncated or modified; prepare the data again)")
    if expected == 0:
        return np.zeros(0, dtype=dtype)  # mmap cannot map an empty file
    return np.memmap(path, dtype=dtype, mode="r", shape=(expected,))


def verify(data_dir: str | os.PathLike) -> dict:
    """Check every shard's size and SHA-256 (and the tokenizer's) against meta.json.

    Returns the meta dict; raises DataError naming the first file that does not match.
    """
    d = Path(data_dir).expanduser()
    meta = load_meta(d)
    for split in meta["tokens"]:
        open_shard(d, split, meta)  # size check first: a clearer message than a hash mismatch
        path = d / meta["files"][split]
        expected = meta["sha256"].get(split)
        found = sha256_file(path)
        if expected != found:
            raise DataError(f"shard {path}: sha256 {found[:16]}... does not match meta.json "
                            f"({str(expected)[:16]}...); the file was modified")
    check_tokenizer(d, meta)
    return meta


def check_tokenizer(data_dir: str | os.PathLike, meta: dict) -> None:
    """DataError when the data dir's tokenizer file is missing or is not the one its shards
    were encoded with (its SHA-256 differs from meta.json's): text decoded or encoded with
    another tokenizer would be garbage. Cheap (one small file), so training, evaluation and
    resume check it every time."""
    d = Path(data_dir).expanduser()
    tok = meta.get("tokenizer", {})
    if not (isinstance(tok, dict) and tok.get("sha256")):
        return  # written without a tokenizer record (e.g. the byte tokenizer)
    path = d / tok.get("file", TOKENIZER_FILE)
    if not path.is_file():
        raise DataError(f"tokenizer {path} is missing; expected it next to {META_FILE}")
    found = sha256_file(path)
    if found != tok["sha256"]:
        raise DataError(f"tokenizer {path}: sha256 {found[:12]}... does not match meta.json's "
                        f"{tok['sha256'][:12]}... (the file was replaced after `moelab data "
                        "prepare`); restore it or prepare the data again")

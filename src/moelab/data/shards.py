"""Token shards on disk: many fixed-size `{split}-PPP-KKKKK.bin` flat token files plus `meta.json`.

A shard holds a run of the split's token stream (each document followed by the EOS token), as
raw little-endian uint16 (vocab_size < 65536) or uint32 integers, with no header, so `np.memmap`
reads it directly. Every shard but the last of a split (of a part, see `merge`) holds exactly
`shard_tokens` tokens; documents may straddle two shards. The loader reads a split as one global
index over its shards (`open_shard`), so the number of shards never changes a batch.

`meta.json` records what is needed to read and trust the shards: dtype, per-split token and
document counts, and a manifest per split listing every shard with its tokens, documents (EOS
tokens in it) and SHA-256. Format version 1 (one `{split}.bin` per split) still loads: it is read
as a split of one shard.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from moelab.errors import DataError

FORMAT = "moelab-shards"
FORMAT_VERSION = 2
# 64 Mi tokens = 128 MiB of uint16 per shard: few enough files for a 10B-token corpus (~150 per
# split), small enough that a resumed prepare redoes little.
DEFAULT_SHARD_TOKENS = 1 << 26
META_FILE = "meta.json"
TOKENIZER_FILE = "tokenizer.json"
SPLITS = ("train", "val", "test")
_DTYPES = ("uint16", "uint32")
_REQUIRED = {"vocab_size": int, "eos_id": int, "dtype": str, "tokens": dict, "documents": dict,
             "sha256": dict}


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


def shard_name(split: str, part: int, k: int) -> str:
    return f"{split}-{part:03d}-{k:05d}.bin"


def manifest_sha256(shards: list[dict]) -> str:
    """One digest for a split: SHA-256 over its shards' digests and sizes, in order."""
    h = hashlib.sha256()
    for s in shards:
        h.update(f"{s['sha256']} {s['tokens']}\n".encode())
    return h.hexdigest()


class SplitWriter:
    """Append a split's token stream to fixed-size shards, hashing and counting as it goes.

    `state()` describes what is on disk after the last `write` (complete shards plus the
    length of the open one), so a killed prepare can `resume` from it and write the same bytes.
    """

    def __init__(self, data_dir: str | os.PathLike, split: str, dtype: np.dtype, eos_id: int,
                 shard_tokens: int, part: int = 0, state: dict | None = None) -> None:
        self.dir = Path(data_dir)
        self.split, self.part = split, part
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.eos_id = int(eos_id)
        self.shard_tokens = int(shard_tokens)
        self.shards: list[dict] = []
        self._file = None
        self._n = self._docs = 0  # tokens and EOS tokens in the open shard
        self._hash = hashlib.sha256()
        if state:
            self._resume(state)

    def _resume(self, state: dict) -> None:
        self.shards = [dict(s) for s in state["shards"]]
        n = int(state["open_tokens"])
        if n:
            path = self.dir / shard_name(self.split, self.part, len(self.shards))
            with open(path, "r+b") as f:  # drop whatever was written after the last checkpoint
                f.truncate(n * self.dtype.itemsize)
            old = np.fromfile(path, dtype=self.dtype)
            self._hash.update(old.tobytes())
            self._n, self._docs = n, int(np.count_nonzero(old == self.eos_id))
            self._file = open(path, "ab")

    def write(self, tokens_N: np.ndarray) -> None:
        """Append tokens (documents already followed by EOS), cutting shards at shard_tokens."""
        tokens_N = np.asarray(tokens_N, dtype=self.dtype)
        while tokens_N.size:
            if self._file is None:
                path = self.dir / shard_name(self.split, self.part, len(self.shards))
                self._file = open(path, "wb")
            take = tokens_N[:self.shard_tokens - self._n]
            data = take.tobytes()
            self._file.write(data)
            self._hash.update(data)
            self._n += take.size
            self._docs += int(np.count_nonzero(take == self.eos_id))
            tokens_N = tokens_N[take.size:]
            if self._n == self.shard_tokens:
                self._close_shard()

    def _close_shard(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self.shards.append({"file": shard_name(self.split, self.part, len(self.shards)),
                            "tokens": self._n, "documents": self._docs,
                            "sha256": self._hash.hexdigest()})
        self._file, self._n, self._docs, self._hash = None, 0, 0, hashlib.sha256()

    def state(self) -> dict:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
        return {"shards": [dict(s) for s in self.shards], "open_tokens": self._n}

    def close(self) -> list[dict]:
        """Close the last (shorter) shard and return the manifest."""
        if self._file is not None:
            self._close_shard()
        return self.shards


def write_meta(data_dir: str | os.PathLike, meta: dict) -> None:
    """Write meta.json through a temporary file and a rename (a reader never sees half)."""
    path = Path(data_dir) / META_FILE
    tmp = path.with_name(f".{META_FILE}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


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
    meta["shards"] = _manifest(meta, path)
    return meta


def _manifest(meta: dict, path: Path) -> dict[str, list[dict]]:
    """Per split, the list of shards {file, tokens, documents, sha256}; v1 gives one each."""
    if meta.get("version", 1) < 2:
        out = {}
        for split, n in meta["tokens"].items():
            if split not in meta["files"] or not isinstance(meta["files"][split], str):
                raise DataError(f"{path}: 'files.{split}' is missing; expected the shard file "
                                "name")
            out[split] = [{"file": meta["files"][split], "tokens": n,
                           "documents": meta["documents"].get(split),
                           "sha256": meta["sha256"].get(split)}]
        return out
    shards = meta.get("shards")
    if not isinstance(shards, dict):
        raise DataError(f"{path}: 'shards' is {shards!r}; expected an object of per-split lists "
                        "(format version 2)")
    for split, n in meta["tokens"].items():
        listed = shards.get(split)
        if not isinstance(listed, list) or not all(
                isinstance(s, dict) and isinstance(s.get("file"), str)
                and isinstance(s.get("tokens"), int) and s["tokens"] >= 0 for s in listed):
            raise DataError(f"{path}: 'shards.{split}' is malformed; expected a list of "
                            "{file, tokens, documents, sha256}")
        total = sum(s["tokens"] for s in listed)
        if total != n:
            raise DataError(f"{path}: shards of {split!r} hold {total} tokens but 'tokens.{split}'"
                            f" is {n}; expected them to agree")
    return shards


def _check_split(meta: dict, split: str, where: Path) -> None:
    if split not in meta["tokens"]:
        raise DataError(f"data dir {where}: no split {split!r}; expected one of "
                        f"{sorted(meta['tokens'])}")


def _open_one(path: Path, expected: int, dtype: np.dtype) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"shard {path} is missing; meta.json lists it with {expected} tokens "
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


def open_shard(data_dir: str | os.PathLike, split: str, meta: dict | None = None):
    """The `split` token stream, read-only: a memmap for one shard, a `ShardedTokens` for more.

    Every shard's size is checked against meta.json first (the checksums are `verify`'s job:
    hashing tens of GB on every open would be too slow).
    """
    d = Path(data_dir).expanduser()
    meta = load_meta(d) if meta is None else meta
    _check_split(meta, split, d)
    dtype = np.dtype(meta["dtype"]).newbyteorder("<")
    arrays = [_open_one(d / s["file"], s["tokens"], dtype) for s in meta["shards"][split]]
    arrays = [a for a in arrays if len(a)] or [np.zeros(0, dtype=dtype)]
    return arrays[0] if len(arrays) == 1 else ShardedTokens(arrays)


class ShardedTokens:
    """Several memmapped shards read as one 1-D array: slices and integer-array gathers.

    The global index of shard s's token j is offsets[s] + j; a gather finds each index's shard
    with one searchsorted and reads each touched shard with one fancy-indexing read.
    """

    def __init__(self, arrays: list[np.ndarray]) -> None:
        self.arrays = arrays
        self.dtype = arrays[0].dtype
        self.offsets = np.concatenate([[0], np.cumsum([len(a) for a in arrays])]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    def __getitem__(self, key):
        n = len(self)
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step != 1:
                raise IndexError("ShardedTokens: slices with a step are not supported")
            if stop <= start:
                return np.zeros(0, dtype=self.dtype)
            first = int(np.searchsorted(self.offsets, start, side="right")) - 1
            last = int(np.searchsorted(self.offsets, stop - 1, side="right")) - 1
            pieces = [self.arrays[s][max(start - self.offsets[s], 0):
                                     min(stop - self.offsets[s], len(self.arrays[s]))]
                      for s in range(first, last + 1)]
            return np.concatenate(pieces) if len(pieces) > 1 else np.asarray(pieces[0])
        idx = np.asarray(key, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"ShardedTokens: index out of range [0, {n})")
        flat = idx.reshape(-1)
        shard = np.searchsorted(self.offsets, flat, side="right") - 1
        out = np.empty(flat.shape, dtype=self.dtype)
        for s in np.unique(shard).tolist():
            m = shard == s
            out[m] = self.arrays[s][flat[m] - self.offsets[s]]
        return out.reshape(idx.shape) if idx.ndim else out[0]


def verify(data_dir: str | os.PathLike) -> dict:
    """Check every shard's size and SHA-256 (and the tokenizer's) against meta.json.

    Returns the meta dict; raises DataError naming the first file that does not match.
    """
    d = Path(data_dir).expanduser()
    meta = load_meta(d)
    for split in meta["tokens"]:
        open_shard(d, split, meta)  # size check first: a clearer message than a hash mismatch
        for s in meta["shards"][split]:
            path = d / s["file"]
            found = sha256_file(path)
            if s.get("sha256") != found:
                raise DataError(f"shard {path}: sha256 {found[:16]}... does not match meta.json "
                                f"({str(s.get('sha256'))[:16]}...); the file was modified")
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

"""`prepare_data`: corpus -> split -> tokenizer -> shards + meta.json, written atomically.

Everything is written into a hidden temporary directory next to `out` and renamed into place at
the end, so an interrupted prepare leaves either the previous complete directory or nothing.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import sys
import time
from pathlib import Path

from moelab.data.corpus import VAL_TITLES, TEST_TITLES, split_documents, uses_fixed_split
from moelab.data.readers import read_corpus
from moelab.data.shards import (FORMAT, FORMAT_VERSION, META_FILE, SPLITS, TOKENIZER_FILE,
                                ShardWriter, sha256_file, token_dtype, write_meta)
from moelab.data.tokenizer import Tokenizer, load_tokenizer, train_bpe
from moelab.errors import DataError
from moelab.fsutil import pid_alive

# Documents are encoded in groups of about this many characters: large enough to keep every core
# busy, small enough that the token lists of one group stay well under a GB.
_GROUP_CHARS = 4_000_000
_TOKENIZER_HELP = "expected 'bpe:VOCAB' (e.g. bpe:8192) or a path to a tokenizer.json"


def prepare_data(corpus: str = "default", tokenizer: str = "bpe:8192",
                 out: str | Path | None = None, seed: int = 0, progress: bool = True) -> dict:
    """Prepare a data directory for training and return its meta dict.

    corpus: 'default', a file/folder path or 'hf:NAME[:CONFIG]' (see `read_corpus`).
    tokenizer: 'bpe:VOCAB' trains a byte-level BPE on the train split only; a path loads a
        tokenizer.json (or a directory holding one).
    out: output directory (required). An existing prepared directory is replaced; a non-empty
        directory without meta.json is refused rather than overwritten.
    seed: salts the hash split of corpora that do not contain the fixed val/test titles
        (the bundled corpus always uses the fixed titles).
    """
    if out is None:
        raise DataError("out: no output directory given; expected a directory path (--out DIR)")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise DataError(f"seed: {seed!r}; expected an integer >= 0")
    out = Path(out).expanduser()
    _check_out(out)
    start = time.perf_counter()
    say = (lambda msg: print(f"[moelab data] {msg}", file=sys.stderr)) if progress else \
        (lambda msg: None)

    docs = read_corpus(corpus)
    splits = split_documents(docs, seed=seed)
    say(f"corpus {corpus}: " + ", ".join(f"{s} {len(splits[s])} docs" for s in SPLITS))
    tok, trained = _get_tokenizer(tokenizer, splits["train"], say)
    dtype = token_dtype(tok.vocab_size)

    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        tok.save(tmp / TOKENIZER_FILE)
        stats = {s: _write_split(tmp, s, splits[s], tok, dtype, progress) for s in SPLITS}
        meta = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id,
            "dtype": dtype.name,
            "tokens": {s: stats[s]["tokens"] for s in SPLITS},
            "documents": {s: stats[s]["documents"] for s in SPLITS},
            "characters": {s: sum(len(d["text"]) for d in splits[s]) for s in SPLITS},
            "sha256": {s: stats[s]["sha256"] for s in SPLITS},
            "files": {s: stats[s]["file"] for s in SPLITS},
            "source": str(corpus),
            "tokenizer": {
                "spec": str(tokenizer),
                "file": TOKENIZER_FILE,
                "sha256": sha256_file(tmp / TOKENIZER_FILE),
                "trained_on": "train" if trained else None,
                **tok.info(),
            },
            "split": {"method": "fixed-titles" if uses_fixed_split(docs) else "hash",
                      "seed": seed},
            "val_titles": [str(d.get("title", "")) for d in splits["val"]],
            "test_titles": [str(d.get("title", "")) for d in splits["test"]],
            "prepare_seconds": None,  # filled below, after the last write
        }
        meta["prepare_seconds"] = round(time.perf_counter() - start, 2)
        write_meta(tmp, meta)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"wrote {out}: " + ", ".join(f"{s} {meta['tokens'][s]:,} tokens" for s in SPLITS)
        + f" ({meta['prepare_seconds']} s)")
    return meta


def _get_tokenizer(spec: str, train_docs: list[dict], say) -> tuple[Tokenizer, bool]:
    """Return (tokenizer, trained_here)."""
    spec = str(spec)
    if spec.startswith("bpe:"):
        m = re.fullmatch(r"bpe:(\d+)", spec)
        if m is None:
            raise DataError(f"tokenizer: {spec!r} has no integer vocab size; {_TOKENIZER_HELP}")
        vocab = int(m.group(1))
        say(f"training byte-level BPE, vocab {vocab}, on {len(train_docs)} train docs")
        return train_bpe((d["text"] for d in train_docs), vocab), True
    if not Path(spec).expanduser().exists():
        raise DataError(f"tokenizer: {spec!r} is neither a bpe:VOCAB spec nor an existing path; "
                        f"{_TOKENIZER_HELP}")
    return load_tokenizer(spec), False


def _write_split(tmp: Path, split: str, docs: list[dict], tok: Tokenizer, dtype, progress: bool
                 ) -> dict:
    from tqdm import tqdm

    writer = ShardWriter(tmp / f"{split}.bin", dtype, tok.eos_id)
    total = sum(len(d["text"]) for d in docs)
    with tqdm(total=total, unit="char", unit_scale=True, desc=f"encode {split}",
              disable=not progress, leave=False) as bar:
        group: list[str] = []
        size = 0
        for d in docs + [None]:  # None flushes the last group
            if d is not None:
                group.append(d["text"])
                size += len(d["text"])
            if group and (d is None or size >= _GROUP_CHARS):
                writer.write_documents(tok.encode_documents(group))
                bar.update(size)
                group, size = [], 0
    return writer.close()


def _check_out(out: Path) -> None:
    """Refuse to replace anything that is not a previous prepare output (checked up front)."""
    if out.exists() and not out.is_dir():
        raise DataError(f"out: {out} is a file; expected a directory path")
    if out.is_dir() and any(out.iterdir()) and not (out / META_FILE).is_file():
        raise DataError(f"out: {out} is a non-empty directory without {META_FILE}; expected a new "
                        "directory or one written by `moelab data prepare`")


def _move_into_place(tmp: Path, out: Path) -> None:
    _check_out(out)  # again: something may have appeared while we worked
    if out.is_dir():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def _remove_stale_tmp(out: Path) -> None:
    """Delete temp dirs left by killed prepares of the same `out` (their process is gone)."""
    for p in out.parent.glob(f".{glob.escape(out.name)}.tmp-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)

    return True

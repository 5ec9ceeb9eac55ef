"""Print a prepared data directory's splits and held-out documents.

    python -m moelab.data.summary DATA_DIR

Per-document character counts come from decoding the shard (decoding is exact), so the table
describes what is actually on disk.
"""
from __future__ import annotations

import os
import sys

from moelab.data.loader import iter_documents
from moelab.data.shards import SPLITS, TOKENIZER_FILE, load_meta
from moelab.data.tokenizer import load_tokenizer


def summarize(data_dir: str | os.PathLike) -> str:
    meta = load_meta(data_dir)
    tok = load_tokenizer(os.path.join(data_dir, meta.get("tokenizer", {}).get("file",
                                                                             TOKENIZER_FILE)))
    lines = [f"{data_dir}: source {meta.get('source')}, tokenizer "
             f"{meta.get('tokenizer', {}).get('spec')}, vocab {meta['vocab_size']}, "
             f"{meta['dtype']}",
             "| split | documents | characters | tokens (incl. EOS) |", "|---|---|---|---|"]
    chars = meta.get("characters", {})
    for split in SPLITS:
        if split in meta["tokens"]:
            lines.append(f"| {split} | {meta['documents'][split]} | "
                         f"{chars.get(split, 0):,} | {meta['tokens'][split]:,} |")
    lines += ["", "| split | title | characters | tokens (excl. EOS) |", "|---|---|---|---|"]
    for split in ("val", "test"):
        titles = meta.get(f"{split}_titles", [])
        for title, ids in zip(titles, iter_documents(data_dir, split)):
            lines.append(f"| {split} | {title} | {len(tok.decode(ids)):,} | {len(ids):,} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m moelab.data.summary DATA_DIR")
    print(summarize(sys.argv[1]))

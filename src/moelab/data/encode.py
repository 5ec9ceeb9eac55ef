"""Encoding in worker processes, in order, with a bounded number of groups in flight.

The reader (the parent process) cuts the document stream into groups of consecutive documents of
about `GROUP_CHARS` characters; each worker holds its own copy of the tokenizer and turns a group
into one token array per split (every document followed by EOS). Results are taken back in
submission order, so the output is the same for any number of workers; only `max_pending` groups
exist at a time, so memory does not grow with the corpus.

Each worker encodes on one thread (`TOKENIZERS_PARALLELISM=false`): the processes are the
parallelism, and Rust threads inside each would only compete for the same cores.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time
from collections import deque
from typing import Callable, Iterable, Iterator

import numpy as np

from moelab.data.tokenizer import split_documents

GROUP_CHARS = 1 << 21  # 2 Mi characters: about a second of work for one core
_SUB_BATCH = 64  # pieces of ~4 k characters per encode_batch call

_WORKER: dict = {}


def _init_worker(tokenizer_json: str, eos_token: str, dtype: str, parent: int) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    # A worker holds both ends of the pool's task pipe, so it would not see a killed parent
    # as end-of-file; it watches its parent instead and exits when it is gone.
    threading.Thread(target=_exit_without_parent, args=(parent,), daemon=True).start()
    from tokenizers import Tokenizer as HFTokenizer

    from moelab.data.tokenizer import Tokenizer

    _WORKER["tok"] = Tokenizer(HFTokenizer.from_str(tokenizer_json), eos_token)
    _WORKER["dtype"] = np.dtype(dtype).newbyteorder("<")


def _exit_without_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def encode_group(texts: list[str], splits: list[str], tok=None, dtype=None
                 ) -> dict[str, np.ndarray]:
    """{split: tokens of that split's documents of the group, in order, each followed by EOS}.

    Pieces are encoded `_SUB_BATCH` at a time and turned into numpy at once: a Rust `Encoding`
    keeps offsets and token strings for every token, so encoding a whole group in one call
    would cost far more memory than the text.
    """
    tok = tok if tok is not None else _WORKER["tok"]
    dtype = np.dtype(dtype if dtype is not None else _WORKER["dtype"])
    pieces, owners = split_documents(texts)
    eos = np.array([tok.eos_id], dtype=dtype)
    chunks: dict[str, list[np.ndarray]] = {s: [] for s in dict.fromkeys(splits)}
    limit = np.iinfo(dtype).max
    for b in range(0, len(pieces), _SUB_BATCH):
        encodings = tok.hf.encode_batch(pieces[b:b + _SUB_BATCH], add_special_tokens=False)
        for j, enc in enumerate(encodings, b):
            ids = np.asarray(enc.ids, dtype=np.int64)
            if ids.size and ids.max() > limit:
                raise ValueError(f"token id {int(ids.max())} does not fit {dtype.name}")
            split = splits[owners[j]]
            chunks[split].append(ids.astype(dtype))
            if j + 1 == len(pieces) or owners[j + 1] != owners[j]:  # the document's last piece
                chunks[split].append(eos)
        del encodings
    return {s: np.concatenate(c) for s, c in chunks.items()}


def _groups(docs: Iterable[tuple[str, str, str]], group_chars: int
            ) -> Iterator[tuple[list[str], list[str], dict]]:
    texts: list[str] = []
    splits: list[str] = []
    size = 0
    info: dict = {}
    for split, text, title in docs:
        if not texts:
            info = {"documents": 0, "characters": {}, "titles": {}}
        texts.append(text)
        splits.append(split)
        size += len(text)
        info["documents"] += 1
        info["characters"][split] = info["characters"].get(split, 0) + len(text)
        info["titles"].setdefault(split, []).append(title)
        if size >= group_chars:
            yield texts, splits, info
            texts, splits, size = [], [], 0
    if texts:
        yield texts, splits, info


def encode_stream(docs: Iterable[tuple[str, str, str]], tok, dtype: np.dtype, workers: int,
                  on_group: Callable[[dict, dict[str, np.ndarray]], None],
                  group_chars: int | None = None) -> None:
    """Encode (split, text, title) triples with `workers` processes and call
    on_group(info, arrays) for each group in order.

    `info` holds the group's number of documents and its characters and titles per split, so the
    caller can checkpoint exactly what is written.
    """
    group_chars = GROUP_CHARS if group_chars is None else group_chars
    if workers == 1:  # in this process, one thread: no start-up cost, no __main__ guard needed
        previous = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        try:
            for texts, splits, info in _groups(docs, group_chars):
                on_group(info, encode_group(texts, splits, tok, np.dtype(dtype).newbyteorder("<")))
        finally:
            if previous is None:
                os.environ.pop("TOKENIZERS_PARALLELISM", None)
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = previous
        return
    # spawn: no fork of a process whose Rust thread pool is running. Like all spawn-based
    # multiprocessing, a script calling this needs an `if __name__ == "__main__":` guard.
    ctx = mp.get_context("spawn")
    max_pending = 2 * workers
    with ctx.Pool(workers, initializer=_init_worker,
                  initargs=(tok.hf.to_str(), tok.eos_token, np.dtype(dtype).name,
                            os.getpid())) as pool:
        pending: deque = deque()
        for texts, splits, info in _groups(docs, group_chars):
            pending.append((info, pool.apply_async(encode_group, (texts, splits))))
            while len(pending) >= max_pending:
                n, res = pending.popleft()
                on_group(n, res.get())
        while pending:
            n, res = pending.popleft()
            on_group(n, res.get())

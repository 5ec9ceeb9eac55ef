"""`prepare_data`: stream a corpus -> split per document -> tokenizer -> parallel encoding ->
fixed-size shards per split + meta.json, resumable and atomic.

Memory does not grow with the corpus: documents stream from the reader, each one's split is
decided on the spot (`StreamSplit`), BPE trains on a bounded sample of the train split, and only
a few groups of documents are being encoded at any time (`encode.encode_stream`).

Everything is written into a hidden work directory `.OUT.partial` next to `OUT` and renamed into
place at the end, so `OUT` is always either the previous complete directory or the new one.
Whenever a shard is complete the work directory records how far the stream is written
(`progress.json`); a prepare that was killed and is run again with the same arguments resumes
from there and writes the same bytes as an uninterrupted one. A bad input (`DataError`) removes
the work directory: nothing half-written is left behind.
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

from moelab.data.corpus import (HASH_TEST_FRACTION, HASH_VAL_FRACTION, StreamSplit,
                                split_documents, uses_fixed_split)
from moelab.data.encode import encode_stream
from moelab.data.readers import Corpus
from moelab.data.shards import (DEFAULT_SHARD_TOKENS, FORMAT, FORMAT_VERSION, META_FILE, SPLITS,
                                TOKENIZER_FILE, SplitWriter, manifest_sha256, sha256_file,
                                token_dtype, write_meta)
from moelab.data.tokenizer import Tokenizer, load_tokenizer, split_for_encoding, train_bpe
from moelab.errors import DataError
from moelab.fsutil import pid_alive, write_json_atomic

_TOKENIZER_HELP = "expected 'bpe:VOCAB' (e.g. bpe:8192) or a path to a tokenizer.json"
# BPE trains on at most this many characters of the train split (in stream order): enough for
# stable merges at 8-32k vocabularies, and about 1-2 GB of trainer memory at most.
DEFAULT_BPE_SAMPLE_CHARS = 100_000_000
# split="auto" holds a corpus in memory only if it ends within this many characters; such a
# small corpus gets the whole-corpus split rules of `split_documents` (fixed titles of the
# bundled corpus, a lone file cut into parts, val and test never empty).
SMALL_CORPUS_CHARS = 64 * 2**20
SPLIT_METHODS = ("auto", "hash", "fixed-titles")
PROGRESS_FILE = "progress.json"
_MAX_TITLES = 10_000  # held-out titles recorded in meta.json per split
_ONE_WORKER_CHARS = 4 * 2**20


def chars_in(splits: dict[str, list[dict]]):
    return (len(d["text"]) for docs in splits.values() for d in docs)


def prepare_data(corpus: str = "default", tokenizer: str = "bpe:8192",
                 out: str | Path | None = None, seed: int = 0, progress: bool = True,
                 workers: int | None = None, shard_tokens: int = DEFAULT_SHARD_TOKENS,
                 split: str = "auto", val_fraction: float = HASH_VAL_FRACTION,
                 test_fraction: float = HASH_TEST_FRACTION,
                 bpe_sample_chars: int = DEFAULT_BPE_SAMPLE_CHARS,
                 part: tuple[int, int] | str | None = None,
                 _on_checkpoint: Callable[[int], None] | None = None) -> dict:
    """Prepare a data directory for training and return its meta dict.

    corpus: 'default', a file/folder path or 'hf:NAME[:CONFIG][@SPLIT]' (see `readers`).
    tokenizer: 'bpe:VOCAB' trains a byte-level BPE on the first `bpe_sample_chars` characters
        of the train split; a path loads a tokenizer.json (or a directory holding one).
    out: output directory (required). An existing prepared directory is replaced; a non-empty
        directory without meta.json is refused rather than overwritten.
    seed: salts the hash split. split: 'auto' (fixed titles for the bundled corpus, the
        whole-corpus rules for a corpus under SMALL_CORPUS_CHARS, else 'hash'), 'hash' (per
        document, `val_fraction` / `test_fraction`) or 'fixed-titles'.
    workers: encoding processes (default: the CPU count, or 1 for a corpus of under 4 Mi
        characters). The output does not depend on it.
    shard_tokens: tokens per shard (the last shard of a split holds the rest).
    part: (I, N) or 'I/N': prepare only part I of N of the corpus (see `readers.Corpus`), for
        `merge_parts`; the split is then always per document.
    """
    opts = _check_options(out, seed, workers, shard_tokens, split, val_fraction, test_fraction,
                          bpe_sample_chars, part)
    out = Path(out).expanduser()
    _check_out(out)
    start = time.perf_counter()
    say = (lambda msg: print(f"[moelab data] {msg}", file=sys.stderr)) if progress else \
        (lambda msg: None)
    source = Corpus(corpus)
    plan = _Plan(source, opts)
    fingerprint = {"format": FORMAT_VERSION, "corpus": str(corpus), "tokenizer": str(tokenizer),
                   "tokenizer_sha256": _given_tokenizer_sha(tokenizer),
                   "corpus_files": source.signature(),
                   **{k: v for k, v in opts.items() if k != "workers"}}
    fingerprint = json.loads(json.dumps(fingerprint))  # tuples -> lists, as read back

    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(out)
    work = out.parent / f".{out.name}.partial"
    state = _claim(work, fingerprint, say)
    try:
        meta = _run(plan, tokenizer, work, state or {"fingerprint": fingerprint}, opts, say,
                    progress, _on_checkpoint)
        meta.update(source=str(corpus), prepare_seconds=round(time.perf_counter() - start, 2))
        write_meta(work, meta)
        (work / PROGRESS_FILE).unlink(missing_ok=True)
        (work / ".owner").unlink(missing_ok=True)
        _move_into_place(work, out)
    except DataError:
        shutil.rmtree(work, ignore_errors=True)  # bad input: leave nothing behind
        raise
    except BaseException:
        (work / ".owner").unlink(missing_ok=True)  # killed or interrupted: resumable
        raise
    say(f"wrote {out}: " + ", ".join(f"{s} {meta['tokens'][s]:,} tokens" for s in SPLITS)
        + f" ({meta['prepare_seconds']} s)")
    return meta


def parse_part(part) -> tuple[int, int] | None:
    """'I/N' or (I, N) -> (I, N) with 0 <= I < N; None stays None."""
    if part is None:
        return None
    given = part
    if isinstance(part, str):
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", part)
        if m is None:
            raise DataError(f"part: {part!r}; expected I/N, e.g. 0/4")
        part = (int(m.group(1)), int(m.group(2)))
    if (not isinstance(part, (tuple, list)) or len(part) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in part)
            or not 0 <= part[0] < part[1]):
        raise DataError(f"part: {given!r}; expected I/N with 0 <= I < N")
    return int(part[0]), int(part[1])


def _check_options(out, seed, workers, shard_tokens, split, val_fraction, test_fraction,
                   bpe_sample_chars, part) -> dict:
    if out is None:
        raise DataError("out: no output directory given; expected a directory path (--out DIR)")

    def positive(name, v):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise DataError(f"{name}: {v!r}; expected an integer > 0")
        return v

    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise DataError(f"seed: {seed!r}; expected an integer >= 0")
    workers = positive("workers", workers) if workers is not None else None  # None: see _run
    if split not in SPLIT_METHODS:
        raise DataError(f"split: {split!r}; expected one of {SPLIT_METHODS}")
    for name, v in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
            raise DataError(f"{name}: {v!r}; expected a number in [0, 1)")
    if val_fraction + test_fraction >= 1:
        raise DataError(f"val_fraction + test_fraction = {val_fraction + test_fraction}; "
                        "expected < 1 so that something is left to train on")
    return {"seed": seed, "workers": workers, "shard_tokens": positive("shard_tokens", shard_tokens),
            "split": split, "val_fraction": float(val_fraction),
            "test_fraction": float(test_fraction),
            "bpe_sample_chars": positive("bpe_sample_chars", bpe_sample_chars),
            "part": parse_part(part)}


class _Plan:
    """Which documents, in which order, go to which split (a stream of (split, doc))."""

    def __init__(self, source: Corpus, opts: dict) -> None:
        self.source, self.part = source, opts["part"]
        self.small: dict[str, list[dict]] | None = None
        method = opts["split"]
        if method == "auto":
            if source.kind == "default":
                method = "fixed-titles"
            elif self.part is None:
                docs = list(_upto_chars(source.documents(), SMALL_CORPUS_CHARS))
                if sum(len(d["text"]) for d in docs) <= SMALL_CORPUS_CHARS:
                    if not docs:
                        raise DataError(f"corpus {source.spec}: no non-empty documents; "
                                        "expected some text")
                    self.small = split_documents(docs, opts["seed"],
                                                 opts["val_fraction"], opts["test_fraction"])
                    # the whole-corpus rules: fixed titles when present, else a hash of the
                    # title with val and test never empty
                    method = "fixed-titles" if uses_fixed_split(docs) else "small-corpus"
                del docs
            method = "hash" if method == "auto" else method
        self.method = method
        self.rule = StreamSplit(method if method != "small-corpus" else "hash",
                                opts["seed"], opts["val_fraction"], opts["test_fraction"])
        self.part_method = source.part_method(self.part[1]) if self.part else None

    def stream(self, whole: bool = False) -> Iterator[tuple[str, dict]]:
        """(split, doc) pairs; `whole` ignores the part (for the BPE sample, same on every part)."""
        if self.small is not None:
            for s in SPLITS:
                for d in self.small[s]:
                    yield s, d
            return
        for d in self.source.documents(None if whole else self.part):
            yield self.rule(d), d


def _upto_chars(docs: Iterator[dict], limit: int) -> Iterator[dict]:
    """Documents until their total passes `limit` (the one that passes it included)."""
    total = 0
    for d in docs:
        yield d
        total += len(d["text"])
        if total > limit:
            return


def _run(plan: _Plan, tokenizer: str, work: Path, state: dict, opts: dict, say,
         progress: bool, on_checkpoint) -> dict:
    from tqdm import tqdm

    if "next_doc" not in state:  # a fresh start
        tok, sample = _get_tokenizer(tokenizer, plan, opts["bpe_sample_chars"], say)
        tok.save(work / TOKENIZER_FILE)
        state.update(next_doc=0, writers={}, characters=dict.fromkeys(SPLITS, 0),
                     titles={"val": [], "test": []}, bpe_sample=sample, checkpoints=0)
        write_json_atomic(work / PROGRESS_FILE, state)  # a resume need not train BPE again
    else:
        tok = load_tokenizer(work / TOKENIZER_FILE)
        say(f"resuming from document {state['next_doc']:,} ({state['checkpoints']} checkpoints)")
    dtype = token_dtype(tok.vocab_size)
    part_index = plan.part[0] if plan.part else 0
    writers = {s: SplitWriter(work, s, dtype, tok.eos_id, opts["shard_tokens"], part_index,
                              state["writers"].get(s)) for s in SPLITS}
    skip = state["next_doc"]
    chars, titles = state["characters"], state["titles"]
    bar = tqdm(unit="tok", unit_scale=True, desc="encode", disable=not progress, leave=False)

    def docs() -> Iterator[tuple[str, str, str]]:
        for i, (s, d) in enumerate(plan.stream()):
            if i >= skip:  # the first `skip` were written before the last checkpoint
                yield s, d["text"], str(d.get("title", ""))

    def on_group(info: dict, arrays: dict) -> None:
        before = sum(len(w.shards) for w in writers.values())
        for s, arr in arrays.items():
            writers[s].write(arr)
        state["next_doc"] += info["documents"]
        for s, n in info["characters"].items():
            chars[s] += n
        for s in ("val", "test"):
            room = _MAX_TITLES - len(titles[s])
            titles[s].extend(info["titles"].get(s, [])[:max(room, 0)])
        bar.update(sum(len(a) for a in arrays.values()))
        if sum(len(w.shards) for w in writers.values()) > before:
            state["writers"] = {s: w.state() for s, w in writers.items()}
            state["checkpoints"] += 1
            write_json_atomic(work / PROGRESS_FILE, state)
            if on_checkpoint is not None:
                on_checkpoint(state["checkpoints"])

    workers = opts["workers"]
    if workers is None:  # the CPU count; one for a small corpus, where starting processes
        small = plan.small is not None and sum(chars_in(plan.small)) < _ONE_WORKER_CHARS
        workers = 1 if small else (os.cpu_count() or 1)  # costs more than it saves
    try:
        encode_stream(docs(), tok, dtype, workers, on_group)
    except ValueError as e:  # a token id outside the dtype: the tokenizer lies about its size
        raise DataError(f"tokenizer: {e}; its vocab_size {tok.vocab_size} is wrong") from e
    finally:
        bar.close()
    if state["next_doc"] == 0 and plan.part is None:
        raise DataError(f"corpus {plan.source.spec}: no non-empty documents; expected some text")
    shards = {s: writers[s].close() for s in SPLITS}
    if plan.part is None:
        for s in ("val", "test"):
            if not shards[s] and shards["train"]:
                say(f"warning: split {s} got no documents (fraction "
                    f"{opts[s + '_fraction']}); raise --{s}-fraction")
    return _meta(tok, tokenizer, work, shards, chars, titles, plan, opts, state["bpe_sample"])


def _meta(tok: Tokenizer, spec: str, work: Path, shards: dict, chars: dict, titles: dict,
          plan: _Plan, opts: dict, sample: int | None) -> dict:
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "dtype": token_dtype(tok.vocab_size).name,
        "shard_tokens": opts["shard_tokens"],
        "tokens": {s: sum(x["tokens"] for x in shards[s]) for s in SPLITS},
        "documents": {s: sum(x["documents"] for x in shards[s]) for s in SPLITS},
        "characters": dict(chars),
        "shards": shards,
        "sha256": {s: manifest_sha256(shards[s]) for s in SPLITS},
        "files": {s: [x["file"] for x in shards[s]] for s in SPLITS},
        "tokenizer": {
            "spec": str(spec), "file": TOKENIZER_FILE,
            "sha256": sha256_file(work / TOKENIZER_FILE),
            "trained_on": "train" if sample is not None else None,
            "sample_characters": sample, **tok.info(),
        },
        "split": {"method": plan.method, "seed": opts["seed"],
                  "val_fraction": opts["val_fraction"], "test_fraction": opts["test_fraction"]},
        "part": ({"index": plan.part[0], "count": plan.part[1], "method": plan.part_method}
                 if plan.part else None),
        "val_titles": titles["val"],
        "test_titles": titles["test"],
    }
    return meta


def _get_tokenizer(spec: str, plan: _Plan, budget: int, say) -> tuple[Tokenizer, int | None]:
    """(tokenizer, characters it was trained on, or None for a loaded one)."""
    spec = str(spec)
    if spec.startswith("bpe:"):
        m = re.fullmatch(r"bpe:(\d+)", spec)
        if m is None:
            raise DataError(f"tokenizer: {spec!r} has no integer vocab size; {_TOKENIZER_HELP}")
        vocab = int(m.group(1))
        used = [0]

        def sample() -> Iterator[str]:
            for s, d in plan.stream(whole=True):
                if s != "train":
                    continue
                for piece in split_for_encoding(d["text"]):
                    if used[0] >= budget:
                        return
                    piece = piece[:budget - used[0]]
                    used[0] += len(piece)
                    yield piece

        say(f"training byte-level BPE, vocab {vocab}, on up to {budget:,} train characters")
        tok = train_bpe(sample(), vocab)
        return tok, used[0]
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(f"tokenizer: {spec!r} is neither a bpe:VOCAB spec nor an existing path; "
                        f"{_TOKENIZER_HELP}")
    return load_tokenizer(path), None


def _given_tokenizer_sha(spec: str) -> str | None:
    path = Path(str(spec)).expanduser()
    if path.is_dir():
        path = path / TOKENIZER_FILE
    return sha256_file(path) if path.is_file() else None


def _claim(work: Path, fingerprint: dict, say) -> dict | None:
    """Take over the work directory: the saved progress if it is the same prepare, else None."""
    owner = work / ".owner"
    if owner.is_file():
        pid = owner.read_text().strip()
        if pid.isdigit() and int(pid) != os.getpid() and pid_alive(int(pid)):
            raise DataError(f"out: another prepare (pid {pid}) is writing {work}; expected one "
                            "prepare per output directory at a time")
    state = None
    progress_path = work / PROGRESS_FILE
    if progress_path.is_file():
        try:
            saved = json.loads(progress_path.read_text())
            if saved.get("fingerprint") == fingerprint:
                state = saved
        except (OSError, json.JSONDecodeError):
            pass
    if state is None:
        if work.exists():
            say(f"discarding {work} (a prepare with other settings)")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
    (work / ".owner").write_text(str(os.getpid()))
    return state


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
    """Delete temp dirs left by killed prepares of format 1 (their process is gone)."""
    for p in out.parent.glob(f".{glob.escape(out.name)}.tmp-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)

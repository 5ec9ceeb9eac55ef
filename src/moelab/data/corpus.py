"""The bundled public-domain corpus and the train/val/test split by document.

The split is by whole documents, never by position inside a document, so no validation or test
text is ever seen in training. For the bundled corpus the held-out documents are a fixed list of
titles (one novel, one play and one verse work each), so every moelab run reports losses on the
same text. Any other corpus is split by a hash of each document's title (or index), which is
stable under reordering and under adding unrelated documents.
"""
from __future__ import annotations

import hashlib
import json
import lzma
from importlib import resources
from typing import Iterable

from moelab.errors import DataError

DEFAULT_CORPUS_FILE = "pd-english.jsonl.xz"

# Held-out documents of the bundled corpus (titles as stored in the file). Chosen for a mix of
# genre (prose novel, play, verse) and size: each split is about 4 % of the 15.9 M characters.
# The King James Bible (4.2 M characters, 26 % of the corpus) stays in train on purpose.
VAL_TITLES: tuple[str, ...] = ("northangerabbey", "macbeth", "paradise regained")
TEST_TITLES: tuple[str, ...] = ("persuasion", "twelfth night", "sonnets")

SPLITS = ("train", "val", "test")

# Fractions used for corpora that do not contain the fixed titles.
HASH_VAL_FRACTION = 0.02
HASH_TEST_FRACTION = 0.02
# A corpus of fewer than three documents is cut into this many parts per document before the
# hash split (see split_documents).
PARTS_FOR_SMALL_CORPUS = 100


def load_default_corpus() -> list[dict]:
    """Return the 57 bundled documents as dicts with title, author, source, license, text."""
    ref = resources.files("moelab.data").joinpath("corpus", DEFAULT_CORPUS_FILE)
    try:
        with ref.open("rb") as raw, lzma.open(raw, "rt", encoding="utf-8") as f:
            docs = [json.loads(line) for line in f if line.strip()]
    except (OSError, lzma.LZMAError, json.JSONDecodeError) as e:
        # Only a broken installation gets here; say so rather than blame the user's data.
        raise DataError(
            f"bundled corpus moelab/data/corpus/{DEFAULT_CORPUS_FILE} is unreadable ({e}); "
            "reinstall moelab"
        ) from e
    return docs


def _unit_hash(key: str, seed: int) -> float:
    """Map (seed, key) to a float in [0, 1) that does not depend on Python's hash salt."""
    digest = hashlib.sha256(f"{seed}\x00{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _doc_key(doc: dict, index: int) -> str:
    title = doc.get("title")
    return str(title) if title not in (None, "") else f"#{index}"


def _text_digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


def uses_fixed_split(docs: Iterable[dict]) -> bool:
    """True when `docs` holds at least one fixed val title and one fixed test title."""
    titles = {d.get("title") for d in docs}
    return bool(titles.intersection(VAL_TITLES)) and bool(titles.intersection(TEST_TITLES))


def split_documents(docs: list[dict], seed: int = 0, val_fraction: float = HASH_VAL_FRACTION,
                    test_fraction: float = HASH_TEST_FRACTION) -> dict[str, list[dict]]:
    """Split documents into {"train", "val", "test"} lists, keeping the input order in each.

    Corpora holding the fixed titles (the bundled one, or a subset of it) use `VAL_TITLES` /
    `TEST_TITLES`. In others a hash of (seed, title or index) in [0, 1) picks val below 0.02 and
    test in [0.02, 0.04); with three or more documents val and test get at least one document each (the
    train documents whose hashes are closest to those bands move over). A corpus of one or two
    documents (a single .txt file, say) is first cut into `PARTS_FOR_SMALL_CORPUS` parts per
    document at line boundaries, titled "TITLE (part k/n)", so it still gets val and test text.
    Documents whose text is identical to a held-out document are dropped from train, so
    duplicates cannot leak.
    """
    docs = list(docs)
    if not docs:
        raise DataError("corpus: no documents to split; expected at least one document")
    fixed = uses_fixed_split(docs)
    if not fixed and len(docs) < 3:
        docs = [part for i, d in enumerate(docs) for part in _cut_into_parts(d, i)]
    which = ["train"] * len(docs)
    if fixed:
        for i, d in enumerate(docs):
            title = d.get("title")
            which[i] = "val" if title in VAL_TITLES else "test" if title in TEST_TITLES else "train"
    elif len(docs) >= 3:  # fewer (tiny texts that could not be cut): everything trains
        u = [_unit_hash(_doc_key(d, i), seed) for i, d in enumerate(docs)]
        for i, ui in enumerate(u):
            if ui < val_fraction:
                which[i] = "val"
            elif ui < val_fraction + test_fraction:
                which[i] = "test"
            else:
                which[i] = "train"
        _ensure_nonempty(which, u, docs)

    held_out = {_text_digest(d["text"]) for d, w in zip(docs, which) if w != "train"}
    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for d, w in zip(docs, which):
        if w == "train" and _text_digest(d["text"]) in held_out:
            continue  # exact copy of a held-out document: training on it would leak
        out[w].append(d)
    if not out["train"]:
        raise DataError(
            f"corpus: all {len(docs)} documents are held out for val/test; "
            "expected at least one training document"
        )
    return out


def _cut_into_parts(doc: dict, index: int, n_parts: int = PARTS_FOR_SMALL_CORPUS) -> list[dict]:
    """Cut one document into about `n_parts` pieces, each ending at a newline when there is one.

    Concatenating the parts gives back the text. Each cut goes to the first newline after the
    ideal position, so no line is split between train and val.
    """
    text = doc["text"]
    title = _doc_key(doc, index)
    cuts = [0]
    for k in range(1, n_parts):
        pos = text.find("\n", max(cuts[-1], k * len(text) // n_parts))
        if pos < 0:
            break
        if pos + 1 > cuts[-1] and pos + 1 < len(text):
            cuts.append(pos + 1)
    cuts.append(len(text))
    n = len(cuts) - 1
    return [dict(doc, title=f"{title} (part {k + 1}/{n})", text=text[a:b])
            for k, (a, b) in enumerate(zip(cuts[:-1], cuts[1:]))]


def _ensure_nonempty(which: list[str], u: list[float], docs: list[dict]) -> None:
    """Move the nearest train documents into an empty val/test split (in place).

    Documents sharing a key (title) move together, so one title never spans two splits.
    """
    keys = [_doc_key(d, i) for i, d in enumerate(docs)]
    for split in ("val", "test"):
        if split in which:
            continue
        train_keys = [keys[i] for i, w in enumerate(which) if w == "train"]
        if len(set(train_keys)) < 2:
            return  # keep at least one training title
        # the smallest hash among train documents is the one closest to the held-out bands
        best = min((u[i], keys[i]) for i, w in enumerate(which) if w == "train")[1]
        for i, k in enumerate(keys):
            if k == best:
                which[i] = split



class StreamSplit:
    """The split of one document at a time, for corpora too large to hold (see prepare).

    method 'fixed-titles': `VAL_TITLES` / `TEST_TITLES`, everything else trains.
    method 'hash': a hash of (seed, text) in [0, 1) picks val below `val_fraction` and test in
    the next `test_fraction`. Hashing the text, not the title, sends exact duplicates to the
    same split, so a copy of a held-out document can never be trained on; and the decision
    needs nothing but the document, so any part of the corpus, on any machine, splits alike.
    """

    def __init__(self, method: str, seed: int = 0, val_fraction: float = HASH_VAL_FRACTION,
                 test_fraction: float = HASH_TEST_FRACTION) -> None:
        if method not in ("fixed-titles", "hash"):
            raise DataError(f"split: {method!r}; expected 'fixed-titles' or 'hash'")
        self.method, self.seed = method, seed
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self._salt = f"{seed}\x00".encode()

    def __call__(self, doc: dict) -> str:
        if self.method == "fixed-titles":
            title = doc.get("title")
            return "val" if title in VAL_TITLES else "test" if title in TEST_TITLES else "train"
        h = hashlib.sha256(self._salt)
        h.update(doc["text"].encode("utf-8", "surrogatepass"))
        u = int.from_bytes(h.digest()[:8], "big") / 2.0**64
        return "val" if u < self.val_fraction else \
            "test" if u < self.val_fraction + self.test_fraction else "train"

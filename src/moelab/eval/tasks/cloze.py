"""`cloze`: LAMBADA-style last-word prediction on the held-out test documents.

Built from the bundled corpus's test split (`moelab.data.corpus.TEST_TITLES`: Persuasion,
Twelfth Night, the Sonnets), which no moelab run trains or validates on. A passage is a verbatim
stretch of a document that starts at a sentence or paragraph start and ends right before a
*target* word; the item asks which of four words comes next.

A word is a target when
  - it is followed by clause-final punctuation (. ! ? ; :) and preceded by a single space (so
    context + " " + word reproduces the original text exactly),
  - it has at least 3 letters, is not all capitals (speaker names, numerals) and is not a function
    word or abbreviation (`STOPWORDS`),
  - it already occurs in the passage (case-insensitive): the LAMBADA idea that the context makes
    the word predictable, here a cheap proxy for "needs the wider context".
The passage is the shortest one, starting at a sentence start, with at least `MIN_WORDS` words;
candidates needing more than `MAX_WORDS` are dropped (long contexts get truncated anyway).
The three distractors are other distinct content words of the same passage (so they are just as
"present" as the answer), of the answer's capitalisation class where the passage has three such
words. Passages do not overlap. `PER_DOCUMENT` items per document are drawn with a fixed seed,
then the item order is shuffled with the same seed (so `--limit N` takes a mix of documents).
"""
from __future__ import annotations

import bisect
import random
import re

SEED = 1234
PER_DOCUMENT = 120
MIN_WORDS = 40
MAX_WORDS = 100
N_CHOICES = 4

# (?<= ) : a single space before; a clause-final mark after.
_TARGET_RE = re.compile(r"(?<= )([A-Za-z]{3,})(?=[.!?;:])")
_WORD_RE = re.compile(r"(?<![A-Za-z'])[A-Za-z]{3,}(?![A-Za-z'])")
_WORDS_RE = re.compile(r"\S+")
# Sentence starts: the first non-space character after . ! ? (and closing quotes/brackets) plus
# whitespace, or after a blank line.
_SENT_END_RE = re.compile(r"(?:[.!?][\"')\]]*\s+|\n\s*\n\s*)(?=\S)")

STOPWORDS = frozenset("""
the and but for nor yet not all any are was were has had have his her hers him its our ours
their theirs them they she you your yours thy thee thou thine who whom whose which what when
where why how that this these those there then than too very can could would should shall will
may might must did does done one ones own now yes just more most some such other others here
with from into upon unto onto about again also ever never only still even each both same
mrs esq etc chap sir
""".split())


def _sentence_starts(text: str) -> list[int]:
    return [0] + [m.end() for m in _SENT_END_RE.finditer(text)]


def _word_count(text: str) -> int:
    return len(_WORDS_RE.findall(text))


def _content_words(text: str) -> list[str]:
    return [w for w in _WORD_RE.findall(text) if not w.isupper() and w.lower() not in STOPWORDS]


def _candidates(title: str, text: str) -> list[dict]:
    starts = _sentence_starts(text)
    out = []
    for m in _TARGET_RE.finditer(text):
        word, pos = m.group(1), m.start()
        if word.isupper() or word.lower() in STOPWORDS:
            continue
        # latest sentence start that leaves at least MIN_WORDS words before the target
        k = bisect.bisect_right(starts, pos - 1) - 1
        while k >= 0 and _word_count(text[starts[k]:pos]) < MIN_WORDS:
            k -= 1
        if k < 0:
            continue
        context = text[starts[k]:pos - 1]  # without the space before the target
        if _word_count(context) > MAX_WORDS:
            continue
        words = _content_words(context)
        if word.lower() not in {w.lower() for w in words}:
            continue
        out.append({"source": title, "start": starts[k], "end": m.end(), "context": context,
                    "target": word, "pool": words})
    return out


def _distractors(word: str, pool: list[str], rng: random.Random) -> list[str] | None:
    """Three distinct words of the passage other than the answer (first spelling of each)."""
    seen, distinct = {word.lower()}, []
    for w in pool:
        if w.lower() not in seen:
            seen.add(w.lower())
            distinct.append(w)
    same_case = [w for w in distinct if w[0].isupper() == word[0].isupper()]
    source = same_case if len(same_case) >= N_CHOICES - 1 else distinct
    if len(source) < N_CHOICES - 1:
        return None
    return rng.sample(source, N_CHOICES - 1)


def build(seed: int = SEED, per_document: int = PER_DOCUMENT) -> list[dict]:
    """The task's items: {"id", "source", "context", "choices", "label", "target"}."""
    from moelab.data.corpus import TEST_TITLES, load_default_corpus

    docs = {d["title"]: d["text"] for d in load_default_corpus() if d["title"] in TEST_TITLES}
    rng = random.Random(seed)
    items = []
    for title in TEST_TITLES:  # fixed order, independent of the corpus file's order
        cands = _candidates(title, docs[title])
        rng.shuffle(cands)
        taken: list[tuple[int, int]] = []
        for c in cands:
            if len(taken) == per_document:
                break
            if any(c["start"] < e and s < c["end"] for s, e in taken):
                continue  # passages do not overlap
            wrong = _distractors(c["target"], c["pool"], rng)
            if wrong is None:
                continue
            choices = [c["target"], *wrong]
            rng.shuffle(choices)
            taken.append((c["start"], c["end"]))
            items.append({"source": title, "context": c["context"], "choices": choices,
                          "label": choices.index(c["target"]), "target": c["target"]})
    rng.shuffle(items)
    for i, it in enumerate(items):
        it["id"] = f"cloze-{i:04d}"
    return items

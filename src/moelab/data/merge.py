"""`merge_parts`: join the data directories of `prepare --part I/N` (one per machine) into one.

Each part is verified first (every shard's size and SHA-256), then the parts must fit together:
the same tokenizer (by SHA-256), the same split settings and shard size, the same N, every
index 0..N-1 exactly once. The merged manifest lists part 0's shards, then part 1's, and so on; shard
files are hard-linked (or copied) into a hidden directory that is renamed into place at the end.
With parts made by file (a folder of at least N files), the merged token stream is the one a
single prepare of the whole corpus writes.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from moelab.data.prepare import _MAX_TITLES, _check_out, _move_into_place
from moelab.data.shards import (SPLITS, TOKENIZER_FILE, manifest_sha256, verify, write_meta)
from moelab.errors import DataError

# keys that every part must share, and how to name them in an error
# (not the corpus path: machines may mount the same corpus at different paths)
_SAME = {"vocab_size": "vocab_size", "eos_id": "eos_id", "dtype": "dtype",
         "split": "split settings", "shard_tokens": "shard_tokens"}


def merge_parts(parts: list[str | os.PathLike], out: str | os.PathLike, link: bool = True) -> dict:
    """Merge part directories (any order) into `out` and return the merged meta dict."""
    if not parts:
        raise DataError("merge: no part directories given; expected the N directories of "
                        "`moelab data prepare --part I/N`")
    out = Path(out).expanduser()
    _check_out(out)
    metas = []
    for p in parts:
        d = Path(p).expanduser()
        meta = verify(d)
        if not meta.get("part"):
            raise DataError(f"merge: {d} was not prepared with --part; expected part directories")
        metas.append((d, meta))
    metas.sort(key=lambda dm: dm[1]["part"]["index"])
    _check_compatible(metas)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.merge-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        first_dir, first = metas[0]
        shutil.copy2(first_dir / first["tokenizer"].get("file", TOKENIZER_FILE),
                     tmp / TOKENIZER_FILE)
        shards: dict[str, list[dict]] = {s: [] for s in SPLITS}
        for d, meta in metas:
            for s in SPLITS:
                for entry in meta["shards"].get(s, []):
                    _place(d / entry["file"], tmp / entry["file"], link)
                    shards[s].append(dict(entry))
        merged = {k: v for k, v in first.items() if k not in ("shards", "part")}
        merged.update(
            shards=shards,
            tokens={s: sum(m["tokens"].get(s, 0) for _, m in metas) for s in SPLITS},
            documents={s: sum(m["documents"].get(s, 0) for _, m in metas) for s in SPLITS},
            characters={s: sum(m.get("characters", {}).get(s, 0) for _, m in metas)
                        for s in SPLITS},
            sha256={s: manifest_sha256(shards[s]) for s in SPLITS},
            files={s: [x["file"] for x in shards[s]] for s in SPLITS},
            part=None,
            merged_from=[{"dir": str(d), "index": m["part"]["index"],
                          "count": m["part"]["count"], "method": m["part"]["method"]}
                         for d, m in metas],
            prepare_seconds=round(sum(m.get("prepare_seconds") or 0 for _, m in metas), 2),
        )
        for key in ("val_titles", "test_titles"):
            merged[key] = [t for _, m in metas for t in m.get(key, [])][:_MAX_TITLES]
        write_meta(tmp, merged)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return merged


def _check_compatible(metas: list[tuple[Path, dict]]) -> None:
    d0, m0 = metas[0]
    count = m0["part"]["count"]
    seen: dict[int, Path] = {}
    for d, m in metas:
        i, n = m["part"]["index"], m["part"]["count"]
        if n != count:
            raise DataError(f"merge: {d} is part {i}/{n} but {d0} is part of {count}; expected "
                            "parts of one --part I/N run")
        if i in seen:
            raise DataError(f"merge: {seen[i]} and {d} are both part {i}/{n}: they overlap; "
                            "expected each part once")
        seen[i] = d
        if m["tokenizer"].get("sha256") != m0["tokenizer"].get("sha256"):
            raise DataError(f"merge: {d} and {d0} were made with different tokenizers (sha256 "
                            f"{str(m['tokenizer'].get('sha256'))[:12]} vs "
                            f"{str(m0['tokenizer'].get('sha256'))[:12]}); expected one tokenizer")
        for key, name in _SAME.items():
            if m.get(key) != m0.get(key):
                raise DataError(f"merge: {d} and {d0} differ in {name} ({m.get(key)!r} vs "
                                f"{m0.get(key)!r}); expected parts of one prepare")
    missing = sorted(set(range(count)) - set(seen))
    if missing:
        raise DataError(f"merge: parts {missing} of {count} are missing; expected every part "
                        f"0..{count - 1}")


def _place(src: Path, dst: Path, link: bool) -> None:
    if dst.exists():
        raise DataError(f"merge: two parts both hold a shard named {dst.name}; expected parts "
                        "written by `moelab data prepare --part`")
    if link:
        try:
            os.link(src, dst)
            return
        except OSError:  # another file system, or no hard links: copy instead
            pass
    shutil.copy2(src, dst)

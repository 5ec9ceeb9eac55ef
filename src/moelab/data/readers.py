"""Read a corpus from a spec string into a list of {"title", "text", ...} documents.

Specs: `default` (the bundled corpus), a `.txt` file (one document), a `.jsonl`, `.jsonl.xz` or
`.jsonl.gz` file (one JSON object with a string field `text` per line; `title` optional), a
`.parquet` file (column `text`; needs pyarrow), a folder of such files (read recursively in sorted
order), a folder written by HF `datasets.save_to_disk`, or `hf:NAME[:CONFIG][@SPLIT]` (loaded with
`datasets.load_dataset`, split `train` unless given). `datasets` and `pyarrow` are optional and
imported only when such a corpus is asked for.

Documents with empty text are dropped (they would only add an end-of-text token). Text is kept
byte for byte (no newline translation), so a round trip through the tokenizer reproduces it.
"""
from __future__ import annotations

import gzip
import json
import lzma
import os
import zlib
from pathlib import Path
from typing import Any

from moelab.data.corpus import load_default_corpus
from moelab.errors import DataError

# Longest first, so ".jsonl.xz" wins over a shorter match.
SUPPORTED_SUFFIXES = (".jsonl.xz", ".jsonl.gz", ".parquet", ".jsonl", ".txt")
_HF_DISK_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_SPEC_HELP = (
    "expected 'default', 'hf:NAME[:CONFIG]', a .txt/.jsonl/.jsonl.xz/.jsonl.gz/.parquet file, "
    "or a folder of them"
)


def read_corpus(spec: str | os.PathLike) -> list[dict]:
    """Return the documents named by `spec` (see the module docstring for the forms)."""
    if not isinstance(spec, (str, os.PathLike)):
        raise DataError(f"corpus: {spec!r} is not a string; {_SPEC_HELP}")
    text_spec = os.fspath(spec)
    if text_spec == "default":
        docs = load_default_corpus()
    elif text_spec.startswith("hf:"):
        docs = _read_hf_hub(text_spec)
    else:
        path = Path(text_spec).expanduser()
        if not path.exists():
            raise DataError(f"corpus: {path} does not exist; {_SPEC_HELP}")
        if path.is_dir():
            if any((path / m).is_file() for m in _HF_DISK_MARKERS):
                docs = _read_hf_disk(path)
            else:
                docs = _read_folder(path)
        else:
            docs = _read_file(path, path.name)
    docs = [d for d in docs if d["text"]]
    if not docs:
        raise DataError(f"corpus {text_spec}: no non-empty documents; expected some text")
    return docs


def _suffix(path: Path) -> str | None:
    name = path.name.lower()
    return next((s for s in SUPPORTED_SUFFIXES if name.endswith(s)), None)


def _read_folder(root: Path) -> list[dict]:
    files = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        # hidden files and folders (.git, editor swap files) are never corpus text
        if p.is_file() and not any(part.startswith(".") for part in rel.parts) and _suffix(p):
            files.append((rel.as_posix(), p))
    if not files:
        raise DataError(
            f"corpus: folder {root} has no {'/'.join(SUPPORTED_SUFFIXES)} files; {_SPEC_HELP}"
        )
    files.sort()  # by relative path, so the order does not depend on the file system
    docs: list[dict] = []
    for rel, p in files:
        docs.extend(_read_file(p, rel))
    return docs


def _read_file(path: Path, title: str) -> list[dict]:
    suffix = _suffix(path)
    if suffix is None:
        raise DataError(f"corpus: {path} has an unsupported extension; {_SPEC_HELP}")
    if suffix == ".txt":
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"corpus: {path} is not UTF-8 text (bad byte at offset {e.start})")
        return [{"title": title, "text": text}]
    if suffix == ".parquet":
        return _read_parquet(path, title)
    return _read_jsonl(path, title, suffix)


def _read_jsonl(path: Path, title: str, suffix: str) -> list[dict]:
    opener: Any = {".jsonl.xz": lzma.open, ".jsonl.gz": gzip.open, ".jsonl": open}[suffix]
    docs = []
    try:
        # newline="" stops newline translation; JSON escapes newlines inside strings anyway
        with opener(path, "rt", encoding="utf-8", newline="") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                docs.append(_jsonl_doc(path, lineno, line, title))
    except (lzma.LZMAError, gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DataError(f"corpus: {path} is not a valid {suffix} file ({e})") from e
    except UnicodeDecodeError as e:
        raise DataError(f"corpus: {path} is not UTF-8 ({e.reason} at byte {e.start})") from e
    return docs


def _jsonl_doc(path: Path, lineno: int, line: str, title: str) -> dict:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"corpus: {path}:{lineno}: invalid JSON ({e.msg}); expected one object "
                        "per line") from e
    if not isinstance(obj, dict) or "text" not in obj:
        got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise DataError(
            f"corpus: {path}:{lineno}: no field 'text' (got {got}); expected a JSON object "
            "with a string field 'text'"
        )
    if not isinstance(obj["text"], str):
        raise DataError(
            f"corpus: {path}:{lineno}: field 'text' is {type(obj['text']).__name__}; "
            "expected a string"
        )
    doc = dict(obj)
    if not doc.get("title"):
        doc["title"] = f"{title}:{lineno}"
    else:
        doc["title"] = str(doc["title"])
    return doc


def _read_parquet(path: Path, title: str) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DataError(f"corpus: reading {path} needs pyarrow (pip install pyarrow)") from e
    try:
        schema = pq.read_schema(path)
        if "text" not in schema.names:
            raise DataError(
                f"corpus: {path} has no column 'text' (columns: {schema.names}); "
                "expected a string column 'text'"
            )
        columns = ["text"] + (["title"] if "title" in schema.names else [])
        table = pq.read_table(path, columns=columns)
    except DataError:
        raise
    except Exception as e:  # pyarrow raises several unrelated types for a corrupt file
        raise DataError(f"corpus: {path} is not a readable parquet file ({e})") from e
    return _rows_to_docs(
        table.column("text").to_pylist(),
        table.column("title").to_pylist() if "title" in columns else None,
        str(path),
        title,
    )


def _rows_to_docs(texts: list, titles: list | None, where: str, prefix: str) -> list[dict]:
    docs = []
    for i, text in enumerate(texts):
        if text is None:
            continue  # a null cell is an absent document, not an error
        if not isinstance(text, str):
            raise DataError(
                f"corpus: {where} row {i}: 'text' is {type(text).__name__}; expected a string"
            )
        t = titles[i] if titles is not None else None
        docs.append({"title": str(t) if t else f"{prefix}#{i}", "text": text})
    return docs


def _docs_from_hf(ds: Any, where: str) -> list[dict]:
    """Documents from a `datasets.Dataset`, or every split of a `DatasetDict` in sorted order."""
    if hasattr(ds, "column_names") and isinstance(ds.column_names, dict):  # DatasetDict
        docs = []
        for name in sorted(ds.keys()):
            docs.extend(_docs_from_hf(ds[name], f"{where}[{name}]"))
        return docs
    if "text" not in ds.column_names:
        raise DataError(
            f"corpus: {where} has no column 'text' (columns: {ds.column_names}); "
            "expected a string column 'text'"
        )
    titles = ds["title"] if "title" in ds.column_names else None
    return _rows_to_docs(list(ds["text"]), list(titles) if titles is not None else None,
                         where, where)


def _import_datasets(what: str) -> Any:
    try:
        import datasets
    except ImportError as e:
        raise DataError(f"corpus {what}: needs the HF datasets package (pip install datasets)") \
            from e
    return datasets


def _read_hf_disk(path: Path) -> list[dict]:
    datasets = _import_datasets(str(path))
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises many types; the user needs the message
        raise DataError(f"corpus: {path} is not a loadable save_to_disk dataset "
                        f"({_one_line(e)})") from e
    return _docs_from_hf(ds, str(path))


def parse_hf_spec(spec: str) -> tuple[str, str | None, str]:
    """'hf:NAME[:CONFIG][@SPLIT]' -> (name, config or None, split)."""
    body = spec[len("hf:"):]
    body, _, split = body.partition("@")
    name, _, config = body.partition(":")
    if not name:
        raise DataError(f"corpus: {spec!r} names no dataset; expected 'hf:NAME[:CONFIG][@SPLIT]'")
    return name, (config or None), (split or "train")


def _read_hf_hub(spec: str) -> list[dict]:
    name, config, split = parse_hf_spec(spec)
    datasets = _import_datasets(spec)
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # offline, unknown name, bad config: all reported the same way
        offline = os.environ.get("HF_DATASETS_OFFLINE") or os.environ.get("HF_HUB_OFFLINE")
        hint = ("offline mode is on, so only datasets already in the HF cache load"
                if offline else "check the name and config and that the Hub is reachable")
        raise DataError(f"corpus {spec}: load_dataset failed ({_one_line(e)}); {hint}") from e
    return _docs_from_hf(ds, spec)


def _one_line(e: Exception) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg[:300]}"

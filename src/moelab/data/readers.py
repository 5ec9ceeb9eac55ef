"""Stream a corpus, one {"title", "text", ...} document at a time.

Specs: `default` (the bundled corpus), a `.txt` file (one document; a file over `TXT_PIECE_CHARS`
is read in pieces of about that size, cut at line ends), a `.jsonl`, `.jsonl.gz`, `.jsonl.xz` or
`.jsonl.zst` file (one JSON object with a string field `text` per line; `title` optional), a
`.parquet` file (column `text`, read one row group at a time; needs pyarrow), a folder of such
files (read recursively in sorted order), a folder written by HF `datasets.save_to_disk`
(memory-mapped Arrow, read in batches), or `hf:NAME[:CONFIG][@SPLIT]` (`datasets.load_dataset`
with `streaming=True`, split `train` unless given). `datasets`, `pyarrow` and `zstandard` are
optional and imported only when such a corpus is asked for.

Nothing here holds more than one document (or one parquet row group, or one batch of a saved
dataset) in memory. `Corpus(spec).documents(part=(I, N))` yields a disjoint, deterministic part
of the corpus: by file for a folder with at least N files (contiguous runs of the sorted files,
so parts 0..N-1 concatenated are the whole corpus in order), otherwise by a hash of each
document's text.

Documents with empty text are dropped (they would only add an end-of-text token). Text is kept
byte for byte (no newline translation), so a round trip through the tokenizer reproduces it.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import os
import zlib
from importlib import resources
from pathlib import Path
from typing import Any, Iterator

from moelab.data.corpus import DEFAULT_CORPUS_FILE
from moelab.errors import DataError

# Longest first, so ".jsonl.xz" wins over a shorter match.
SUPPORTED_SUFFIXES = (".jsonl.xz", ".jsonl.gz", ".jsonl.zst", ".parquet", ".jsonl", ".txt")
_HF_DISK_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_SPEC_HELP = (
    "expected 'default', 'hf:NAME[:CONFIG][@SPLIT]', a .txt/.jsonl/.jsonl.gz/.jsonl.xz/"
    ".jsonl.zst/.parquet file, or a folder of them"
)
# A .txt file longer than this is yielded as several documents (a 10 GB text file must not be
# one string in memory). Cuts go after a newline, so no line is split.
TXT_PIECE_CHARS = 32 * 2**20
_TXT_BLOCK = 1 << 20
_HF_BATCH = 1000


def read_corpus(spec: str | os.PathLike) -> list[dict]:
    """All documents of `spec` as a list: for small corpora and tests. Prepare streams instead."""
    docs = list(Corpus(spec).documents())
    if not docs:
        raise DataError(f"corpus {os.fspath(spec)}: no non-empty documents; expected some text")
    return docs


def part_key(text: str) -> int:
    """The 64-bit hash of a document's text used to assign it to a --part."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()[8:16],
                          "big")


class Corpus:
    """A corpus spec, checked up front; `documents()` streams it (again on every call)."""

    def __init__(self, spec: str | os.PathLike) -> None:
        if not isinstance(spec, (str, os.PathLike)):
            raise DataError(f"corpus: {spec!r} is not a string; {_SPEC_HELP}")
        self.spec = os.fspath(spec)
        self.files: list[tuple[str, Path]] = []  # (title prefix, path) for file corpora
        if self.spec == "default":
            self.kind = "default"
        elif self.spec.startswith("hf:"):
            self.kind = "hf-hub"
            parse_hf_spec(self.spec)
        else:
            path = Path(self.spec).expanduser()
            if not path.exists():
                raise DataError(f"corpus: {path} does not exist; {_SPEC_HELP}")
            self.path = path
            if path.is_dir() and any((path / m).is_file() for m in _HF_DISK_MARKERS):
                self.kind = "hf-disk"
            elif path.is_dir():
                self.kind = "files"
                self.files = _folder_files(path)
            else:
                if _suffix(path) is None:
                    raise DataError(f"corpus: {path} has an unsupported extension; {_SPEC_HELP}")
                self.kind = "files"
                self.files = [(path.name, path)]

    def signature(self) -> str | None:
        """A digest of the files' names, sizes and modification times (None for HF corpora):
        a resumed prepare must read the same corpus as the one it continues."""
        if not self.files:
            return None
        h = hashlib.sha256()
        for title, path in self.files:
            st = path.stat()
            h.update(f"{title}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()

    def part_method(self, count: int) -> str:
        """'file' when there are at least `count` files to share out, else 'hash'."""
        return "file" if self.kind == "files" and len(self.files) >= count else "hash"

    def documents(self, part: tuple[int, int] | None = None) -> Iterator[dict]:
        """Yield the non-empty documents in a fixed order (of part I of N when `part` is given)."""
        index, count = part if part is not None else (0, 1)
        by_file = count > 1 and self.part_method(count) == "file"
        for doc in self._all(file_part=(index, count) if by_file else None):
            if not doc["text"]:
                continue
            if count > 1 and not by_file and part_key(doc["text"]) % count != index:
                continue
            yield doc

    def _all(self, file_part: tuple[int, int] | None) -> Iterator[dict]:
        if self.kind == "default":
            yield from _read_default()
        elif self.kind == "hf-hub":
            yield from _read_hf_hub(self.spec)
        elif self.kind == "hf-disk":
            yield from _read_hf_disk(self.path)
        else:
            files = self.files
            if file_part is not None:  # contiguous runs: file i goes to part i*N // F
                i_part, n = file_part
                files = [f for i, f in enumerate(files) if i * n // len(files) == i_part]
            for title, path in files:
                yield from _read_file(path, title)


def _read_default() -> Iterator[dict]:
    ref = resources.files("moelab.data").joinpath("corpus", DEFAULT_CORPUS_FILE)
    try:
        with ref.open("rb") as raw, lzma.open(raw, "rb") as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)
    except (OSError, lzma.LZMAError, json.JSONDecodeError) as e:
        raise DataError(f"bundled corpus moelab/data/corpus/{DEFAULT_CORPUS_FILE} is unreadable "
                        f"({e}); reinstall moelab") from e


def _suffix(path: Path) -> str | None:
    name = path.name.lower()
    return next((s for s in SUPPORTED_SUFFIXES if name.endswith(s)), None)


def _folder_files(root: Path) -> list[tuple[str, Path]]:
    files = []
    for p in root.rglob("*"):
        rel = p.relative_to(root)
        # hidden files and folders (.git, editor swap files) are never corpus text
        if p.is_file() and not any(part.startswith(".") for part in rel.parts) and _suffix(p):
            files.append((rel.as_posix(), p))
    if not files:
        raise DataError(
            f"corpus: folder {root} has no {'/'.join(SUPPORTED_SUFFIXES)} files; {_SPEC_HELP}"
        )
    return sorted(files)  # by relative path, so the order does not depend on the file system


def _read_file(path: Path, title: str) -> Iterator[dict]:
    suffix = _suffix(path)
    if suffix == ".txt":
        yield from _read_txt(path, title)
    elif suffix == ".parquet":
        yield from _read_parquet(path, title)
    else:
        yield from _read_jsonl(path, title, suffix)


def _read_txt(path: Path, title: str) -> Iterator[dict]:
    """One document, or pieces of about TXT_PIECE_CHARS cut after a newline for a big file."""
    pieces: list[str] = []
    size = 0
    offset = 0  # bytes decoded so far, for the error message
    k = 0
    with open(path, "rb") as f:
        tail = b""
        while True:
            block = f.read(_TXT_BLOCK)
            data = tail + block
            cut = len(data) if not block else data.rfind(b"\n") + 1
            if cut == 0 and block:  # no newline in this block yet: keep reading
                tail = data
                continue
            chunk, tail = data[:cut], data[cut:]
            try:
                text = chunk.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"corpus: {path} is not UTF-8 text (bad byte at offset "
                                f"{offset + e.start})") from e
            offset += len(chunk)
            pieces.append(text)
            size += len(text)
            if size >= TXT_PIECE_CHARS and block:
                k += 1
                yield {"title": f"{title} (part {k})", "text": "".join(pieces)}
                pieces, size = [], 0
            if not block:
                break
    if k == 0:
        yield {"title": title, "text": "".join(pieces)}
    elif size:
        yield {"title": f"{title} (part {k + 1})", "text": "".join(pieces)}


class _ZstLines:
    """Lines of a .zst file (one or more frames), raising on a truncated last frame.

    Decompressing with `decompressobj` rather than a stream reader because only it tells
    whether the input ended inside a frame (a cut-off download would otherwise look complete).
    """

    def __init__(self, path: Path) -> None:
        try:
            import zstandard
        except ImportError as e:
            raise DataError(f"corpus: reading {path} needs zstandard (pip install zstandard)") \
                from e
        self.zstandard, self.path = zstandard, path

    def __enter__(self):
        self.file = open(self.path, "rb")
        return self._lines()

    def __exit__(self, *exc) -> None:
        self.file.close()

    def _lines(self) -> Iterator[bytes]:
        d = self.zstandard.ZstdDecompressor().decompressobj()
        tail = b""
        while block := self.file.read(_TXT_BLOCK):
            data = d.decompress(block)
            while d.eof and d.unused_data:  # the next frame begins in this block
                rest = d.unused_data
                d = self.zstandard.ZstdDecompressor().decompressobj()
                data += d.decompress(rest)
            lines = (tail + data).split(b"\n")
            tail = lines.pop()
            yield from lines
        if not d.eof:
            raise DataError(f"corpus: {self.path} is not a valid .jsonl.zst file (it ends inside "
                            "a zstd frame: truncated)")
        if tail:
            yield tail


def _decompress_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [lzma.LZMAError, gzip.BadGzipFile, EOFError, zlib.error]
    try:
        import zstandard
        errors.append(zstandard.ZstdError)
    except ImportError:
        pass
    return tuple(errors)


def _read_jsonl(path: Path, title: str, suffix: str) -> Iterator[dict]:
    openers: dict[str, Any] = {".jsonl.xz": lzma.open, ".jsonl.gz": gzip.open,
                               ".jsonl.zst": lambda p, mode: _ZstLines(p), ".jsonl": open}
    bad = _decompress_errors()
    try:
        # binary lines: json.loads decodes UTF-8 itself, and JSON escapes newlines in strings
        with openers[suffix](path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    yield _jsonl_doc(path, lineno, line, title)
    except bad as e:
        raise DataError(f"corpus: {path} is not a valid {suffix} file ({e})") from e


def _jsonl_doc(path: Path, lineno: int, line: bytes, title: str) -> dict:
    try:
        obj = json.loads(line)
    except UnicodeDecodeError as e:
        raise DataError(f"corpus: {path}:{lineno}: not UTF-8 ({e.reason})") from e
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
    obj["title"] = str(obj["title"]) if obj.get("title") else f"{title}:{lineno}"
    return obj


def _read_parquet(path: Path, title: str) -> Iterator[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DataError(f"corpus: reading {path} needs pyarrow (pip install pyarrow)") from e
    try:
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
    except Exception as e:  # pyarrow raises several unrelated types for a corrupt file
        raise DataError(f"corpus: {path} is not a readable parquet file ({_one_line(e)})") from e
    if "text" not in names:
        raise DataError(f"corpus: {path} has no column 'text' (columns: {names}); "
                        "expected a string column 'text'")
    columns = ["text"] + (["title"] if "title" in names else [])
    row = 0
    n_groups = pf.num_row_groups
    for g in range(n_groups):
        try:
            table = pf.read_row_group(g, columns=columns)
            texts = table.column("text").to_pylist()
            titles = table.column("title").to_pylist() if "title" in columns else None
        except Exception as e:
            raise DataError(f"corpus: {path}: row group {g} of {n_groups} is unreadable "
                            f"({_one_line(e)}); expected a valid parquet file") from e
        del table
        yield from _rows_to_docs(texts, titles, str(path), title, row)
        row += len(texts)


def _rows_to_docs(texts: list, titles: list | None, where: str, prefix: str,
                  first_row: int = 0) -> Iterator[dict]:
    for j, text in enumerate(texts):
        i = first_row + j
        if text is None:
            continue  # a null cell is an absent document, not an error
        if not isinstance(text, str):
            raise DataError(
                f"corpus: {where} row {i}: 'text' is {type(text).__name__}; expected a string"
            )
        t = titles[j] if titles is not None else None
        yield {"title": str(t) if t else f"{prefix}#{i}", "text": text}


def _import_datasets(what: str) -> Any:
    try:
        import datasets
    except ImportError as e:
        raise DataError(f"corpus {what}: needs the HF datasets package (pip install datasets)") \
            from e
    return datasets


def _check_text_column(names: Any, where: str) -> None:
    if names is not None and "text" not in names:
        raise DataError(f"corpus: {where} has no column 'text' (columns: {list(names)}); "
                        "expected a string column 'text'")


def _docs_from_hf_disk(ds: Any, where: str) -> Iterator[dict]:
    """A memory-mapped `datasets.Dataset` in batches, or every split of a `DatasetDict`."""
    if isinstance(getattr(ds, "column_names", None), dict):  # DatasetDict: splits sorted
        for name in sorted(ds.keys()):
            yield from _docs_from_hf_disk(ds[name], f"{where}[{name}]")
        return
    _check_text_column(ds.column_names, where)
    has_title = "title" in ds.column_names
    columns = ["text"] + (["title"] if has_title else [])
    row = 0
    for batch in ds.select_columns(columns).iter(batch_size=_HF_BATCH):
        texts = batch["text"]
        yield from _rows_to_docs(texts, batch["title"] if has_title else None, where, where, row)
        row += len(texts)


def _read_hf_disk(path: Path) -> Iterator[dict]:
    datasets = _import_datasets(str(path))
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises many types; the user needs the message
        raise DataError(f"corpus: {path} is not a loadable save_to_disk dataset "
                        f"({_one_line(e)})") from e
    yield from _docs_from_hf_disk(ds, str(path))


def parse_hf_spec(spec: str) -> tuple[str, str | None, str]:
    """'hf:NAME[:CONFIG][@SPLIT]' -> (name, config or None, split)."""
    body = spec[len("hf:"):]
    body, _, split = body.partition("@")
    name, _, config = body.partition(":")
    if not name:
        raise DataError(f"corpus: {spec!r} names no dataset; expected 'hf:NAME[:CONFIG][@SPLIT]'")
    return name, (config or None), (split or "train")


def _read_hf_hub(spec: str) -> Iterator[dict]:
    name, config, split = parse_hf_spec(spec)
    datasets = _import_datasets(spec)
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True)
        _check_text_column(getattr(ds, "column_names", None), spec)
    except DataError:
        raise
    except Exception as e:  # offline, unknown name, bad config: all reported the same way
        offline = os.environ.get("HF_DATASETS_OFFLINE") or os.environ.get("HF_HUB_OFFLINE")
        hint = ("offline mode is on, so only datasets already in the HF cache load"
                if offline else "check the name and config and that the Hub is reachable")
        raise DataError(f"corpus {spec}: load_dataset failed ({_one_line(e)}); {hint}") from e
    for i, row in enumerate(ds):
        if "text" not in row:
            raise DataError(f"corpus: {spec} row {i} has no field 'text' (got {sorted(row)}); "
                            "expected a string field 'text'")
        yield from _rows_to_docs([row["text"]], [row.get("title")], spec, spec, i)


def _one_line(e: Exception) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg[:300]}"

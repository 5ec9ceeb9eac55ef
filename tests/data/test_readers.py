"""Every source format streams: the first document arrives before a damaged tail is read."""
import gzip
import json
import lzma

import pytest

from moelab.data import readers
from moelab.data.readers import Corpus, read_corpus
from moelab.errors import DataError

ROWS = [{"title": f"t{i}", "text": f"document number {i}\n" * 3} for i in range(200)]


def _jsonl_bytes(rows):
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _zst(data: bytes) -> bytes:
    zstandard = pytest.importorskip("zstandard")
    return zstandard.ZstdCompressor().compress(data)


COMPRESSORS = {".jsonl": lambda b: b, ".jsonl.gz": gzip.compress, ".jsonl.xz": lzma.compress,
               ".jsonl.zst": _zst}


@pytest.mark.parametrize("suffix", list(COMPRESSORS))
def test_jsonl_formats_stream(tmp_path, suffix):
    path = tmp_path / f"c{suffix}"
    rows = [{"text": f"document {i} " * (i % 50 + 1)} for i in range(3000)]  # several blocks
    data = COMPRESSORS[suffix](_jsonl_bytes(rows))
    path.write_bytes(data)
    assert [d["text"] for d in Corpus(path).documents()] == [r["text"] for r in rows]
    # a damaged end: the first documents still come out one at a time, then a clear error
    path.write_bytes(data[:len(data) // 2] if suffix != ".jsonl" else data + b"{broken\n")
    docs = Corpus(path).documents()
    assert next(docs)["text"] == rows[0]["text"]
    with pytest.raises(DataError, match=rf"c{suffix}"):
        list(docs)


def test_parquet_streams_by_row_group_and_names_a_bad_one(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "p.parquet"
    texts = [r["text"] * 20 for r in ROWS]
    pq.write_table(pa.table({"text": texts}), path, row_group_size=50, compression="none")
    pf = pq.ParquetFile(path)
    assert pf.num_row_groups == 4
    assert [d["text"] for d in Corpus(path).documents()] == texts
    assert [d["title"] for d in read_corpus(path)][:2] == ["p.parquet#0", "p.parquet#1"]
    # damage the third row group's column chunk (page header and data)
    col = pf.metadata.row_group(2).column(0)
    raw = bytearray(path.read_bytes())
    start = col.data_page_offset
    raw[start:start + 64] = b"\xff" * 64
    path.write_bytes(bytes(raw))
    docs = Corpus(path).documents()
    assert next(docs)["text"] == texts[0]
    with pytest.raises(DataError, match=r"p.parquet: row group 2 of 4 is unreadable"):
        list(docs)


def test_big_txt_is_read_in_pieces(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "TXT_PIECE_CHARS", 1000)
    monkeypatch.setattr(readers, "_TXT_BLOCK", 300)
    text = "".join(f"line {i} é\n" for i in range(2000))
    (tmp_path / "big.txt").write_text(text, encoding="utf-8")
    docs = list(Corpus(tmp_path / "big.txt").documents())
    assert len(docs) > 10 and "".join(d["text"] for d in docs) == text
    assert all(d["text"].endswith("\n") for d in docs)
    assert docs[1]["title"] == "big.txt (part 2)"
    (tmp_path / "bad.txt").write_bytes(b"ok\n" * 200 + b"\xff\n")
    with pytest.raises(DataError, match=r"bad.txt is not UTF-8 text \(bad byte at offset 600\)"):
        list(Corpus(tmp_path / "bad.txt").documents())


def test_hf_hub_spec_streams(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = {}

    def fake_load(name, config, split, streaming=False):
        calls.update(name=name, config=config, split=split, streaming=streaming)
        return datasets.IterableDataset.from_generator(lambda: iter(ROWS))

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    docs = Corpus("hf:org/corpus:cfg@validation").documents()
    assert next(docs)["text"] == ROWS[0]["text"]
    assert calls == {"name": "org/corpus", "config": "cfg", "split": "validation",
                     "streaming": True}
    assert len(list(docs)) == len(ROWS) - 1
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k:
                        datasets.IterableDataset.from_generator(lambda: iter([{"body": "x"}])))
    with pytest.raises(DataError, match="no column 'text'|no field 'text'"):
        list(Corpus("hf:org/corpus").documents())


def test_hf_save_to_disk_streams_in_batches(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(readers, "_HF_BATCH", 7)
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    docs = list(Corpus(tmp_path / "ds").documents())
    assert [d["title"] for d in docs] == [r["title"] for r in ROWS]
    datasets.Dataset.from_dict({"body": ["x"]}).save_to_disk(str(tmp_path / "nt"))
    with pytest.raises(DataError, match="no column 'text'"):
        list(Corpus(tmp_path / "nt").documents())


def test_parts_are_disjoint_and_cover_the_corpus(tmp_path):
    for i in range(5):
        (tmp_path / f"f{i}.jsonl").write_bytes(_jsonl_bytes(ROWS[i * 40:(i + 1) * 40]))
    folder = Corpus(tmp_path)
    whole = [d["text"] for d in folder.documents()]
    assert folder.part_method(3) == "file" and folder.part_method(6) == "hash"
    for n in (2, 3, 6):
        parts = [[d["text"] for d in folder.documents(part=(i, n))] for i in range(n)]
        if n <= 5:  # by file: contiguous runs, so concatenated they are the corpus in order
            assert sum(parts, []) == whole
        assert sorted(sum(parts, [])) == sorted(whole)
    single = Corpus(tmp_path / "f0.jsonl")
    parts = [[d["title"] for d in single.documents(part=(i, 3))] for i in range(3)]
    assert sorted(sum(parts, [])) == sorted(r["title"] for r in ROWS[:40]) and all(parts)

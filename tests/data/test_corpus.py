import gzip
import json
import lzma

import pytest

from moelab.data.corpus import TEST_TITLES, VAL_TITLES, split_documents
from moelab.data.readers import read_corpus
from moelab.errors import DataError


def test_default_corpus(default_docs):
    assert len(default_docs) == 57
    assert all(set(d) >= {"title", "author", "source", "license", "text"} for d in default_docs)
    titles = [d["title"] for d in default_docs]
    assert len(set(titles)) == len(titles)
    assert set(VAL_TITLES) <= set(titles) and set(TEST_TITLES) <= set(titles)


def test_default_split_fixed_and_small(default_docs):
    splits = split_documents(default_docs)
    assert sorted(d["title"] for d in splits["val"]) == sorted(VAL_TITLES)
    assert sorted(d["title"] for d in splits["test"]) == sorted(TEST_TITLES)
    assert len(splits["train"]) == 57 - len(VAL_TITLES) - len(TEST_TITLES)
    total = sum(len(d["text"]) for d in default_docs)
    for split in ("val", "test"):
        frac = sum(len(d["text"]) for d in splits[split]) / total
        assert 0.02 < frac < 0.06, (split, frac)
        authors = {d["author"] for d in splits[split]}
        assert "Jane Austen" in authors and "William Shakespeare" in authors  # mixed genre
        assert "King James Bible" not in [d["title"] for d in splits[split]]
    _assert_disjoint(splits)


def _assert_disjoint(splits):
    titles = {s: {d["title"] for d in docs} for s, docs in splits.items()}
    texts = {s: {d["text"] for d in docs} for s, docs in splits.items()}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not titles[a] & titles[b] and not texts[a] & texts[b]


def test_hash_split_user_corpus():
    docs = [{"title": f"doc {i}", "text": f"text {i}"} for i in range(500)]
    splits = split_documents(docs)
    _assert_disjoint(splits)
    assert sum(len(v) for v in splits.values()) == 500
    assert 2 <= len(splits["val"]) <= 25 and 2 <= len(splits["test"]) <= 25
    # deterministic and independent of order
    again = split_documents(list(reversed(docs)))
    assert {d["title"] for d in again["val"]} == {d["title"] for d in splits["val"]}
    other_seed = split_documents(docs, seed=1)
    assert {d["title"] for d in other_seed["val"]} != {d["title"] for d in splits["val"]}


def test_hash_split_small_corpus_gets_val_and_test():
    docs = [{"text": f"doc {i}"} for i in range(3)]  # no titles: keyed by index
    splits = split_documents(docs)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [1, 1, 1]
    tiny = split_documents([{"title": "only", "text": "x"}])  # cannot be cut: all trains
    assert len(tiny["train"]) == 1 and not tiny["val"] and not tiny["test"]


def test_single_document_is_cut_into_parts():
    text = "".join(f"line {i} of a long single-file corpus\n" for i in range(5000))
    splits = split_documents([{"title": "input.txt", "text": text}])
    assert splits["val"] and splits["test"] and splits["train"]
    _assert_disjoint(splits)
    parts = sorted(splits["train"] + splits["val"] + splits["test"],
                   key=lambda d: int(d["title"].split("part ")[1].split("/")[0]))
    assert "".join(d["text"] for d in parts) == text
    assert all(d["text"].endswith("\n") for d in parts)  # cut at line ends only


def test_duplicate_of_held_out_text_is_dropped_from_train(default_docs):
    val_doc = next(d for d in default_docs if d["title"] == VAL_TITLES[0])
    docs = default_docs + [dict(val_doc, title="copy of " + val_doc["title"])]
    splits = split_documents(docs)
    assert all(d["text"] != val_doc["text"] for d in splits["train"])


# ------------------------------------------------------------------------------ readers
def _write_jsonl(path, rows, opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def test_read_txt_keeps_bytes(tmp_path):
    p = tmp_path / "a.txt"
    p.write_bytes("line one\r\nline two é\n".encode("utf-8"))
    assert read_corpus(str(p)) == [{"title": "a.txt", "text": "line one\r\nline two é\n"}]


@pytest.mark.parametrize("suffix,opener", [(".jsonl", open), (".jsonl.xz", lzma.open),
                                           (".jsonl.gz", gzip.open)])
def test_read_jsonl(tmp_path, suffix, opener):
    p = tmp_path / f"c{suffix}"
    _write_jsonl(p, [{"title": "t1", "text": "one", "extra": 1}, {"text": "two"}], opener)
    docs = read_corpus(str(p))
    assert [d["text"] for d in docs] == ["one", "two"]
    assert docs[0]["title"] == "t1" and docs[0]["extra"] == 1
    assert docs[1]["title"] == f"c{suffix}:2"


def test_read_folder_sorted_recursive(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("B")
    (tmp_path / "a.txt").write_text("A")
    _write_jsonl(tmp_path / "sub" / "c.jsonl", [{"text": "C1"}, {"text": "C2"}])
    (tmp_path / "README.md").write_text("not corpus")  # unsupported: skipped in a folder
    (tmp_path / ".hidden.txt").write_text("hidden")
    docs = read_corpus(str(tmp_path))
    assert [d["text"] for d in docs] == ["A", "B", "C1", "C2"]
    assert docs[2]["title"] == "sub/c.jsonl:1"


def test_reader_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_corpus(str(tmp_path / "missing.txt"))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(DataError, match="unsupported extension"):
        read_corpus(str(tmp_path / "x.csv"))
    _write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, {"body": "no text"}])
    with pytest.raises(DataError, match=r"bad.jsonl:2: no field 'text'"):
        read_corpus(str(tmp_path / "bad.jsonl"))
    (tmp_path / "broken.jsonl").write_text('{"text": "a"}\n{oops\n')
    with pytest.raises(DataError, match=r"broken.jsonl:2: invalid JSON"):
        read_corpus(str(tmp_path / "broken.jsonl"))
    (tmp_path / "num.jsonl").write_text('{"text": 5}\n')
    with pytest.raises(DataError, match="expected a string"):
        read_corpus(str(tmp_path / "num.jsonl"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="no non-empty documents"):
        read_corpus(str(tmp_path / "empty.txt"))
    (tmp_path / "fake.jsonl.xz").write_bytes(b"not xz at all")
    with pytest.raises(DataError, match="not a valid .jsonl.xz"):
        read_corpus(str(tmp_path / "fake.jsonl.xz"))
    empty_dir = tmp_path / "nothing"
    empty_dir.mkdir()
    with pytest.raises(DataError, match="has no"):
        read_corpus(str(empty_dir))


def test_read_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["one", None, "three"], "title": ["a", "b", "c"]}),
                   tmp_path / "d.parquet")
    docs = read_corpus(str(tmp_path / "d.parquet"))
    assert [(d["title"], d["text"]) for d in docs] == [("a", "one"), ("c", "three")]
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "e.parquet")
    with pytest.raises(DataError, match="no column 'text'"):
        read_corpus(str(tmp_path / "e.parquet"))


def test_hf_spec_clear_error_without_datasets_or_network(monkeypatch):
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(DataError, match="pip install datasets"):
            read_corpus("hf:roneneldan/TinyStories")
        return
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="load_dataset failed"):
        read_corpus("hf:moelab-test/does-not-exist-anywhere")


def test_hf_save_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["a", "b"]}).save_to_disk(str(tmp_path / "ds"))
    assert [d["text"] for d in read_corpus(str(tmp_path / "ds"))] == ["a", "b"]

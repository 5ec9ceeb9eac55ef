import json
import os
import time

import numpy as np
import pytest

from moelab.data import prepare as prepare_mod
from moelab.data.loader import iter_documents
from moelab.data.prepare import prepare_data
from moelab.data.shards import load_meta, open_shard, sha256_file, token_dtype, verify
from moelab.data.tokenizer import load_tokenizer
from moelab.errors import DataError

META_KEYS = {"vocab_size", "eos_id", "dtype", "tokens", "documents", "sha256", "files", "source",
             "tokenizer", "val_titles", "test_titles", "characters", "split", "format", "version",
             "shards", "shard_tokens", "part"}


def test_token_dtype():
    assert token_dtype(512) == np.uint16
    assert token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint32
    assert token_dtype(200_000) == np.uint32
    with pytest.raises(DataError):
        token_dtype(0)


def test_uint32_shards_roundtrip(tmp_path, synthetic):
    tokens = np.array([70_000, 5, 0, 99_999, 0], dtype=np.int64)
    synthetic(tmp_path / "d", {"train": tokens}, vocab_size=100_000)
    shard = open_shard(tmp_path / "d", "train")
    assert shard.dtype == np.uint32 and shard.tolist() == tokens.tolist()
    assert [d.tolist() for d in iter_documents(tmp_path / "d", "train")] == [[70_000, 5], [99_999]]


def test_meta_and_hashes(small_data, small_corpus_file):
    data_dir, meta = small_data
    assert META_KEYS <= set(meta) and load_meta(data_dir) == meta
    assert meta["dtype"] == "uint16" and meta["eos_id"] == 0 and meta["vocab_size"] <= 512
    assert meta["source"] == str(small_corpus_file)
    assert meta["val_titles"] == ["macbeth"] and meta["test_titles"] == ["sonnets"]
    assert meta["split"]["method"] == "fixed-titles" and meta["tokenizer"]["trained_on"] == "train"
    assert meta["version"] == 2
    for split in ("train", "val", "test"):
        (entry,) = meta["shards"][split]  # the default shard size holds the whole split
        path = data_dir / entry["file"]
        assert meta["files"][split] == [entry["file"]] == [f"{split}-000-00000.bin"]
        assert sha256_file(path) == entry["sha256"]
        assert os.path.getsize(path) == 2 * meta["tokens"][split] == 2 * entry["tokens"]
        assert entry["documents"] == meta["documents"][split]
        shard = open_shard(data_dir, split)
        # one EOS after each document, and the shard ends with one
        assert int((shard == meta["eos_id"]).sum()) == meta["documents"][split]
        assert shard[-1] == meta["eos_id"]
    assert sha256_file(data_dir / "tokenizer.json") == meta["tokenizer"]["sha256"]
    assert verify(data_dir) == meta
    assert not [p for p in data_dir.parent.iterdir() if p.name.startswith(".")]  # no temp left


def test_shards_decode_to_documents(small_data, small_corpus_file):
    data_dir, meta = small_data
    tok = load_tokenizer(data_dir)
    docs = [json.loads(line) for line in small_corpus_file.read_text().splitlines()]
    by_title = {d["title"]: d["text"] for d in docs}
    val = [tok.decode(ids) for ids in iter_documents(data_dir, "val")]
    assert val == [by_title[t] for t in meta["val_titles"]]
    train = [tok.decode(ids) for ids in iter_documents(data_dir, "train")]
    assert train == [d["text"] for d in docs if d["title"] not in ("macbeth", "sonnets")]


def _copy(data_dir, tmp_path):
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(data_dir, dst)
    return dst


def test_verify_catches_modified_shard(small_data, tmp_path):
    d = _copy(small_data[0], tmp_path)
    verify(d)
    with open(d / "val-000-00000.bin", "r+b") as f:
        f.seek(10)
        byte = f.read(1)
        f.seek(10)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(DataError, match=r"val-000-00000.bin: sha256 .* does not match"):
        verify(d)
    (d / "tokenizer.json").write_text("{}")
    with pytest.raises(DataError):
        verify(d)


def test_truncated_shard(small_data, tmp_path):
    d = _copy(small_data[0], tmp_path)
    expected = small_data[1]["tokens"]["train"]
    with open(d / "train-000-00000.bin", "r+b") as f:
        f.truncate(2 * (expected - 100))
    with pytest.raises(DataError, match=rf"train-000-00000.bin: expected {expected} uint16 "
                                        rf"tokens, found {expected - 100}"):
        open_shard(d, "train")
    (d / "val-000-00000.bin").unlink()
    with pytest.raises(DataError, match="val-000-00000.bin is missing"):
        open_shard(d, "val")
    with pytest.raises(DataError, match="no split 'dev'"):
        open_shard(d, "dev")


def test_missing_or_malformed_dir(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_meta(tmp_path / "nope")
    with pytest.raises(DataError, match="has no meta.json"):
        load_meta(tmp_path)
    (tmp_path / "meta.json").write_text("{oops")
    with pytest.raises(DataError, match="not valid JSON"):
        load_meta(tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps({"vocab_size": 10}))
    with pytest.raises(DataError, match="missing key 'eos_id'"):
        load_meta(tmp_path)
    good = {"vocab_size": 10, "eos_id": 0, "dtype": "uint32", "tokens": {}, "documents": {},
            "sha256": {}, "files": {}}
    (tmp_path / "meta.json").write_text(json.dumps(good))
    with pytest.raises(DataError, match="does not match vocab_size"):
        load_meta(tmp_path)


def test_prepare_errors(tmp_path, small_corpus_file):
    with pytest.raises(DataError, match="out"):
        prepare_data(str(small_corpus_file), "bpe:512")
    with pytest.raises(DataError, match="bpe:VOCAB"):
        prepare_data(str(small_corpus_file), "bpe:lots", out=tmp_path / "a")
    with pytest.raises(DataError, match="neither a bpe:VOCAB"):
        prepare_data(str(small_corpus_file), str(tmp_path / "no-tok.json"), out=tmp_path / "a")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "precious.txt").write_text("user data")
    with pytest.raises(DataError, match="non-empty directory without meta.json"):
        prepare_data(str(small_corpus_file), "bpe:512", out=busy)
    assert (busy / "precious.txt").read_text() == "user data"


def test_interrupted_prepare_leaves_no_output_and_resumes(tmp_path, small_corpus_file,
                                                           monkeypatch):
    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_mod, "encode_stream", boom)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(str(small_corpus_file), "bpe:300", out=tmp_path / "out", progress=False)
    # no output, only the hidden work dir (with the trained tokenizer) that a rerun resumes
    assert [p.name for p in tmp_path.iterdir()] == [".out.partial"]
    monkeypatch.undo()
    prepare_data(str(small_corpus_file), "bpe:300", out=tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    verify(tmp_path / "out")


def test_bad_input_midway_leaves_nothing(tmp_path):
    bad = tmp_path / "c.jsonl"
    bad.write_text("".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(50))
                   + '{"body": "no text"}\n')
    with pytest.raises(DataError, match=r"c.jsonl:51: no field 'text'"):
        prepare_data(str(bad), "bpe:300", out=tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl"]


def test_prepare_with_existing_tokenizer_replaces_dir(small_data, tmp_path, small_corpus_file):
    data_dir, meta = small_data
    out = tmp_path / "again"
    first = prepare_data(str(small_corpus_file), str(data_dir), out=out, progress=False)
    (out / "stale.txt").write_text("from an older prepare")
    second = prepare_data(str(small_corpus_file), str(data_dir / "tokenizer.json"), out=out,
                          progress=False)
    assert not (out / "stale.txt").exists()  # the whole directory was replaced
    # same corpus + same tokenizer -> byte-identical shards
    assert first["sha256"] == second["sha256"] == meta["sha256"]
    assert second["tokenizer"]["trained_on"] is None


@pytest.mark.slow
def test_prepare_full_default_corpus(tmp_path):
    import resource

    def cpu():  # this process and its joined workers: a bound that holds on a loaded machine
        return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                    resource.getrusage(resource.RUSAGE_CHILDREN)))

    start, cpu0 = time.perf_counter(), cpu()
    meta = prepare_data("default", "bpe:8192", out=tmp_path / "default", progress=False)
    seconds, cpu_seconds = time.perf_counter() - start, cpu() - cpu0
    print(f"\nprepare default bpe:8192: {seconds:.1f} s wall, {cpu_seconds:.1f} CPU s; tokens "
          f"{meta['tokens']}; characters {meta['characters']}")
    assert cpu_seconds < 60
    assert meta["vocab_size"] == 8192 and meta["dtype"] == "uint16"
    assert meta["documents"] == {"train": 51, "val": 3, "test": 3}
    assert 3_000_000 < meta["tokens"]["train"] and 100_000 < meta["tokens"]["val"]
    verify(tmp_path / "default")
    tok = load_tokenizer(tmp_path / "default")
    from moelab.data.corpus import load_default_corpus

    by_title = {d["title"]: d["text"] for d in load_default_corpus()}
    for title, ids in zip(meta["test_titles"], iter_documents(tmp_path / "default", "test")):
        assert tok.decode(ids) == by_title[title]


def test_summary_lists_held_out_documents(small_data):
    from moelab.data.summary import summarize

    text = summarize(small_data[0])
    assert "| val | macbeth |" in text and "| test | sonnets |" in text


def test_prepare_removes_temp_dirs_of_dead_runs(tmp_path, small_corpus_file):
    stale = tmp_path / ".out.tmp-999999999"  # no such process
    stale.mkdir()
    (stale / "train.bin").write_bytes(b"half written")
    prepare_data(str(small_corpus_file), "bpe:300", out=tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

"""--part I/N on N "machines" + merge equals one prepare of the whole corpus."""
import json
import random
import shutil

import numpy as np
import pytest
import torch

from moelab.data.loader import TokenLoader, iter_documents
from moelab.data.merge import merge_parts
from moelab.data.prepare import prepare_data
from moelab.data.shards import open_shard, verify
from moelab.errors import DataError

OPTS = dict(tokenizer="bpe:300", shard_tokens=3000, split="hash", val_fraction=0.1,
            test_fraction=0.1, progress=False, workers=1)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from moelab.data.corpus import load_default_corpus

    text = load_default_corpus()[1]["text"]
    rng = random.Random(1)
    root = tmp_path_factory.mktemp("corpus")
    for f in range(4):
        with open(root / f"shard{f}.jsonl", "w") as fh:
            for i in range(60):
                a = rng.randrange(len(text) - 2000)
                fh.write(json.dumps({"text": text[a:a + rng.randint(100, 1500)]}) + "\n")
    return root


@pytest.fixture(scope="module")
def whole(tmp_path_factory, folder):
    out = tmp_path_factory.mktemp("whole") / "d"
    prepare_data(str(folder), out=out, **OPTS)
    return out


def _parts(folder, tmp_path, n, spec=None):
    """Prepare parts 0..n-1 (as n machines would) and return their directories."""
    dirs = [tmp_path / f"p{i}" for i in range(n)]
    for i, d in enumerate(dirs):
        prepare_data(str(spec or folder), out=d, part=f"{i}/{n}", **OPTS)
    return dirs


def test_parts_by_file_merge_to_the_whole(folder, whole, tmp_path):
    parts = _parts(folder, tmp_path, 2)
    merged = merge_parts(list(reversed(parts)), tmp_path / "merged")  # any order
    assert verify(tmp_path / "merged") == merged
    assert merged["tokenizer"]["sha256"] == json.loads((whole / "meta.json").read_text())[
        "tokenizer"]["sha256"]
    for split in ("train", "val", "test"):
        a = np.asarray(open_shard(whole, split)[:])
        b = np.asarray(open_shard(tmp_path / "merged", split)[:])
        assert np.array_equal(a, b), split
    for sampling in ("random", "packed"):
        la = TokenLoader(whole, "train", 4, 16, seed=2, sampling=sampling)
        lb = TokenLoader(tmp_path / "merged", "train", 4, 16, seed=2, sampling=sampling)
        assert all(torch.equal(la.get_batch(s)[0], lb.get_batch(s)[0]) for s in range(5))
    assert [m["index"] for m in merged["merged_from"]] == [0, 1]


def test_parts_by_hash_hold_the_same_documents(folder, whole, tmp_path):
    spec = folder / "shard0.jsonl"
    parts = _parts(folder, tmp_path, 3, spec)
    merge_parts(parts, tmp_path / "merged")
    one = tmp_path / "one"
    prepare_data(str(spec), out=one, **OPTS)
    for split in ("train", "val", "test"):
        docs_a = sorted(d.tobytes() for d in iter_documents(one, split))
        docs_b = sorted(d.tobytes() for d in iter_documents(tmp_path / "merged", split))
        assert docs_a == docs_b, split


def test_merge_errors(folder, tmp_path):
    parts = _parts(folder, tmp_path, 2)
    with pytest.raises(DataError, match=r"parts \[1\] of 2 are missing"):
        merge_parts(parts[:1], tmp_path / "m")
    shutil.copytree(parts[0], tmp_path / "again")
    with pytest.raises(DataError, match=r"are both part 0/2: they overlap"):
        merge_parts([parts[0], tmp_path / "again", parts[1]], tmp_path / "m")
    other = tmp_path / "other"
    prepare_data(str(folder), out=other, part="1/2", **dict(OPTS, tokenizer="bpe:280"))
    with pytest.raises(DataError, match="different tokenizers"):
        merge_parts([parts[0], other], tmp_path / "m")
    with pytest.raises(DataError, match="was not prepared with --part"):
        merge_parts([parts[0], _whole_like(tmp_path, folder)], tmp_path / "m")
    (parts[1] / json.loads((parts[1] / "meta.json").read_text())["files"]["train"][0]).unlink()
    with pytest.raises(DataError, match="is missing"):
        merge_parts(parts, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def _whole_like(tmp_path, folder):
    out = tmp_path / "nopart"
    prepare_data(str(folder / "shard1.jsonl"), out=out, **OPTS)
    return out

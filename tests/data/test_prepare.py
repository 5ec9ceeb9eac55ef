"""prepare_data at scale: worker count, shards, kill-and-resume, a memory cap, bad shards."""
import json
import os
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from moelab.data.loader import iter_documents
from moelab.data.prepare import prepare_data
from moelab.data.shards import load_meta, open_shard, verify
from moelab.errors import DataError

# small shards, so a few hundred kB of text make many of them
OPTS = dict(tokenizer="bpe:300", shard_tokens=4000, split="hash", val_fraction=0.1,
            test_fraction=0.1, progress=False)


def write_corpus(path, n_docs=300, seed=0):
    """A jsonl corpus of distinct documents cut from the bundled text."""
    from moelab.data.corpus import load_default_corpus

    text = load_default_corpus()[0]["text"]
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n_docs):
            a = rng.randrange(len(text) - 3000)
            f.write(json.dumps({"title": f"d{i}", "text": text[a:a + rng.randint(200, 2500)]})
                    + "\n")
    return path


def shard_bytes(d):
    meta = load_meta(d)
    return {s: [(d / x["file"]).read_bytes() for x in meta["shards"][s]] for s in meta["shards"]}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("c") / "c.jsonl")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("ref") / "one"
    return out, prepare_data(str(corpus), out=out, workers=1, **OPTS)


def test_many_fixed_size_shards_with_manifest(reference, corpus):
    out, meta = reference
    assert verify(out) == meta
    for split in ("train", "val", "test"):
        shards = meta["shards"][split]
        assert shards and all(s["tokens"] == 4000 for s in shards[:-1])
        assert 0 < shards[-1]["tokens"] <= 4000
        assert sum(s["documents"] for s in shards) == meta["documents"][split] > 0
        assert len(open_shard(out, split)) == meta["tokens"][split]
    assert len(meta["shards"]["train"]) > 20
    # every document comes back, in corpus order per split, with nothing else
    from moelab.data.tokenizer import load_tokenizer

    tok = load_tokenizer(out)
    texts = [json.loads(line)["text"] for line in open(corpus, encoding="utf-8")]
    decoded = [tok.decode(ids) for s in ("train", "val", "test") for ids in iter_documents(out, s)]
    assert sorted(decoded) == sorted(texts)
    train = [tok.decode(ids) for ids in iter_documents(out, "train")]
    assert train == [t for t in texts if t in set(train)]


def test_output_bytes_do_not_depend_on_workers(reference, corpus, tmp_path):
    out, meta = reference
    two = prepare_data(str(corpus), out=tmp_path / "two", workers=2, **OPTS)
    assert two["shards"] == meta["shards"]
    assert shard_bytes(tmp_path / "two") == shard_bytes(out)
    assert (tmp_path / "two" / "tokenizer.json").read_bytes() == (out / "tokenizer.json").read_bytes()


def test_kill_and_resume_equals_uninterrupted(reference, corpus, tmp_path):
    out = tmp_path / "killed"
    script = textwrap.dedent(f"""
        import os, signal
        import moelab.data.encode
        from moelab.data.prepare import prepare_data
        moelab.data.encode.GROUP_CHARS = 20_000  # many groups, so many checkpoints
        def die(n):
            if n == 3:
                os.kill(os.getpid(), signal.SIGKILL)
        prepare_data({str(corpus)!r}, out={str(out)!r}, workers=1, _on_checkpoint=die,
                     **{OPTS!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    assert not out.exists()
    progress = json.loads((tmp_path / ".killed.partial" / "progress.json").read_text())
    assert progress["checkpoints"] == 3 and 0 < progress["next_doc"] < 300
    # something was written after the last checkpoint, and the resume must drop it
    meta = prepare_data(str(corpus), out=out, workers=2, **OPTS)
    assert meta["shards"] == reference[1]["shards"]
    assert shard_bytes(out) == shard_bytes(reference[0])
    assert not (tmp_path / ".killed.partial").exists()


def test_other_settings_discard_the_partial_dir(corpus, tmp_path):
    work = tmp_path / ".o.partial"
    work.mkdir()
    (work / "progress.json").write_text(json.dumps({"fingerprint": {"other": 1}}))
    (work / "train-000-00000.bin").write_bytes(b"junk")
    meta = prepare_data(str(corpus), out=tmp_path / "o", workers=1, **OPTS)
    assert verify(tmp_path / "o") == meta and not work.exists()


def test_listed_shard_missing_truncated_or_modified(reference, tmp_path):
    import shutil

    d = tmp_path / "copy"
    shutil.copytree(reference[0], d)
    second = d / reference[1]["shards"]["train"][1]["file"]
    data = second.read_bytes()
    second.write_bytes(data[:-2])
    with pytest.raises(DataError, match=rf"{second.name}: expected 4000 uint16 tokens, found 3999"):
        open_shard(d, "train")
    second.unlink()
    with pytest.raises(DataError, match=rf"shard .*{second.name} is missing; meta.json lists it"):
        open_shard(d, "train")
    second.write_bytes(bytes([data[0] ^ 1]) + data[1:])
    open_shard(d, "train")  # sizes agree: only the checksum can tell
    with pytest.raises(DataError, match=rf"{second.name}: sha256 .* does not match meta.json"):
        verify(d)


def test_option_errors(corpus, tmp_path):
    for kwargs, match in [({"workers": 0}, "workers: 0"), ({"shard_tokens": -1}, "shard_tokens"),
                          ({"split": "random"}, "split: 'random'"),
                          ({"val_fraction": 1.5}, "val_fraction"), ({"part": "3/2"}, "part"),
                          ({"part": "x"}, "expected I/N"), ({"bpe_sample_chars": 0}, "bpe_sample")]:
        with pytest.raises(DataError, match=match):
            prepare_data(str(corpus), "bpe:300", out=tmp_path / "x", progress=False, **kwargs)
    assert not list(tmp_path.iterdir())


def test_bpe_trains_on_a_bounded_sample(corpus, tmp_path):
    meta = prepare_data(str(corpus), out=tmp_path / "s", workers=1,
                        **dict(OPTS, bpe_sample_chars=5000))
    assert meta["tokenizer"]["sample_characters"] == 5000
    assert meta["tokenizer"]["trained_on"] == "train"


@pytest.mark.slow
def test_prepares_a_corpus_several_times_larger_than_a_memory_cap(tmp_path):
    """50 MB of text under an address-space cap 12 MB above what a small prepare needed."""
    cap_mb = 12
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randint(2, 8)))
             for _ in range(500)]
    big = tmp_path / "big.jsonl"
    with open(big, "w") as f:
        while f.tell() < (4 * cap_mb + 2) * 2**20:
            f.write(json.dumps({"text": " ".join(rng.choices(words, k=1000)) + "\n"}) + "\n")
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps({"text": " ".join(rng.choices(words, k=1000))}) + "\n"
                             for _ in range(400)))
    script = textwrap.dedent(f"""
        import resource
        from moelab.data.prepare import prepare_data
        kw = dict(workers=1, progress=False, split="hash")
        prepare_data({str(small)!r}, "bpe:300", out={str(tmp_path / "tok")!r}, **kw)
        size = next(int(l.split()[1]) for l in open("/proc/self/status")
                    if l.startswith("VmSize")) * 1024
        cap = size + {cap_mb} * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        meta = prepare_data({str(big)!r}, {str(tmp_path / "tok")!r}, out={str(tmp_path / "big")!r},
                            **kw)
        print(sum(meta["characters"].values()))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert int(proc.stdout.split()[-1]) > 4 * cap_mb * 2**20
    verify(tmp_path / "big")
    assert os.path.getsize(big) > 4 * cap_mb * 2**20
    assert np.asarray(open_shard(tmp_path / "big", "train")[:10]).size == 10


def test_a_changed_corpus_is_not_resumed(corpus, tmp_path, monkeypatch):
    import shutil

    import moelab.data.encode as encode_mod

    copy = tmp_path / "c.jsonl"
    shutil.copy(corpus, copy)

    def stop(n):
        raise KeyboardInterrupt

    monkeypatch.setattr(encode_mod, "GROUP_CHARS", 20_000)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(str(copy), out=tmp_path / "o", workers=1, _on_checkpoint=stop, **OPTS)
    assert (tmp_path / ".o.partial" / "progress.json").is_file()
    with open(copy, "a") as f:
        f.write(json.dumps({"text": "one more document"}) + "\n")
    meta = prepare_data(str(copy), out=tmp_path / "o", workers=1, **OPTS)
    assert sum(meta["documents"].values()) == 301  # all of it, not a resume of the old file


def test_empty_corpus_with_hash_split_is_an_error(tmp_path):
    (tmp_path / "e.jsonl").write_text(json.dumps({"text": ""}) + "\n")
    with pytest.raises(DataError, match="no non-empty documents"):
        prepare_data(str(tmp_path / "e.jsonl"), out=tmp_path / "o", workers=1, **OPTS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.jsonl"]

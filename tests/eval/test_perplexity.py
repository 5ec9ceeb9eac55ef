"""Perplexity: equals exp(mean NLL) computed by hand from the model's logits; eval.json; CLI."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from moelab.cli import main
from moelab.data.shards import sha256_file, token_dtype, write_meta
from moelab.eval.perplexity import document_windows, evaluate_run

EOS, VOCAB, SEQ = 0, 40, 4
# val documents: shorter than, equal to and longer than a window, one empty document
VAL_DOCS = [[5, 6, 7], [9, 8, 7, 6, 5, 4, 3, 2, 1], [11], [], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12],
            [30, 31, 32, 33]]
TEST_DOCS = [[2, 4, 6, 8, 10], [3, 5]]


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model; avoids oversubscription under pytest -n 2
    yield
    torch.set_num_threads(before)


def _shard(docs):
    return np.array([t for d in docs for t in d + [EOS]], dtype=np.int64)


def _write_data(data_dir):
    rng = np.random.default_rng(0)
    train_docs = [rng.integers(1, VOCAB, size=int(n)).tolist() for n in rng.integers(5, 60, 80)]
    data_dir.mkdir(parents=True)
    dtype = token_dtype(VOCAB)
    meta = {"format": "moelab-shards", "version": 1, "vocab_size": VOCAB, "eos_id": EOS,
            "dtype": dtype.name, "tokens": {}, "documents": {}, "sha256": {}, "files": {}}
    for split, docs in (("train", train_docs), ("val", VAL_DOCS), ("test", TEST_DOCS)):
        path = data_dir / f"{split}.bin"
        _shard(docs).astype(dtype).tofile(path)
        meta["tokens"][split] = int(len(_shard(docs)))
        meta["documents"][split] = len(docs)
        meta["sha256"][split] = sha256_file(path)
        meta["files"][split] = path.name
    write_meta(data_dir, meta)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 3-step run of a very small model on synthetic shards."""
    from moelab.config import load_preset
    from moelab.train.loop import train

    root = tmp_path_factory.mktemp("ppl")
    _write_data(root / "data")
    cfg = load_preset("dense-tiny").with_overrides([
        "model.d_model=16", "model.n_layers=1", "model.attention.n_heads=2", "model.ffn.d_ff=32",
        f"model.vocab_size={VOCAB}", "model.max_seq_len=16", f"train.seq_len={SEQ}",
        "train.batch_size=4", "train.eval_batches=1", "train.eval_every=0", "train.lr=1e-2"])
    train(cfg, root / "data", root / "run", steps=3, progress=False, tensorboard=False)
    return root / "run"


def _by_hand(model, docs):
    """Score every document window by window, one window per forward pass, in float64."""
    total_nll, total_n, doc_ppls = 0.0, 0, []
    for doc in docs:
        if not doc:
            continue
        seq = [EOS] + doc
        doc_nll = 0.0
        for lo in range(0, len(doc), SEQ):
            hi = min(lo + SEQ, len(doc))
            with torch.no_grad():
                logits_TV = model(torch.tensor([seq[lo:hi]])).logits[0].double()
            logp_TV = logits_TV.log_softmax(-1)
            doc_nll -= sum(float(logp_TV[i, t]) for i, t in enumerate(seq[lo + 1:hi + 1]))
        total_nll += doc_nll
        total_n += len(doc)
        doc_ppls.append(math.exp(doc_nll / len(doc)))
    return math.exp(total_nll / total_n), sum(doc_ppls) / len(doc_ppls), total_n


def test_windows_start_with_eos_and_do_not_overlap():
    docs = [np.array(d) for d in VAL_DOCS]
    wins = document_windows(docs, EOS, SEQ)
    doc4 = [(x.tolist(), y.tolist()) for d, x, y in wins if d == 4]
    assert doc4 == [([0, 1, 2, 3], [1, 2, 3, 4]), ([4, 5, 6, 7], [5, 6, 7, 8]),
                    ([8, 9, 10, 11], [9, 10, 11, 12])]
    assert sum(len(y) for _, _, y in wins) == sum(len(d) for d in VAL_DOCS)
    limited = document_windows(docs, EOS, SEQ, max_tokens=10)
    assert sum(len(y) for _, _, y in limited) == 10


def test_perplexity_equals_exp_mean_nll_by_hand(run):
    from moelab.train.checkpoint import load_model

    model, _, _ = load_model(run)
    model.eval()
    ppl, doc_ppl, n = _by_hand(model, VAL_DOCS)
    res = evaluate_run(run, batch_size=3)  # batches mix windows of different documents
    assert res["tokens"] == n == sum(len(d) for d in VAL_DOCS)
    assert res["documents"] == 5  # the empty document is skipped
    assert res["perplexity"] == pytest.approx(ppl, rel=1e-5)
    assert res["doc_perplexity"] == pytest.approx(doc_ppl, rel=1e-5)
    assert res["perplexity"] != pytest.approx(res["doc_perplexity"], rel=1e-3)  # really differ
    assert res["seq_len"] == SEQ and res["checkpoint"] == "step-00000003"


def test_eval_json_keeps_every_split(run):
    val = evaluate_run(run, split="val")
    test = evaluate_run(run, split="test")
    saved = json.loads((run / "eval.json").read_text())
    assert saved["val"]["perplexity"] == val["perplexity"]
    assert saved["test"]["perplexity"] == test["perplexity"]
    assert saved["split"] == "test" and saved["perplexity"] == test["perplexity"]
    assert saved["tokens"] == test["tokens"] == sum(len(d) for d in TEST_DOCS)


def test_eval_json_keeps_other_commands_results_and_rebuilds_damage(run):
    (run / "eval.json").write_text('{"tasks": {"cloze": {"acc": 0.5}}}')
    evaluate_run(run, split="val")
    saved = json.loads((run / "eval.json").read_text())
    assert saved["tasks"] == {"cloze": {"acc": 0.5}} and saved["split"] == "val"
    (run / "eval.json").write_text('{"val": ')  # torn by hand: only a cache, so rebuilt
    res = evaluate_run(run, split="val")
    assert json.loads((run / "eval.json").read_text())["perplexity"] == res["perplexity"]


def test_max_tokens_limits_the_count(run):
    assert evaluate_run(run, max_tokens=7)["tokens"] == 7


def test_cli_eval_json(run, capsys):
    assert main(["eval", str(run), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert {"perplexity", "doc_perplexity", "tokens"} <= set(res)
    assert main(["eval", str(run), "--split", "test"]) == 0
    assert "perplexity" in capsys.readouterr().out


def test_cli_eval_errors(run, tmp_path, capsys):
    for argv, fragment in ((["eval", str(tmp_path / "missing")], "no such run"),
                           (["eval", str(run), "--data", str(tmp_path / "nodata")],
                            "does not exist")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("moelab: error:") and fragment in err
        assert "Traceback" not in err

"""MoLE re-parameterisation: table codecs, conversion, the lookup model and its storages."""
import json

import numpy as np
import pytest
import torch

from moelab.config import load_preset
from moelab.errors import CheckpointError, ConfigError
from moelab.export.mole_lut import (CODECS, convert_mole_lut, make_codec, nf4_code_book,
                                    read_header, verify)
from moelab.export.mole_model import is_converted_dir, load_any, load_converted
from moelab.model import MoELM
from moelab.train.checkpoint import load_model, write_checkpoint

VOCAB = 512
MOLE_SMALL = [
    "model.d_model=64", "model.n_layers=2", "model.attention.n_heads=2",
    f"model.vocab_size={VOCAB}",
    "model.max_seq_len=64", "model.ffn.d_ff=128", "model.ffn.expert_dim=128",
    "model.ffn.n_experts=4", "model.ffn.top_k=4", "train.seq_len=64", "train.batch_size=8",
    "train.warmup_steps=10", "train.lr=3e-3", "train.eval_every=0", "train.save_every=0",
]
TITLES = ("macbeth", "sonnets", "hamlet", "emma", "mobydick")

# Bounds checked below (docs/mole.md):
# int8: every element within scale/2 of its value (round to nearest, scale = absmax/127).
# nf4: every element within 0.152 x its block's absmax (the largest half-gap of the code book,
#      between -1 and -0.696); relative RMS error over a table below NF4_REL_RMS: measured 0.092
#      on Gaussian rows (blocks of 64), 0.097 (blocks of 192) and 0.095-0.096 on the trained
#      mole-tiny tables (one block per (token, expert) row); 0.15 leaves room for heavier tails.
NF4_HALF_GAP = 0.1520
NF4_REL_RMS = 0.15


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: tiny models, and no spin-waiting thread pools fighting over 2 cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _mole_cfg(*sets):
    return load_preset("mole-tiny").with_overrides(MOLE_SMALL + list(sets))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from moelab.data.corpus import load_default_corpus
    from moelab.data.prepare import prepare_data

    root = tmp_path_factory.mktemp("mole_data")
    by_title = {d["title"]: d for d in load_default_corpus()}
    corpus = root / "slice.jsonl"
    with open(corpus, "w", encoding="utf-8") as f:
        for title in TITLES:
            f.write(json.dumps(dict(by_title[title], text=by_title[title]["text"][:40_000])) + "\n")
    prepare_data(str(corpus), f"bpe:{VOCAB}", out=root / "data", progress=False)
    return root / "data"


@pytest.fixture(scope="module")
def trained_run(data_dir, tmp_path_factory):
    """A tiny MoLE trained briefly on real text (about 5 s on one core)."""
    from moelab.train.loop import train

    run = tmp_path_factory.mktemp("mole_run") / "run"
    train(_mole_cfg(), data_dir=data_dir, out_dir=run, steps=80, progress=False,
          tensorboard=False)
    return run


@pytest.fixture(scope="module")
def converted(trained_run, tmp_path_factory):
    """dtype -> converted directory of the trained run (converted lazily, once each)."""
    root = tmp_path_factory.mktemp("mole_lut")
    done = {}

    def get(dtype):
        if dtype not in done:
            convert_mole_lut(trained_run, root / dtype, dtype=dtype)
            done[dtype] = root / dtype
        return done[dtype]

    return get


def _val_ids(data_dir, n=4, T=48):
    from moelab.data.loader import iter_documents

    toks = np.concatenate(list(iter_documents(data_dir, "val")))[: n * T]
    return torch.from_numpy(toks.astype(np.int64)).view(n, T)


# ---------------------------------------------------------------------------------------------
# codecs
# ---------------------------------------------------------------------------------------------
def test_nf4_code_book_is_the_published_one():
    qlora = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
             -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
             0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
             0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]
    levels = nf4_code_book()
    assert torch.allclose(levels, torch.tensor(qlora), atol=1e-6)
    assert (levels.diff() / 2).max().item() <= NF4_HALF_GAP


@pytest.mark.parametrize("name", list(CODECS))
def test_codec_round_trip_and_bounds(name):
    N, d = 3, 64
    v = torch.randn(50, N, d) * torch.rand(50, N, 1) * 4
    v[0, 1] = 0.0  # an all-zero row stays exactly zero
    c = make_codec(name, N, d)
    rec = c.encode(v)
    assert rec.dtype == torch.uint8 and rec.shape == (50, c.record_bytes)
    assert c.record_bytes % 16 == 0
    out = c.decode(rec, torch.float32)
    assert out.shape == v.shape and torch.all(out[0, 1] == 0)
    err = (out - v).abs()
    absmax = v.abs().amax(-1, keepdim=True)
    if name == "fp32":
        assert torch.equal(out, v)
    elif name in ("fp16", "bf16"):
        assert torch.equal(out, v.to(c.dtype).float())
    elif name == "int8":
        scale = absmax / 127
        assert (err <= scale / 2 * (1 + 1e-6) + 1e-12).all()
    else:
        assert (err <= NF4_HALF_GAP * absmax + 1e-6).all()
        rel_rms = ((out - v).norm() / v.norm()).item()
        assert rel_rms < NF4_REL_RMS, rel_rms


def test_storage_sizes_match_the_paper():
    fp16 = make_codec("fp16", 4, 768)
    nf4 = make_codec("nf4", 4, 768)  # token-wise blocks of 768, float32 absmax (Table 8: 25.3%)
    assert nf4.payload_bytes / fp16.payload_bytes == pytest.approx(0.2526, abs=5e-4)
    assert make_codec("int8", 4, 768).payload_bytes / fp16.payload_bytes == pytest.approx(0.5026,
                                                                                         abs=1e-3)
    assert make_codec("nf4", 4, 768, block_size=64).payload_bytes == 4 * 768 // 2 + 48 * 4
    with pytest.raises(ConfigError, match="block size"):
        make_codec("nf4", 4, 768, block_size=100)
    with pytest.raises(ConfigError, match="allowed"):
        make_codec("fp8", 4, 768)


# ---------------------------------------------------------------------------------------------
# conversion and the lookup model
# ---------------------------------------------------------------------------------------------
def test_converted_dir_is_self_contained_and_checksummed(trained_run, converted):
    out = converted("fp16")
    assert is_converted_dir(out) and not is_converted_dir(trained_run)
    h = read_header(out)
    assert h["shape"] == [VOCAB, 2, 4 * 64 * 2] and h["dtype"] == "fp16"
    assert set(h["sha256"]) == {"lut.bin", "model.safetensors", "config.json", "tokenizer.json",
                                "run.json"}
    verify(out)
    model, cfg, path = load_any(out)
    assert cfg.model.ffn.kind == "mole_lookup" and path == out
    assert not any("experts" in k or "expert_norm" in k for k in model.state_dict())
    train_model, _, _ = load_any(trained_run)
    assert isinstance(train_model, MoELM) and train_model.config.ffn.kind == "mole"


def test_corrupt_or_truncated_tables_are_refused(trained_run, converted, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(converted("int8"), bad)
    with open(bad / "lut.bin", "r+b") as f:
        f.seek(100)
        f.write(b"\xff")
    with pytest.raises(CheckpointError, match="sha256"):
        verify(bad)
    with pytest.raises(CheckpointError, match="sha256"):
        load_converted(bad, check=True)
    with open(bad / "lut.bin", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(CheckpointError, match="truncated"):
        load_converted(bad)
    with pytest.raises(CheckpointError, match="already exists"):
        convert_mole_lut(trained_run, bad)  # never overwrites without asking


@pytest.mark.parametrize("dtype,tol", [("fp32", 1e-5), ("fp16", 1e-3)])
def test_lookup_logits_equal_training_logits(trained_run, converted, data_dir, dtype, tol):
    model, _, _ = load_model(trained_run)
    model.eval()
    real = _val_ids(data_dir)
    rand = torch.randint(0, VOCAB, (3, 40))
    outs = {}
    for storage in ("ram", "mmap"):
        lm = load_converted(converted(dtype), storage=storage)
        assert lm.tables.storage == storage
        outs[storage] = [lm(x).logits for x in (real, rand)]
    for x, ref, ram, mm in zip((real, rand), [model(x).logits for x in (real, rand)],
                               outs["ram"], outs["mmap"]):
        assert torch.equal(ram, mm)  # storage never changes a result
        err = (ram - ref).abs().max().item()
        if dtype == "fp32":
            assert err < tol, err
        else:
            assert err / ref.abs().max().item() < tol, err


def test_lookup_cached_decoding_and_generate(trained_run, converted):
    lm = load_converted(converted("fp32"), storage="mmap")
    x = torch.randint(0, VOCAB, (2, 14))
    full = lm(x).logits
    cache = lm.new_cache()
    parts = [lm(x[:, :5], cache=cache).logits]
    parts += [lm(x[:, t:t + 1], cache=cache).logits for t in range(5, 14)]
    assert (torch.cat(parts, 1) - full).abs().max().item() < 1e-5
    model, _, _ = load_model(trained_run)
    before = lm.tables.bytes_read
    out = lm.generate(x[:, :4], 6, temperature=0)
    assert torch.equal(out, model.generate(x[:, :4], 6, temperature=0))
    assert lm.tables.bytes_read > before


def test_shared_layers_store_distinct_tables_only(tmp_path):
    cfg = _mole_cfg("model.n_layers=4", "model.sharing.group_size=2")
    torch.manual_seed(1)
    m = MoELM(cfg.model).eval()
    write_checkpoint(tmp_path / "run", 1, m, cfg)
    convert_mole_lut(tmp_path / "run", tmp_path / "lut", dtype="fp32")
    h = read_header(tmp_path / "lut")
    assert h["n_layers"] == 2 and h["schedule"] == [0, 1, 0, 1]
    lm = load_converted(tmp_path / "lut")
    x = torch.randint(0, VOCAB, (2, 9))
    assert (lm(x).logits - m(x).logits).abs().max().item() < 1e-5


def test_only_mole_models_convert(tmp_path):
    cfg = load_preset("dense-tiny").with_overrides(
        ["model.vocab_size=97", "model.d_model=32", "model.n_layers=1",
         "model.attention.n_heads=2"])
    write_checkpoint(tmp_path / "run", 1, MoELM(cfg.model), cfg)
    with pytest.raises(ConfigError, match="only a `mole` model"):
        convert_mole_lut(tmp_path / "run", tmp_path / "out")


def _val_ppl(model, data_dir, max_tokens=4096):
    from moelab.data.loader import iter_documents
    from moelab.data.shards import load_meta
    from moelab.eval.perplexity import perplexities, score_documents

    docs = list(iter_documents(data_dir, "val"))
    res = score_documents(model, docs, load_meta(data_dir)["eos_id"], 64, batch_size=16,
                          max_tokens=max_tokens)
    return perplexities(res["nll_D"], res["count_D"])["perplexity"]


def test_validation_perplexity_is_kept(trained_run, converted, data_dir):
    model, _, _ = load_model(trained_run)
    ref = _val_ppl(model, data_dir)
    assert ref < 0.5 * VOCAB  # the run learned something: the comparison means something
    rel = {d: _val_ppl(load_converted(converted(d)), data_dir) / ref - 1
           for d in ("fp16", "int8", "nf4")}
    assert abs(rel["fp16"]) < 0.005, rel
    assert abs(rel["int8"]) < 0.01 and abs(rel["nf4"]) < 0.05, rel


def test_decode_benchmark_smoke(tmp_path, capsys):
    from moelab.export.mole_bench import main

    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\n<!-- mole_decode:start -->\nOLD-SECTION\n"
                       "<!-- mole_decode:end -->\n\ntail\n")
    assert main(["--quick", "--json", "--batches", "2", "--steps", "3", "--rounds", "1",
                 "--write-results", "--results-file", str(results)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {(r["model"], r["cache"]) for r in rows} == {
        ("dense", "-"), ("moe", "-"), ("moe-offloaded", "warm"), ("moe-offloaded", "cold"),
        ("mole-ram", "-"), ("mole-disk", "warm"), ("mole-disk", "cold")}
    by = {(r["model"], r["cache"]): r for r in rows}
    assert by[("dense", "-")]["ratio_to_dense"] == 1.0
    assert by[("mole-disk", "cold")]["bytes_per_token"] == 2 * 4 * 64 * 2  # L * N * d * fp16
    assert by[("moe-offloaded", "warm")]["bytes_per_step"] > 0
    text = results.read_text()
    assert "OLD-SECTION" not in text and text.endswith("tail\n")
    assert "| mole-disk | cold | 2 |" in text

"""MoLE re-parameterisation: table codecs, conversion, the lookup model and its storages."""
import json

import numpy as np
import pytest
import torch

from moelab.config import load_preset
from moelab.errors import CheckpointError, ConfigError
from moelab.export.mole_lut import (CODECS, codec_from_header, convert_mole_lut, make_codec,
                                    nf4_code_book, read_header, verify)
from moelab.export.mole_model import is_converted_dir, load_any, load_converted
from moelab.model import MoELM
from moelab.train.checkpoint import load_model, write_checkpoint
from train.conftest import VOCAB

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
def test_lookup_logits_equal_training_logits(trained_run, converted, tiny_data, dtype, tol):
    model, _, _ = load_model(trained_run)
    model.eval()
    real = _val_ids(tiny_data)
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
    lm.tables.evict()  # cold rows (read ahead with WILLNEED, then faulted in) are the same rows
    assert torch.equal(lm(x).logits, full)


def test_mmap_fetch_announces_each_token_row_once(converted, monkeypatch):
    """Disk reads: one WILLNEED per run of consecutive token ids, covering all layers' rows."""
    import os

    from moelab.export import mole_model

    lm = load_converted(converted("fp16"), storage="mmap")
    calls = []
    monkeypatch.setattr(mole_model.os, "posix_fadvise",
                        lambda fd, off, n, advice: calls.append((off, n, advice)))
    lm(torch.tensor([[7, 3, 4, 5, 7]]))
    V, L, R = read_header(converted("fp16"))["shape"]
    row = L * R
    assert calls == [(3 * row, 3 * row, os.POSIX_FADV_WILLNEED), (7 * row, row,
                                                                   os.POSIX_FADV_WILLNEED)]


def _decoded_tables(path) -> torch.Tensor:
    """Every row of a converted directory's tables, dequantised: (V, L, N, d) float32."""
    h = read_header(path)
    codec = codec_from_header(h)
    V, L, R = h["shape"]
    rec_VLR = torch.from_numpy(np.fromfile(path / h["file"], dtype=np.uint8).reshape(V, L, R))
    return torch.stack([codec.decode(rec_VLR[:, layer].contiguous(), torch.float32)
                        for layer in range(L)], 1)


def test_trained_tables_dequantise_within_the_stated_bounds(converted):
    """The codec bounds of docs/mole.md hold on the trained run's real tables too, measured
    against the fp32 table (the exact expert outputs)."""
    v = _decoded_tables(converted("fp32"))
    absmax = v.abs().amax(-1, keepdim=True)  # per (token, layer, expert) row = block here
    int8_err = (_decoded_tables(converted("int8")) - v).abs()
    assert (int8_err <= absmax / 127 / 2 * (1 + 1e-6) + 1e-12).all()
    nf4 = _decoded_tables(converted("nf4"))
    assert ((nf4 - v).abs() <= NF4_HALF_GAP * absmax + 1e-6).all()
    for layer in range(v.shape[1]):
        rel_rms = ((nf4[:, layer] - v[:, layer]).norm() / v[:, layer].norm()).item()
        assert rel_rms < NF4_REL_RMS, (layer, rel_rms)
    fp16 = _decoded_tables(converted("fp16"))
    assert torch.equal(fp16, v.half().float())


def test_shared_layers_store_distinct_tables_only(tmp_path, mole_cfg):
    cfg = mole_cfg("model.n_layers=4", "model.sharing.group_size=2")
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
    with pytest.raises(ConfigError, match="model.ffn.kind is 'dense'"):
        convert_mole_lut(tmp_path / "run", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_conversion_refuses_bad_requests_before_writing(trained_run, converted, tmp_path):
    with pytest.raises(ConfigError, match="allowed: fp32, fp16, bf16, int8, nf4"):
        convert_mole_lut(trained_run, tmp_path / "a", dtype="fp8")
    with pytest.raises(ConfigError, match="only the nf4 dtype has blocks"):
        convert_mole_lut(trained_run, tmp_path / "a", dtype="int8", block_size=32)
    with pytest.raises(ConfigError, match="already a converted MoLE directory"):
        convert_mole_lut(converted("fp16"), tmp_path / "a")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not a converted MoLE directory"):
        convert_mole_lut(trained_run, tmp_path / "notes", overwrite=True)
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"
    assert not (tmp_path / "a").exists()


def test_validation_perplexity_is_kept(trained_run, converted, tiny_data):
    """`moelab eval`'s perplexity (evaluate_run) of the training run and of its conversions,
    on the same held-out tokens; the converted directories find the data themselves (their
    copied run.json)."""
    from moelab.eval.perplexity import evaluate_run

    ref = evaluate_run(trained_run, max_tokens=4096, device="cpu")
    assert ref["perplexity"] < 0.5 * VOCAB  # the run learned something: the comparison means
    # something (an untrained model scores about VOCAB)
    got = {d: evaluate_run(converted(d), max_tokens=4096, device="cpu")
           for d in ("fp16", "int8", "nf4")}
    rel = {d: r["perplexity"] / ref["perplexity"] - 1 for d, r in got.items()}
    print("val perplexity", ref["perplexity"], "relative change", rel)
    for d, r in got.items():
        assert r["tokens"] == ref["tokens"] and r["data_dir"] == ref["data_dir"]
        assert r["checkpoint"] == ref["checkpoint"] and r["lookup"]["dtype"] == d
    assert abs(rel["fp16"]) < 0.005, rel  # the bound
    assert abs(rel["int8"]) < 0.01 and abs(rel["nf4"]) < 0.05, rel  # loose: 8 and 4 bits
    assert json.loads((converted("fp16") / "eval.json").read_text())["val"]["perplexity"] == \
        got["fp16"]["perplexity"]


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


def test_an_exported_mole_converts_like_its_run(trained_run, converted, tmp_path):
    """convert takes any model directory (moelab.loading): the `export hf` copy of a MoLE run
    gives the same tables as the run."""
    pytest.importorskip("transformers")
    from moelab.export.hf import export_hf

    exp = export_hf(trained_run, tmp_path / "export")
    out = tmp_path / "lut"
    convert_mole_lut(exp, out, dtype="fp16")
    a = np.fromfile(out / "lut.bin", dtype=np.uint8)
    b = np.fromfile(converted("fp16") / "lut.bin", dtype=np.uint8)
    assert np.array_equal(a, b)

"""benchmarks/train_throughput.py: rows, model FLOPs and MFU, config overrides."""
import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "train_throughput.py"


def _load():
    spec = importlib.util.spec_from_file_location("train_throughput", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_rows_carry_model_flops_and_mfu(monkeypatch):
    from moelab.config import load_preset
    from moelab.flops import count

    tt = _load()
    monkeypatch.setitem(tt.PEAK_N, "cpu", 256)
    sets = ("model.d_model=32", "model.n_layers=1", "model.attention.n_heads=2",
            "model.ffn.d_ff=64", "model.vocab_size=97", "train.seq_len=16", "train.batch_size=2")
    torch.set_num_threads(1)
    rows = tt.bench([("dense-tiny", "float32")], steps=2, warmup=1, device=torch.device("cpu"),
                    sets=sets)
    (r,) = rows
    cfg = load_preset("dense-tiny").with_overrides(list(sets))
    assert r["batch"] == "2x16" and r["tokens"] == 32
    assert r["model_flops"] == 6 * count(cfg.model, batch=2, seq_len=16)["macs_forward"]
    assert r["model_tflops"] * 1e12 == pytest.approx(r["model_flops"] / (r["step_ms"] / 1e3))
    assert r["mfu"] > 0 and r["mfu"] == pytest.approx(r["model_tflops"] / r["peak_tflops"])
    table = tt.table(rows)
    assert "| MFU |" in table and f"{100 * r['mfu']:.1f}%" in table


def test_compile_table_pairs_eager_and_compiled_rows():
    tt = _load()
    rows = [{"preset": "dense-tiny", "dtype": "float32", "compiled": c, "step_ms": ms,
             "tokens_per_s": 2048 / ms * 1e3} for c, ms in ((False, 100.0), (True, 80.0))]
    table = tt.compile_table(rows)
    assert "| dense-tiny | float32 | 100.0 | 80.0 |" in table and "1.25x" in table

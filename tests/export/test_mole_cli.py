"""The MoLE workflow on the command line: `moelab convert mole-lut`, then `moelab generate` and
`moelab eval` on the converted directory, and `moelab bench mole-decode`."""
import json

import pytest
import torch

from moelab.cli import main
from moelab.config import load_preset
from moelab.export.mole_lut import read_header
from moelab.export.mole_model import is_converted_dir
from moelab.model import MoELM
from moelab.train.checkpoint import write_checkpoint


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _one_line_error(capsys, argv, words):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err, err
    assert sum(line.startswith("moelab: error:") for line in err.splitlines()) == 1, err


def test_convert_then_generate_and_eval_the_converted_dir(trained_run, tmp_path, capsys):
    out = tmp_path / "lut"
    assert main(["convert", "mole-lut", str(trained_run), "--out", str(out),
                 "--dtype", "fp32"]) == 0
    said = capsys.readouterr().out
    assert said.startswith(f"wrote {out}: fp32 lookup tables") and "bytes per token" in said
    assert is_converted_dir(out) and read_header(out)["dtype"] == "fp32"
    # the converted directory carries the run's tokenizer and data record
    assert (out / "tokenizer.json").is_file() and (out / "run.json").is_file()

    gen = ["--prompt", "The king", "--max-new-tokens", "8", "--temperature", "0"]
    assert main(["generate", str(trained_run), *gen]) == 0
    from_run = capsys.readouterr().out
    for storage in ("ram", "mmap"):
        assert main(["generate", str(out), "--storage", storage, *gen]) == 0
        assert capsys.readouterr().out == from_run  # fp32 tables: the same greedy text
    assert from_run.startswith("The king")

    assert main(["eval", str(trained_run), "--json"]) == 0
    ref = json.loads(capsys.readouterr().out)
    assert main(["eval", str(out), "--json", "--storage", "mmap"]) == 0  # finds the data itself
    res = json.loads(capsys.readouterr().out)
    assert res["tokens"] == ref["tokens"] and res["lookup"]["storage"] == "mmap"
    assert res["perplexity"] == pytest.approx(ref["perplexity"], rel=1e-5)
    assert main(["eval", str(out)]) == 0
    assert "(lookup tables fp32, storage ram)" in capsys.readouterr().out

    # --overwrite replaces an earlier conversion
    assert main(["convert", "mole-lut", str(trained_run), "--out", str(out), "--dtype", "nf4",
                 "--overwrite"]) == 0
    assert "nf4 lookup tables" in capsys.readouterr().out
    assert read_header(out)["dtype"] == "nf4"


def test_convert_and_converted_dir_errors_are_one_line(trained_run, converted, tmp_path,
                                                       capsys):
    cfg = load_preset("dense-tiny").with_overrides(
        ["model.vocab_size=97", "model.d_model=32", "model.n_layers=1",
         "model.attention.n_heads=2"])
    write_checkpoint(tmp_path / "dense", 1, MoELM(cfg.model), cfg)
    lut = str(converted("fp16"))
    new = str(tmp_path / "new")
    cases = [
        (["convert", "mole-lut", str(tmp_path / "dense"), "--out", new],
         "model.ffn.kind is 'dense'; only a MoLE run"),
        (["convert", "mole-lut", str(trained_run), "--out", lut], "already exists"),
        (["convert", "mole-lut", str(trained_run), "--out", new, "--dtype", "fp8"],
         "--dtype 'fp8': not a lookup-table dtype; allowed: fp32, fp16, bf16, int8, nf4"),
        (["convert", "mole-lut", lut, "--out", new], "already a converted MoLE directory"),
        (["eval", str(trained_run), "--storage", "mmap"],
         "--storage mmap: applies to a converted MoLE directory"),
        (["eval", lut, "--storage", "disk"], "--storage 'disk': allowed auto, ram, mmap"),
        (["eval", lut, "--storage", "pinned"], "needs a CUDA device"),
        (["eval", lut, "--tasks", "cloze"], "--tasks/--lm-eval take the training run"),
        (["generate", "--preset", "dense-tiny", "--storage", "ram"], "not to an untrained"),
    ]
    for argv, words in cases:
        _one_line_error(capsys, argv, words)
    assert not (tmp_path / "new").exists()


def test_bench_mole_decode_quick_json(capsys):
    assert main(["bench", "mole-decode", "--quick", "--json", "--batches", "1", "--steps", "3",
                 "--rounds", "1"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["model"] for r in rows} == {"dense", "moe", "moe-offloaded", "mole-ram",
                                          "mole-disk"}
    for r in rows:
        assert {"model", "batch", "ms_per_token", "ratio_to_dense", "bytes_per_token"} <= set(r)
        assert r["batch"] == 1 and r["ms_per_token"] > 0 and r["ratio_to_dense"] > 0
    by = {(r["model"], r["cache"]): r for r in rows}
    assert by[("mole-ram", "-")]["bytes_per_token"] == 2 * 4 * 64 * 2  # L * N * d * fp16
    assert by[("dense", "-")]["bytes_per_token"] == 0

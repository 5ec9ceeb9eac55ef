"""moelab.loading.open_model opens every kind of model directory with the same model; the
commands (eval, report, generate, export hf, train --init-from) take each kind."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

from imports.hf_models import build  # noqa: E402
from moelab.errors import CheckpointError, ConfigError  # noqa: E402
from moelab.imports import import_hf  # noqa: E402
from moelab.loading import model_dir_kind, open_model, read_model_config  # noqa: E402
from train.conftest import VOCAB, tiny_data  # noqa: E402,F401  (tiny_data: a fixture)



@pytest.fixture
def dirs(tmp_path, tiny_data):  # noqa: F811
    """A transformers Qwen3 directory with the data's tokenizer, its import and its export."""
    from moelab.export.hf import export_hf

    hf = tmp_path / "hf"
    ref = build("qwen3", hf, vocab_size=VOCAB)  # the data's tokenizer has VOCAB tokens
    shutil.copyfile(tiny_data / "tokenizer.json", hf / "tokenizer.json")
    run = import_hf(hf, tmp_path / "run")
    exp = export_hf(run, tmp_path / "export")
    return {"ref": ref, "hf": hf, "run": run, "export": exp,
            "checkpoint": run / "checkpoints" / "step-00000000"}


def test_every_kind_opens_to_the_same_logits(dirs):
    x = torch.randint(0, 300, (2, 11))
    with torch.no_grad():
        want = dirs["ref"](x).logits
    for kind in ("run", "checkpoint", "hf", "export"):
        m = open_model(dirs[kind])
        assert m.kind == {"export": "hf-export"}.get(kind, kind)
        assert m.tokenizer is not None and m.tokenizer.name == "tokenizer.json"
        assert m.owner == (dirs["run"] if kind in ("run", "checkpoint") else dirs[kind])
        with torch.no_grad():
            torch.testing.assert_close(m.model(x).logits, want, rtol=1e-5, atol=1e-5)
        assert read_model_config(dirs[kind]).model == m.config.model


def test_not_a_model_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no such run or model directory"):
        model_dir_kind(tmp_path / "absent")
    with pytest.raises(CheckpointError, match="not a model directory"):
        model_dir_kind(tmp_path)


def test_commands_take_a_transformers_directory(dirs, tiny_data, capsys):  # noqa: F811
    from moelab.cli import main

    for kind in ("hf", "export", "run"):
        assert main(["eval", str(dirs[kind]), "--data", str(tiny_data), "--json"]) == 0
        res = json.loads(capsys.readouterr().out)
        assert res["perplexity"] > 1
        assert main(["generate", str(dirs[kind]), "--prompt", "The", "--max-new-tokens", "3",
                     "--temperature", "0"]) == 0
        capsys.readouterr()
    ppl = [json.loads((dirs[k] / "eval.json").read_text())["perplexity"]
           for k in ("hf", "export", "run")]
    assert max(ppl) - min(ppl) < 1e-3 * ppl[0]  # one model, three directories


def test_train_init_from_starts_at_the_imported_model(dirs, tiny_data, tmp_path):  # noqa: F811
    """`train --init-from` starts from the weights (its step-0 validation loss is the imported
    model's) with a fresh optimizer, and the run records where it started."""
    from moelab.cli import main
    from moelab.data.loader import TokenLoader
    from moelab.train.step import evaluate_loss

    out = tmp_path / "ft"
    assert main(["train", "--init-from", str(dirs["run"]), "--data", str(tiny_data), "--out",
                 str(out), "--steps", "2", "--no-progress", "--set", "train.seq_len=32",
                 "--set", "train.batch_size=4", "--set", "train.eval_batches=2",
                 "--set", "train.eval_every=1"]) == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    val0 = next(r["val_loss"] for r in lines if r.get("step") == 0 and "val_loss" in r)
    loader = TokenLoader(tiny_data, "val", 4, 32, 0)
    ref = evaluate_loss(open_model(dirs["run"]).model, loader.eval_batches(2), 4,
                        torch.device("cpu"))
    assert abs(val0 - ref["val_loss"]) < 1e-4
    info = json.loads((out / "run.json").read_text())
    assert info["init_from"] == str(dirs["run"].resolve())
    with pytest.raises(ConfigError, match="--init-from"):
        from moelab.train.loop import load_initial_weights
        from moelab.model import MoELM
        from helpers import tiny

        load_initial_weights(MoELM(tiny().model), dirs["run"])


def test_compare_member_from_a_model_directory(dirs, tiny_data, tmp_path):  # noqa: F811
    """A model directory joins a study as a member trained on from its weights."""
    from moelab.compare.study import run_compare

    out = tmp_path / "cmp"
    run_compare([str(dirs["run"])], tiny_data, 2 * 4 * 32, out,
                sets=("train.seq_len=32", "train.batch_size=4", "train.eval_batches=2",
                      "train.eval_every=0"), tasks=(), progress=False)
    member = out / "run"
    row = json.loads((member / "compare.json").read_text())["row"]
    assert row["model"] == "run" and row["val_ppl"] > 1
    assert json.loads((member / "run.json").read_text())["init_from"] == str(dirs["run"].resolve())

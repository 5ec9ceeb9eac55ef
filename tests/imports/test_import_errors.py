"""Bad input to `moelab import hf`: each case is one line on stderr naming the file, field or
tensor, exit code 2, and no run directory left behind."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from imports.hf_models import build  # noqa: E402
from moelab.cli import main  # noqa: E402


@pytest.fixture
def hf_dir(tmp_path):
    src = tmp_path / "hf"
    build("qwen3_moe", src)
    return src


def _edit_config(src, **changes):
    path = src / "config.json"
    d = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            d.pop(k, None)
        else:
            d[k] = v
    path.write_text(json.dumps(d))


def _rewrite_weights(src, fn):
    from safetensors.torch import load_file, save_file

    sd = load_file(str(src / "model.safetensors"))
    save_file(fn(sd), str(src / "model.safetensors"), metadata={"format": "pt"})


def _tokenizer(path, n_words):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, **{f"w{i}": i + 1 for i in range(n_words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))


CASES = {
    "no_config": (lambda s: (s / "config.json").unlink(), "no config.json"),
    "unsupported_architecture": (lambda s: _edit_config(s, architectures=["GPT2LMHeadModel"]),
                                 "architectures=['GPT2LMHeadModel'] is not supported"),
    "unknown_field": (lambda s: _edit_config(s, attn_logit_softcapping=30.0),
                      "field attn_logit_softcapping=30.0 is not supported"),
    "unsupported_rope": (lambda s: _edit_config(s, rope_parameters={"rope_type": "yarn",
                                                                    "factor": 4.0}),
                         "rope_type='yarn' is not supported"),
    "dense_layers_between": (lambda s: _edit_config(s, mlp_only_layers=[1]),
                             "mlp_only_layers=[1] is not supported"),
    "missing_field": (lambda s: _edit_config(s, hidden_size=None), "field 'hidden_size' is missing"),
    "missing_tensor": (lambda s: _rewrite_weights(s, lambda sd: {
        k: v for k, v in sd.items() if k != "model.layers.1.mlp.experts.2.up_proj.weight"}),
        "tensor 'model.layers.1.mlp.experts.2.up_proj.weight' is missing from the checkpoint"),
    "unmapped_tensor": (lambda s: _rewrite_weights(s, lambda sd: {
        **sd, "model.layers.0.self_attn.extra.weight": torch.zeros(2)}),
        "tensor 'model.layers.0.self_attn.extra.weight' is not mapped"),
    "shape_mismatch": (lambda s: _rewrite_weights(s, lambda sd: {
        **sd, "model.layers.0.self_attn.o_proj.weight": torch.zeros(32, 16)}),
        "shape mismatch: model.layers.0.self_attn.o_proj.weight [32, 16]"),
    "tokenizer_larger_than_vocab": (lambda s: _tokenizer(s / "tokenizer.json", 400),
                                    "the tokenizer has 401 tokens but config.json's vocab_size "
                                    "is 320"),
    "pickled_weights_only": (lambda s: ((s / "model.safetensors").rename(s / "pytorch_model.bin")),
                             "would need unpickling"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line(case, hf_dir, tmp_path, capsys):
    damage, fragment = CASES[case]
    damage(hf_dir)
    out = tmp_path / "run"
    assert main(["import", "hf", str(hf_dir), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("moelab: error: "), err
    assert fragment in err, err
    assert not out.exists()


def test_missing_shard_of_an_index(hf_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(hf_dir).save_pretrained(hf_dir, max_shard_size="30KB")
    (hf_dir / "model.safetensors").unlink(missing_ok=True)
    shards = sorted(hf_dir.glob("model-*.safetensors"))
    shards[1].unlink()
    capsys.readouterr()  # transformers' progress bars
    assert main(["import", "hf", str(hf_dir), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{shards[1].name}: shard named in" in err, err


def test_out_exists_and_missing_dir(hf_dir, tmp_path, capsys):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    assert main(["import", "hf", str(hf_dir), "--out", str(tmp_path / "busy")]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert main(["import", "hf", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r")]) == 2
    assert "no such model directory" in capsys.readouterr().err


def test_sliding_window_on_some_layers_only_is_refused(tmp_path, capsys):
    src = tmp_path / "hf"
    build("qwen3_window", src, max_window_layers=1)  # layer 0 full, layer 1 sliding
    assert main(["import", "hf", str(src), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "layer_types mixes" in err

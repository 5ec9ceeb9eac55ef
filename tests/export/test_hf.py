"""HF transformers export: every tiny preset loads with AutoModelForCausalLM (offline,
trust_remote_code), gives moelab's logits, generates with the cache; the tokenizer loads with
AutoTokenizer; lm-eval's own `hf` model scores a local task like moelab's adapter does."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")

transformers = pytest.importorskip("transformers")

from helpers import assert_greedy_equal, small_tokenizer, tiny  # noqa: E402
from moelab.compare.study import tiny_presets  # noqa: E402
from moelab.config import load_preset  # noqa: E402
from moelab.errors import CheckpointError, ConfigError, MoelabError  # noqa: E402
from moelab.export.hf import export_hf  # noqa: E402
from moelab.model import MoELM  # noqa: E402
from moelab.train.checkpoint import write_checkpoint  # noqa: E402

VOCAB = 300


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    return small_tokenizer(tmp_path_factory.mktemp("tok"), VOCAB)


def small_config(preset: str, *sets: str):
    """The preset at test size: d 32, 2 layers (kinds whose own knobs do not fit that keep their
    preset size, which is still small)."""
    sizes = (f"model.vocab_size={VOCAB}", "model.max_seq_len=64", "train.seq_len=64")
    try:
        return tiny(*sizes, *sets, base=preset)
    except MoelabError:
        return load_preset(preset).with_overrides([*sizes, *sets])


def make_run(run_dir, tokenizer_file, cfg, seed=0):
    torch.manual_seed(seed)
    model = MoELM(cfg.model)
    write_checkpoint(run_dir, 3, model, cfg)
    shutil.copyfile(tokenizer_file, run_dir / "tokenizer.json")
    return model.eval()


def load_hf(out):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()


@pytest.mark.parametrize("preset", tiny_presets())
def test_every_tiny_preset_exports_loads_and_generates(preset, tokenizer_file, tmp_path):
    cfg = small_config(preset)
    run = tmp_path / "run"
    model = make_run(run, tokenizer_file, cfg)
    out = export_hf(run, tmp_path / f"hf-{preset}")
    hf = load_hf(out)
    assert type(hf).__name__ == "MoelabForCausalLM"
    # every stored tensor loaded, aliases (a tied head) still one tensor
    ours = dict(model.named_parameters(remove_duplicate=False))
    theirs = dict(hf.model.named_parameters(remove_duplicate=False))
    assert set(ours) == set(theirs)
    for name, p in ours.items():
        assert torch.equal(theirs[name], p), name
    if cfg.model.tie_embeddings:
        assert hf.model.head.weight is hf.model.embed.weight

    g = torch.Generator().manual_seed(1)
    ids_BT = torch.randint(0, VOCAB, (2, 20), generator=g)
    with torch.no_grad():
        ref = model(ids_BT[:, :-1], ids_BT[:, 1:])
        out_hf = hf(ids_BT[:, :-1], labels=ids_BT[:, :-1])  # HF shifts labels itself
    torch.testing.assert_close(out_hf.logits, ref.logits, rtol=0, atol=1e-5)
    # labels shifted by one: the same targets as moelab's, minus the last position
    with torch.no_grad():
        shifted = model(ids_BT[:, :-2], ids_BT[:, 1:-1]).loss
    torch.testing.assert_close(out_hf.loss, shifted, rtol=1e-5, atol=1e-5)

    prompt_BT = ids_BT[:, :6]
    want = model.generate(prompt_BT, 8, temperature=0)
    got = hf.generate(prompt_BT, max_new_tokens=8, do_sample=False, min_new_tokens=8)
    assert_greedy_equal(got, want, model)  # greedy with moelab's KV cache behind HF's Cache
    no_cache = hf.generate(prompt_BT, max_new_tokens=8, do_sample=False, min_new_tokens=8,
                           use_cache=False)
    assert_greedy_equal(no_cache, want, model)
    # every decoding step's logits equal a full forward over the same prefix: a cache that
    # transformers failed to hand back (an empty one each step) fails here even when a random
    # model's greedy tokens happen to agree
    res = hf.generate(prompt_BT, max_new_tokens=8, do_sample=False, min_new_tokens=8,
                      output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        full = model(res.sequences[:, :-1]).logits[:, prompt_BT.shape[1] - 1:]
    torch.testing.assert_close(torch.stack(res.logits, 1), full, rtol=0, atol=1e-4)


def test_cache_methods_used_by_generate(tokenizer_file, tmp_path):
    """Beam search (reorder), several samples per prompt (repeat), crop and the mask check."""
    cfg = small_config("dense-tiny", "model.tie_embeddings=false")
    run = tmp_path / "run"
    make_run(run, tokenizer_file, cfg)
    hf = load_hf(export_hf(run, tmp_path / "hf"))
    ids_BT = torch.randint(0, VOCAB, (1, 5))
    beams = hf.generate(ids_BT, max_new_tokens=4, num_beams=3, do_sample=False, min_new_tokens=4)
    assert beams.shape == (1, 9) and torch.equal(beams[:, :5], ids_BT)
    torch.manual_seed(0)
    samples = hf.generate(ids_BT, max_new_tokens=4, do_sample=True, num_return_sequences=3,
                          min_new_tokens=4)
    assert samples.shape == (3, 9)
    with torch.no_grad():
        full = hf(ids_BT, use_cache=True)
        cache = full.past_key_values
        assert cache.get_seq_length() == 5
        cache.crop(2)  # forget the last two positions, then feed them again
        again = hf(ids_BT[:, 3:], past_key_values=cache)
        torch.testing.assert_close(again.logits, full.logits[:, 3:], rtol=0, atol=1e-5)
        with pytest.raises(ValueError, match="attention mask"):
            hf(ids_BT, attention_mask=torch.tensor([[0, 1, 1, 1, 1]]))


def test_tokenizer_loads_offline_as_fast_tokenizer(tokenizer_file, tmp_path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from moelab.data.tokenizer import load_tokenizer

    run = tmp_path / "run"
    make_run(run, tokenizer_file, small_config("dense-tiny"))
    out = export_hf(run, tmp_path / "hf")
    tok = AutoTokenizer.from_pretrained(out)
    assert isinstance(tok, PreTrainedTokenizerFast)
    ours = load_tokenizer(tokenizer_file)
    text = "Shall I compare thee to a summer's day? <|endoftext|> Thou art more lovely."
    assert tok(text).input_ids == ours.encode(text)  # literal special text stays bytes
    assert tok.decode(ours.encode(text)) == text
    assert tok.eos_token_id == tok.bos_token_id == tok.pad_token_id == ours.eos_id
    assert tok.model_max_length == 64
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_moelab.MoelabForCausalLM"
    assert "top_k" not in cfg and cfg["moelab_config"]["ffn"]["top_k"] == 0
    assert "pip install moelab" in (out / "README.md").read_text()


def test_export_errors(tokenizer_file, tmp_path):
    run = tmp_path / "run"
    make_run(run, tokenizer_file, small_config("dense-tiny"))
    (run / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer"):
        export_hf(run, tmp_path / "hf")
    shutil.copyfile(tokenizer_file, run / "tokenizer.json")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not an exported moelab model"):
        export_hf(run, busy)
    out = export_hf(run, tmp_path / "hf")
    with pytest.raises(ConfigError, match="pass --overwrite"):
        export_hf(run, out)
    assert export_hf(run, out, overwrite=True) == out  # an earlier export is replaced
    with pytest.raises(ConfigError, match="is a moelab run directory; refusing"):
        export_hf(out, run, overwrite=True)  # never another run, also with --overwrite
    with pytest.raises(CheckpointError):
        export_hf(tmp_path / "nothing", tmp_path / "hf2")


@pytest.mark.slow
def test_lm_eval_hf_model_matches_moelab_adapter(tokenizer_file, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from moelab.eval.harness import MoelabLM
    from moelab.eval.tasks import export_lm_eval_tasks

    cfg = small_config("moe-tiny")
    run = tmp_path / "run"
    make_run(run, tokenizer_file, cfg)
    out = export_hf(run, tmp_path / "hf")
    include = export_lm_eval_tasks(tmp_path / "tasks", ["cloze"])
    manager = TaskManager(include_path=include, include_defaults=False)
    common = dict(tasks=["moelab_cloze"], task_manager=manager, limit=12, batch_size=4,
                  log_samples=True)
    res_hf = simple_evaluate(
        model="hf", model_args=f"pretrained={out},trust_remote_code=True,dtype=float32",
        device="cpu", **common)
    res_ours = simple_evaluate(model=MoelabLM(path=str(run)), **common)
    # the same log-likelihood of every choice of every item, so the same accuracies
    ll_hf = [r[0] for s in res_hf["samples"]["moelab_cloze"] for r in s["filtered_resps"]]
    ll_ours = [r[0] for s in res_ours["samples"]["moelab_cloze"] for r in s["filtered_resps"]]
    assert len(ll_hf) == 12 * 4
    assert ll_hf == pytest.approx(ll_ours, abs=1e-4)
    for key in ("acc,none", "acc_norm,none"):
        assert res_hf["results"]["moelab_cloze"][key] == res_ours["results"]["moelab_cloze"][key]

"""`moelab import hf`: every supported architecture, built tiny and random with transformers'
own classes, imports to a run whose logits equal transformers' (float32), whose cached greedy
generation equals transformers' token for token, and which exports back to a transformers
directory with the same logits."""
from __future__ import annotations

import json
import os

import pytest
import torch

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")

transformers = pytest.importorskip("transformers")

from helpers import small_tokenizer  # noqa: E402
from imports.hf_models import CASES, MOE_CASES, VOCAB, build  # noqa: E402
from moelab.imports import import_hf  # noqa: E402
from moelab.train.checkpoint import load_model  # noqa: E402

TOK_VOCAB = 300


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    return small_tokenizer(tmp_path_factory.mktemp("tok"), TOK_VOCAB)


def make(name, tmp_path, tokenizer_file=None):
    import shutil

    src = tmp_path / f"hf-{name}"
    ref = build(name, src)
    if tokenizer_file is not None:
        shutil.copyfile(tokenizer_file, src / "tokenizer.json")
    return src, ref


def tokens(seed=1, B=2, T=13):
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def hf_greedy(ref, x, n):
    """Greedy tokens from the transformers model: its own generate (with its cache), or, for
    the patched gated variant, repeated full forwards."""
    with torch.no_grad():
        try:
            return ref.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                pad_token_id=0)
        except Exception:  # pragma: no cover - fallback only if generate cannot run
            out = x
            for _ in range(n):
                out = torch.cat([out, ref(out).logits[:, -1].argmax(-1, keepdim=True)], 1)
            return out


@pytest.mark.parametrize("name", list(CASES))
def test_logits_and_greedy_generation_equal_transformers(name, tmp_path):
    src, ref = make(name, tmp_path)
    run = import_hf(src, tmp_path / "run")
    model, cfg, ckpt = load_model(run)
    model.eval()
    x = tokens()
    with torch.no_grad():
        want, got = ref(x).logits, model(x).logits
    assert want.abs().max() > 1.0  # not a near-zero model that any mapping would match
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # greedy decoding with moelab's KV cache equals transformers' greedy tokens
    prompt = tokens(seed=2, B=1, T=5)
    n = 16  # past the sliding windows of the window cases
    want_ids = hf_greedy(ref, prompt, n)
    got_ids = model.generate(prompt, n, temperature=0)
    assert got_ids.tolist() == want_ids.tolist()
    info = json.loads((run / "run.json").read_text())["imported"]
    assert info["architecture"] == CASES[name][1]


def test_options_each_case_needs_are_set(tmp_path):
    """The cases exercise what they are named for (so the equality tests above cover them)."""
    expect = {
        "llama": lambda m: m.attention.bias and m.ffn.bias and m.attention.rope_scaling.kind
        == "llama3",
        "llama_linear_tied": lambda m: m.tie_embeddings and m.attention.rope_scaling.kind
        == "linear" and m.head_dim == 16,
        "mistral_window": lambda m: m.attention.sliding_window == 5,
        "qwen2": lambda m: m.attention.qkv_bias and not m.attention.bias,
        "qwen3": lambda m: m.attention.qk_norm and m.attention.qk_norm_scope == "head",
        "qwen3_window": lambda m: m.attention.sliding_window == 6,
        "mixtral": lambda m: m.router.renormalize and m.ffn.n_experts == 4,
        "olmoe": lambda m: m.attention.qk_norm_scope == "all" and not m.router.renormalize,
        "qwen2_moe": lambda m: m.ffn.shared_gate and m.ffn.shared_expert_dim == 24
        and m.attention.qkv_bias,
        "qwen3_moe": lambda m: m.router.renormalize and m.ffn.expert_dim == 16,
        "qwen3_moe_unnormalised": lambda m: not m.router.renormalize,
        "gated_headwise": lambda m: m.attention.gate.granularity == "headwise"
        and m.attention.gate.position == "sdpa" and not m.attention.bias,
        "gated_elementwise": lambda m: m.attention.gate.granularity == "elementwise"
        and m.attention.bias,
    }
    from moelab.imports.hf import hf_model_config

    assert set(expect) == set(CASES)
    for name, check in expect.items():
        src = tmp_path / name
        build(name, src)
        assert check(hf_model_config(src)[2].model), name


@pytest.mark.parametrize("name", list(CASES))
def test_import_export_transformers_round_trip(name, tmp_path, tokenizer_file):
    from transformers import AutoModelForCausalLM

    from moelab.export.hf import export_hf

    src, ref = make(name, tmp_path, tokenizer_file)
    run = import_hf(src, tmp_path / "run")
    out = export_hf(run, tmp_path / "export")
    back = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, ref(x).logits, rtol=1e-5, atol=1e-5)


def test_sharded_checkpoint_streams_and_bf16_kept(tmp_path):
    """A checkpoint in several shards (index.json) imports; --dtype keep stores bf16 as bf16,
    float32 converts; the logits of a bf16 checkpoint equal transformers' in float32."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    src = tmp_path / "hf"
    build("qwen3_moe", src).to(torch.bfloat16).save_pretrained(src, max_shard_size="20KB")
    (src / "model.safetensors").unlink()
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    assert (src / "model.safetensors.index.json").is_file()
    assert len(list(src.glob("model-*.safetensors"))) > 2
    run = import_hf(src, tmp_path / "run")
    ckpt = run / "checkpoints" / "step-00000000" / "model.safetensors"
    with safe_open(str(ckpt), "pt") as f:
        assert f.get_tensor("embed.weight").dtype == torch.bfloat16
    model, _, _ = load_model(run)
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x).logits, ref(x).logits, rtol=1e-5,
                                   atol=1e-5)
    run32 = import_hf(src, tmp_path / "run32", dtype="float32")
    with safe_open(str(run32 / "checkpoints" / "step-00000000" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("embed.weight").dtype == torch.float32


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_fused_expert_layout_imports(name, tmp_path):
    """transformers 5's in-memory layout (experts.gate_up_proj (E, 2h, d), experts.down_proj
    (E, d, h)) imports as well as the per-expert layout save_pretrained writes."""
    from safetensors.torch import save_file

    src, ref = make(name, tmp_path)
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in sd)
    (src / "model.safetensors").unlink()
    save_file(sd, str(src / "model.safetensors"), metadata={"format": "pt"})
    model, _, _ = load_model(import_hf(src, tmp_path / "run"))
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x).logits, ref(x).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", MOE_CASES[:1])
def test_report_on_imported_moe_shows_expert_load(name, tmp_path, tokenizer_file):
    pytest.importorskip("matplotlib")
    from moelab.eval.report import write_report

    src, _ = make(name, tmp_path, tokenizer_file)
    run = import_hf(src, tmp_path / "run")
    path = write_report(run)
    rep = json.loads((path.parent / "report.json").read_text())
    assert "expert_load" in rep["figures"]
    assert "No training curves" in path.read_text()


def test_cli_import_then_generate(tmp_path, tokenizer_file, capsys):
    from moelab.cli import main

    src, _ = make("llama", tmp_path, tokenizer_file)
    assert main(["import", "hf", str(src), "--out", str(tmp_path / "run")]) == 0
    assert "LlamaForCausalLM" in capsys.readouterr().out
    assert main(["generate", str(tmp_path / "run"), "--prompt", "The", "--max-new-tokens", "4",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out.strip()


def test_tied_checkpoint_that_stores_the_head_too(tmp_path):
    """Some tied checkpoints store lm_head.weight as well: it is the embedding, not unmapped."""
    from safetensors.torch import load_file, save_file

    src, ref = make("qwen3", tmp_path)  # tie_word_embeddings=True
    sd = load_file(str(src / "model.safetensors"))
    assert "lm_head.weight" not in sd
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    save_file(sd, str(src / "model.safetensors"), metadata={"format": "pt"})
    model, _, _ = load_model(import_hf(src, tmp_path / "run"))
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x).logits, ref(x).logits, rtol=1e-5, atol=1e-5)

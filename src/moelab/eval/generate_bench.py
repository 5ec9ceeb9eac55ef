"""Greedy generation speed: moelab's `MoELM.generate` against transformers' `generate` on the
equivalent transformers model carrying the same weights.

- dense-tiny -> `LlamaForCausalLM` (pre-LN RMSNorm, RoPE rotate-half, SwiGLU, tied head).
- moe-tiny -> `Qwen2MoeForCausalLM`: top-2 softmax router without renormalisation, SwiGLU
  experts, one shared expert. Qwen2-MoE has two things moelab's model does not, made inert:
  q/k/v biases (set to zero) and a sigmoid gate on the shared expert (weight zero, so the gate
  is sigmoid(0) = 1/2, and the shared down projection is doubled: exact in binary floating point).

Both run greedy decoding with a KV cache from the same prompt, in the same process and thread
count, interleaved (moelab, peer, moelab, ...), median of the repeats; the generated tokens are
compared (`same_tokens`). tokens/s = batch x new tokens / wall time of one `generate` call
(prefill included). ratio = moelab tokens/s / peer tokens/s.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import statistics
import sys

import torch

from moelab.bench_results import cpu_features, cpu_name, load_average, time_ms, write_section

MODELS = ("dense-tiny", "moe-tiny")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SECTION = "generate"


def _moelab_model(preset: str, seed: int):
    from moelab.config import load_preset
    from moelab.model import MoELM

    torch.manual_seed(seed)
    return MoELM(load_preset(preset).model).eval()


def _check_supported(cfg) -> None:
    a, f, n = cfg.attention, cfg.ffn, cfg.norm
    ok = (a.kind == "dense" and a.gate.position == "none" and not a.qk_norm and not a.bias
          and a.rope_fraction == 1.0 and n.kind == "rmsnorm" and n.scheme == "pre"
          and f.gated and f.activation == "silu" and not f.bias and cfg.n_distinct_layers ==
          cfg.n_layers)
    if f.kind == "moe":
        ok = ok and cfg.router.kind == "softmax_topk" and f.n_shared_experts <= 1
    elif f.kind != "dense":
        ok = False
    if not ok:
        raise ValueError("the generate benchmark maps only dense-tiny-like (Llama) and "
                         "moe-tiny-like (Qwen2-MoE) models to transformers")


def peer_model(model):
    """The transformers model equivalent to `model` (a dense or FFN-MoE MoELM), same weights."""
    cfg = model.config
    _check_supported(cfg)
    a, f = cfg.attention, cfg.ffn
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
                  num_hidden_layers=cfg.n_layers, num_attention_heads=a.n_heads,
                  num_key_value_heads=a.kv_heads, head_dim=cfg.head_dim,
                  max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm.eps,
                  rope_theta=a.rope_theta, tie_word_embeddings=cfg.tie_embeddings,
                  hidden_act="silu", attn_implementation="sdpa")
    if f.kind == "dense":
        from transformers import LlamaConfig, LlamaForCausalLM

        hf = LlamaForCausalLM(LlamaConfig(intermediate_size=f.d_ff, attention_bias=False,
                                          mlp_bias=False, **common))
    else:
        from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

        shared = f.n_shared_experts * (f.shared_expert_dim or f.expert_dim)
        hf = Qwen2MoeForCausalLM(Qwen2MoeConfig(
            intermediate_size=max(shared, 1), num_experts=f.n_experts,
            num_experts_per_tok=f.top_k, moe_intermediate_size=f.expert_dim,
            shared_expert_intermediate_size=max(shared, 1), norm_topk_prob=cfg.router.renormalize,
            decoder_sparse_step=1, mlp_only_layers=[], **common))
    _copy_weights(model, hf)
    return hf.eval()


@torch.no_grad()
def _copy_weights(model, hf) -> None:
    sd = {}
    sd["model.embed_tokens.weight"] = model.embed.weight
    sd["model.norm.weight"] = model.norm.weight
    sd["lm_head.weight"] = model.head.weight
    for i, block in enumerate(model.layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = block.attn_norm.weight
        sd[p + "post_attention_layernorm.weight"] = block.ffn_norm.weight
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[p + f"self_attn.{name}.weight"] = getattr(block.attn, name).weight
        ffn = block.ffn
        if hasattr(ffn, "experts"):
            ex = ffn.experts
            sd[p + "mlp.gate.weight"] = ffn.router.weight
            # transformers keeps (E, 2h, d) [gate; up] and (E, d, h): moelab's W1, W3 transposed
            sd[p + "mlp.experts.gate_up_proj"] = torch.cat(
                [ex.w1_EDH.transpose(1, 2), ex.w3_EDH.transpose(1, 2)], dim=1)
            sd[p + "mlp.experts.down_proj"] = ex.w2_EHD.transpose(1, 2)
            dense, q = ffn.shared, "mlp.shared_expert."
            hf_layer = hf.model.layers[i].mlp
            for bias in ("q_proj", "k_proj", "v_proj"):
                sd[p + f"self_attn.{bias}.bias"] = torch.zeros_like(
                    getattr(hf.model.layers[i].self_attn, bias).bias)
            sd[p + "mlp.shared_expert_gate.weight"] = torch.zeros_like(
                hf_layer.shared_expert_gate.weight)
            down_scale = 2.0  # undoes the shared gate's sigmoid(0) = 1/2
        else:
            dense, q, down_scale = ffn, "mlp.", 1.0
        if dense is not None:
            gate_W, up_W = dense.up.weight.chunk(2, dim=0)
            sd[p + q + "gate_proj.weight"] = gate_W
            sd[p + q + "up_proj.weight"] = up_W
            sd[p + q + "down_proj.weight"] = dense.down.weight * down_scale
    missing, unexpected = hf.load_state_dict({k: v.detach().clone() for k, v in sd.items()},
                                             strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not hf.config.tie_word_embeddings]
    if missing or unexpected:
        raise RuntimeError(f"weight mapping incomplete: missing {missing}, unexpected "
                           f"{unexpected}")


def _peer_generate(hf, prompt_BT: torch.Tensor, n_new: int) -> torch.Tensor:
    return hf.generate(prompt_BT, attention_mask=torch.ones_like(prompt_BT),
                       max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                       num_beams=1, pad_token_id=0, eos_token_id=None)


def run_benchmark(models=MODELS, batches=(1, 8), dtypes=("float32", "bfloat16"),
                  prompt_len: int = 16, new_tokens: int = 48, repeats: int = 5,
                  threads: int | None = 1, seed: int = 0) -> list[dict]:
    """Rows {model, batch, dtype, prompt, new_tokens, moelab_tok_s, peer, peer_tok_s, ratio,
    same_tokens, ms_per_step_moelab, ms_per_step_peer}."""
    if threads:
        torch.set_num_threads(threads)
    rows = []
    for preset in models:
        base = _moelab_model(preset, seed)
        for dtype_name in dtypes:
            model = copy.deepcopy(base).to(DTYPES[dtype_name])
            hf = peer_model(model)
            peer_name = type(hf).__name__
            for B in batches:
                gen = torch.Generator().manual_seed(seed + B)
                prompt_BT = torch.randint(0, model.config.vocab_size, (B, prompt_len),
                                          generator=gen)
                ours = model.generate(prompt_BT, new_tokens, temperature=0)
                theirs = _peer_generate(hf, prompt_BT, new_tokens)
                same = bool(torch.equal(ours, theirs))
                agree = float((ours[:, prompt_len:] == theirs[:, prompt_len:]).float().mean())
                times = {"moelab": [], "peer": []}
                for it in range(repeats):  # interleaved, order alternating every round
                    order = ["moelab", "peer"] if it % 2 == 0 else ["peer", "moelab"]
                    for who in order:
                        if who == "moelab":
                            ms = time_ms(lambda: model.generate(prompt_BT, new_tokens,
                                                                temperature=0))
                        else:
                            ms = time_ms(lambda: _peer_generate(hf, prompt_BT, new_tokens))
                        times[who].append(ms)
                ms_ours, ms_peer = (statistics.median(times[k]) for k in ("moelab", "peer"))
                n = B * new_tokens
                rows.append(dict(model=preset, batch=B, dtype=dtype_name, prompt=prompt_len,
                                 new_tokens=new_tokens,
                                 moelab_tok_s=round(n / ms_ours * 1e3, 1), peer=peer_name,
                                 peer_tok_s=round(n / ms_peer * 1e3, 1),
                                 ratio=round(ms_peer / ms_ours, 3), same_tokens=same,
                                 token_agreement=round(agree, 4),
                                 ms_per_step_moelab=round(ms_ours / new_tokens, 2),
                                 ms_per_step_peer=round(ms_peer / new_tokens, 2)))
            del hf
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = ["| model | peer | batch | dtype | moelab tok/s | peer tok/s | ratio | moelab ms/step "
             "| peer ms/step | same tokens |", "|---|---|---:|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        same = "yes" if r["same_tokens"] else f"no ({r['token_agreement']:.0%} agree)"
        lines.append(f"| {r['model']} | {r['peer']} | {r['batch']} | {r['dtype']} "
                     f"| {r['moelab_tok_s']:.0f} | {r['peer_tok_s']:.0f} | {r['ratio']:.2f} "
                     f"| {r['ms_per_step_moelab']:.2f} | {r['ms_per_step_peer']:.2f} | {same} |")
    return "\n".join(lines)


def results_section(rows: list[dict], command: str, load_before: str, load_after: str) -> str:
    import transformers

    r0 = rows[0] if rows else {"prompt": 0, "new_tokens": 0}
    return "\n".join([
        "## Greedy generation: moelab vs transformers",
        "",
        f"Command: `{command}`  ",
        f"Date: {datetime.date.today().isoformat()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, CPU: {cpu_name()} ({cpu_features()}), threads: "
        f"{torch.get_num_threads()}, 1-minute load average before/after: {load_before} / "
        f"{load_after}  ",
        f"Random weights (seed 0) copied into the transformers model; prompt {r0['prompt']} "
        f"tokens, {r0['new_tokens']} new tokens, greedy, KV cache on both sides; median of "
        "interleaved runs. ratio = moelab tokens/s / transformers tokens/s (target >= 1.1).",
        "",
        markdown_table(rows),
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="moelab bench generate", description=__doc__.split("\n")[0])
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--quick", action="store_true", help="few tokens and repeats (smoke test)")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--write-results", action="store_true",
                   help="replace the generate section of benchmarks/RESULTS.md")
    p.add_argument("--results-file", default=None, help="RESULTS.md path (default: repo's)")
    args = p.parse_args(argv)
    for name in ("prompt_len", "new_tokens", "repeats", "threads"):
        v = getattr(args, name)
        if v is not None and v < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if any(b < 1 for b in args.batches):
        p.error(f"--batches must be >= 1, got {args.batches}")
    load_before = load_average()
    rows = run_benchmark(args.models, tuple(args.batches), tuple(args.dtypes), args.prompt_len,
                         args.new_tokens or (4 if args.quick else 48),
                         args.repeats or (1 if args.quick else 5), args.threads)
    print(json.dumps(rows, indent=1) if args.json else markdown_table(rows))
    if args.write_results:
        command = "moelab bench generate " + " ".join(sys.argv[2:] if argv is None else argv)
        path = write_section(SECTION, results_section(rows, command.strip(), load_before,
                                                      load_average()), args.results_file)
        print(f"wrote {path}", file=sys.stderr)
    return 0

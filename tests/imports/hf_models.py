"""Tiny random transformers models of every architecture moelab imports, built with the installed
transformers' own classes and written with `save_pretrained` (nothing comes from a hub), plus the
gated-attention paper's Qwen3 variant (not in transformers: its attention is patched below from
the paper's equations and checkpoint layout, reference umoe-and-gated-attention.md B1)."""
from __future__ import annotations

import math

import torch

VOCAB = 320  # the tokenizer fixture has 300 tokens; models pad their vocabulary, as real ones do
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              attn_implementation="eager")
MOE = dict(num_experts=4, num_experts_per_tok=2)

# name -> (config class, model class, config fields); each name exercises something
CASES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        attention_bias=True, mlp_bias=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 16})),
    "llama_linear_tied": ("LlamaConfig", "LlamaForCausalLM", dict(
        tie_word_embeddings=True, head_dim=16,
        rope_parameters={"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0})),
    "mistral_window": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=5)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict()),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16, tie_word_embeddings=True)),
    "qwen3_window": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        use_sliding_window=True, sliding_window=6, max_window_layers=0)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(
        num_local_experts=4, num_experts_per_tok=2, sliding_window=7)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(**MOE, norm_topk_prob=False)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        **MOE, moe_intermediate_size=16, shared_expert_intermediate_size=24,
        norm_topk_prob=False)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        **MOE, moe_intermediate_size=16, norm_topk_prob=True, head_dim=16)),
    "qwen3_moe_unnormalised": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        **MOE, moe_intermediate_size=16, norm_topk_prob=False)),
    "gated_headwise": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        headwise_attn_output_gate=True, elementwise_attn_output_gate=False, use_qk_norm=True,
        qkv_bias=False)),
    "gated_elementwise": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        headwise_attn_output_gate=False, elementwise_attn_output_gate=True, use_qk_norm=True,
        qkv_bias=True)),
}
MOE_CASES = ["mixtral", "olmoe", "qwen2_moe", "qwen3_moe", "qwen3_moe_unnormalised"]


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Weights far from init (norms far from 1, decisive routers), so that a swapped or
    transposed tensor changes the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if "norm" in name and p.dim() == 1:
                p.copy_(1 + 0.3 * r)
            else:
                fan_in = p.shape[-1] if p.dim() >= 2 else 16
                p.copy_(r * 1.5 / math.sqrt(fan_in))


def build(name: str, out_dir, seed: int = 0, **overrides):
    """The model of case `name` (config fields `overrides` changed), randomised and saved to
    `out_dir`; returns it in eval mode."""
    import transformers

    cfg_cls, model_cls, extra = CASES[name]
    cfg = getattr(transformers, cfg_cls)(**{**COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg)
    if name.startswith("gated"):
        gate_attention(model, cfg)
    randomize(model, seed)
    model.save_pretrained(out_dir)
    return model.eval()


def gate_attention(model, cfg) -> None:
    """The gated-attention paper's Qwen3 attention: q_proj also emits the gate logits, laid out
    per KV group as [the group's query heads | their gates] (one per head when headwise, one per
    channel when elementwise); output of head h times sigmoid(gate_h) before o_proj (Eq. 5, G1).
    Its `qkv_bias` puts biases on q, k, v and o."""
    import types

    import torch.nn as nn
    from transformers.models.qwen3 import modeling_qwen3 as mq

    headwise = cfg.headwise_attn_output_gate
    for layer in model.model.layers:
        at = layer.self_attn
        H, K, D = cfg.num_attention_heads, cfg.num_key_value_heads, at.head_dim
        G = H // K
        width = H * D + (H if headwise else H * D)
        at.q_proj = nn.Linear(cfg.hidden_size, width, bias=cfg.qkv_bias)
        for p in ("k_proj", "v_proj"):
            setattr(at, p, nn.Linear(cfg.hidden_size, K * D, bias=cfg.qkv_bias))
        at.o_proj = nn.Linear(H * D, cfg.hidden_size, bias=cfg.qkv_bias)

        def forward(self, hidden_states, position_embeddings, attention_mask, cache=None,
                    past_key_values=None, **kwargs):
            B, T, _ = hidden_states.shape
            qg = self.q_proj(hidden_states).view(B, T, K, -1)
            q, g = qg.split([G * D, qg.shape[-1] - G * D], dim=-1)
            g = g.reshape(B, T, H, -1)  # (..., 1) headwise or (..., D) elementwise
            q = self.q_norm(q.reshape(B, T, H, D)).transpose(1, 2)
            k = self.k_norm(self.k_proj(hidden_states).view(B, T, K, D)).transpose(1, 2)
            v = self.v_proj(hidden_states).view(B, T, K, D).transpose(1, 2)
            cos, sin = position_embeddings
            q, k = mq.apply_rotary_pos_emb(q, k, cos, sin)
            cache = cache if cache is not None else past_key_values
            if cache is not None:
                k, v = cache.update(k, v, self.layer_idx)
            o, w = mq.eager_attention_forward(self, q, k, v, attention_mask, dropout=0.0,
                                              scaling=self.scaling)
            o = o * torch.sigmoid(g)  # (B, T, H, D) after eager_attention_forward's transpose
            return self.o_proj(o.reshape(B, T, H * D)), w

        at.forward = types.MethodType(forward, at)

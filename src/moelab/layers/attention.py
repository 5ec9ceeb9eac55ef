"""Dense causal self-attention (MHA / GQA / MQA, optional QK-norm, RoPE, output gate) and the
attention helpers every attention kind shares."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from moelab.config import ModelConfig
from moelab.layers.base import (Counts, ForwardContext, LayerCache, attention_core_macs,
                                linear_counts, mark_residual_out)
from moelab.layers.gate import AttentionGate
from moelab.layers.norms import make_norm
from moelab.layers.rope import RotaryEmbedding
from moelab.registry import ATTENTION


def causal_attention(q_BHTD: torch.Tensor, k_BKSD: torch.Tensor, v_BKSD: torch.Tensor,
                     past: int, scale: float | None = None, window: int = 0) -> torch.Tensor:
    """SDPA where query t (absolute position past + t) sees keys 0 .. past + t.

    `is_causal` in SDPA aligns the mask to the top-left corner, which is only right without a
    cache prefix; with one, a single new token needs no mask and a chunk needs an explicit one.
    `scale` defaults to 1/sqrt(head dim); SwitchHead pre-scales q and k and passes 1.
    `window` > 0 (sliding-window attention, Mistral): query p sees only keys p - window < j <= p.
    """
    T, S = q_BHTD.shape[-2], k_BKSD.shape[-2]
    gqa = q_BHTD.shape[1] != k_BKSD.shape[1]
    if window and S > window:
        j_S = torch.arange(S, device=q_BHTD.device)
        p_T1 = past + torch.arange(T, device=q_BHTD.device)[:, None]
        mask = (j_S <= p_T1) & (j_S > p_T1 - window)
        return F.scaled_dot_product_attention(q_BHTD, k_BKSD, v_BKSD, attn_mask=mask,
                                              scale=scale, enable_gqa=gqa)
    if past == 0:
        if v_BKSD.shape[-1] != q_BHTD.shape[-1] and q_BHTD.device.type == "cpu":
            return blocked_causal_attention(q_BHTD, k_BKSD, v_BKSD, scale)
        return F.scaled_dot_product_attention(q_BHTD, k_BKSD, v_BKSD, is_causal=True,
                                              scale=scale, enable_gqa=gqa)
    mask = None
    if T > 1:
        mask = torch.arange(S, device=q_BHTD.device) <= (
            past + torch.arange(T, device=q_BHTD.device)[:, None])
    return F.scaled_dot_product_attention(q_BHTD, k_BKSD, v_BKSD, attn_mask=mask, scale=scale,
                                          enable_gqa=gqa)


CAUSAL_BLOCK = 64  # query rows per block of `blocked_causal_attention` (ad hoc: 32-128 alike)


def blocked_causal_attention(q_BHTD: torch.Tensor, k_BKTD: torch.Tensor, v_BKTV: torch.Tensor,
                             scale: float | None = None, block: int = CAUSAL_BLOCK) -> torch.Tensor:
    """Causal attention without a cache prefix, computed block by block below the diagonal.

    On CPU, SDPA has no flash kernel when the value width differs from the key width (UMoE-Att
    mixes d-wide hidden states with d_k-wide keys); its math fallback computes the full T x T
    score matrix, half of it masked, and copies the shared K/V head once per query head. Here
    query block [s, e) meets keys [0, e) only, and the query heads of a K/V head are stacked into
    one matrix against that head's keys, so no K/V copy is made: about half the score and mixing
    MACs at long T (measured on the UMoE-Att layers: `benchmarks/attention_experts.py`). Scores
    and softmax run in float32 at least; plain autograd gives the backward.
    """
    B, H, T, dk = q_BHTD.shape
    Hk, V = k_BKTD.shape[1], v_BKTV.shape[-1]
    G = H // Hk  # query heads per K/V head
    scale = dk ** -0.5 if scale is None else scale
    work = torch.promote_types(q_BHTD.dtype, torch.float32)
    q_NGTD = q_BHTD.reshape(B * Hk, G, T, dk)
    k_NTD, v_NTV = k_BKTD.reshape(B * Hk, T, dk), v_BKTV.reshape(B * Hk, T, V)
    outs = []
    for s in range(0, T, block):
        e = min(s + block, T)
        n = e - s
        q_NMD = q_NGTD[:, :, s:e].reshape(B * Hk, G * n, dk)  # the G heads' rows of this block
        scores_NGne = (q_NMD @ k_NTD[:, :e].transpose(1, 2)).view(B * Hk, G, n, e)
        future_ne = torch.ones(n, e, dtype=torch.bool, device=q_BHTD.device).triu(s + 1)
        scores_NGne = scores_NGne.to(work).mul(scale).masked_fill(future_ne, float("-inf"))
        p_NMe = scores_NGne.softmax(-1).to(v_NTV.dtype).view(B * Hk, G * n, e)
        outs.append((p_NMe @ v_NTV[:, :e]).view(B * Hk, G, n, V))
    return torch.cat(outs, dim=2).view(B, H, T, V)


def first_token_attention(q_BHTD: torch.Tensor, k_BKSD: torch.Tensor, past: int) -> torch.Tensor:
    """Mean attention weight on the first token (the attention sink of arXiv 2505.06708 Tab. 4).

    Averaged over batch, heads and queries at absolute position >= 1 (position 0 can only attend
    to itself). Computed with an explicit score matrix: for analysis, not for training.
    """
    T, S = q_BHTD.shape[-2], k_BKSD.shape[-2]
    k = k_BKSD.repeat_interleave(q_BHTD.shape[1] // k_BKSD.shape[1], dim=1).float()
    scores = q_BHTD.float() @ k.transpose(-1, -2) / math.sqrt(q_BHTD.shape[-1])
    qpos = past + torch.arange(T, device=q_BHTD.device)[:, None]
    scores = scores.masked_fill(torch.arange(S, device=q_BHTD.device) > qpos, float("-inf"))
    p_first_BHT = scores.softmax(-1)[..., 0]
    keep = (qpos[:, 0] >= 1)
    if not keep.any():
        return p_first_BHT.new_zeros(())
    return p_first_BHT[..., keep].mean()


@ATTENTION.register("dense")
class DenseAttention(nn.Module):
    """softmax(q k^T / sqrt(d)) v with n_kv_heads <= n_heads (GQA/MQA) and an optional gate."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, shared: dict | None = None):
        super().__init__()
        a, d = cfg.attention, cfg.d_model
        self.n_heads, self.n_kv, self.head_dim = a.n_heads, a.kv_heads, cfg.head_dim
        self.gate = AttentionGate(a.gate, self.n_heads, self.n_kv, self.head_dim)
        qkv_bias = a.bias or a.qkv_bias
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim + self.gate.width, bias=qkv_bias)
        self.k_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=a.bias)
        self.window = a.sliding_window
        mark_residual_out(self.o_proj.weight)
        # peri-LN: queries, keys and the gate read a normed input; values read the raw stream.
        self.qk_in_norm = make_norm(cfg) if cfg.norm.scheme == "peri" else nn.Identity()
        self.q_norm = qk_norm(cfg, self.n_heads, self.head_dim) if a.qk_norm else nn.Identity()
        self.k_norm = qk_norm(cfg, self.n_kv, self.head_dim) if a.qk_norm else nn.Identity()
        self.rope = RotaryEmbedding(self.head_dim, a.rope_fraction, a.rope_theta,
                                    a.rope_scaling)

    def forward(self, x_BTD: torch.Tensor, cache: LayerCache | None, past: int,
                ctx: ForwardContext) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        xn_BTD = self.qk_in_norm(x_BTD)
        q_BTHD, g = self.gate.split(self.q_proj(xn_BTD))
        k_BTKD = self.k_proj(xn_BTD).view(B, T, self.n_kv, self.head_dim)
        v_BTKD = self.gate.on_value(self.v_proj(x_BTD).view(B, T, self.n_kv, self.head_dim), g)
        q_BHTD = self.rope(self.q_norm(q_BTHD).transpose(1, 2), past, ctx.rope)
        k_BKTD = self.rope(self.k_norm(k_BTKD).transpose(1, 2), past, ctx.rope)
        v_BKTD = v_BTKD.transpose(1, 2)
        if cache is not None:
            kv = cache.update(k=k_BKTD, v=v_BKTD)
            k_BKTD, v_BKTD = kv["k"], kv["v"]
        o_BHTD = causal_attention(q_BHTD, k_BKTD, v_BKTD, past, window=self.window)
        if ctx.diagnostics:
            ctx.add_diag("attn_first_token", first_token_attention(q_BHTD, k_BKTD, past))
        o_BTHD = self.gate.on_output(o_BHTD.transpose(1, 2), g)
        return self.o_proj(o_BTHD.reshape(B, T, self.n_heads * self.head_dim))

    @staticmethod
    def count(cfg: ModelConfig, T: int, full_attention: bool = False) -> Counts:
        a, d, dh = cfg.attention, cfg.d_model, cfg.head_dim
        gate = AttentionGate(a.gate, a.n_heads, a.kv_heads, dh)
        qkv_bias = a.bias or a.qkv_bias
        c = (linear_counts("attn.q_proj", d, a.n_heads * dh + gate.width, T, qkv_bias)
             + linear_counts("attn.k_proj", d, a.kv_heads * dh, T, qkv_bias)
             + linear_counts("attn.v_proj", d, a.kv_heads * dh, T, qkv_bias)
             + linear_counts("attn.o_proj", a.n_heads * dh, d, T, a.bias))
        core = attention_core_macs(a.n_heads, T, dh, dh, full_attention)
        c += Counts(0, 0, core, {"attn.scores_mix": core})
        qk_dims = (dh, dh) if a.qk_norm_scope == "head" else (a.n_heads * dh, a.kv_heads * dh)
        norm_p = (sum(norm_params(cfg, w) for w in qk_dims) * a.qk_norm
                  + norm_params(cfg) * (cfg.norm.scheme == "peri"))
        return c + Counts(norm_p, norm_p, 0, {})


class AllHeadsNorm(nn.Module):
    """A norm over the dims of all heads at once (OLMoE normalises q_proj's whole output)."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm

    def forward(self, x_BTHD: torch.Tensor) -> torch.Tensor:
        return self.norm(x_BTHD.flatten(-2)).view_as(x_BTHD)


def qk_norm(cfg: ModelConfig, n_heads: int, head_dim: int) -> nn.Module:
    """QK-norm on (B, T, heads, head_dim): per head, or over all heads (`qk_norm_scope`)."""
    if cfg.attention.qk_norm_scope == "all":
        return AllHeadsNorm(make_norm(cfg, n_heads * head_dim))
    return make_norm(cfg, head_dim)


def norm_params(cfg: ModelConfig, dim: int | None = None) -> int:
    return (dim or cfg.d_model) * (2 if cfg.norm.kind == "layernorm" else 1)

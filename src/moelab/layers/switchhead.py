"""SwitchHead attention (Csordas et al., NeurIPS 2024; the attention of MoEUT), reference 1.3.

Per head h, with xn the normed layer input and x the value input (xn under pre-LN, the raw
residual under peri-LN):

    q_h, k_h = xn W_q^h, xn W_k^h                                     dense, H heads of d_h
    V_h      = sum_{e in topk(s^v_h)} s^v_{h,e} x W_v[h, e]            s^v = sigmoid(xn W_sel_v)
    o_h      = softmax((q_h d_h^-1/4)(k_h d_h^-1/4)^T) V_h             = SDPA, scale d_h^-1/2
    y        = sum_h sum_{e in topk(s^o_h)} s^o_{h,e} o_h W_o[h, e]    s^o = sigmoid(xn W_sel_o)

The top-k (`attention.top_k`) is taken within each head's `attention.n_experts` (Ea) experts;
gates are the raw sigmoid scores. The V router sees the key side and the O router the query
side; in self-attention both are xn. With Ea = 1 the layer is dense V and O plus a per-head
output gate sigmoid(xn W_sel_o) (MoEUT's "standard RoPE attention with a learned output gate").

Experts are the stacked weights w_v (H*Ea, d, d_v) and w_o (H*Ea, d_v, d), run through the
routed engine with expert ids h * Ea + e: one plan per router decision, built once and used by
the forward and backward of that matmul (V: token rows gathered per pair; O: each head's output
is the pair's row, and `combine` sums over heads and slots, MoEUT's one reduction).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from moelab.config import ModelConfig
from moelab.errors import ConfigError
from moelab.layers.attention import causal_attention, first_token_attention, norm_params
from moelab.layers.attn_experts import (HeadwiseRouter, attention_router_config,
                                        check_attention_experts, gate_width)
from moelab.layers.base import (Counts, ForwardContext, LayerCache, attention_core_macs,
                                linear_counts, mark_residual_out)
from moelab.layers.init import set_fan_in
from moelab.layers.norms import make_norm
from moelab.layers.rope import RotaryEmbedding
from moelab.ops import build_plan, combine, routed_matmul
from moelab.registry import ATTENTION


@ATTENTION.register("switchhead")
class SwitchHeadAttention(nn.Module):
    default_router = "sigmoid_topk"  # MoEUT's sigma-MoE selection

    @classmethod
    def check_config(cls, cfg: ModelConfig) -> None:
        a = cfg.attention
        check_attention_experts(cfg, "switchhead")
        if a.kv_heads != a.n_heads:
            raise ConfigError(f"model.attention.n_kv_heads: {a.kv_heads}; switchhead has one key "
                              f"head per query head, set it to n_heads={a.n_heads} (or null)")

    def __init__(self, cfg: ModelConfig, layer_idx: int, shared: dict | None = None):
        super().__init__()
        a, d = cfg.attention, cfg.d_model
        H, dh, dv, Ea = a.n_heads, cfg.head_dim, a.expert_dim or cfg.head_dim, a.n_experts
        self.H, self.dh, self.dv, self.Ea = H, dh, dv, Ea
        self.top_k = a.top_k if Ea > 1 else 1
        self.backend = cfg.moe_backend
        # peri-LN: Q, K, routers and gates read a normed input, values the raw residual
        self.in_norm = make_norm(cfg) if cfg.norm.scheme == "peri" else nn.Identity()
        self.q_proj = nn.Linear(d, H * dh, bias=False)
        self.k_proj = nn.Linear(d, H * dh, bias=False)
        self.q_norm = make_norm(cfg, dh) if a.qk_norm else nn.Identity()
        self.k_norm = make_norm(cfg, dh) if a.qk_norm else nn.Identity()
        self.rope = RotaryEmbedding(dh, a.rope_fraction, a.rope_theta)
        if Ea > 1:
            rcfg = attention_router_config(cfg, self.default_router)
            self.v_router = HeadwiseRouter(d, H, Ea, self.top_k, rcfg, "attn_v_router")
            self.o_router = HeadwiseRouter(d, H, Ea, self.top_k, rcfg, "attn_o_router")
            self.w_v_EDV = nn.Parameter(torch.randn(H * Ea, d, dv) * 0.02)
            self.w_o_EVD = nn.Parameter(torch.randn(H * Ea, dv, d) * 0.02)
            set_fan_in(self.w_o_EVD, H * dv)  # MoEUT init: o ~ N(0, s / sqrt(H d_h)) (ref. 1.5)
            mark_residual_out(self.w_o_EVD)
        else:
            self.v_proj = nn.Linear(d, H * dv, bias=False)
            self.o_proj = nn.Linear(H * dv, d, bias=False)
            self.sel_o = nn.Linear(d, H, bias=False)  # per-head output gate (ref. 1.3)
            mark_residual_out(self.o_proj.weight)
        self.gw = gate_width(cfg, dv)
        self.gate_proj = nn.Linear(d, H * self.gw, bias=False) if self.gw else None

    def forward(self, x_BTD: torch.Tensor, cache: LayerCache | None, past: int,
                ctx: ForwardContext) -> torch.Tensor:
        B, T, D = x_BTD.shape
        H, dh = self.H, self.dh
        xn_BTD = self.in_norm(x_BTD)
        # MoEUT scales q and k by d_h^-1/4 each with SDPA scale 1: the same scores as SDPA's
        # d_h^-1/2, which is applied inside the kernel instead of two passes over q and k
        q_BHTD = self.rope(self.q_norm(self.q_proj(xn_BTD).view(B, T, H, dh)).transpose(1, 2),
                           past, ctx.rope)
        k_BHTD = self.rope(self.k_norm(self.k_proj(xn_BTD).view(B, T, H, dh)).transpose(1, 2),
                           past, ctx.rope)
        v_BHTV = self._values(x_BTD, xn_BTD, ctx).transpose(1, 2)
        if cache is not None:
            kv = cache.update(k=k_BHTD, v=v_BHTV)
            k_BHTD, v_BHTV = kv["k"], kv["v"]
        o_BHTV = causal_attention(q_BHTD, k_BHTD, v_BHTV, past, scale=dh ** -0.5)
        if ctx.diagnostics:  # the helper's 1/sqrt(d_h) scores are MoEUT's
            ctx.add_diag("attn_first_token", first_token_attention(q_BHTD, k_BHTD, past))
        o_BTHV = o_BHTV.transpose(1, 2)
        if self.gate_proj is not None:  # G1 (arXiv 2505.06708 eq. 5) before the output experts
            o_BTHV = o_BTHV * torch.sigmoid(self.gate_proj(xn_BTD).view(B, T, H, self.gw))
        return self._outputs(o_BTHV, xn_BTD, ctx)

    def _values(self, x_BTD, xn_BTD, ctx) -> torch.Tensor:
        """V_h = sum_e s^v_{h,e} x W_v[h, e], (B, T, H, d_v)."""
        B, T, D = x_BTD.shape
        if self.Ea == 1:
            return self.v_proj(x_BTD).view(B, T, self.H, self.dv)
        idx_BTHK, w_BTHK = self.v_router(xn_BTD, ctx)
        J = self.H * self.top_k  # (head, slot) pairs per token
        plan = build_plan(idx_BTHK.reshape(B * T, J), self.H * self.Ea)
        y_SV = routed_matmul(x_BTD.reshape(B * T, D), self.w_v_EDV, plan, gather=True,
                             backend=self.backend)
        # each (token, head) sums its own k experts: one weighted gather-sum (embedding_bag)
        head_plan = plan.regrouped(self.top_k)
        w_NK = w_BTHK.reshape(B * T * self.H, self.top_k).to(y_SV.dtype)
        return combine(y_SV, head_plan, w_NK).view(B, T, self.H, self.dv)

    def _outputs(self, o_BTHV, xn_BTD, ctx) -> torch.Tensor:
        """y = sum_h sum_e s^o_{h,e} o_h W_o[h, e], (B, T, d)."""
        B, T, H, V = o_BTHV.shape
        if self.Ea == 1:
            o_BTHV = o_BTHV * torch.sigmoid(self.sel_o(xn_BTD))[..., None]
            return self.o_proj(o_BTHV.reshape(B, T, H * V))
        idx_BTHK, w_BTHK = self.o_router(xn_BTD, ctx)
        J = H * self.top_k
        plan = build_plan(idx_BTHK.reshape(B * T, J), H * self.Ea)
        # each (token, head, slot) pair's input row is that head's attention output
        o_TJV = o_BTHV.reshape(B * T, H, 1, V).expand(B * T, H, self.top_k, V).reshape(B * T, J, V)
        y_SD = routed_matmul(plan.sort_pairs(o_TJV), self.w_o_EVD, plan, gather=False,
                             backend=self.backend)
        return combine(y_SD, plan, w_BTHK.reshape(B * T, J).to(y_SD.dtype)).view(B, T, -1)

    @staticmethod
    def count(cfg: ModelConfig, T: int, full_attention: bool = False) -> Counts:
        a, d, dh = cfg.attention, cfg.d_model, cfg.head_dim
        H, dv, Ea = a.n_heads, a.expert_dim or cfg.head_dim, a.n_experts
        k = a.top_k if Ea > 1 else 1
        c = linear_counts("attn.q_proj", d, H * dh, T) + linear_counts("attn.k_proj", d, H * dh, T)
        if Ea > 1:
            for name in ("attn.v_router", "attn.o_router"):
                c += linear_counts(name, d, H * Ea, T)
            per = d * dv  # one V (or O) expert matrix
            for name in ("attn.v_experts", "attn.o_experts"):
                c += Counts(H * Ea * per, H * k * per, T * H * k * per, {name: T * H * k * per})
        else:
            c += (linear_counts("attn.v_proj", d, H * dv, T)
                  + linear_counts("attn.o_proj", H * dv, d, T)
                  + linear_counts("attn.out_gate", d, H, T))
        gw = gate_width(cfg, dv)
        if gw:
            c += linear_counts("attn.gate", d, H * gw, T)
        core = attention_core_macs(H, T, dh, dv, full_attention)
        c += Counts(0, 0, core, {"attn.scores_mix": core})
        norm_p = (norm_params(cfg, dh) * 2 * a.qk_norm
                  + norm_params(cfg) * (cfg.norm.scheme == "peri"))
        return c + Counts(norm_p, norm_p, 0, {})

"""UMoE (Yang, Wang, Li; arXiv 2505.07260): pre-mixing attention experts, and attention and FFN
sharing one expert bank. Reference part A.

Multi-head attention regrouped (UMoE eq. 6-9): y = sum_i (a_i X W_v^i) W_o^i = sum_i E_i(a_i X)
with the expert E(z) = z W_v W_o; tokens are mixed first, then pass an FFN-like expert. UMoE-Att
(`attention.kind: umoe_att`) routes over E two-layer experts (eq. 1-2), u the normed input:

    p      = softmax(u W_r)  (float32), top-k, not renormalised unless router.renormalize
    q_i    = u W_q + RMSNorm_r(u W_a^i) W_b^i                    eq. 11 (+ the code's rank norm)
    q_0    = u W_q0                                              the shared head (full rank)
    K      = U W_k                                               one key head, RoPE on all d_k
    a_i    = softmax(q_i K^T / sqrt(d_k))                        values are U itself (no W_v)
    y      = sum_{i in topk} p_i E_i(a_i U)  +  E_0(a_0 U)       E_0: dense MLP, unweighted

Experts are 2-layer SiLU MLPs of width `attention.expert_dim` (not gated, A3.6); the shared one
has width n_shared_experts x expert_dim. The 1 + k heads of a token are one multi-query SDPA
call (queries (B, 1+k, T, d_k) against one key head, value head dim d); the cache holds one key
head and U, d_k + d values per token. The low-rank queries run through the routed engine with
the router's plan over (token, slot) pairs; the expert FFNs take each pair's mixed vector as its
own row (a plan over the T*k pairs, one slot each) and run as the bank's fused expert FFN.

UMoE (`attention.kind: umoe_att` + `ffn.kind: umoe_ffn`): the FFN-MoE's routed experts are the
same bank, with its own router and its own shared expert (A3, `ffn_separate_router`,
`seperate_share_expert_for_ffn`). Under peri-LN queries, keys, router and gate read the normed
input and U is the raw residual.

Counting convention (flops.count): an attention kind with `holds_expert_bank = True` counts the
bank's parameters; `umoe_ffn` then counts only its router and shared expert (parameters), and
its routed experts' MACs. Active parameters count k_att + k_ffn experts, capped at E (an upper
bound: both mixers may pick the same expert).

G1 gate (arXiv 2505.06708 eq. 5, `gate.position: sdpa`) on each mixed vector before its expert:
a routed head's gate belongs to its expert, sigmoid(u W_g^i), W_g (E, d, 1) headwise or
(E, d, d) elementwise (E d^2 parameters: headwise is the affordable one); the shared head has its
own (d, 1 or d) gate.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from moelab.config import ModelConfig
from moelab.errors import ConfigError
from moelab.layers.attention import causal_attention, first_token_attention, norm_params
from moelab.layers.attn_experts import (attention_router_config, check_attention_experts,
                                        gate_width, umoe_bank)
from moelab.layers.base import (Counts, ForwardContext, LayerCache, attention_core_macs,
                                linear_counts, mark_residual_out)
from moelab.layers.experts import ExpertBank
from moelab.layers.moe import MoEFFN
from moelab.layers.norms import make_norm
from moelab.layers.rope import RotaryEmbedding
from moelab.layers.routers import make_router
from moelab.ops import build_plan, routed_matmul
from moelab.registry import ATTENTION, FFN


@ATTENTION.register("umoe_att")
class PreMixingAttention(nn.Module):
    default_router = "softmax_topk"
    holds_expert_bank = True  # see the counting convention in the module docstring

    @classmethod
    def check_config(cls, cfg: ModelConfig) -> None:
        a, f = cfg.attention, cfg.ffn
        check_attention_experts(cfg, "umoe_att")
        width = a.expert_dim or cfg.head_dim
        if f.kind == "umoe_ffn" and (f.n_experts, f.expert_dim) != (a.n_experts, width):
            raise ConfigError(
                f"model.ffn: UMoE's attention and FFN share one expert bank, but "
                f"model.attention has {a.n_experts} experts of width {width} and model.ffn "
                f"{f.n_experts} of width {f.expert_dim}; set model.ffn.n_experts = "
                "model.attention.n_experts and model.ffn.expert_dim = model.attention.expert_dim")

    def __init__(self, cfg: ModelConfig, layer_idx: int, shared: dict | None = None):
        super().__init__()
        a, d = cfg.attention, cfg.d_model
        E, k, r, dk = a.n_experts, a.top_k, a.q_rank, cfg.head_dim
        h = a.expert_dim or dk
        self.E, self.top_k, self.rank, self.dk, self.d = E, k, r, dk, d
        self.n_shared = 1 if a.n_shared_experts else 0
        self.backend = cfg.moe_backend
        self.in_norm = make_norm(cfg) if cfg.norm.scheme == "peri" else nn.Identity()
        self.router = make_router(d, E, k, attention_router_config(cfg, self.default_router),
                                  name="attn_router")
        self.q_proj = nn.Linear(d, dk, bias=False)  # W_q, common to every routed head
        if r:
            self.w_a_EDR = nn.Parameter(torch.randn(E, d, r) * 0.02)
            self.rank_norm = make_norm(cfg, r)  # one norm over the bottleneck, all experts
            self.w_b_ERK = nn.Parameter(torch.randn(E, r, dk) * 0.02)
        self.k_proj = nn.Linear(d, dk, bias=False)
        self.q_norm = make_norm(cfg, dk) if a.qk_norm else nn.Identity()
        self.k_norm = make_norm(cfg, dk) if a.qk_norm else nn.Identity()
        self.rope = RotaryEmbedding(dk, a.rope_fraction, a.rope_theta)
        self.experts = umoe_bank(cfg, shared, E, h, "model.attention")
        mark_residual_out(self.experts.w2_EHD)
        self.gw = gate_width(cfg, d)
        self.w_g_EDG = nn.Parameter(torch.randn(E, d, self.gw) * 0.02) if self.gw else None
        if self.n_shared:
            hs = a.n_shared_experts * h
            self.q_shared = nn.Linear(d, dk, bias=False)
            self.shared_up = nn.Linear(d, hs, bias=False)  # E_0: a dense 2-layer SiLU MLP
            self.shared_down = nn.Linear(hs, d, bias=False)
            self.g_shared = nn.Linear(d, self.gw, bias=False) if self.gw else None
            mark_residual_out(self.shared_down.weight)

    def forward(self, x_BTD: torch.Tensor, cache: LayerCache | None, past: int,
                ctx: ForwardContext) -> torch.Tensor:
        B, T, D = x_BTD.shape
        N, k, ns = B * T, self.top_k, self.n_shared
        un_BTD = self.in_norm(x_BTD)  # = x_BTD under pre-LN (the block already normed it)
        un_ND = un_BTD.reshape(N, D)
        r = self.router(un_BTD, ctx)
        idx_NK = r.idx_BTK.reshape(N, k)
        plan = build_plan(idx_NK, self.E)
        q_NKD = self.q_proj(un_ND)[:, None].expand(N, k, self.dk)
        if self.rank:  # UMoE eq. 11: the expert-specific low-rank part of each routed query
            h_SR = self.rank_norm(routed_matmul(un_ND, self.w_a_EDR, plan, gather=True,
                                                backend=self.backend))
            q_NKD = q_NKD + plan.unsort_pairs(routed_matmul(h_SR, self.w_b_ERK, plan,
                                                            gather=False, backend=self.backend))
        if ns:
            q_NKD = torch.cat([self.q_shared(un_ND)[:, None], q_NKD], dim=1)
        J = ns + k
        q_BJTD = self.rope(self.q_norm(q_NKD.reshape(B, T, J, self.dk)).transpose(1, 2), past,
                           ctx.rope)
        k_B1TD = self.rope(self.k_norm(self.k_proj(un_BTD).view(B, T, 1, self.dk)).transpose(1, 2),
                           past, ctx.rope)
        u_B1TD = x_BTD.view(B, 1, T, D)  # the values are the hidden states themselves
        if cache is not None:  # d_k + d values per token
            kv = cache.update(k=k_B1TD, u=u_B1TD)
            k_B1TD, u_B1TD = kv["k"], kv["u"]
        mixed_BJTD = causal_attention(q_BJTD, k_B1TD, u_B1TD, past)  # a_i U for all 1 + k heads
        if ctx.diagnostics:
            ctx.add_diag("attn_first_token", first_token_attention(q_BJTD, k_B1TD, past))
        mixed_NJD = mixed_BJTD.transpose(1, 2).reshape(N, J, D)
        if self.w_g_EDG is not None:
            g_NKG = plan.unsort_pairs(routed_matmul(un_ND, self.w_g_EDG, plan, gather=True,
                                                    backend=self.backend))
            if ns:
                g_NKG = torch.cat([self.g_shared(un_ND)[:, None], g_NKG], dim=1)
            mixed_NJD = mixed_NJD * torch.sigmoid(g_NKG)
        # split, not two slices: its backward is one cat, a slice's a zero-filled (N, J, D) each
        shared_N1D, routed_NKD = mixed_NJD.split([ns, k], dim=1)
        # every (token, slot) pair's mixed vector is its own row: a plan over N*k rows of 1 slot
        pair_plan = build_plan(idx_NK.reshape(N * k, 1), self.E)
        w_P1 = r.weights_BTK.reshape(N * k, 1).to(x_BTD.dtype)
        y_PD = self.experts(routed_NKD.reshape(N * k, D), pair_plan, w_P1)
        y_ND = y_PD.view(N, k, D).sum(1)
        if ns:
            y_ND = y_ND + self.shared_down(F.silu(self.shared_up(shared_N1D.squeeze(1))))
        return y_ND.view(B, T, D)

    @staticmethod
    def count(cfg: ModelConfig, T: int, full_attention: bool = False) -> Counts:
        a, d, dk = cfg.attention, cfg.d_model, cfg.head_dim
        E, k, r = a.n_experts, a.top_k, a.q_rank
        h = a.expert_dim or dk
        ns = 1 if a.n_shared_experts else 0
        gw = gate_width(cfg, d)
        c = (linear_counts("attn.router", d, E, T) + linear_counts("attn.q_proj", d, dk, T)
             + linear_counts("attn.k_proj", d, dk, T))
        for name, per in (("attn.q_a", d * r), ("attn.q_b", r * dk), ("attn.gate", d * gw)):
            if per:
                c += Counts(E * per, k * per, T * k * per, {name: T * k * per})
        c += ExpertBank.count(E, d, h, T, k, name="attn.experts")
        if ns:
            hs = a.n_shared_experts * h
            c += (linear_counts("attn.q_shared", d, dk, T)
                  + linear_counts("attn.shared_up", d, hs, T)
                  + linear_counts("attn.shared_down", hs, d, T))
            if gw:
                c += linear_counts("attn.gate", d, gw, T)
        core = attention_core_macs(ns + k, T, dk, d, full_attention)
        c += Counts(0, 0, core, {"attn.scores_mix": core})
        norm_p = (norm_params(cfg, r) * (r > 0) + norm_params(cfg, dk) * 2 * a.qk_norm
                  + norm_params(cfg) * (cfg.norm.scheme == "peri"))
        return c + Counts(norm_p, norm_p, 0, {})


@FFN.register("umoe_ffn")
class UMoEFFN(MoEFFN):
    """The FFN-MoE of UMoE: `MoEFFN` (its own router `model.router` and shared expert) whose
    routed experts are the layer's shared bank (`attention.kind: umoe_att` made it, or this
    layer makes it when the attention holds none)."""

    @classmethod
    def check_config(cls, cfg: ModelConfig) -> None:
        f = cfg.ffn
        super().check_config(cfg)
        if f.activation != "silu" or f.gated:
            raise ConfigError(f"model.ffn: umoe_ffn's routed experts are the shared UMoE bank "
                              f"(SiLU, not gated); got activation={f.activation!r}, "
                              f"gated={f.gated}; set model.ffn.activation=silu, "
                              "model.ffn.gated=false")

    def __init__(self, cfg: ModelConfig, layer_idx: int, shared: dict | None = None,
                 bank: ExpertBank | None = None):
        f = cfg.ffn
        if bank is None:
            bank = umoe_bank(cfg, shared, f.n_experts, f.expert_dim, "model.ffn")
        super().__init__(cfg, layer_idx, shared=shared, bank=bank)

    @classmethod
    def count(cls, cfg: ModelConfig, T: int, full_attention: bool = False) -> Counts:
        c = super().count(cfg, T, full_attention)
        if not getattr(ATTENTION.get(cfg.attention.kind), "holds_expert_bank", False):
            return c
        f, E = cfg.ffn, cfg.ffn.n_experts
        per = ExpertBank.expert_params(1, cfg.d_model, f.expert_dim)
        extra_active = min(f.top_k, max(E - cfg.attention.top_k, 0))  # experts beyond attention's
        return Counts(c.params - E * per, c.active_params - (f.top_k - extra_active) * per,
                      c.macs, c.parts)

"""Pieces shared by the attention-expert kinds (SwitchHead, MoA, UMoE-Att): config checks, the
attention routers' config, a per-head router (SwitchHead), SDPA with an explicit scale, the
per-head output gate and the UMoE expert bank that attention and FFN hold together.

The attention routers' config is `model.router` with two attention-specific fields:
- `attention.router_kind` (None = the kind's own router: sigmoid top-k for SwitchHead, softmax
  top-k for MoA and UMoE-Att);
- `attention.entropy_coef` (None = `router.entropy_coef`): MoEUT regularises attention routers
  with delta = 0.001 and FFN routers with gamma = 0.01 (reference sec. 1.4).
Every other router setting (renormalize, jitter, switch/seq/z coefficients) is `model.router`'s.
"""
from __future__ import annotations

import dataclasses
import types

import torch
import torch.nn as nn

from moelab.config import ModelConfig, RouterConfig
from moelab.errors import ConfigError
from moelab.layers.base import ForwardContext
from moelab.layers.experts import ExpertBank, check_expert_count
from moelab.layers.routers import Routing, add_balance_losses, make_router

BANK_KEY = "expert_bank"  # the key of UMoE's bank in a block's `shared` dict


def check_attention_experts(cfg: ModelConfig, kind: str) -> None:
    """Reject settings an attention-expert kind cannot honour, naming the field."""
    a, p = cfg.attention, "model.attention"
    # a single expert is always chosen: top_k matters only with several
    check_expert_count(p, f"attention kind {kind!r}", a.n_experts,
                       a.top_k if a.n_experts > 1 else None)
    if a.bias:
        raise ConfigError(f"{p}.bias: true is not supported by attention kind {kind!r} (its "
                          "expert projections have no bias); set it to false")
    if a.gate.position == "value":
        raise ConfigError(f"{p}.gate.position: 'value' (G2) is not supported by attention kind "
                          f"{kind!r}; use 'sdpa' (G1, the paper's best position) or 'none'")


def attention_router_config(cfg: ModelConfig, default_kind: str) -> RouterConfig:
    """`model.router` with the attention routers' kind and entropy coefficient (module doc)."""
    kind = cfg.attention.router_kind or default_kind
    entropy = cfg.attention.entropy_coef
    return dataclasses.replace(cfg.router, kind=kind,
                               entropy_coef=cfg.router.entropy_coef if entropy is None else entropy)


def gate_width(cfg: ModelConfig, head_out_dim: int) -> int:
    """Width of the G1 gate of one head: 0 (no gate), 1 (headwise) or the head's output width."""
    g = cfg.attention.gate
    if g.position == "none":
        return 0
    return head_out_dim if g.granularity == "elementwise" else 1


class HeadwiseRouter(nn.Module):
    """H independent routers of Ea experts each (SwitchHead), computed as one (d, H*Ea) matmul.

    Top-k is taken within each head's Ea logits. Balance losses and metrics treat every
    (sequence, head) as its own sequence over Ea experts, so MoEUT's entropy regulariser is the
    negative entropy of each head's marginal, averaged over batch and heads (reference 1.4).
    """

    def __init__(self, d_in: int, n_heads: int, n_experts: int, top_k: int, cfg: RouterConfig,
                 name: str):
        super().__init__()
        self.n_heads, self.n_experts, self.top_k = n_heads, n_experts, top_k
        # A real Router owns the weight, so init schemes treat it as one (MoEUT row renorm).
        self.router = make_router(d_in, n_heads * n_experts, top_k, cfg, name=name)
        # add_balance_losses reads cfg / n_experts / name and pools entropy by object identity
        self.loss_view = types.SimpleNamespace(cfg=cfg, n_experts=n_experts, name=name)

    def forward(self, x_BTD: torch.Tensor,
                ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Global expert ids h * Ea + e, (B, T, H, k), and their float32 gate values."""
        B, T, _ = x_BTD.shape
        H, Ea, k = self.n_heads, self.n_experts, self.top_k
        r = self.router
        if self.training and r.cfg.jitter > 0:
            x_BTD = x_BTD * torch.empty_like(x_BTD).uniform_(1 - r.cfg.jitter, 1 + r.cfg.jitter)
        logits_BTHE = (x_BTD.float() @ r.weight.float().t()).view(B, T, H, Ea)
        idx_BTHK, w_BTHK = r.select(logits_BTHE, r.selection_bias(logits_BTHE.shape[-2:]))
        per_head = Routing(idx_BTHK.transpose(1, 2).reshape(B * H, T, k),
                           w_BTHK.transpose(1, 2).reshape(B * H, T, k),
                           logits_BTHE.transpose(1, 2).reshape(B * H, T, Ea))
        add_balance_losses(self.loss_view, per_head, ctx)
        offset_H1 = torch.arange(H, device=idx_BTHK.device)[:, None] * Ea
        r.record_load(idx_BTHK + offset_H1)  # loads over all H * Ea experts (balance bias)
        if r.bias_rate and ctx.stats:
            ctx.add_metric(f"{self.loss_view.name}.bias", r.balance_bias_E.clone())
        return idx_BTHK + offset_H1, w_BTHK


def umoe_bank(cfg: ModelConfig, shared: dict | None, n_experts: int, d_expert: int,
              owner: str) -> ExpertBank:
    """The layer's UMoE expert bank: taken from `shared` if the other mixer made it, else made
    here (and stored there), so the attention and the FFN may be built in either order.

    UMoE's experts are plain 2-layer SiLU MLPs, not gated (reference A3.6).
    """
    bank = shared.get(BANK_KEY) if shared is not None else None
    if bank is None:
        bank = ExpertBank(n_experts, cfg.d_model, d_expert, activation="silu", gated=False,
                          backend=cfg.moe_backend)
        if shared is not None:
            shared[BANK_KEY] = bank
    elif (bank.n_experts, bank.d_expert) != (n_experts, d_expert):
        raise ConfigError(
            f"{owner}: the layer's shared expert bank has {bank.n_experts} experts of width "
            f"{bank.d_expert}, this mixer asks for {n_experts} of width {d_expert}; UMoE's "
            "attention and FFN share one bank, so set model.ffn.n_experts = "
            "model.attention.n_experts and model.ffn.expert_dim = model.attention.expert_dim")
    return bank

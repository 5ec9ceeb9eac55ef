"""Dense channel mixers: SwiGLU (gated) or a plain two-layer MLP with GELU/ReLU/SiLU."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from moelab.config import ModelConfig
from moelab.layers.base import Counts, ForwardContext, linear_counts, mark_residual_out
from moelab.registry import FFN

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}


@FFN.register("dense")
class DenseFFN(nn.Module):
    """down(act(x W_gate) * (x W_up)) when gated (SwiGLU with silu), else down(act(x W_up))."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, shared: dict | None = None,
                 d_ff: int | None = None):
        super().__init__()
        f, d = cfg.ffn, cfg.d_model
        h = d_ff or f.d_ff
        self.gated = f.gated
        self.act = ACTIVATIONS[f.activation]
        self.up = nn.Linear(d, h * (2 if f.gated else 1), bias=f.bias)  # [gate | up] fused
        self.down = nn.Linear(h, d, bias=f.bias)
        mark_residual_out(self.down.weight)

    def forward(self, x_BTD: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        u = self.up(x_BTD)
        if self.gated:
            gate, up = u.chunk(2, dim=-1)
            return self.down(self.act(gate) * up)
        return self.down(self.act(u))

    @staticmethod
    def count(cfg: ModelConfig, T: int, full_attention: bool = False,
              d_ff: int | None = None) -> Counts:
        f, d = cfg.ffn, cfg.d_model
        h = d_ff or f.d_ff
        return (linear_counts("ffn.up", d, h * (2 if f.gated else 1), T, f.bias)
                + linear_counts("ffn.down", h, d, T, f.bias))

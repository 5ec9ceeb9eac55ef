"""Gated attention (Qiu et al., arXiv 2505.06708): Y' = Y * sigmoid(X W_theta)  (Eq. 5).

X is the attention layer's (normed) input, the tensor the queries are computed from.
- G1 (`position: sdpa`, best in the paper): gates each head's SDPA output, before W_o.
- G2 (`position: value`): gates the value heads right after W_v.
- `headwise`: one scalar per head; `elementwise`: one per channel.

As in the paper's code, the gate weights are fused into the query projection. Within each KV
group the fused output is laid out as [the group's query heads | their gates], which is the
official checkpoint layout (`q, g = split(q_proj(x).view(b, s, n_kv, -1), [d*G, gate])`).
"""
from __future__ import annotations

import torch

from moelab.config import GateConfig


class AttentionGate:
    """Splits a fused query+gate projection and applies the gate at its position (no weights)."""

    def __init__(self, cfg: GateConfig, n_heads: int, n_kv_heads: int, head_dim: int):
        self.position = cfg.position
        self.elementwise = cfg.granularity == "elementwise"
        self.n_heads, self.n_kv, self.head_dim = n_heads, n_kv_heads, head_dim
        self.group = n_heads // n_kv_heads  # query heads per KV head
        per_gated_head = head_dim if self.elementwise else 1
        gated_heads = {"none": 0, "sdpa": self.group, "value": 1}[self.position]
        self.per_group = gated_heads * per_gated_head  # gate width inside one KV group

    @property
    def width(self) -> int:
        """Extra output width the gate adds to the query projection."""
        return self.n_kv * self.per_group

    def split(self, qg_BTX: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Fused projection -> queries (B, T, H, D) and gate logits (or None)."""
        B, T, _ = qg_BTX.shape
        qg = qg_BTX.view(B, T, self.n_kv, self.group * self.head_dim + self.per_group)
        q, g = qg.split([self.group * self.head_dim, self.per_group], dim=-1)
        q_BTHD = q.reshape(B, T, self.n_heads, self.head_dim)
        if self.position == "none":
            return q_BTHD, None
        heads = self.n_heads if self.position == "sdpa" else self.n_kv
        return q_BTHD, g.reshape(B, T, heads, -1)

    def on_value(self, v_BTKD: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
        return v_BTKD * torch.sigmoid(g) if self.position == "value" else v_BTKD

    def on_output(self, o_BTHD: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
        return o_BTHD * torch.sigmoid(g) if self.position == "sdpa" else o_BTHD

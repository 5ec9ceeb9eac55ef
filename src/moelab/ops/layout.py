"""Row layouts the expert kernels loop over, and the slot reduction back to tokens.

A layout is the sorted pair order of a plan, either tight (expert e owns exactly its count of
rows) or bucketed (each expert's rows padded to `bucket_rows(count)`, see plan.py: stable matmul
shapes for oneDNN's per-shape JIT on CPU in bf16/fp16). Kernels see the same fields either way.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moelab.ops.plan import RoutingPlan


@dataclass(eq=False)
class Layout:
    counts: list[int]  # rows per expert (padded when bucketed)
    n_rows: int  # R: S tight, P bucketed
    rows_R: torch.Tensor  # token row of every layout row
    inverse_TK: torch.Tensor  # layout row of every (token, slot)
    pos_S: torch.Tensor | None  # layout row of every sorted pair; None when tight

    def pairs_to_rows(self, v_S: torch.Tensor | None, fill: float = 0.0) -> torch.Tensor | None:
        """Per-pair values (S,) in sorted order -> (R,), `fill` on padding rows."""
        if v_S is None or self.pos_S is None:
            return v_S
        return v_S.new_full((self.n_rows,), fill).index_copy_(0, self.pos_S, v_S)

    def rows_to_pairs(self, v_R: torch.Tensor | None) -> torch.Tensor | None:
        if v_R is None or self.pos_S is None:
            return v_R
        return v_R.index_select(0, self.pos_S)


def bucketing_pays(x: torch.Tensor) -> bool:
    """16-bit matmuls on CPU go to oneDNN, which compiles a kernel per shape; fp32 goes to MKL
    (no per-shape cost: 0.88 vs 0.80 ms measured) and CUDA libraries have none either."""
    return x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16)


def layout_for(plan: RoutingPlan, x: torch.Tensor) -> Layout:
    if bucketing_pays(x):
        b = plan.bucketed()
        return Layout(b.counts, b.n_rows, b.rows_P, b.inverse_TK, b.pos_S)
    return Layout(plan.counts(), plan.n_pairs, plan.rows_S, plan.inverse_TK, None)


def reduce_slots(v_RD: torch.Tensor, inverse_TK: torch.Tensor,
                 w_TK: torch.Tensor | None = None) -> torch.Tensor:
    """out_t = sum_j w_{t,j} v_R[inverse_TK[t, j]]: (T, d) in one `F.embedding_bag` pass, a
    fused gather-and-sum that accumulates in float32 (also for bf16) and writes its output once
    (no zero fill). Not differentiable: callers own the backward."""
    T = inverse_TK.shape[0]
    if inverse_TK.numel() == 0:
        return v_RD.new_zeros(T, v_RD.shape[1])
    if w_TK is not None:
        w_TK = w_TK.reshape(inverse_TK.shape).to(v_RD.dtype)  # the table's dtype is required
    return F.embedding_bag(inverse_TK, v_RD, mode="sum", per_sample_weights=w_TK)

"""Expert parallelism (EP): each process holds E / W of an expert bank's experts, and the routed
rows travel to the process that owns their expert and back (two all-to-alls per bank call).

The routing plan already sorts the (token, slot) pairs by expert, so with experts placed in
contiguous blocks ([r*L, (r+1)*L) on rank r, L = E / W) the rows bound for each rank are one
contiguous range of the sorted rows:

    x_SD   = x_TD[plan.rows_S]                        sorted pairs, grouped by expert
    x_RD   = all_to_all(x_SD)                         rows for my experts, grouped by source rank
    y_RD   = FFN_local(x_RD)                          the engine, over my L experts
    y_SD   = all_to_all(y_RD)                         back, in the original sorted order
    y_TD   = combine(y_SD, plan, weights)             gates applied locally (their grad stays)

Both all-to-alls are autograd functions (`torch.distributed.nn.functional.all_to_all_single`):
the backward pass sends the output gradients the same way back, so each expert's weight gradient
sums the contributions of every rank's tokens. Counts vary with every routing decision
(dropless routing), so one small all-to-all of per-expert counts comes first.

Every rank must call the bank the same number of times in the same order (true when all ranks
run the same model on their own rows, as data-parallel training does).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from moelab.ops.expert_ffn import expert_ffn
from moelab.ops.plan import RoutingPlan, build_plan


@dataclass(frozen=True)
class ExpertPlacement:
    """Where a bank's experts live: rank r of the `world` ranks of an expert-parallel group holds
    experts [r*n_local, (r+1)*n_local). With several such groups (`replicas` > 1) every shard
    has one copy per group; `replica_group` joins the copies (their gradients are summed)."""

    rank: int
    world: int
    n_local: int
    group: Optional[Any] = None  # the expert-parallel process group; None: the default group
    replicas: int = 1
    replica_group: Optional[Any] = None

    @property
    def first(self) -> int:
        return self.rank * self.n_local

    def local_slice(self) -> slice:
        return slice(self.first, self.first + self.n_local)


def _all_to_all(x: torch.Tensor, out_rows: list[int], in_rows: list[int], group) -> torch.Tensor:
    from torch.distributed.nn.functional import all_to_all_single

    out = x.new_empty((sum(out_rows), *x.shape[1:]))
    return all_to_all_single(out, x.contiguous(), out_rows, in_rows, group=group)


def dispatched_expert_ffn_sorted(x_TD: torch.Tensor, w1_LDH: torch.Tensor, w2_LHD: torch.Tensor,
                                 plan: RoutingPlan, placement: ExpertPlacement,
                                 activation: str = "silu", w3_LDH: torch.Tensor | None = None,
                                 backend: str = "auto") -> torch.Tensor:
    """Every (token, slot) expert output, (S, d) in the plan's sorted order, computed by the
    rank that owns the pair's expert. `w*_L..` are this rank's experts only (L = n_local).

    Collective: every rank of the placement's group must call it (with its own tokens)."""
    import torch.distributed as dist

    W, L = placement.world, placement.n_local
    if plan.n_experts != W * L:
        raise ValueError(f"plan routes over {plan.n_experts} experts, the placement holds "
                         f"{W} x {L}")
    counts_WL = plan.counts_E.view(W, L)  # pairs of mine for each rank's experts
    # per-expert counts: recv_WL[s, l] = pairs rank s sends to my local expert l
    recv_WL = torch.empty_like(counts_WL)
    dist.all_to_all_single(recv_WL, counts_WL.contiguous(), group=placement.group)
    send_rows, recv_rows = counts_WL.sum(1).tolist(), recv_WL.sum(1).tolist()

    x_SD = x_TD.index_select(0, plan.rows_S)
    x_RD = _all_to_all(x_SD, recv_rows, send_rows, placement.group)
    # received rows are grouped by source rank, each source's rows sorted by local expert
    local_R = torch.arange(L, device=x_TD.device).repeat(W).repeat_interleave(
        recv_WL.reshape(-1).to(x_TD.device))
    local_plan = build_plan(local_R[:, None], L)
    y_RD = expert_ffn(x_RD, w1_LDH, w2_LHD, local_plan, None, activation, w3_LDH,
                      backend=backend)
    return _all_to_all(y_RD, send_rows, recv_rows, placement.group)

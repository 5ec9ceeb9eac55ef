"""Routers (softmax top-k, sigmoid top-k, dense softmax) and balance losses.

Routers compute in float32. Every loss arrives already multiplied by its coefficient through the
forward context (`ctx.add_aux`), never through module state. Losses and the symbols used:
- Switch (Fedus et al.): E * sum_e f_e * P_e, f_e = share of routed slots that went to e,
  P_e = mean router probability of e.
- Sequence-level (DeepSeek-V2, as UMoE uses): mean_b sum_e ce[b,e] * mean_t p[b,t,e],
  ce[b,e] = count_{t,slot}(idx = e) * E / (T k).
- Entropy (MoEUT sec. 1.4 of the reference): per sequence, the marginal softmax distribution over
  the time steps of *every repeat* of a shared layer; loss = its negative entropy, batch-averaged.
- z-loss (ST-MoE): mean_t logsumexp(logits_t)^2.
Aux-loss-free balancing (DeepSeek-V3, `router.bias_rate` = gamma) is not a loss: each top-k router
keeps a bias b_e added to its scores only to choose the experts (the gate values stay the
unbiased scores). Training forwards add up the expert loads of the whole step (every
micro-batch, every repeat of a shared layer, every rank); after the optimizer step
`update_balance_biases` moves b_e by gamma * sign(mean load - load_e), centred (a shift common to
all experts would not change any choice).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from moelab.config import RouterConfig
from moelab.errors import ConfigError
from moelab.layers.base import ForwardContext
from moelab.registry import ROUTER


@dataclass
class Routing:
    idx_BTK: torch.Tensor  # chosen experts (long)
    weights_BTK: torch.Tensor  # combine weights (float32, carries the router's gradient)
    logits_BTE: torch.Tensor  # float32 router logits


class Router(nn.Module):
    """x -> logits = x W_r^T (float32) -> a choice of k experts per token, plus losses/metrics."""

    selects = True  # chooses among experts (a selection bias can balance it)

    def __init__(self, d_in: int, n_experts: int, top_k: int, cfg: RouterConfig,
                 name: str = "router"):
        super().__init__()
        self.n_experts, self.top_k, self.cfg, self.name = n_experts, top_k, cfg, name
        self.weight = nn.Parameter(torch.empty(n_experts, d_in))
        nn.init.normal_(self.weight, std=0.02)
        self.bias_rate = cfg.bias_rate
        if self.bias_rate:
            if not self.selects:
                raise ConfigError(f"model.router.bias_rate: {cfg.bias_rate}, but the {cfg.kind} "
                                  f"router ({name}) uses every expert: there is no choice to "
                                  "balance; set it to 0")
            # a buffer: saved with the weights, so a resumed run keeps its balance
            self.register_buffer("balance_bias_E", torch.zeros(n_experts))
        self._load_E: torch.Tensor | None = None  # this step's loads (not a buffer: DDP
        # would broadcast rank 0's over the others')

    def select(self, logits_BTE: torch.Tensor,
               bias_E: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(expert ids, gate values); `bias_E` (broadcast over the scores) shifts only the
        choice, never the gate values."""
        raise NotImplementedError

    def selection_bias(self, shape: tuple[int, ...]) -> torch.Tensor | None:
        """The balance bias shaped like the trailing dims of scores of `shape` (None if off)."""
        if not self.bias_rate:
            return None
        n = 1
        for i in range(len(shape) - 1, -1, -1):  # the trailing dims that hold n_experts
            n *= shape[i]
            if n == self.n_experts:
                return self.balance_bias_E.view(shape[i:])
        raise ValueError(f"scores of shape {tuple(shape)} do not end in {self.n_experts} experts")

    @torch.no_grad()
    def record_load(self, idx: torch.Tensor) -> None:
        """Add the chosen experts (ids in [0, n_experts)) to this step's loads (training)."""
        if self.bias_rate and self.training:
            counts_E = torch.bincount(idx.reshape(-1), minlength=self.n_experts).float()
            self._load_E = counts_E if self._load_E is None else self._load_E + counts_E

    @torch.no_grad()
    def update_bias(self, all_sum=None) -> None:
        """b += rate * sign(mean load - load), centred; loads summed over ranks by `all_sum`."""
        load_E, self._load_E = self._load_E, None
        if load_E is None:
            return
        if all_sum is not None:
            load_E = all_sum(load_E)
        delta_E = self.bias_rate * torch.sign(load_E.mean() - load_E)
        self.balance_bias_E.add_(delta_E - delta_E.mean())

    def forward(self, x_BTD: torch.Tensor, ctx: ForwardContext) -> Routing:
        if self.training and self.cfg.jitter > 0:
            noise = torch.empty_like(x_BTD).uniform_(1 - self.cfg.jitter, 1 + self.cfg.jitter)
            x_BTD = x_BTD * noise
        logits_BTE = x_BTD.float() @ self.weight.float().t()
        idx_BTK, w_BTK = self.select(logits_BTE, self.selection_bias(logits_BTE.shape[-1:]))
        self.record_load(idx_BTK)
        routing = Routing(idx_BTK, w_BTK, logits_BTE)
        add_balance_losses(self, routing, ctx)
        if self.bias_rate and ctx.stats:
            ctx.add_metric(f"{self.name}.bias", self.balance_bias_E.clone())
        return routing


@ROUTER.register("softmax_topk")
class SoftmaxTopKRouter(Router):
    def select(self, logits_BTE, bias_E=None):
        probs = logits_BTE.softmax(-1)
        if bias_E is None:
            w, idx = probs.topk(self.top_k, dim=-1)
        else:
            idx = (probs + bias_E).topk(self.top_k, dim=-1).indices
            w = probs.gather(-1, idx)
        if self.cfg.renormalize:
            w = w / w.sum(-1, keepdim=True)
        return idx, w


@ROUTER.register("sigmoid_topk")
class SigmoidTopKRouter(Router):
    """σ-MoE: gates are the raw sigmoid scores of the chosen experts (not renormalised)."""

    def __init__(self, *args, expert_dropout: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.expert_dropout = expert_dropout

    def select(self, logits_BTE, bias_E=None):
        scores = torch.sigmoid(logits_BTE)
        sel = scores if bias_E is None else scores + bias_E
        if self.training and self.expert_dropout > 0:
            drop = torch.rand_like(scores) < self.expert_dropout
            sel = sel.masked_fill(drop, float("-inf"))
        idx = sel.topk(self.top_k, dim=-1).indices
        return idx, scores.gather(-1, idx)


@ROUTER.register("softmax_dense")
class DenseSoftmaxRouter(Router):
    """MoLE: every expert, weighted by the softmax over all of them (no top-k)."""

    selects = False

    def select(self, logits_BTE, bias_E=None):
        probs = logits_BTE.softmax(-1)
        idx = torch.arange(self.n_experts, device=probs.device).expand_as(probs)
        return idx, probs


def make_router(d_in: int, n_experts: int, top_k: int, cfg: RouterConfig, name: str = "router",
                **kwargs) -> Router:
    return ROUTER.get(cfg.kind)(d_in, n_experts, top_k, cfg, name=name, **kwargs)


# ---------------------------------------------------------------------------------------------
# balance losses and metrics
# ---------------------------------------------------------------------------------------------
def expert_counts(idx_BTK: torch.Tensor, n_experts: int) -> torch.Tensor:
    """(B, E) number of (token, slot) pairs routed to each expert, per sequence."""
    B = idx_BTK.shape[0]
    flat = idx_BTK.reshape(B, -1)
    return torch.zeros(B, n_experts, device=flat.device).scatter_add_(
        1, flat, torch.ones_like(flat, dtype=torch.float32))


def switch_loss(logits_BTE, idx_BTK, n_experts):
    counts_E = expert_counts(idx_BTK, n_experts).sum(0)
    f_E = counts_E / counts_E.sum()
    P_E = logits_BTE.softmax(-1).reshape(-1, n_experts).mean(0)
    return n_experts * (f_E * P_E).sum()


def sequence_loss(logits_BTE, idx_BTK, n_experts):
    T, k = idx_BTK.shape[1], idx_BTK.shape[2]
    ce_BE = expert_counts(idx_BTK, n_experts) * n_experts / (T * k)
    p_BE = logits_BTE.softmax(-1).mean(1)
    return (ce_BE * p_BE).sum(-1).mean()


def z_loss(logits_BTE):
    return torch.logsumexp(logits_BTE, dim=-1).square().mean()


def negative_marginal_entropy(logits_list: list[torch.Tensor]) -> torch.Tensor:
    """MoEUT regulariser: log of the per-sequence mean softmax over time and all repeats."""
    logp_BNE = torch.cat([lg.log_softmax(-1) for lg in logits_list], dim=1)
    log_mean_BE = torch.logsumexp(logp_BNE, dim=1) - math.log(logp_BNE.shape[1])
    return (log_mean_BE.exp() * log_mean_BE).sum(-1).mean()


def add_balance_losses(router: Router, r: Routing, ctx: ForwardContext) -> None:
    if not ctx.stats:  # generation / plain evaluation: nobody reads them
        return
    cfg, E, name = router.cfg, router.n_experts, router.name
    if cfg.switch_coef:
        ctx.add_aux(f"{name}.switch", cfg.switch_coef * switch_loss(r.logits_BTE, r.idx_BTK, E))
    if cfg.seq_coef:
        ctx.add_aux(f"{name}.seq", cfg.seq_coef * sequence_loss(r.logits_BTE, r.idx_BTK, E))
    if cfg.z_coef:
        ctx.add_aux(f"{name}.z", cfg.z_coef * z_loss(r.logits_BTE))
    if cfg.entropy_coef:
        # Pooled over every call of this router module in the pass (all repeats of a shared
        # layer); the model turns the pools into losses once the pass is done.
        pools = ctx.stash.setdefault("entropy_pools", {})
        pool = pools.setdefault(id(router), {"name": f"layer{ctx.position}.{name}.entropy",
                                             "coef": cfg.entropy_coef, "logits": []})
        pool["logits"].append(r.logits_BTE)
    with torch.no_grad():
        counts_E = expert_counts(r.idx_BTK, E).sum(0)
        ctx.add_metric(f"{name}.load", counts_E / counts_E.sum())
        ctx.add_metric(f"{name}.dead", (counts_E == 0).sum().float())
        p = r.logits_BTE.softmax(-1)
        ctx.add_metric(f"{name}.entropy", -(p * p.clamp_min(1e-20).log()).sum(-1).mean())


def update_balance_biases(model: nn.Module, all_sum=None) -> None:
    """After an optimizer step: move every balanced router's bias by the step's loads (summed over
    ranks by `all_sum`, e.g. `DistEnv.all_sum`; every rank must call it)."""
    for m in model.modules():
        if isinstance(m, Router) and m.bias_rate:
            m.update_bias(all_sum)


def clear_balance_loads(model: nn.Module) -> None:
    """Forget loads recorded since the last update (a step that was not taken)."""
    for m in model.modules():
        if isinstance(m, Router):
            m._load_E = None


def finish_entropy_losses(ctx: ForwardContext) -> None:
    """Called by the model after the last layer: one entropy loss per router module."""
    for pool in ctx.stash.pop("entropy_pools", {}).values():
        ctx.aux_losses[pool["name"]] = pool["coef"] * negative_marginal_entropy(pool["logits"])

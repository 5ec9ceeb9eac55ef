"""AdamW with decoupled weight-decay groups, and the warmup + cosine learning-rate schedule.

Weight decay shrinks weights towards zero; on gains of norms, biases and embedding rows that
only hurts (a norm gain of 0 switches a channel off, and rare tokens' embeddings would decay
between their updates), so by default those parameters go in a group with weight_decay 0.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from moelab.config import TrainConfig


def no_decay_param_ids(model: nn.Module) -> set[int]:
    """ids of parameters that get no weight decay: every parameter of an embedding or norm
    module, and every parameter with fewer than 2 dims (biases, gains, scalars)."""
    ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, (nn.Embedding, nn.LayerNorm, nn.RMSNorm)):
            ids.update(id(p) for p in module.parameters(recurse=False))
    ids.update(id(p) for p in model.parameters() if p.ndim < 2)
    return ids


def param_groups(model: nn.Module, weight_decay: float,
                 decay_norms_and_embeddings: bool = False) -> list[dict]:
    """Two AdamW groups, "decay" and "no_decay" (empty groups dropped).

    A tied head shares its tensor with the embedding; `model.parameters()` yields it once, as
    the embedding, so it is not decayed either.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    skip = set() if decay_norms_and_embeddings else no_decay_param_ids(model)
    decay = [p for p in params if id(p) not in skip]
    no_decay = [p for p in params if id(p) in skip]
    groups = [{"name": "decay", "params": decay, "weight_decay": weight_decay},
              {"name": "no_decay", "params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, tcfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW, fused when this build supports it for the parameters' device, else foreach.

    Fused and foreach AdamW compute the same update up to rounding; a run and its resumed
    continuation always pick the same one, so resumed loss curves still match exactly.
    """
    groups = param_groups(model, tcfg.weight_decay, tcfg.decay_norms_and_embeddings)
    kwargs = dict(lr=tcfg.lr, betas=(tcfg.beta1, tcfg.beta2), eps=tcfg.eps)
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):  # fused unsupported on this device / dtype
        return torch.optim.AdamW(groups, foreach=True, **kwargs)


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak lr for optimizer update number `step` (0-based).

    Linear warmup over the first `warmup_steps` updates, reaching the peak at update
    warmup_steps-1 (so the first update is not wasted with lr 0), then a half cosine from the
    peak down to `min_lr_ratio` at `total_steps`; beyond that it stays at the floor.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_at(step: int, tcfg: TrainConfig, total_steps: int | None = None) -> float:
    """The learning rate of update `step` (0-based) for a run of `total_steps` updates."""
    total = tcfg.steps if total_steps is None else total_steps
    return tcfg.lr * lr_factor(step, total, tcfg.warmup_steps, tcfg.min_lr_ratio)


class Schedule:
    """Warmup + cosine as a pure function of the update index, applied to the optimizer's
    groups before each update. Its state is just counters, so a resumed run takes the
    learning rate, warmup and floor of its (possibly edited) config, and a run extended with a
    larger --steps stretches the cosine over the new total from the current step on."""

    def __init__(self, optimizer: torch.optim.Optimizer, tcfg: TrainConfig, total_steps: int):
        self.optimizer = optimizer
        self.tcfg = tcfg
        self.total_steps = total_steps
        self.step = 0  # index of the next update

    def lr(self, step: int | None = None) -> float:
        return lr_at(self.step if step is None else step, self.tcfg, self.total_steps)

    def apply(self) -> float:
        """Set the lr of the next update on every group; returns it."""
        lr = self.lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def advance(self) -> None:
        self.step += 1

    def state_dict(self) -> dict:
        return {"step": self.step, "total_steps": self.total_steps}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


def apply_hyperparameters(optimizer: torch.optim.Optimizer, tcfg: TrainConfig) -> None:
    """Re-apply the config's betas/eps/weight decay after loading a saved optimizer state
    (load_state_dict restores the saved ones), so an edited config takes effect on resume."""
    for group in optimizer.param_groups:
        group["betas"] = (tcfg.beta1, tcfg.beta2)
        group["eps"] = tcfg.eps
        if group.get("name") == "decay":
            group["weight_decay"] = tcfg.weight_decay

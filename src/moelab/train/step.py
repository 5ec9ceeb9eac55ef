"""One optimizer update and one validation pass, shared by the training loop and the benchmark.

Gradient accumulation splits the *global* batch into `grad_accum` equal micro-batches of
consecutive rows and scales each micro-batch loss by 1/grad_accum. Every row has the same number
of target tokens, so the mean of micro-batch means is the global mean and the gradient equals
the one of a single full-batch pass (up to float rounding). The aux (balance) losses are
computed per micro-batch, so for MoE models they depend on grad_accum the way they depend on the
batch size.

Under data parallelism (`dist`, a `moelab.train.distributed.DistEnv`) x_BT holds this rank's rows
of every micro-batch; gradients are reduced in the last micro-batch's backward only, and the
logged statistics are averaged over ranks (equal-sized parts, so the mean is the global value).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Optional

import torch

from moelab.errors import ConfigError
from moelab.layers.routers import clear_balance_loads, update_balance_biases

DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Precision:
    """Autocast settings: `dtype` None means plain float32 (autocast off)."""

    device_type: str
    dtype: Optional[torch.dtype] = None

    @classmethod
    def from_config(cls, name: str, device: torch.device) -> "Precision":
        if name not in DTYPES:
            raise ConfigError(f"train.dtype: {name!r} is not allowed; allowed: "
                              f"{', '.join(DTYPES)}")
        return cls(device.type, DTYPES[name])

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def grad_scaler(self) -> Optional["torch.amp.GradScaler"]:
        """float16 gradients underflow without loss scaling; bfloat16 has float32's range."""
        if self.dtype is torch.float16:
            return torch.amp.GradScaler(self.device_type)
        return None


class NonFiniteLoss(Exception):
    """Raised by `train_step` before the update when the loss (or, without a grad scaler, the
    gradient norm) is inf/nan; the parameters and optimizer state are left untouched."""

    def __init__(self, stats: dict[str, float]):
        super().__init__(f"non-finite loss or gradient: {stats.get('loss')}, "
                         f"grad_norm {stats.get('grad_norm')}")
        self.stats = stats


def _stats(out) -> tuple[list[str], torch.Tensor]:
    """Names and a float32 vector of everything logged per step: LM loss, aux loss, each aux
    loss term, scalar routing metrics, and max/min of vector metrics (e.g. expert load)."""
    names = ["loss", "aux_loss"]
    values = [out.loss.detach().float(), out.aux_loss.detach().float()]
    for name, v in out.aux_losses.items():
        names.append(f"aux.{name}")
        values.append(v.detach().float())
    for name, v in out.metrics.items():
        v = v.detach().float()
        if v.numel() == 1:
            names.append(name)
            values.append(v.reshape(()))
        else:  # a per-expert vector: its extremes show imbalance in one number each
            names += [f"{name}_max", f"{name}_min"]
            values += [v.max(), v.min()]
    return names, torch.stack(values)


def _grad_norm(params: list[torch.Tensor], grad_clip: float, dist=None) -> torch.Tensor:
    if dist is not None and dist.parallel == "ep":  # expert shards differ between ranks
        from moelab.train.expert_parallel import grad_norm, is_shard, reduce_replicas

        shards = [p for p in params if is_shard(p)]
        reduce_replicas(shards)
        norm = grad_norm([p.grad for p in params if not is_shard(p)], [p.grad for p in shards],
                         group=dist.ep_group)
    elif not hasattr(torch.nn.utils, "get_total_norm"):  # torch < 2.6 (never sharded here)
        if grad_clip > 0:
            return torch.nn.utils.clip_grad_norm_(params, grad_clip, foreach=True)
        grads = [p.grad for p in params]
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
        if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor norm over the shards
            norm = norm.full_tensor()
    if grad_clip > 0:  # what clip_grad_norm_ does, with the full norm
        torch.nn.utils.clip_grads_with_norm_(params, grad_clip, norm, foreach=True)
    return norm


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x_BT: torch.Tensor,
               y_BT: torch.Tensor, grad_accum: int = 1, grad_clip: float = 0.0,
               precision: Optional[Precision] = None,
               scaler: Optional["torch.amp.GradScaler"] = None, dist=None,
               aux_per_micro_batch: bool = False) -> dict[str, float]:
    """Forward/backward over the micro-batches of one global batch, clip, check, update.

    The LM loss of each micro-batch is divided by grad_accum; so is the aux loss, unless
    `aux_per_micro_batch` (`train.aux_loss_scale: per_micro_batch`, UMoE's official training),
    which adds every micro-batch's aux loss with weight 1.

    Returns the step's statistics averaged over micro-batches (one host sync for all of them),
    plus `grad_norm` (before clipping). The lr must already be set on the optimizer.
    """
    precision = precision or Precision(x_BT.device.type)
    clear_balance_loads(model)  # loads of this step only (a failed step may have left some)
    rows = x_BT.shape[0] // grad_accum
    sync = dist.grad_sync if dist is not None else (lambda last: contextlib.nullcontext())
    names: list[str] = []
    sum_S: Optional[torch.Tensor] = None
    for i in range(grad_accum):
        xb_bT, yb_bT = x_BT[i * rows:(i + 1) * rows], y_BT[i * rows:(i + 1) * rows]
        with sync(i == grad_accum - 1):
            with precision.autocast():
                out = model(xb_bT, yb_bT)
            aux = out.aux_loss.float() * (1.0 if aux_per_micro_batch else 1.0 / grad_accum)
            objective = out.loss / grad_accum + aux
            (scaler.scale(objective) if scaler is not None else objective).backward()
        names, stats_S = _stats(out)
        sum_S = stats_S if sum_S is None else sum_S + stats_S
    if scaler is not None:
        scaler.unscale_(optimizer)  # clip and report the true gradient norm
    params = [p for p in model.parameters() if p.grad is not None]
    norm = _grad_norm(params, grad_clip, dist)
    mean_S = sum_S / grad_accum
    if dist is not None:
        mean_S = dist.all_mean(mean_S)
    values = torch.cat([mean_S, norm.detach().float().reshape(1)]).tolist()
    stats = dict(zip(names + ["grad_norm"], values))
    bad_grad = scaler is None and not math.isfinite(stats["grad_norm"])  # a scaler skips those
    if not (math.isfinite(stats["loss"]) and math.isfinite(stats["aux_loss"])) or bad_grad:
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLoss(stats)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    # aux-loss-free balancing: once per step, from the loads of all its micro-batches and ranks
    update_balance_biases(model, dist.all_sum if dist is not None else None)
    return stats


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]],
                  rows: int, device: torch.device,
                  precision: Optional[Precision] = None, dist=None) -> dict:
    """Mean LM loss over fixed batches (split into chunks of `rows` rows), in eval mode.

    Also returns vector routing metrics (e.g. `layer0.router.load`) averaged over the batches,
    as lists, so the full expert-load distribution is on record at every evaluation. With `dist`
    each rank scores its rows and the means are averaged over ranks.
    """
    precision = precision or Precision(device.type)
    was_training = model.training
    model.eval()
    losses: list[torch.Tensor] = []
    vectors: dict[str, torch.Tensor] = {}
    try:
        for x_BT, y_BT in batches:
            for lo in range(0, x_BT.shape[0], rows):
                x_bT = x_BT[lo:lo + rows].to(device, non_blocking=True)
                y_bT = y_BT[lo:lo + rows].to(device, non_blocking=True)
                with precision.autocast():
                    out = model(x_bT, y_bT, stats=True)  # the expert loads are logged
                losses.append(out.loss.float())
                for name, v in out.metrics.items():
                    if v.numel() > 1:
                        vectors[name] = vectors.get(name, 0) + v.float()
    finally:
        model.train(was_training)
    n = len(losses)
    names = sorted(vectors)
    flat = torch.cat([torch.stack(losses).mean().reshape(1)] + [vectors[k] / n for k in names])
    if dist is not None:
        flat = dist.all_mean(flat)  # one collective for the loss and every vector
    res: dict = {"val_loss": flat[0].item()}
    offset = 1
    for name in names:
        size = vectors[name].numel()
        res[name] = [round(x, 6) for x in flat[offset:offset + size].tolist()]
        offset += size
    return res

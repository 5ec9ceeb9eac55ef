"""`train.parallel: ep` under torchrun: expert banks split between the ranks, the rest DDP.

`train.ep_size` (0 = all processes) sets the expert group: ranks [g*ep, (g+1)*ep) hold every
expert once between them, and with W / ep groups each shard has W / ep copies whose gradients
are summed after the backward pass (`reduce_replicas`), as DDP does for the replicated rest.

Every routed `ExpertBank` (FFN-MoE, σ-MoE, UMoE's shared bank, MoEUT's repeated banks, each
placed once however many layers hold it) keeps E / W experts per rank (`ExpertBank.place`); its
calls move the rows to the owning rank and back (moelab/ops/expert_parallel.py). Everything else
(embeddings, attention, routers, shared experts, the small attention experts of SwitchHead, MoA
and UMoE's queries) is replicated and averaged by DDP, which is told to ignore the expert shards.

Why a W-process EP run is the 1-process run (as for DDP, docs/distributed.md):
* Gradients. Rank r's loss is the mean over its own rows, so DDP's average of the replicated
  gradients is the gradient of the global mean. An expert's gradient on its owner already sums
  what every rank's rows contribute (the all-to-all's backward brings them), so it is divided by
  W (a hook on each shard) to be the same gradient of the global mean.
* Gradient norm and clipping. Replicated gradients are equal on every rank; expert shards are
  disjoint, so the global squared norm is the replicated part plus the all-reduced sum of the
  shards' parts (`grad_norm`).
* Checkpoints. Shards are all-gathered (weights and AdamW moments) to rank 0, which writes the
  single-process format; loading slices the full state again, so a run resumes at any world
  size and with any `train.parallel`.

MoLE's experts are not placed: they run densely on every token in training and become lookup
tables for inference (docs/mole.md).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from moelab.errors import ConfigError
from moelab.layers.experts import ExpertBank
from moelab.ops.expert_parallel import ExpertPlacement

EP_MARK = "_moelab_expert_shard"  # attribute set on a placed parameter: its ExpertPlacement
MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW state shaped like its parameter: sharded with it


def routed_banks(model: nn.Module) -> dict[str, ExpertBank]:
    """Every distinct routed expert bank by its first module name (MoLE banks left out)."""
    from moelab.layers.mole import _MoLEBase

    mole = {id(m.experts) for m in model.modules() if isinstance(m, _MoLEBase)}
    banks: dict[int, tuple[str, ExpertBank]] = {}
    for name, m in model.named_modules():
        if isinstance(m, ExpertBank) and id(m) not in mole:
            banks.setdefault(id(m), (name, m))
    return dict(banks.values())


def check_placeable(bank_experts: dict[str, int], world: int) -> None:
    """ConfigError unless there are routed banks and `world` divides each one's expert count."""
    if not bank_experts:
        raise ConfigError("train.parallel: 'ep' places routed experts on ranks, and this model "
                          "has none (MoLE experts run on every token); use ddp or fsdp")
    for name, n in bank_experts.items():
        if n % world:
            raise ConfigError(f"train.parallel: 'ep' with {world} processes: {name} has {n} "
                              f"experts, not divisible by {world}; choose --nproc (or "
                              "train.ep_size) dividing the number of experts")


def check_ep_size(ep_size: int, world: int) -> int:
    """The expert-group size (`train.ep_size`, 0 = every process); it must divide `world`."""
    ep = ep_size or world
    if world % ep:
        raise ConfigError(f"train.ep_size: {ep} must divide the number of processes {world} "
                          "(or be 0: one expert group over all of them)")
    return ep


def is_shard(p: torch.Tensor) -> bool:
    return getattr(p, EP_MARK, None) is not None


def expert_groups(rank: int, world: int, ep_size: int) -> tuple[int, Any, Any]:
    """(this rank's place in its expert-parallel group, that group, the group of the ranks that
    hold the same shards). Ranks [g*ep, (g+1)*ep) form expert group g; every rank must call this
    (process groups are created collectively, in the same order everywhere)."""
    groups = [dist.new_group(list(range(g * ep_size, (g + 1) * ep_size)))
              for g in range(world // ep_size)]
    replicas = [dist.new_group(list(range(q, world, ep_size))) for q in range(ep_size)]
    return rank % ep_size, groups[rank // ep_size], replicas[rank % ep_size]


def place_experts(model: nn.Module, rank: int, world: int, group=None,
                  replicas: int = 1, replica_group=None) -> list[str]:
    """Place every routed bank's experts over the `world` ranks of an expert-parallel group
    (`rank` is this process's place in it); with `replicas` > 1 such groups hold copies.
    Returns the parameter names (all aliases) of the shards, for DDP to ignore."""
    banks = routed_banks(model)
    check_placeable({name: bank.n_experts for name, bank in banks.items()}, world)
    for name, bank in banks.items():
        placement = ExpertPlacement(rank, world, bank.n_experts // world, group, replicas,
                                    replica_group)
        bank.place(placement)
        for p in bank.parameters():
            setattr(p, EP_MARK, placement)
            # the owner's gradient sums its group's rows; / all ranks = the global mean's
            # (module docstring), once the replicas' parts are added (`reduce_replicas`)
            p.register_hook(lambda g, w=world * replicas: g / w)
    return [n for n, p in model.named_parameters(remove_duplicate=False) if is_shard(p)]


def wrap(model: nn.Module, env, device: torch.device, ep_size: int = 0) -> nn.Module:
    """Place the experts (over groups of `ep_size` ranks; 0 = all), then DDP over the rest."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    ep = check_ep_size(ep_size, env.world_size)
    if ep == env.world_size:
        names = place_experts(model, env.rank, ep)
    else:
        ep_rank, env.ep_group, replica_group = expert_groups(env.rank, env.world_size, ep)
        names = place_experts(model, ep_rank, ep, env.ep_group, env.world_size // ep,
                              replica_group)
    DDP._set_params_and_buffers_to_ignore_for_model(model, names)
    ids = [device.index] if device.type == "cuda" else None
    return DDP(model, device_ids=ids)


def reduce_replicas(params: list[torch.Tensor]) -> None:
    """Add up the gradients of the copies of every expert shard (one per expert group)."""
    for p in params:
        placement = getattr(p, EP_MARK, None)
        if placement is not None and placement.replicas > 1 and p.grad is not None:
            dist.all_reduce(p.grad, group=placement.replica_group)


def grad_norm(grads_rep: list[torch.Tensor], grads_ep: list[torch.Tensor], group=None,
              foreach: bool = True) -> torch.Tensor:
    """Global L2 norm: replicated gradients once, plus every shard of an expert group (the
    copies in other groups are equal once `reduce_replicas` has run)."""
    def sq(gs):
        if not gs:
            return torch.zeros((), dtype=torch.float32)
        return torch.nn.utils.get_total_norm(gs, foreach=foreach).float() ** 2

    ep_sq = sq(grads_ep).to(grads_ep[0].device if grads_ep else "cpu")
    dist.all_reduce(ep_sq, group=group)
    rep_sq = sq(grads_rep).to(ep_sq.device)
    return (rep_sq + ep_sq).sqrt()


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------
def _gather(t: torch.Tensor, placement: ExpertPlacement) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(placement.world)]
    dist.all_gather(parts, t.contiguous(), group=placement.group)
    return torch.cat(parts).cpu()


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer,
               is_main: bool) -> tuple[Optional[dict], Optional[dict]]:
    """Full weights (names without aliases) and index-keyed optimizer state on rank 0; every
    rank must call it (the shards are all-gathered)."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    sd = optimizer.state_dict()
    full_opt = {"state": {}, "param_groups": sd["param_groups"]}
    full_param: dict[int, torch.Tensor] = {}
    for i, p in enumerate(params):  # the same order on every rank: the collectives line up
        state = sd["state"].get(i, {})
        if not is_shard(p):
            full_opt["state"][i] = state
            continue
        placement = getattr(p, EP_MARK)
        full_param[id(p)] = _gather(p.detach(), placement)
        # every rank gathers both moments in this order (zeros if it has none yet)
        moments = {k: _gather(state[k] if k in state else torch.zeros_like(p), placement)
                   for k in MOMENTS}
        full_opt["state"][i] = {**state, **moments}
    if not is_main:
        return None, None
    from moelab.train.checkpoint import alias_free_weights

    weights = alias_free_weights(model, model.state_dict(),
                                 lambda _, t: full_param.get(id(t), t))
    return weights, full_opt


def local_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict) -> dict:
    """A full, index-keyed optimizer state cut down to this rank's expert shards."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = {}
    for i, s in saved["state"].items():
        p = params[int(i)]
        if is_shard(p):
            sl = getattr(p, EP_MARK).local_slice()
            s = {k: v[sl].clone() if k in MOMENTS else v for k, v in s.items()}
        state[i] = s
    return {"state": state, "param_groups": saved["param_groups"]}

"""Training-state memory per process: weights, gradients and AdamW moments under DDP, FSDP2 and
expert parallelism, counted exactly from the model built on the meta device (no memory used).

Training keeps float32 weights (bf16/fp16 autocast casts copies for the matmuls), float32
gradients and AdamW's two float32 moments: 16 bytes per parameter held. What a process holds:
  ddp   every parameter
  fsdp  1/W of every parameter at rest (plus one gathered unit while it computes: the whole
        model while blocks are not sharded on their own, docs/distributed.md)
  ep    every replicated parameter, and E/G experts of every routed expert bank (G =
        train.ep_size, the processes of an expert group; all W by default)
Activations depend on batch, sequence length and the backend's saved tensors; they are not
estimated here (measure them: `torch.cuda.max_memory_allocated` in a training step).
"""
from __future__ import annotations

import math

import torch

from moelab.config import ModelConfig

BYTES_PER_PARAM = {"weights": 4, "grads": 4, "adamw": 8}  # float32 each; AdamW: two moments


def parameter_split(cfg: ModelConfig) -> dict:
    """Parameters (aliases counted once) split into routed expert banks and everything else,
    and the expert counts of the banks (EP needs every one divisible by the world size)."""
    from moelab.model import MoELM
    from moelab.train.expert_parallel import routed_banks

    with torch.device("meta"):
        model = MoELM(cfg)
    banks = routed_banks(model)
    expert = sum(p.numel() for b in banks.values() for p in b.parameters())
    total = sum(p.numel() for p in model.parameters())
    return {"total": total, "experts": expert, "replicated": total - expert,
            "bank_experts": sorted({b.n_experts for b in banks.values()})}


def state_per_rank(cfg: ModelConfig, world: int, ep_size: int = 0) -> dict[str, dict]:
    """{parallel: {"params": held per rank, "bytes": weights + grads + AdamW}} for ddp, fsdp and
    ep over expert groups of `ep_size` processes (0 = all); ep is {"unavailable": why} when the
    model has no routed bank or the group size does not divide `world` or a bank's experts."""
    if world < 1:
        raise ValueError(f"world size {world}: expected a positive number of processes")
    split = parameter_split(cfg)
    per_param = sum(BYTES_PER_PARAM.values())

    def held(n: int) -> dict:
        return {"params": n, "bytes": n * per_param}

    out = {"ddp": held(split["total"]), "fsdp": held(math.ceil(split["total"] / world))}
    ep = ep_size or world
    odd = [e for e in split["bank_experts"] if e % ep]
    if not split["experts"]:
        out["ep"] = {"unavailable": "no routed expert bank"}
    elif world % ep:
        out["ep"] = {"unavailable": f"train.ep_size {ep} does not divide {world} processes"}
    elif odd:
        out["ep"] = {"unavailable": f"{odd[0]} experts are not divisible by {ep}"}
    else:
        out["ep"] = held(split["replicated"] + split["experts"] // ep)
    return out

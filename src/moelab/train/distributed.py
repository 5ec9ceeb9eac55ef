"""Data-parallel training under torchrun: DDP or FSDP2, with results that do not depend on the
world size.

`torchrun --nproc_per_node N -m moelab train ...` (or `moelab train --nproc N`, see `launch`)
starts N copies of the same training loop. Each reads RANK / WORLD_SIZE / LOCAL_RANK from the
environment torchrun sets, joins one process group (gloo on CPU, NCCL on CUDA) and wraps the model
in DistributedDataParallel or FSDP2 (`fully_shard`), chosen by `train.parallel`.

What makes a W-process run the same run as a 1-process one (docs/distributed.md):
* Batches. `train.batch_size` is the global batch and `train.grad_accum` the number of global
  micro-batches. Global micro-batch i (rows [i*B/ga, (i+1)*B/ga) of the loader's global batch) is
  cut into W equal slices, and rank r reads slice r of each (`RankBatches`), so micro-batch i over
  all ranks holds exactly the rows the 1-process run puts in its micro-batch i.
* Losses. The LM loss, the sequence-level, z and entropy losses are means over equally many
  tokens/sequences per rank, so averaging gradients over ranks (what DDP and FSDP do) gives the
  gradient of the global mean. The Switch loss E * sum_e f_e * P_e is not: f_e must be the share
  of the *global* micro-batch. `GlobalRouting` all-reduces the expert counts and adds
  E * sum_e (f_global - f_local) * P_local to the rank's loss; f is a constant (counts carry no
  gradient), so the mean over ranks of E * sum_e f_global * P_local is the global Switch loss,
  value and gradient.
* Metrics. Load fractions and dead-expert counts come from the global counts; every other logged
  number is a mean over equal-sized parts and is averaged over ranks.
"""
from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from moelab.errors import ConfigError

PARALLEL = ("ddp", "fsdp", "ep")
log = logging.getLogger(__name__)


def resolve_parallel(train_cfg, explicit: Optional[str] = None) -> str:
    """The explicit argument, else the config's train.parallel."""
    name = explicit or train_cfg.parallel
    if name not in PARALLEL:
        raise ConfigError(f"train.parallel: {name!r} is not allowed; allowed: "
                          f"{', '.join(PARALLEL)}")
    return name


def check_batch(batch_size: int, world: int, grad_accum: int) -> None:
    if batch_size % (world * grad_accum):
        raise ConfigError(
            f"train.batch_size: {batch_size} must be divisible by world_size x grad_accum = "
            f"{world} x {grad_accum} = {world * grad_accum}")


def check_dtype(parallel: str, dtype: str) -> None:
    if parallel in ("fsdp", "ep") and dtype == "float16":
        raise ConfigError(f"train.dtype float16 with train.parallel {parallel}: the loss scaler "
                          "would see only this rank's gradient shards; use bfloat16 (or "
                          "train.parallel ddp)")


def check_launch(cfg, nproc: int) -> None:
    """What the launcher can check before starting `nproc` processes, so a bad setting is one
    line here rather than the same error from every rank and torchrun's report after them."""
    tc = cfg.train
    parallel = resolve_parallel(tc)
    check_batch(tc.batch_size, nproc, tc.grad_accum)
    check_dtype(parallel, tc.dtype)
    if parallel == "ep":
        from moelab.model import MoELM
        from moelab.train.expert_parallel import check_ep_size, check_placeable, routed_banks

        ep = check_ep_size(tc.ep_size, nproc)
        with torch.device("meta"):  # structure only: no memory, no initialisation cost
            model = MoELM(cfg.model)
        check_placeable({n: b.n_experts for n, b in routed_banks(model).items()}, ep)


def is_main() -> bool:
    """Whether this process is rank 0 (or not under torchrun): the one that prints."""
    return int(os.environ.get("RANK", "0")) == 0


@dataclass
class DistEnv:
    """This process's place in the data-parallel group (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    parallel: str = "none"  # none | ddp | fsdp | ep
    owns_group: bool = False  # we created the process group, so we destroy it
    wrapped: Optional[nn.Module] = field(default=None, repr=False)  # the DDP / FSDP module
    ep_group: Optional[object] = field(default=None, repr=False)  # EP: the expert group (None: all)

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return t
        t = t.detach().clone()
        dist.all_reduce(t)
        return t

    def all_mean(self, t: torch.Tensor) -> torch.Tensor:
        return self.all_sum(t) / self.world_size if self.active else t

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    @contextlib.contextmanager
    def grad_sync(self, enabled: bool):
        """Reduce gradients across ranks only in the last micro-batch's backward (the values
        are the same either way; skipping the earlier reductions saves communication)."""
        m = self.wrapped
        if enabled or m is None:
            yield
        elif self.parallel in ("ddp", "ep"):  # EP: DDP over the replicated parameters
            with m.no_sync():
                yield
        else:  # FSDP2
            m.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                m.set_requires_gradient_sync(True)


def setup(device: torch.device, parallel: str) -> tuple[DistEnv, torch.device]:
    """Join the process group torchrun describes in the environment (nothing to do for a single
    process). Returns the env and this rank's device (cuda:LOCAL_RANK on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
        owns = True
    return DistEnv(rank, world, local_rank, parallel, owns), device


def teardown(env: DistEnv) -> None:
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def seed_rank(seed: int, env: DistEnv, step: int = 0) -> None:
    """Give ranks > 0 their own stream for random ops (router jitter, expert dropout), so ranks
    do not draw the same noise for different rows. Rank 0 keeps the 1-process stream."""
    if env.rank > 0:
        torch.manual_seed(int(np.random.SeedSequence([seed, env.rank, step]).generate_state(1)[0]))


# ---------------------------------------------------------------------------------------------
# batches
# ---------------------------------------------------------------------------------------------
class RankBatches:
    """This rank's rows of global batch `step`, as its grad_accum micro-batches in order.

    Micro-batch i of rank r is slice i*W + r of the global batch cut into W*ga equal slices (a
    TokenLoader with world_size W*ga reads exactly those rows), so the union over ranks of
    micro-batch i is the 1-process micro-batch i.
    """

    def __init__(self, data_dir, split: str, batch_size: int, seq_len: int, seed: int,
                 sampling: str, grad_accum: int, env: DistEnv):
        from moelab.data.loader import TokenLoader

        parts = env.world_size * grad_accum
        check_batch(batch_size, env.world_size, grad_accum)
        self.loaders = [TokenLoader(data_dir, split, batch_size, seq_len, seed,
                                    sampling=sampling, rank=i * env.world_size + env.rank,
                                    world_size=parts) for i in range(grad_accum)]

    def get_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = zip(*(loader.get_batch(step) for loader in self.loaders))
        return torch.cat(xs), torch.cat(ys)

    def state_dict(self) -> dict:
        return self.loaders[0].state_dict()  # global settings: the same on every rank

    def load_state_dict(self, state: dict) -> None:
        self.loaders[0].load_state_dict(state)


# ---------------------------------------------------------------------------------------------
# model wrapping
# ---------------------------------------------------------------------------------------------
def wrap_model(model: nn.Module, env: DistEnv, device: torch.device,
               ep_size: int = 0) -> nn.Module:
    """DDP, FSDP2 or expert parallelism (over groups of `ep_size` ranks, 0 = all) + DDP around
    `model` (unchanged for one process)."""
    if not env.active:
        return model
    if env.parallel == "ep":
        from moelab.train import expert_parallel

        env.wrapped = expert_parallel.wrap(model, env, device, ep_size)
        return env.wrapped
    if env.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index] if device.type == "cuda" else None
        env.wrapped = DDP(model, device_ids=ids)
        return env.wrapped
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (env.world_size,))
    if shard_per_block(model):
        for block in model.layers:  # one all-gather per block: peak memory ~ one block
            fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)  # the rest (embedding, tied head, final norm)
    env.wrapped = model
    return model


def shard_per_block(model: nn.Module) -> bool:
    """Whether FSDP2 can shard block by block (else the model is one unit: parameters are
    sharded at rest and gathered for the whole forward and backward).

    Needs each block called once per forward and no parameter held by two blocks (MoEUT's
    repeated groups are one unit). And FSDP2's pre-forward hook of a sharded module rebuilds
    dataclass arguments that hold tensors requiring grad (`dataclasses.replace`): a block would
    then add its balance losses to a copy of the `ForwardContext`, and they would be lost. So
    while ForwardContext is a dataclass, blocks are not sharded on their own.
    """
    import dataclasses

    from moelab.layers.base import ForwardContext

    if dataclasses.is_dataclass(ForwardContext):
        return False
    schedule = getattr(model, "schedule", None)
    if schedule is None or len(schedule) != len(set(schedule)):
        return False
    owner: dict[int, int] = {}
    for i, block in enumerate(model.layers):
        for p in block.parameters():
            if owner.setdefault(id(p), i) != i:
                return False
    return True


def unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return getattr(model, "module", model)  # DDP


# ---------------------------------------------------------------------------------------------
# global routing statistics
# ---------------------------------------------------------------------------------------------
class GlobalRouting:
    """Forward hooks on every router that make its Switch loss and load metrics global over the
    data-parallel group (module docstring). Only installed when world_size > 1; `remove()`
    takes them off again (the hooks run collectives, so the model must not keep them after
    training, when a single rank may use it alone)."""

    def __init__(self, model: nn.Module, env: DistEnv):
        from moelab.layers.routers import Router

        try:
            from moelab.layers.attn_experts import HeadwiseRouter
        except ImportError:  # pragma: no cover - older layer sets
            HeadwiseRouter = ()
        self.env = env
        self.handles = []
        self.warned = False
        for m in model.modules():
            if isinstance(m, Router):
                hook = self._router_hook
            elif HeadwiseRouter and isinstance(m, HeadwiseRouter):
                hook = self._headwise_hook
            else:
                continue
            self.handles.append(m.register_forward_hook(hook, with_kwargs=True))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def _router_hook(self, router, args, kwargs, out) -> None:
        ctx = _context(args, kwargs)
        if ctx is None or not ctx.stats:  # the same on every rank: no collective is skipped
            return
        E = router.n_experts
        counts_E = torch.bincount(out.idx_BTK.reshape(-1), minlength=E).float()
        self._globalise(ctx, router.cfg, router.name, E, counts_E,
                        lambda: out.logits_BTE.reshape(-1, E))

    def _headwise_hook(self, hr, args, kwargs, out) -> None:
        """SwitchHead: H routers of Ea experts whose losses treat each (sequence, head) as a
        sequence over Ea experts; its output holds global ids h*Ea + e, not logits."""
        ctx = _context(args, kwargs)
        if ctx is None or not ctx.stats:  # the same on every rank: no collective is skipped
            return
        Ea, cfg = hr.n_experts, hr.loss_view.cfg
        counts_E = torch.bincount((out[0] % Ea).reshape(-1), minlength=Ea).float()
        x_BTD = args[0] if args else kwargs["x_BTD"]

        def logits():  # recomputed: the hook has no access to the jittered input
            return (x_BTD.float() @ hr.router.weight.float().t()).reshape(-1, Ea)

        exact = not (hr.training and cfg.jitter > 0)
        if not exact and cfg.switch_coef and not self.warned:
            self.warned = True
            log.warning("SwitchHead router with jitter: its Switch loss uses per-rank counts")
        self._globalise(ctx, cfg, hr.loss_view.name, Ea, counts_E, logits if exact else None)

    def _globalise(self, ctx, cfg, name: str, E: int, counts_E: torch.Tensor, logits) -> None:
        global_E = self.env.all_sum(counts_E)
        f_global_E = global_E / global_E.sum()
        if cfg.switch_coef and logits is not None:
            # the router added coef * E * sum f_local P_local; this makes it f_global (eq. above)
            f_local_E = counts_E / counts_E.sum()
            P_E = logits().softmax(-1).mean(0)
            ctx.add_aux(f"{name}.switch",
                        cfg.switch_coef * E * ((f_global_E - f_local_E) * P_E).sum())
        ctx.add_metric(f"{name}.load", f_global_E)
        ctx.add_metric(f"{name}.dead", (global_E == 0).sum().float())


def _context(args, kwargs):
    from moelab.layers.base import ForwardContext

    for a in (*args, *kwargs.values()):
        if isinstance(a, ForwardContext):
            return a
    return None


# ---------------------------------------------------------------------------------------------
# checkpoints: one format for every world size
# ---------------------------------------------------------------------------------------------
def full_state(model: nn.Module, optimizer: torch.optim.Optimizer,
               env: DistEnv) -> tuple[Optional[dict], Optional[dict]]:
    """FSDP2: gather the full weights and optimizer state onto rank 0's CPU (a collective: every
    rank calls it), in the single-process format: weights by parameter name without aliases (a
    tied head is stored once, as the embedding), optimizer state keyed by parameter index as
    `Optimizer.state_dict()` does. Returns (None, None) on other ranks and when not sharded
    (DDP's rank 0 holds everything already). Expert parallelism: the expert shards are
    gathered the same way (moelab/train/expert_parallel.py)."""
    if env.parallel == "ep" and env.active:
        from moelab.train import expert_parallel

        return expert_parallel.full_state(model, optimizer, env.is_main)
    if env.parallel != "fsdp" or not env.active:
        return None, None
    from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                         get_model_state_dict,
                                                         get_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd = get_model_state_dict(model, options=opts)
    optim_sd = get_optimizer_state_dict(model, optimizer, options=opts)
    if not env.is_main:
        return None, None
    from moelab.train.checkpoint import alias_free_weights

    weights = alias_free_weights(model, model_sd, lambda name, _: model_sd[name])
    return weights, _fqn_to_indexed(optim_sd, _param_names(model, optimizer))


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict,
                         env: DistEnv) -> None:
    """Load a checkpoint's full, index-keyed optimizer state (written at any world size)."""
    if env.parallel == "ep" and env.active:
        from moelab.train import expert_parallel

        optimizer.load_state_dict(expert_parallel.local_optimizer_state(optimizer, saved))
        return
    if env.parallel != "fsdp" or not env.active:
        optimizer.load_state_dict(saved)
        return
    from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                         set_optimizer_state_dict)

    names = _param_names(model, optimizer)
    by_name = {"state": {names[int(i)]: s for i, s in saved["state"].items()},
               "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]}
                                for g in saved["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name,
                             options=StateDictOptions(full_state_dict=True))


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the optimizer's index order (group by group)."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]


def _fqn_to_indexed(optim_sd: dict, names: list[str]) -> dict:
    index = {n: i for i, n in enumerate(names)}
    return {"state": {index[n]: s for n, s in optim_sd["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]}
                             for g in optim_sd["param_groups"]]}


# ---------------------------------------------------------------------------------------------
# launcher
# ---------------------------------------------------------------------------------------------
def strip_nproc(argv: list[str]) -> list[str]:
    """argv without `--nproc N` / `--nproc=N` (the re-executed processes must not relaunch)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def launch_command(nproc: int, argv: list[str]) -> list[str]:
    """The torchrun command `moelab ... --nproc N` stands for (one node, local rendezvous)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", "-m", "moelab", *strip_nproc(argv)]


def launch(nproc: int, argv: list[str], env: Optional[dict] = None) -> int:
    """Re-execute `moelab ARGV` as `nproc` processes through torch.distributed.run; returns its
    exit code. argv is moelab's own argument list (e.g. sys.argv[1:]); --nproc is removed.
    env: the children's environment (default: this process's)."""
    if nproc < 1:
        raise ConfigError(f"--nproc {nproc}: expected a positive number of processes")
    return subprocess.call(launch_command(nproc, argv), env=env)

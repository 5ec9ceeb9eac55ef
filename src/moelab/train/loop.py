"""`train()`: the training loop behind `moelab train`.

Order of one iteration (step s = number of updates done afterwards):
  batch s-1 from the loader (a pure function of (seed, s-1), so resuming needs no data iterator)
  -> lr of update s-1 -> forward/backward/clip/update -> metrics line `step: s`
  -> validation if s % eval_every == 0 or s is the last step -> checkpoint if s % save_every == 0
     or s is the last step.
A checkpoint taken after step s holds the state after everything of iteration s (validation
included), so a run resumed from it replays iterations s+1... exactly as the uninterrupted run.

Under torchrun every rank runs this loop (moelab/train/distributed.py): each reads its rows of
every global batch, gradients and logged numbers are reduced across ranks, and rank 0 alone
writes the run directory (metrics, TensorBoard, run.json, checkpoints). Checkpoints have the
single-process format, so a run continues at any world size.
"""
from __future__ import annotations

import math
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from moelab.config import Config
from moelab.cpu_memory import use_cpu_allocator
from moelab.errors import CheckpointError, ConfigError, DataError, TrainingError
from moelab.fsutil import RunLock, check_writable
from moelab.train import checkpoint as ckpt_io
from moelab.train import distributed as ddist
from moelab.train.metrics import MetricsLogger, NullLogger, PendingLogger, Progress
from moelab.train.optim import Schedule, apply_hyperparameters, build_optimizer
from moelab.train.rundir import (check_resume_config, check_same_data, check_vocab,
                                 write_run_files)
from moelab.train.step import NonFiniteLoss, Precision, evaluate_loss, train_step


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """auto = cuda if available else cpu; an unavailable or unknown device is a ConfigError."""
    name = str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r}: unknown device; expected auto, cpu or cuda") \
            from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine; "
                          "use --device cpu or auto")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name!r}: expected auto, cpu or cuda")
    return dev


def total_steps(cfg: Config, steps: Optional[int], tokens: Optional[int]) -> int:
    """--steps, or --tokens converted to ceil(tokens / (batch_size * seq_len)), or train.steps."""
    if steps is not None and tokens is not None:
        raise ConfigError("give either --steps or --tokens, not both")
    if tokens is not None:
        if tokens <= 0:
            raise ConfigError(f"--tokens {tokens}: must be a positive number of tokens")
        return math.ceil(tokens / (cfg.train.batch_size * cfg.train.seq_len))
    if steps is not None:
        if steps <= 0:
            raise ConfigError(f"--steps {steps}: must be a positive number of steps")
        return steps
    return cfg.train.steps


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def train(cfg: Config, data_dir: str | Path | None = None, out_dir: str | Path = "runs/run",
          steps: Optional[int] = None, tokens: Optional[int] = None, resume: bool = False,
          progress: bool = True, device: str = "auto", stop_at: Optional[int] = None,
          tensorboard: bool = True, parallel: Optional[str] = None,
          init_from: str | Path | None = None) -> dict:
    """Train `cfg` on a prepared data directory, writing the run to `out_dir`.

    stop_at: stop (with a checkpoint) after this step although the schedule runs to the full
        total, as if the process had been killed right after saving; `resume=True` continues.
    parallel: ddp | fsdp | ep under torchrun (default: train.parallel); ignored in one process.
    init_from: a model directory (run, imported or transformers directory, ...; see
        moelab.loading) whose weights the run starts from, with a fresh optimizer and schedule
        (fine-tuning); ignored when resuming (the checkpoint holds the weights).
    Returns a summary dict (see docs/training.md); every rank returns the same numbers.
    """
    dev = resolve_device(device)
    env, dev = ddist.setup(dev, ddist.resolve_parallel(cfg.train, parallel))
    if dev.type == "cpu":
        use_cpu_allocator(cfg.train.cpu_allocator)
    try:
        with RunDirGuard(out_dir, env):
            return _train(cfg, data_dir, out_dir, steps, tokens, resume, progress, dev,
                          stop_at, tensorboard, env, init_from)
    finally:
        ddist.teardown(env)


LOCK_HELD_ENV = "MOELAB_RUN_LOCK_HELD"  # set by `moelab train --nproc N` for its children


class RunDirGuard:
    """One training process per run directory, and no trace of a command that failed to start.

    Rank 0 (or the single process) takes the run's lock (`fsutil.RunLock`) before it reads the
    run; a second `train` on the same --out is refused in one line. A run directory this command
    created is removed again when it fails before its first step, so a mistyped config does not
    leave an empty run behind. Under `moelab train --nproc N` the launching process holds the
    lock for its children (they are other processes, which flock would refuse)."""

    def __init__(self, out_dir, env: ddist.DistEnv):
        self.run_dir = Path(out_dir).expanduser()
        self.active = env.is_main and os.environ.get(LOCK_HELD_ENV) != str(self.run_dir.resolve())
        self.created: Path | None = None  # the top folder this command created
        self.lock = RunLock(self.run_dir)

    def __enter__(self) -> "RunDirGuard":
        if not self.active:
            return self
        check_writable(self.run_dir, "--out")
        top = self.run_dir.absolute()
        while not top.parent.exists():  # the highest folder this command is about to create
            top = top.parent
        self.created = None if self.run_dir.exists() else top
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.lock.acquire()
        except BaseException:
            self._undo()
            raise
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if not self.active:
            return
        self.lock.release()
        if exc_type is not None:
            self.discard_if_unstarted()

    def discard_if_unstarted(self) -> None:
        """Remove the run directory if this command created it and the run never started."""
        if not (self.run_dir / "config.json").exists():
            self._undo()

    def _undo(self) -> None:
        if self.created is not None:
            shutil.rmtree(self.created, ignore_errors=True)


def _train(cfg: Config, data_dir, out_dir, steps, tokens, resume: bool, progress: bool,
           dev: torch.device, stop_at: Optional[int], tensorboard: bool,
           env: ddist.DistEnv, init_from=None) -> dict:
    from moelab.data.loader import TokenLoader
    from moelab.data.shards import check_tokenizer, load_meta
    from moelab.flops import count
    from moelab.model import MoELM

    wall_start = time.perf_counter()
    run_dir = Path(out_dir).expanduser()
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out {run_dir}: is a file; expected a run directory")
    data_dir = data_dir if data_dir is not None else cfg.data.dir
    if data_dir is None:
        raise ConfigError("no data: pass --data DIR (a directory written by "
                          "`moelab data prepare`)")
    data_dir = Path(data_dir).expanduser().resolve()
    n_total = total_steps(cfg, steps, tokens)
    d = cfg.to_dict()
    d["train"]["steps"] = n_total
    d["data"]["dir"] = str(data_dir)
    cfg = Config.from_dict(d)
    tc = cfg.train
    meta = load_meta(data_dir)  # DataError for a missing or broken data dir
    check_vocab(meta, cfg, data_dir)
    check_tokenizer(data_dir, meta)  # tokenizer.json is the one the shards were encoded with

    # ---- where do we start from
    resume_ckpt = None
    if resume:
        found = ckpt_io.resume_point(run_dir, dev, warn=_warn if env.is_main else None)
        if found is None:
            raise CheckpointError(f"--resume: {run_dir} has no complete checkpoint "
                                  f"(expected {ckpt_io.checkpoint_dir(run_dir)}/step-N); "
                                  "start without --resume")
        resume_ckpt, saved = found
        check_resume_config(ckpt_io.read_config(resume_ckpt), cfg, resume_ckpt)
        check_same_data(run_dir, meta, data_dir)
        if saved["state"].get("total_steps", n_total) != n_total and env.is_main:
            _warn(f"resuming {run_dir} for {n_total} steps in all, not the "
                  f"{saved['state']['total_steps']} it was started with: the learning-rate "
                  f"schedule from step {saved['state'].get('step')} on follows the new total, "
                  "so the run differs from one trained for this total from the start")
    elif ckpt_io.list_checkpoints(run_dir):
        raise CheckpointError(f"{run_dir} already holds checkpoints of a run; pass --resume to "
                              "continue it, or choose a new --out")

    if env.active:  # this rank's rows of each micro-batch (distributed.RankBatches)
        train_loader = ddist.RankBatches(data_dir, "train", tc.batch_size, tc.seq_len, tc.seed,
                                         cfg.data.sampling, tc.grad_accum, env)
    else:
        train_loader = TokenLoader(data_dir, "train", tc.batch_size, tc.seq_len, tc.seed,
                                   sampling=cfg.data.sampling)  # DataError for a truncated shard
    val_loader = TokenLoader(data_dir, "val", tc.batch_size, tc.seq_len, tc.seed,
                             rank=env.rank, world_size=env.world_size)
    eval_set = val_loader.eval_batches(tc.eval_batches)
    for x_BT, y_BT in eval_set:
        check_token_ids(x_BT, y_BT, cfg.model.vocab_size, data_dir, "val", 0)
    if env.active:
        ddist.check_dtype(env.parallel, tc.dtype)

    seed_everything(tc.seed)
    model = MoELM(cfg.model).to(dev)
    if resume_ckpt is not None:  # before sharding: every rank loads the same full weights
        ckpt_io.load_weights(model, resume_ckpt)
    elif init_from is not None:
        load_initial_weights(model, init_from)
    wrapped = ddist.wrap_model(model, env, dev, ep_size=tc.ep_size)
    routing = ddist.GlobalRouting(model, env) if env.active else None
    optimizer = build_optimizer(model, tc)
    schedule = Schedule(optimizer, tc, n_total)
    precision = Precision.from_config(tc.dtype, dev)
    scaler = precision.grad_scaler()
    state = {"step": 0, "tokens": 0, "val_loss": None, "best_val_loss": None, "train_loss": None,
             "train_wall_s": 0.0}
    if resume_ckpt is not None:
        ddist.load_optimizer_state(model, optimizer, saved["optimizer"], env)
        apply_hyperparameters(optimizer, tc)
        schedule.load_state_dict(saved["scheduler"])
        if scaler is not None and saved.get("scaler"):
            scaler.load_state_dict(saved["scaler"])
        state.update({k: v for k, v in saved["state"].items() if k in state})
        train_loader.load_state_dict(saved["state"].get("data", {}))
        ckpt_io.restore_rng(saved["rng"])  # rank 0's generators
        if env.is_main:
            ckpt_io.remove_stale_tmp(run_dir)
    start = state["step"]
    ddist.seed_rank(tc.seed, env, start)
    if stop_at is not None and not start < stop_at <= n_total:
        raise ConfigError(f"stop_at={stop_at}: expected {start} < stop_at <= {n_total}")
    end = n_total if stop_at is None else stop_at

    counts = count(cfg.model, seq_len=tc.seq_len)
    params = {"params_total": counts["params_total"], "params_active": counts["params_active"]}
    layout = {"world_size": env.world_size,
              "parallel": env.parallel if env.active else "none"}
    if init_from is not None and resume_ckpt is None:
        layout["init_from"] = str(Path(init_from).expanduser().resolve())
    env.barrier()  # every rank has checked the run directory before rank 0 changes it
    # Nothing is written into the run directory until the first optimizer step has succeeded
    # (a bad backend, a shape error, a token id beyond the vocabulary all surface there), so a
    # command that fails to start leaves the run as it was: its config.json, run.json and
    # metrics stay the previous session's, and the next plain --resume works.
    logger = PendingLogger() if env.is_main else NullLogger()

    def commit_start() -> None:
        nonlocal logger
        if not env.is_main or not isinstance(logger, PendingLogger):
            return
        write_run_files(run_dir, cfg, data_dir, meta, str(dev), {**params, **layout},
                        resumed_from=resume_ckpt.name if resume_ckpt is not None else None)
        pending = logger
        logger = MetricsLogger(run_dir, start if resume_ckpt is not None else None, tensorboard)
        pending.replay(logger)
    fwd = compile_model(wrapped) if tc.compile else wrapped
    bar = Progress(n_total, start, progress and env.is_main, cfg.name)
    rows = tc.batch_size // tc.grad_accum // env.world_size  # rows of one micro-batch, per rank
    dist_arg = env if env.active else None
    tokens_per_step = tc.batch_size * tc.seq_len
    session_tokens, session_train_s = 0, 0.0

    def validate(step: int) -> None:
        res = evaluate_loss(fwd, eval_set, rows, dev, precision, dist=dist_arg)
        state["val_loss"] = res["val_loss"]
        best = state["best_val_loss"]
        state["best_val_loss"] = res["val_loss"] if best is None else min(best, res["val_loss"])
        logger.log({"step": step, "val_loss": res["val_loss"], "tokens": state["tokens"],
                    "train_wall_s": state["train_wall_s"],
                    **{k: v for k, v in res.items() if k != "val_loss"}})
        bar.val = res["val_loss"]

    def save(step: int) -> None:
        trainer_state = {**state, "step": step, "total_steps": n_total,
                         "data": {"next_batch": step, **train_loader.state_dict()},
                         "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        weights, optim_state = ddist.full_state(model, optimizer, env)  # FSDP: a collective
        if env.is_main:
            ckpt_io.write_training_checkpoint(run_dir, step, model, cfg, optimizer,
                                              schedule, scaler, trainer_state,
                                              keep_last=tc.keep_last, state_dict=weights,
                                              optimizer_state=optim_state)
        env.barrier()  # the checkpoint exists for every rank once save() returns

    try:
        if start == 0 and tc.eval_every:
            validate(0)  # the untrained baseline every curve starts from
        fwd.train()
        for s in range(start, end):
            t0 = time.perf_counter()
            x_BT, y_BT = train_loader.get_batch(s)
            check_token_ids(x_BT, y_BT, cfg.model.vocab_size, data_dir, "train", s + 1)
            x_BT, y_BT = x_BT.to(dev, non_blocking=True), y_BT.to(dev, non_blocking=True)
            lr = schedule.apply()
            try:
                stats = train_step(fwd, optimizer, x_BT, y_BT, tc.grad_accum, tc.grad_clip,
                                   precision, scaler, dist=dist_arg,
                                   aux_per_micro_batch=tc.aux_loss_scale == "per_micro_batch")
            except NonFiniteLoss as e:
                raise _non_finite_error(run_dir, s + 1, e.stats) from None
            schedule.advance()
            commit_start()
            dt = time.perf_counter() - t0
            step = s + 1
            state["step"], state["train_loss"] = step, stats["loss"]
            state["tokens"] += tokens_per_step
            state["train_wall_s"] += dt
            session_tokens += tokens_per_step
            session_train_s += dt
            if step % max(1, tc.log_every) == 0 or step == end:
                # train_wall_s sums every step's time over all sessions of the run (resumes
                # included), so time curves stay right however sparsely steps are logged.
                logger.log({"step": step, **stats, "lr": lr, "tokens": state["tokens"],
                            "tokens_per_s": tokens_per_step / dt, "step_s": dt,
                            "train_wall_s": state["train_wall_s"]})
            bar.update(1, stats["loss"], lr, tokens_per_step / dt)
            if (tc.eval_every and step % tc.eval_every == 0) or step == n_total:
                validate(step)
            if (tc.save_every and step % tc.save_every == 0) or step == end:
                save(step)
    finally:
        bar.close()
        logger.close()
        if routing is not None:
            routing.remove()
    return {
        "steps": state["step"],
        "total_steps": n_total,
        "tokens": state["tokens"],
        "tokens_per_s": session_tokens / session_train_s if session_train_s else 0.0,
        "wall_s": time.perf_counter() - wall_start,
        "train_wall_s": state["train_wall_s"],
        "final_loss": state["train_loss"],
        "val_loss": state["val_loss"],
        "best_val_loss": state["best_val_loss"],
        **params,
        **layout,
        "device": str(dev),
        "resumed_from": resume_ckpt.name if resume_ckpt is not None else None,
        "run_dir": str(run_dir),
    }


def check_token_ids(x_BT: torch.Tensor, y_BT: torch.Tensor, vocab_size: int, data_dir: Path,
                    split: str, step: int) -> None:
    """DataError when a batch holds a token id the embedding has no row for (shards that do not
    match their meta.json), instead of an IndexError deep in the forward pass. A max over one
    CPU batch: microseconds next to a step."""
    hi = int(torch.maximum(x_BT.max(), y_BT.max())) if x_BT.numel() else 0
    lo = int(torch.minimum(x_BT.min(), y_BT.min())) if x_BT.numel() else 0
    if hi >= vocab_size or lo < 0:
        bad = hi if hi >= vocab_size else lo
        where = f"step {step}" if step else "the validation batches"
        raise DataError(f"data dir {data_dir}: token id {bad} in the {split} split ({where}) is "
                        f"outside model.vocab_size {vocab_size} (0..{vocab_size - 1}); the "
                        "shards do not match this model or their meta.json; prepare the data "
                        "again or set model.vocab_size")


def _warn(message: str) -> None:
    print(f"moelab: warning: {message}", file=sys.stderr)
def load_initial_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Copy the weights of the model in directory `path` into `model` (strict: every tensor,
    same shapes); ConfigError naming the first mismatch."""
    from moelab.loading import open_model

    src = open_model(path)
    if src.kind == "mole-lut":
        raise ConfigError(f"--init-from {path}: a converted MoLE directory is not trainable; "
                          "start from the run it was converted from")
    # a balance bias (router.bias_rate) is training state: a fresh run may start it at 0
    fresh = ("balance_bias_E",)
    theirs = {k: v for k, v in src.model.state_dict().items() if not k.endswith(fresh)}
    mine = {k: v for k, v in model.state_dict().items() if not k.endswith(fresh)}
    for name, t in mine.items():
        if name not in theirs or theirs[name].shape != t.shape:
            got = list(theirs[name].shape) if name in theirs else "absent"
            raise ConfigError(f"--init-from {path}: tensor {name} is {got} there, "
                              f"{list(t.shape)} in the model being trained; train it with the "
                              "model config of that directory (drop --preset/--config)")
    extra = sorted(set(theirs) - set(mine))
    if extra:
        raise ConfigError(f"--init-from {path}: it has tensor {extra[0]} that the model being "
                          "trained lacks; train it with that directory's model config")
    model.load_state_dict(theirs, strict=False)


def _non_finite_error(run_dir: Path, step: int, stats: dict) -> TrainingError:
    last = ckpt_io.latest_checkpoint(run_dir)
    if last is not None:
        good = (f"checkpoint {last.name} is the last good one (continue from it with "
                f"--resume, e.g. with a lower --set train.lr=...)")
    else:
        good = "no checkpoint was written before it (try a lower --set train.lr=...)"
    return TrainingError(f"loss became non-finite at step {step} (loss {stats.get('loss')}, "
                         f"grad_norm {stats.get('grad_norm')}); training stopped, {good}")


def compile_model(model: torch.nn.Module, backend: str = "inductor") -> torch.nn.Module:
    """`torch.compile` for `train.compile`; fullgraph=True where nothing breaks the graph: a
    model without routers in one process (dense and gated attention: one graph, checked by
    tests/train/test_compile.py). The routed engine reads host-side expert counts (`tolist`,
    `item`) to size its matmuls, so routed models compile with graph breaks around it, and a
    DDP/FSDP wrapper splits the graph at its buckets."""
    from moelab.layers.routers import Router
    from moelab.model import MoELM

    routed = any(isinstance(m, Router) for m in model.modules())
    single = type(model) is MoELM  # not DDP, not an FSDP2 subclass
    return torch.compile(model, fullgraph=single and not routed, backend=backend)


"""Data-parallel training (torchrun, gloo on CPU): a 2-process run is the 1-process run.

The end-to-end tests launch `python -m torch.distributed.run --standalone` (a free rendezvous
port, one OpenMP thread per process) through `moelab.train.distributed.launch`, the function
behind `moelab train --nproc N`, and compare every logged number with an in-process 1-process
run of the same global batch: an MoE with a Switch loss (whose expert shares must be global,
not per rank), z-loss, aux-loss-free balance biases (moved by the global loads) and two
micro-batches per step.
"""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from moelab.config import Config
from moelab.errors import ConfigError
from moelab.train import checkpoint as ck
from moelab.train import distributed as ddist
from moelab.train.loop import train

STEPS = 4
MOE = [
    "model.ffn.kind=moe", "model.ffn.n_experts=4", "model.ffn.top_k=2", "model.ffn.expert_dim=32",
    "model.ffn.n_shared_experts=1", "model.ffn.shared_expert_dim=32",
    "model.router.switch_coef=0.05", "model.router.z_coef=0.001", "model.router.bias_rate=0.01",
    "train.grad_accum=2", "train.eval_every=2", "train.save_every=2", "train.keep_last=3",
    "train.warmup_steps=2",
]
TOL = dict(rel=1e-5, abs=1e-5)


@pytest.fixture(scope="module")
def moe_cfg(tiny_cfg) -> Config:
    return tiny_cfg(*MOE)


def _lines(run_dir):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return ({r["step"]: r for r in lines if "loss" in r},
            {r["step"]: r for r in lines if "val_loss" in r})


def _assert_same(ref, run, steps):
    (rt, rv), (gt, gv) = _lines(ref), _lines(run)
    assert set(steps) <= set(gt)
    for s in steps:
        timing = {"tokens_per_s", "step_s", "train_wall_s"}
        keys = set(rt[s]) - timing
        assert keys == set(gt[s]) - timing
        assert any(k.startswith("aux.") and k.endswith(".switch") for k in keys)
        for k in sorted(keys):
            assert gt[s][k] == pytest.approx(rt[s][k], **TOL), (s, k)
    for s in (x for x in rv if x in gv):
        for k in set(rv[s]) - {"train_wall_s"}:
            assert gv[s][k] == pytest.approx(rv[s][k], **TOL), (s, k)


def _torchrun(cfg: Config, data, out, parallel: str, *extra: str, nproc: int = 2) -> None:
    cfg_file = out.parent / f"{out.name}.yaml"
    cfg.with_overrides([f"train.parallel={parallel}"]).save(cfg_file)
    argv = ["train", "--config", str(cfg_file), "--data", str(data), "--out", str(out),
            "--steps", str(STEPS), "--device", "cpu", "--no-progress", "--nproc", str(nproc),
            *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    assert ddist.launch(nproc, argv, env=env) == 0


@pytest.fixture(scope="module")
def reference(tiny_data, moe_cfg, tmp_path_factory):
    run = tmp_path_factory.mktemp("ref") / "run"
    train(moe_cfg, tiny_data, run, steps=STEPS, progress=False, tensorboard=False)
    return run


# ---------------------------------------------------------------------------------------------
# end to end (2 processes)
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ddp_two_processes_equal_one(tiny_data, moe_cfg, reference, tmp_path):
    run = tmp_path / "ddp"
    _torchrun(moe_cfg, tiny_data, run, "ddp")
    _assert_same(reference, run, range(1, STEPS + 1))
    info = json.loads((run / "run.json").read_text())
    assert info["world_size"] == 2 and info["parallel"] == "ddp"
    # written once, in the single-process format: the same keys as the 1-process checkpoint
    from safetensors.torch import load_file

    a = load_file(ck.latest_checkpoint(reference) / "model.safetensors")
    b = load_file(ck.latest_checkpoint(run) / "model.safetensors")
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_fsdp_two_processes_equal_one_and_resume_in_one(tiny_data, moe_cfg, reference, tmp_path):
    run = tmp_path / "fsdp"
    _torchrun(moe_cfg, tiny_data, run, "fsdp")
    _assert_same(reference, run, range(1, STEPS + 1))
    # the gathered checkpoint resumes in a single process and continues the same curve
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    shutil.rmtree(ck.checkpoint_dir(resumed) / f"step-{STEPS:08d}")
    res = train(moe_cfg, tiny_data, resumed, steps=STEPS, resume=True, progress=False,
                tensorboard=False)
    assert res["resumed_from"] == "step-00000002" and res["world_size"] == 1
    _assert_same(reference, resumed, range(3, STEPS + 1))


@pytest.mark.slow
def test_one_process_checkpoint_resumes_on_two(tiny_data, moe_cfg, reference, tmp_path):
    """--resume across world sizes the other way, through the CLI under torchrun."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    shutil.rmtree(ck.checkpoint_dir(run) / f"step-{STEPS:08d}")
    _torchrun(moe_cfg, tiny_data, run, "ddp", "--resume")
    _assert_same(reference, run, range(1, STEPS + 1))


# ---------------------------------------------------------------------------------------------
# pieces (no processes started)
# ---------------------------------------------------------------------------------------------
def test_rank_batches_make_the_one_process_micro_batches(tiny_data):
    from moelab.data.loader import TokenLoader

    B, T, ga, W = 8, 16, 2, 2
    one_x, one_y = TokenLoader(tiny_data, "train", B, T, seed=3).get_batch(5)
    ranks = [ddist.RankBatches(tiny_data, "train", B, T, 3, "random", ga,
                               ddist.DistEnv(rank=r, world_size=W)).get_batch(5)
             for r in range(W)]
    rows = B // ga // W
    for i in range(ga):  # micro-batch i over all ranks = the 1-process micro-batch i
        got = torch.cat([x[i * rows:(i + 1) * rows] for x, _ in ranks])
        torch.testing.assert_close(got, one_x[i * B // ga:(i + 1) * B // ga])
    assert torch.equal(torch.cat([y for _, y in ranks]).sort(0).values, one_y.sort(0).values)
    with pytest.raises(Exception, match="world_size x grad_accum"):
        ddist.RankBatches(tiny_data, "train", 6, T, 3, "random", 2, ddist.DistEnv(0, 2))


def test_launcher_command_and_parallel_choice(moe_cfg, monkeypatch):
    argv = ["train", "--preset", "moe-tiny", "--nproc", "4", "--out", "r", "--nproc=2"]
    assert ddist.strip_nproc(argv) == ["train", "--preset", "moe-tiny", "--out", "r"]
    cmd = ddist.launch_command(4, argv)
    assert cmd[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
                       "-m", "moelab", "train", "--preset", "moe-tiny", "--out", "r"]
    tc = moe_cfg.train
    assert ddist.resolve_parallel(tc) == "ddp"
    fsdp = moe_cfg.with_overrides(["train.parallel=fsdp"]).train
    assert ddist.resolve_parallel(fsdp) == "fsdp" and ddist.resolve_parallel(fsdp, "ddp") == "ddp"
    with pytest.raises(Exception, match="train.parallel"):
        ddist.resolve_parallel(tc, "zero3")
    with pytest.raises(Exception, match="--nproc"):
        ddist.launch(0, ["train"])


def test_optimizer_state_index_and_name_keys_round_trip(moe_cfg):
    from moelab.model import MoELM
    from moelab.train.optim import build_optimizer

    cfg = moe_cfg
    model = MoELM(cfg.model)
    opt = build_optimizer(model, cfg.train)
    model(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long)).loss.backward()
    opt.step()
    sd = opt.state_dict()
    names = ddist._param_names(model, opt)
    assert len(names) == len(set(names)) == len(list(model.parameters()))
    by_name = {"state": {names[i]: s for i, s in sd["state"].items()},
               "param_groups": [{**g, "params": [names[i] for i in g["params"]]}
                                for g in sd["param_groups"]]}
    back = ddist._fqn_to_indexed(by_name, names)
    assert back["param_groups"] == sd["param_groups"]
    assert all(back["state"][i]["exp_avg"] is sd["state"][i]["exp_avg"] for i in sd["state"])


def test_fsdp_shards_blocks_only_when_they_are_independent(moe_cfg):
    import dataclasses

    from moelab.layers.base import ForwardContext
    from moelab.model import MoELM

    # FSDP2 would rebuild a dataclass ForwardContext per block (see shard_per_block)
    opaque_context = not dataclasses.is_dataclass(ForwardContext)
    assert ddist.shard_per_block(MoELM(moe_cfg.model)) == opaque_context
    shared = moe_cfg.with_overrides(["model.n_layers=4", "model.sharing.group_size=2"])
    assert not ddist.shard_per_block(MoELM(shared.model))


def test_launcher_checks_before_starting_processes(moe_cfg, tiny_cfg):
    """Settings that would fail on every rank are one error in the launcher."""
    ep = moe_cfg.with_overrides(["train.parallel=ep"])
    ddist.check_launch(ep, 2)  # 4 experts over 2 processes, 8 rows = 2 x 2 micro-batches x 2
    with pytest.raises(ConfigError, match="batch_size: 8 must be divisible"):
        ddist.check_launch(moe_cfg, 3)
    with pytest.raises(ConfigError, match="6 experts, not divisible by 4"):
        ddist.check_launch(ep.with_overrides(["train.batch_size=16", "model.ffn.n_experts=6",
                                              "model.ffn.top_k=2"]), 4)
    with pytest.raises(ConfigError, match="has none"):
        ddist.check_launch(tiny_cfg("train.parallel=ep"), 2)
    with pytest.raises(ConfigError, match="float16 with train.parallel fsdp"):
        ddist.check_launch(moe_cfg.with_overrides(["train.parallel=fsdp",
                                                   "train.dtype=float16"]), 2)

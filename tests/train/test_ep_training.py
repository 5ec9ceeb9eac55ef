"""Expert parallelism (`train.parallel: ep`, torchrun with gloo on CPU): experts split over 2
processes train the same run as 1 process, for an FFN-MoE (Switch loss, shared expert, two
micro-batches) and for UMoE (one bank shared by attention and FFN); checkpoints keep the
single-process format and resume at either world size."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import MOE, STEPS, _assert_same, _torchrun

from moelab.errors import ConfigError
from moelab.model import MoELM
from moelab.train import checkpoint as ck
from moelab.train import expert_parallel as epx
from moelab.train.loop import train

UMOE = [
    "model.attention.kind=umoe_att", "model.attention.n_experts=4", "model.attention.top_k=2",
    "model.attention.n_shared_experts=1", "model.attention.expert_dim=16",
    "model.attention.head_dim=16", "model.attention.q_rank=4",
    "model.ffn.kind=umoe_ffn", "model.ffn.n_experts=4", "model.ffn.top_k=2",
    "model.ffn.expert_dim=16", "model.ffn.n_shared_experts=1", "model.ffn.shared_expert_dim=16",
    "model.ffn.gated=false", "model.router.switch_coef=0.05", "model.router.seq_coef=0.001",
    "train.eval_every=2", "train.save_every=2", "train.warmup_steps=2",
]


def _reference(cfg, data, out):
    train(cfg, data, out, steps=STEPS, progress=False, tensorboard=False)
    return out


def _same_weights(a_run, b_run):
    a = load_file(ck.latest_checkpoint(a_run) / "model.safetensors")
    b = load_file(ck.latest_checkpoint(b_run) / "model.safetensors")
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.slow
def test_ep_two_processes_equal_one_and_resume_either_way(tiny_data, tiny_cfg, tmp_path):
    cfg = tiny_cfg(*MOE)
    ref = _reference(cfg, tiny_data, tmp_path / "ref")
    run = tmp_path / "ep"
    _torchrun(cfg, tiny_data, run, "ep")
    _assert_same(ref, run, range(1, STEPS + 1))  # losses, balance losses, grad norm, val
    info = json.loads((run / "run.json").read_text())
    assert info["world_size"] == 2 and info["parallel"] == "ep"
    _same_weights(ref, run)  # the expert shards were gathered into one file
    saved = torch.load(ck.latest_checkpoint(run) / "optimizer.pt", weights_only=True)
    ref_saved = torch.load(ck.latest_checkpoint(ref) / "optimizer.pt", weights_only=True)
    for i, s in ref_saved["optimizer"]["state"].items():  # AdamW moments of every expert too
        torch.testing.assert_close(saved["optimizer"]["state"][i]["exp_avg_sq"], s["exp_avg_sq"],
                                   rtol=1e-3, atol=1e-9)
    # the gathered checkpoint resumes in one process and continues the same curve
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    shutil.rmtree(ck.checkpoint_dir(resumed) / f"step-{STEPS:08d}")
    train(cfg, tiny_data, resumed, steps=STEPS, resume=True, progress=False, tensorboard=False)
    _assert_same(ref, resumed, range(3, STEPS + 1))
    # and a 1-process checkpoint resumes with the experts split
    back = tmp_path / "back"
    shutil.copytree(ref, back)
    shutil.rmtree(ck.checkpoint_dir(back) / f"step-{STEPS:08d}")
    _torchrun(cfg, tiny_data, back, "ep", "--resume")
    _assert_same(ref, back, range(1, STEPS + 1))


@pytest.mark.slow
def test_ep_umoe_shared_bank_two_processes_equal_one(tiny_data, tiny_cfg, tmp_path):
    cfg = tiny_cfg(*UMOE)
    ref = _reference(cfg, tiny_data, tmp_path / "ref")
    run = tmp_path / "ep"
    _torchrun(cfg, tiny_data, run, "ep")
    _assert_same(ref, run, range(1, STEPS + 1))
    _same_weights(ref, run)


@pytest.mark.slow
def test_two_expert_groups_of_two_on_four_processes_equal_one(tiny_data, tiny_cfg, tmp_path):
    """train.ep_size=2 on 4 processes: two expert groups each holding every expert once, the
    shards' copies summed over groups; the same run as one process."""
    from moelab.train import distributed as ddist

    cfg = tiny_cfg(*MOE)
    ref = _reference(cfg, tiny_data, tmp_path / "ref")
    run = tmp_path / "ep4"
    _torchrun(cfg.with_overrides(["train.ep_size=2"]), tiny_data, run, "ep", nproc=4)
    _assert_same(ref, run, range(1, STEPS + 1))
    _same_weights(ref, run)
    with pytest.raises(ConfigError, match="ep_size: 3 must divide the number of processes 4"):
        ddist.check_launch(cfg.with_overrides(["train.parallel=ep", "train.ep_size=3"]), 4)


def test_place_experts_places_each_bank_once_and_names_every_alias(tiny_cfg):
    model = MoELM(tiny_cfg(*UMOE).model)
    banks = epx.routed_banks(model)
    assert len(banks) == 2  # one bank per layer, held by its attention and its FFN
    names = epx.place_experts(model, rank=1, world=2)
    for bank in banks.values():
        assert bank.w1_EDH.shape[0] == 2 and bank.placement.first == 2
    # the attention and the FFN name the same shard: DDP must ignore both names
    assert any(".attn." in n for n in names) and any(".ffn." in n for n in names)
    shards = [p for p in model.parameters() if epx.is_shard(p)]
    assert len(shards) == 2 * 2  # w1 and w2 of each bank (not gated)


def test_place_experts_errors_name_the_problem(tiny_cfg):
    dense = MoELM(tiny_cfg().model)
    with pytest.raises(ConfigError, match="has none"):
        epx.place_experts(dense, 0, 2)
    moe = MoELM(tiny_cfg(*MOE).model)
    with pytest.raises(ConfigError, match="4 experts, not divisible by 3"):
        epx.place_experts(moe, 0, 3)
    mole = MoELM(tiny_cfg("model.ffn.kind=mole", "model.ffn.n_experts=4",
                          "model.ffn.expert_dim=32").model)
    with pytest.raises(ConfigError, match="MoLE"):
        epx.place_experts(mole, 0, 2)

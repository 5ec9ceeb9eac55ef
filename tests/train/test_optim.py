"""LR schedule values and AdamW weight-decay groups."""
from __future__ import annotations

import math

import pytest
import torch

from moelab.config import TrainConfig
from moelab.train.optim import (Schedule, build_optimizer, lr_at, lr_factor, no_decay_param_ids,
                                param_groups)


def test_warmup_is_linear_and_reaches_peak():
    tc = TrainConfig(lr=1e-3, warmup_steps=10, steps=110, min_lr_ratio=0.1)
    assert lr_at(0, tc) == pytest.approx(1e-4)
    assert lr_at(4, tc) == pytest.approx(5e-4)
    assert lr_at(9, tc) == pytest.approx(1e-3)  # peak at the last warmup update
    assert lr_at(10, tc) == pytest.approx(1e-3)  # cosine starts at the peak


def test_cosine_midpoint_and_floor():
    tc = TrainConfig(lr=1e-3, warmup_steps=10, steps=110, min_lr_ratio=0.1)
    assert lr_at(60, tc) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))  # halfway down the cosine
    assert lr_at(110, tc) == pytest.approx(1e-4)  # floor = lr * min_lr_ratio
    assert lr_at(500, tc) == pytest.approx(1e-4)  # stays there beyond the end
    lrs = [lr_at(s, tc) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # monotone decay


def test_no_warmup_and_zero_floor():
    assert lr_factor(0, 100, 0, 0.0) == pytest.approx(1.0)
    assert lr_factor(100, 100, 0, 0.0) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(25, 100, 0, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_schedule_state_is_counters_and_sets_every_group():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    tc = TrainConfig(lr=1e-2, warmup_steps=4, steps=20)
    opt = build_optimizer(model, tc)
    sched = Schedule(opt, tc, 20)
    for _ in range(3):
        sched.advance()
    assert sched.apply() == pytest.approx(lr_at(3, tc))
    assert all(g["lr"] == pytest.approx(lr_at(3, tc)) for g in opt.param_groups)
    other = Schedule(opt, tc, 20)
    other.load_state_dict(sched.state_dict())
    assert other.step == 3


def _tiny_model(**sets):
    from moelab.config import load_preset
    from moelab.model import MoELM

    over = ["model.d_model=32", "model.n_layers=2", "model.attention.n_heads=2",
            "model.ffn.d_ff=64", "model.vocab_size=64", "model.attention.bias=true",
            "model.ffn.bias=true"] + [f"{k}={v}" for k, v in sets.items()]
    return MoELM(load_preset("dense-tiny").with_overrides(over).model)


@pytest.mark.parametrize("tied", [True, False])
def test_no_weight_decay_on_norms_biases_embeddings(tied):
    model = _tiny_model(**{"model.tie_embeddings": str(tied).lower()})
    tc = TrainConfig(weight_decay=0.1)
    opt = build_optimizer(model, tc)
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0
    no_decay = {id(p) for p in groups["no_decay"]["params"]}
    decay = {id(p) for p in groups["decay"]["params"]}
    names = dict((id(p), n) for n, p in model.named_parameters())
    for n, p in model.named_parameters():
        expect_no_decay = (p.ndim < 2 or n.startswith("embed.") or "norm" in n)
        assert (id(p) in no_decay) == expect_no_decay, n
    assert id(model.embed.weight) in no_decay
    assert any(names[i].endswith("bias") for i in no_decay)  # biases really exist here
    if not tied:  # an untied output head is an ordinary matrix: decayed
        assert id(model.head.weight) in decay
    # every parameter exactly once
    assert len(no_decay) + len(decay) == len(list(model.parameters()))


def test_decay_norms_and_embeddings_puts_everything_in_one_group():
    model = _tiny_model()
    groups = param_groups(model, 0.1, decay_norms_and_embeddings=True)
    assert [g["name"] for g in groups] == ["decay"]
    assert len(groups[0]["params"]) == len(list(model.parameters()))


def test_no_decay_ids_cover_rmsnorm_and_layernorm():
    m = torch.nn.ModuleDict({"a": torch.nn.RMSNorm(8), "b": torch.nn.LayerNorm(8, bias=False),
                             "e": torch.nn.Embedding(5, 8), "w": torch.nn.Linear(8, 8, bias=False)})
    ids = no_decay_param_ids(m)
    assert id(m["a"].weight) in ids and id(m["b"].weight) in ids and id(m["e"].weight) in ids
    assert id(m["w"].weight) not in ids

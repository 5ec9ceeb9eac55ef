"""Trainer state in checkpoints: RNG round trip, optimizer state, atomic writes, config diffs."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from moelab.config import load_preset
from moelab.errors import CheckpointError
from moelab.model import MoELM
from moelab.train import checkpoint as ck
from moelab.train.optim import Schedule, build_optimizer


def _draws():
    return (torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)],
            float(np.random.randn()), random.gauss(0, 1))


def test_rng_round_trip_through_a_weights_only_file(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.randn()  # leave a cached gaussian in numpy's state
    state = ck.capture_rng()
    torch.save(state, tmp_path / "rng.pt")
    expected = _draws()
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    ck.restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert _draws() == expected


def _model():
    cfg = load_preset("dense-tiny").with_overrides(
        ["model.d_model=32", "model.n_layers=1", "model.attention.n_heads=2",
         "model.ffn.d_ff=32", "model.vocab_size=64"])
    return MoELM(cfg.model), cfg


def _one_update(model, opt):
    out = model(torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8)))
    out.loss.backward()
    opt.step()
    opt.zero_grad()


def test_training_checkpoint_round_trip(tmp_path):
    model, cfg = _model()
    opt = build_optimizer(model, cfg.train)
    sched = Schedule(opt, cfg.train, 10)
    _one_update(model, opt)
    sched.advance()
    path = ck.write_training_checkpoint(tmp_path, 1, model, cfg, opt, sched, None,
                                        {"step": 1, "tokens": 16})
    assert sorted(p.name for p in path.iterdir()) == [
        "config.json", "model.safetensors", "optimizer.pt", "rng.pt", "state.json"]
    saved = ck.read_training_state(path)
    assert saved["state"] == {"step": 1, "tokens": 16}
    assert saved["scheduler"] == {"step": 1, "total_steps": 10}
    model2, _ = _model()
    opt2 = build_optimizer(model2, cfg.train)
    opt2.load_state_dict(saved["optimizer"])
    ck.load_weights(model2, path)
    for a, b in zip(opt.state_dict()["state"].values(), opt2.state_dict()["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["step"], b["step"])
    # both continue identically
    torch.manual_seed(5)
    _one_update(model, opt)
    torch.manual_seed(5)
    _one_update(model2, opt2)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


def test_crash_while_writing_keeps_previous_checkpoint(tmp_path):
    model, cfg = _model()
    opt = build_optimizer(model, cfg.train)
    sched = Schedule(opt, cfg.train, 10)
    ck.write_training_checkpoint(tmp_path, 1, model, cfg, opt, sched, None, {"step": 1})
    with pytest.raises(RuntimeError, match="simulated crash"):
        ck.write_training_checkpoint(tmp_path, 2, model, cfg, opt, sched, None, {"step": 2},
                                     _fail_after="state.json")
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step-00000001"]
    assert not list(ck.checkpoint_dir(tmp_path).glob(".tmp-*"))
    assert ck.read_training_state(ck.latest_checkpoint(tmp_path))["state"]["step"] == 1
    ck.load_model(tmp_path)


def test_stale_tmp_of_dead_process_is_removed(tmp_path):
    root = ck.checkpoint_dir(tmp_path)
    (root / ".tmp-step-00000003-999999999").mkdir(parents=True)  # no such pid
    (root / ".tmp-step-00000003-999999999" / "model.safetensors").write_bytes(b"half")
    assert ck.latest_checkpoint(tmp_path) is None
    ck.remove_stale_tmp(tmp_path)
    assert not list(root.iterdir())


def test_weights_only_checkpoint_cannot_be_resumed(tmp_path):
    model, cfg = _model()
    path = ck.write_checkpoint(tmp_path, 4, model, cfg)
    with pytest.raises(CheckpointError, match="optimizer.pt, rng.pt, state.json missing"):
        ck.read_training_state(path)


def test_damaged_trainer_state_is_a_checkpoint_error(tmp_path):
    model, cfg = _model()
    opt = build_optimizer(model, cfg.train)
    path = ck.write_training_checkpoint(tmp_path, 1, model, cfg, opt, Schedule(opt, cfg.train, 2),
                                        None, {"step": 1})
    (path / "optimizer.pt").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="unreadable"):
        ck.read_training_state(path)


def test_config_differences_names_leaves():
    a = load_preset("dense-tiny").to_dict()
    b = json.loads(json.dumps(a))
    b["model"]["d_model"] = 128
    b["model"]["attention"]["gate"]["position"] = "sdpa"
    diffs = ck.config_differences(a["model"], b["model"], "model.")
    assert diffs == ["model.attention.gate.position: checkpoint 'none', given 'sdpa'",
                     "model.d_model: checkpoint 192, given 128"]


def test_alias_free_weights_matches_a_single_process_checkpoint(tmp_path):
    """The weights FSDP/EP gather for rank 0's checkpoint have the names, shapes and values the
    single-process writer stores: a tied head once, non-persistent buffers left out."""
    from safetensors.torch import load_file

    model, cfg = _model()
    assert cfg.model.tie_embeddings
    model.register_buffer("extra_B", torch.arange(3.0))  # kept
    model.register_buffer("scratch_B", torch.ones(2), persistent=False)  # left out
    written = load_file(str(ck.write_checkpoint(tmp_path, 1, model, cfg) / "model.safetensors"))
    doubled = ck.alias_free_weights(model, model.state_dict(), lambda name, t: 2 * t)
    assert doubled.keys() == written.keys()
    assert "extra_B" in doubled and "scratch_B" not in doubled
    for name, t in written.items():
        torch.testing.assert_close(doubled[name], 2 * t, rtol=0, atol=0)
        assert doubled[name].is_contiguous() and not doubled[name].requires_grad
    # a checkpoint written from it loads into a plain model
    ckpt = ck.write_checkpoint(tmp_path, 2, model, cfg, state_dict=ck.alias_free_weights(
        model, model.state_dict(), lambda name, t: t))
    fresh, _ = _model()
    fresh.register_buffer("extra_B", torch.zeros(3))
    ck.load_weights(fresh, ckpt)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)

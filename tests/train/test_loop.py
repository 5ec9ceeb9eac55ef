"""End-to-end training: learning, exact resume, crash safety, accumulation, precision, layout."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from moelab.cli import main
from moelab.train import checkpoint as ck
from moelab.train.loop import total_steps, train

# float32, eval every 10, checkpoints every 20: the straight run of the resume tests
RESUME_SETS = ("train.eval_every=10", "train.save_every=20", "train.warmup_steps=5")
REQUIRED_KEYS = {"step", "loss", "aux_loss", "lr", "grad_norm", "tokens", "tokens_per_s"}


@pytest.fixture(scope="module")
def straight_run(tiny_data, tiny_cfg, tmp_path_factory):
    run = tmp_path_factory.mktemp("straight") / "run"
    train(tiny_cfg(*RESUME_SETS), tiny_data, run, steps=40, progress=False)
    return run


def _assert_same_curve(a, b, metrics_of):
    a_train, a_val = metrics_of(a)
    b_train, b_val = metrics_of(b)
    assert sorted(a_train) == sorted(b_train) == list(range(1, 41))
    for s in a_train:
        for key in ("loss", "grad_norm", "lr", "tokens"):
            assert b_train[s][key] == pytest.approx(a_train[s][key], rel=1e-6, abs=1e-6), (s, key)
    assert sorted(a_val) == sorted(b_val)
    for s in a_val:
        assert b_val[s]["val_loss"] == pytest.approx(a_val[s]["val_loss"], abs=1e-6)


@pytest.mark.slow
def test_training_learns(tiny_data, tiny_cfg, tmp_path, metrics_of):
    from moelab.eval.perplexity import evaluate_run

    cfg = tiny_cfg("train.eval_every=100")
    res = train(cfg, tiny_data, tmp_path / "run", steps=200, progress=False)
    _, val = metrics_of(tmp_path / "run")
    print(f"val loss: step 0 {val[0]['val_loss']:.3f}, step 100 {val[100]['val_loss']:.3f}, "
          f"step 200 {val[200]['val_loss']:.3f}")
    assert val[0]["val_loss"] == pytest.approx(math.log(512), abs=0.1)  # untrained: ~uniform
    assert val[200]["val_loss"] < val[0]["val_loss"] - 1.0
    assert res["val_loss"] == val[200]["val_loss"] and res["steps"] == 200
    assert res["tokens"] == 200 * 8 * 64 and res["params_active"] == res["params_total"]
    ppl = evaluate_run(tmp_path / "run")
    assert ppl["perplexity"] < math.exp(val[0]["val_loss"] - 1.0)


@pytest.mark.slow
def test_resume_equals_uninterrupted(tiny_data, tiny_cfg, tmp_path, straight_run, metrics_of):
    cfg = tiny_cfg(*RESUME_SETS)
    run = tmp_path / "run"
    first = train(cfg, tiny_data, run, steps=40, stop_at=30, progress=False)
    assert first["steps"] == 30 and first["total_steps"] == 40
    # as if killed after step 30 but before its checkpoint: metrics has lines 21..30 to drop
    shutil.rmtree(ck.checkpoint_dir(run) / "step-00000030")
    res = train(cfg, tiny_data, run, steps=40, resume=True, progress=False)
    assert res["resumed_from"] == "step-00000020" and res["steps"] == 40
    _assert_same_curve(straight_run, run, metrics_of)
    # the training-time clock runs on from the checkpoint: steps 21..30 of the first session
    # were dropped with their lines, so it is the sum of the step times left in the file
    lines, _ = metrics_of(run)
    clock = [lines[s]["train_wall_s"] for s in sorted(lines)]
    assert all(b > a for a, b in zip(clock, clock[1:]))
    assert clock[-1] == pytest.approx(sum(r["step_s"] for r in lines.values()), rel=1e-9)
    assert res["train_wall_s"] == pytest.approx(clock[-1], rel=1e-12)
    assert len(list((run / "tb").glob("events.out.tfevents.*"))) >= 2
    assert json.loads((run / "run.json").read_text())["resumes"][0]["from"] == "step-00000020"


@pytest.mark.slow
def test_crash_while_checkpointing_then_cli_resume(tiny_data, tiny_cfg, tmp_path, straight_run,
                                                   metrics_of, monkeypatch, capsys):
    real = ck.write_checkpoint

    def crash_at_20(run_dir, step, *args, **kwargs):
        if step == 20:
            kwargs["_fail_after"] = "state.json"
        return real(run_dir, step, *args, **kwargs)

    run = tmp_path / "run"
    monkeypatch.setattr(ck, "write_checkpoint", crash_at_20)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tiny_cfg(*RESUME_SETS, "train.save_every=10"), tiny_data, run, steps=40,
              progress=False)
    monkeypatch.undo()
    assert [p.name for p in ck.list_checkpoints(run)] == ["step-00000010"]
    assert not list(ck.checkpoint_dir(run).glob(".tmp-*"))
    ck.load_model(run)  # the previous checkpoint is intact and loadable
    # resume through the CLI with the run's own config.json (no --preset)
    rc = main(["train", "--data", str(tiny_data), "--out", str(run), "--resume", "--no-progress"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert json.loads(out.out)["steps"] == 40
    _assert_same_curve(straight_run, run, metrics_of)


def test_grad_accum_gives_the_same_step(tiny_data, tiny_cfg, tmp_path, metrics_of):
    lines = {}
    for ga in (1, 2, 4):
        cfg = tiny_cfg(f"train.grad_accum={ga}", "train.eval_every=0")
        train(cfg, tiny_data, tmp_path / f"ga{ga}", steps=2, progress=False, tensorboard=False)
        lines[ga] = metrics_of(tmp_path / f"ga{ga}")[0]
    for ga in (2, 4):
        assert lines[ga][1]["loss"] == pytest.approx(lines[1][1]["loss"], rel=1e-6)
        assert lines[ga][1]["grad_norm"] == pytest.approx(lines[1][1]["grad_norm"], rel=1e-5)
        assert lines[ga][2]["loss"] == pytest.approx(lines[1][2]["loss"], rel=1e-5)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_autocast_runs(tiny_data, tiny_cfg, tmp_path, dtype):
    res = train(tiny_cfg(f"train.dtype={dtype}", "train.eval_every=0"), tiny_data,
                tmp_path / "run", steps=3, progress=False, tensorboard=False)
    assert math.isfinite(res["final_loss"]) and math.isfinite(res["val_loss"])
    opt_state = ck.read_training_state(ck.latest_checkpoint(tmp_path / "run"))
    assert bool(opt_state["scaler"]) == (dtype == "float16")  # fp16 loss scaling is resumable


def test_tokens_convert_to_steps(tiny_data, tmp_path, tiny_cfg):
    cfg = tiny_cfg()
    assert total_steps(cfg, None, 1000) == 2  # ceil(1000 / (8 * 64))
    assert total_steps(cfg, None, 1024) == 2 and total_steps(cfg, 7, None) == 7
    assert total_steps(cfg, None, None) == cfg.train.steps
    res = train(tiny_cfg("train.eval_every=0"), tiny_data, tmp_path / "run", tokens=1000,
                progress=False, tensorboard=False)
    assert res["steps"] == 2 and res["tokens"] == 1024


def test_run_directory_layout(tiny_data, tmp_path, tiny_cfg, metrics_of):
    from moelab.config import Config
    from moelab.data.shards import load_meta

    run = tmp_path / "run"
    res = train(tiny_cfg("train.eval_every=2", "train.save_every=2", "train.keep_last=2"),
                tiny_data, run, steps=5, progress=False)
    assert set(res) >= {"steps", "tokens", "tokens_per_s", "wall_s", "final_loss", "val_loss",
                        "params_total", "params_active", "run_dir"}
    assert res["tokens_per_s"] > 0 and res["run_dir"] == str(run)
    cfg = Config.load(run / "config.json")
    assert cfg.train.steps == 5 and cfg.data.dir == str(tiny_data.resolve())
    assert (run / "tokenizer.json").read_bytes() == (tiny_data / "tokenizer.json").read_bytes()
    info = json.loads((run / "run.json").read_text())
    assert info["data_dir"] == str(tiny_data.resolve())
    assert info["data"]["sha256"] == load_meta(tiny_data)["sha256"]
    assert [p.name for p in ck.list_checkpoints(run)] == ["step-00000004", "step-00000005"]
    state = json.loads((ck.latest_checkpoint(run) / "state.json").read_text())
    assert state["step"] == 5 and state["tokens"] == 5 * 512 and state["data"]["next_batch"] == 5
    train_lines, val_lines = metrics_of(run)
    assert sorted(train_lines) == [1, 2, 3, 4, 5] and sorted(val_lines) == [0, 2, 4, 5]
    assert all(REQUIRED_KEYS <= set(r) for r in train_lines.values())
    assert list((run / "tb").glob("events.out.tfevents.*"))


def test_step_metrics_average_over_micro_batches():
    """Routing metrics and aux losses from the model are averaged over micro-batches; vector
    metrics are logged as their max and min."""
    from moelab.model import ModelOutput
    from moelab.train.step import train_step

    class Fake(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))

        def forward(self, x_BT, y_BT):
            mean = x_BT.float().mean()
            loss = self.w * mean
            return ModelOutput(logits=x_BT.float(), loss=loss, aux_loss=0.5 * self.w,
                               aux_losses={"layer0.router.switch": 0.5 * self.w},
                               metrics={"layer0.router.entropy": mean,
                                        "layer0.router.load": torch.stack([mean, 1 - mean])})

    model = Fake()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    x_BT = torch.tensor([[0, 0], [1, 1]])  # micro-batch means 0 and 1
    stats = train_step(model, opt, x_BT, x_BT, grad_accum=2)
    assert stats["loss"] == pytest.approx(0.5) and stats["aux_loss"] == pytest.approx(0.5)
    assert stats["aux.layer0.router.switch"] == pytest.approx(0.5)
    assert stats["layer0.router.entropy"] == pytest.approx(0.5)
    assert stats["layer0.router.load_max"] == pytest.approx(1.0)
    assert stats["layer0.router.load_min"] == pytest.approx(0.0)
    assert stats["grad_norm"] == pytest.approx(1.0)  # d(loss + aux)/dw = 0.5 + 0.5


def test_moe_resume_restores_router_noise_and_logs_routing(tiny_data, tmp_path, metrics_of):
    """Router jitter draws from the torch RNG during training, so an exact MoE resume needs
    the RNG state of the checkpoint; routing metrics land in metrics.jsonl."""
    from moelab.config import load_preset, preset_names

    if "moe-tiny" not in preset_names():
        pytest.skip("no moe-tiny preset in this tree")
    cfg = load_preset("moe-tiny").with_overrides([
        "model.d_model=64", "model.n_layers=2", "model.attention.n_heads=2",
        "model.vocab_size=512", "model.max_seq_len=64", "model.ffn.n_experts=4",
        "model.ffn.expert_dim=32", "model.ffn.shared_expert_dim=64", "model.router.jitter=0.1",
        "model.router.bias_rate=0.01",  # the balance biases are saved and restored too
        "train.seq_len=64", "train.batch_size=8", "train.eval_every=5", "train.eval_batches=2",
        "train.save_every=5", "train.warmup_steps=2", "train.grad_accum=2"])
    train(cfg, tiny_data, tmp_path / "a", steps=10, progress=False, tensorboard=False)
    train(cfg, tiny_data, tmp_path / "b", steps=10, stop_at=5, progress=False, tensorboard=False)
    train(cfg, tiny_data, tmp_path / "b", steps=10, resume=True, progress=False,
          tensorboard=False)
    a_train, a_val = metrics_of(tmp_path / "a")
    b_train, b_val = metrics_of(tmp_path / "b")
    assert [a_train[s]["loss"] for s in range(1, 11)] == [b_train[s]["loss"] for s in range(1, 11)]
    assert [a_val[s]["val_loss"] for s in (0, 5, 10)] == [b_val[s]["val_loss"] for s in (0, 5, 10)]
    line = a_train[1]
    assert line["aux_loss"] > 0 and any(k.startswith("aux.layer0.") for k in line)
    assert a_train[10]["layer0.ffn_router.bias_max"] > 0  # balancing moved the biases
    for suffix in (".entropy", ".load_max", ".load_min", ".dead"):  # router names vary by kind
        assert any(k.startswith("layer0.") and k.endswith(suffix) for k in line), suffix
    loads = [v for k, v in a_val[10].items() if k.startswith("layer1.") and k.endswith(".load")]
    assert loads and len(loads[0]) == 4 and sum(loads[0]) == pytest.approx(1.0, abs=1e-4)


def test_training_on_cpu_applies_the_setting(monkeypatch, tiny_data, tiny_cfg, tmp_path):
    from moelab import cpu_memory
    from moelab.train import loop

    calls = []
    monkeypatch.setattr(cpu_memory, "reuse_large_blocks", lambda: calls.append(1) or True)
    loop.train(tiny_cfg("train.cpu_allocator=system"), tiny_data, tmp_path / "a", steps=1,
               progress=False, device="cpu")
    assert calls == []
    loop.train(tiny_cfg(), tiny_data, tmp_path / "b", steps=1, progress=False, device="cpu")
    assert calls == [1]

"""Bad input to `moelab train` gives one `moelab: error:` line, exit code 2, no traceback."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from moelab.cli import main
from moelab.train import checkpoint as ck
from moelab.train.metrics import read_metrics

TINY_SETS = ["--set", "model.d_model=64", "--set", "model.n_layers=2",
             "--set", "model.attention.n_heads=2", "--set", "model.ffn.d_ff=128",
             "--set", "model.vocab_size=512", "--set", "model.max_seq_len=64",
             "--set", "train.seq_len=64", "--set", "train.batch_size=8",
             "--set", "train.eval_batches=2", "--set", "train.eval_every=0"]


def cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def assert_one_error(rc, err, *fragments):
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("moelab: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def train_cli(capsys, data, out, *extra):
    return cli(capsys, "train", "--preset", "dense-tiny", *TINY_SETS, "--data", data,
               "--out", out, "--no-progress", *extra)


@pytest.fixture
def small_run(tiny_data, tmp_path, capsys):
    """A finished 2-step run trained through the CLI."""
    run = tmp_path / "run"
    rc, out, err = train_cli(capsys, tiny_data, run, "--steps", 2)
    assert rc == 0, err
    summary = json.loads(out)
    assert summary["steps"] == 2 and summary["run_dir"] == str(run)
    return run


def test_missing_data_dir(tmp_path, capsys):
    rc, _, err = train_cli(capsys, tmp_path / "nope", tmp_path / "run", "--steps", 2)
    assert_one_error(rc, err, str(tmp_path / "nope"), "does not exist")


def test_truncated_shard(tiny_data, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    name = json.loads((data / "meta.json").read_text())["files"]["train"][0]
    shard = data / name
    shard.write_bytes(shard.read_bytes()[:-100])
    rc, _, err = train_cli(capsys, data, tmp_path / "run", "--steps", 2)
    assert_one_error(rc, err, name, "truncated")


def test_tokenizer_vocab_larger_than_model(tiny_data, tmp_path, capsys):
    rc, _, err = train_cli(capsys, tiny_data, tmp_path / "run", "--steps", 2,
                           "--set", "model.vocab_size=300")
    assert_one_error(rc, err, "vocab_size 512", "model.vocab_size is 300",
                     "use --set model.vocab_size=512")


def test_resume_with_another_architecture(small_run, tiny_data, capsys):
    rc, _, err = train_cli(capsys, tiny_data, small_run, "--resume", "--steps", 4,
                           "--set", "model.d_model=32")
    assert_one_error(rc, err, "step-00000002", "model.d_model: checkpoint 64, given 32")
    rc, _, err = cli(capsys, "train", "--preset", "gated-tiny", *TINY_SETS, "--data", tiny_data,
                     "--out", small_run, "--resume", "--no-progress")
    assert_one_error(rc, err, "model.attention.gate.position: checkpoint 'none', given 'sdpa'")


def test_resume_with_no_checkpoint(tiny_data, tmp_path, capsys):
    rc, _, err = train_cli(capsys, tiny_data, tmp_path / "empty", "--resume")
    assert_one_error(rc, err, "no complete checkpoint", "start without --resume")


def test_fresh_start_over_an_existing_run(small_run, tiny_data, capsys):
    rc, _, err = train_cli(capsys, tiny_data, small_run, "--steps", 2)
    assert_one_error(rc, err, "already holds checkpoints", "--resume")


def test_resume_with_changed_data(small_run, tiny_data, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(tiny_data, other)
    meta = json.loads((other / "meta.json").read_text())
    meta["sha256"]["train"] = "0" * 64  # as if the shard had been re-prepared differently
    (other / "meta.json").write_text(json.dumps(meta))
    rc, _, err = cli(capsys, "train", "--data", other, "--out", small_run, "--resume",
                     "--steps", 4, "--no-progress")
    assert_one_error(rc, err, "train shard differs", "--data")


def test_non_finite_loss_stops_and_names_last_good_checkpoint(tiny_data, tmp_path, capsys,
                                                             monkeypatch):
    from moelab.model import MoELM

    forward = MoELM.forward
    calls = {"train": 0}

    def poisoned(self, idx_BT, targets_BT=None, **kwargs):
        out = forward(self, idx_BT, targets_BT, **kwargs)
        if self.training:
            calls["train"] += 1
            if calls["train"] >= 3:  # the loss of step 3 (grad_accum 1) becomes nan
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(MoELM, "forward", poisoned)
    run = tmp_path / "run"
    rc, _, err = train_cli(capsys, tiny_data, run, "--steps", 6, "--set", "train.save_every=2")
    assert_one_error(rc, err, "non-finite at step 3", "step-00000002 is the last good one")
    assert [p.name for p in ck.list_checkpoints(run)] == ["step-00000002"]
    assert max(r["step"] for r in read_metrics(run)) == 2  # the bad step is not logged
    monkeypatch.undo()
    rc, out, err = cli(capsys, "train", "--data", tiny_data, "--out", run, "--resume",
                       "--no-progress")
    assert rc == 0 and json.loads(out)["steps"] == 6, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda(tiny_data, tmp_path, capsys):
    rc, _, err = train_cli(capsys, tiny_data, tmp_path / "run", "--steps", 2,
                           "--device", "cuda")
    assert_one_error(rc, err, "CUDA is not available")

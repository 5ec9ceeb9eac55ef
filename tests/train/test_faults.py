"""Failures leave runs as they were and say so in one line (docs/failures.md).

The CLI is run as a subprocess where the point is what a user sees (one `moelab: error:` line,
exit code 2, no traceback) and in-process where only the library's behaviour is checked.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moelab.cli import main
from moelab.train import checkpoint as ck

from train.conftest import CHARS, TITLES, VOCAB
from train.test_cli_errors import TINY_SETS, cli, train_cli
from train.test_cli_errors import assert_one_error as _assert_one_error


def assert_one_error(rc, err, *fragments):
    """One `moelab: error:` line, exit code 2, no traceback (`moelab: warning:` lines, such as
    the note that a resume changes the run's length, may come before it)."""
    kept = "\n".join(line for line in err.splitlines() if not line.startswith("moelab: warning:"))
    assert "Traceback" not in err, err
    _assert_one_error(rc, kept, *fragments)


def moelab(*argv, check_rc: int | None = None, timeout: int = 300, env=None):
    """`python -m moelab ARGV` in a fresh process: (rc, stdout, stderr)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    p = subprocess.run([sys.executable, "-m", "moelab", *map(str, argv)], capture_output=True,
                       text=True, timeout=timeout, env=env)
    if check_rc is not None:
        assert p.returncode == check_rc, p.stderr
    return p.returncode, p.stdout, p.stderr


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` by relative path, with its bytes."""
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def train_argv(data, out, *extra):
    return ["train", "--preset", "dense-tiny", *TINY_SETS, "--data", data, "--out", out,
            "--no-progress", *extra]


@pytest.fixture(scope="module")
def other_data(tmp_path_factory):
    """Data tokenized with another tokenizer of the same size (other text, so other merges),
    and data with a larger vocabulary."""
    from moelab.data.corpus import load_default_corpus
    from moelab.data.prepare import prepare_data

    root = tmp_path_factory.mktemp("other_data")
    by_title = {d["title"]: d for d in load_default_corpus()}
    corpus = root / "other.jsonl"
    with open(corpus, "w", encoding="utf-8") as f:
        for title in TITLES:  # the same documents, a later part of each
            doc = by_title[title]
            f.write(json.dumps(dict(doc, text=doc["text"][CHARS:2 * CHARS])) + "\n")
    prepare_data(str(corpus), f"bpe:{VOCAB}", out=root / "same-vocab", progress=False)
    prepare_data(str(corpus), f"bpe:{4 * VOCAB}", out=root / "big-vocab", progress=False)
    return root


@pytest.fixture
def run_at_2_and_4(tiny_data, tmp_path, capsys):
    """A 4-step run with checkpoints after steps 2 and 4."""
    run = tmp_path / "run"
    rc, _, err = train_cli(capsys, tiny_data, run, "--steps", 4, "--set", "train.save_every=2")
    assert rc == 0, err
    assert [p.name for p in ck.list_checkpoints(run)] == ["step-00000002", "step-00000004"]
    return run


# ---- a failed command leaves the run as it was ---------------------------------------------
def test_resume_on_other_data_is_refused_before_anything_is_written(
        run_at_2_and_4, tiny_data, other_data):
    run = run_at_2_and_4
    before = snapshot(run)
    # the case: ids beyond the model's vocabulary
    rc, _, err = moelab("train", "--out", run, "--data", other_data / "big-vocab", "--resume",
                        "--steps", 6, "--no-progress")
    assert_one_error(rc, err, str(other_data / "big-vocab"), "model.vocab_size is 512")
    # same vocabulary size, another tokenizer: both sides named
    rc, _, err = moelab("train", "--out", run, "--data", other_data / "same-vocab", "--resume",
                        "--steps", 6, "--no-progress")
    assert_one_error(rc, err, "another tokenizer", str(other_data / "same-vocab"), str(tiny_data))
    assert snapshot(run) == before
    rc, out, err = moelab("eval", run, check_rc=0)  # the run still points at its own data
    assert "perplexity" in out


def test_a_resume_failing_at_its_first_step_writes_nothing(run_at_2_and_4, tiny_data, capsys,
                                                           monkeypatch):
    import moelab.train.loop as loop

    run = run_at_2_and_4
    before = snapshot(run)

    def broken_step(*args, **kwargs):
        raise ck.CheckpointError("simulated failure in the first step")

    monkeypatch.setattr(loop, "train_step", broken_step)
    rc, _, err = cli(capsys, "train", "--out", run, "--data", tiny_data, "--resume", "--steps",
                     6, "--set", "train.lr=5e-4", "--no-progress")
    assert_one_error(rc, err, "simulated failure")
    assert snapshot(run) == before  # config.json (lr), run.json and metrics.jsonl untouched
    monkeypatch.undo()
    rc, out, err = cli(capsys, "train", "--out", run, "--data", tiny_data, "--resume",
                       "--steps", 6, "--no-progress")
    assert rc == 0 and json.loads(out)["steps"] == 6, err


def test_a_fresh_run_that_fails_to_start_leaves_no_directory(other_data, tmp_path, capsys):
    # a data dir whose meta.json claims a smaller vocabulary than its shards hold
    data = tmp_path / "data"
    shutil.copytree(other_data / "big-vocab", data)
    meta = json.loads((data / "meta.json").read_text())
    meta["vocab_size"] = VOCAB
    (data / "meta.json").write_text(json.dumps(meta))
    run = tmp_path / "runs" / "new"
    rc, _, err = train_cli(capsys, data, run, "--steps", 2)
    assert_one_error(rc, err, "token id", "outside model.vocab_size 512")
    assert not run.exists() and not run.parent.exists()


def test_replaced_tokenizer_is_refused_at_train_eval_and_resume(run_at_2_and_4, tiny_data,
                                                                other_data, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    shutil.copyfile(other_data / "same-vocab" / "tokenizer.json", data / "tokenizer.json")
    rc, _, err = moelab(*train_argv(data, tmp_path / "fresh", "--steps", 2))
    assert_one_error(rc, err, str(data / "tokenizer.json"), "does not match meta.json")
    rc, _, err = cli(capsys, "eval", run_at_2_and_4, "--data", data)
    assert_one_error(rc, err, "does not match meta.json")
    rc, _, err = cli(capsys, "train", "--out", run_at_2_and_4, "--data", data, "--resume",
                     "--no-progress")
    assert_one_error(rc, err, "does not match meta.json")


# ---- damaged checkpoints -------------------------------------------------------------------
DAMAGE = {
    "zero-length": lambda raw: b"",
    "truncated": lambda raw: raw[:len(raw) // 2],
    "garbage": lambda raw: os.urandom(len(raw)),
    "pickle": None,  # a torch.save file under the safetensors name
}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_damaged_weights_are_named_and_resume_falls_back(kind, run_at_2_and_4, tiny_data,
                                                         tmp_path, capsys):
    run = run_at_2_and_4
    reference = tmp_path / "uninterrupted"
    shutil.copytree(run, reference)
    weights = run / "checkpoints" / "step-00000004" / "model.safetensors"
    if DAMAGE[kind] is None:
        torch.save({"w": torch.zeros(3)}, weights)
    else:
        weights.write_bytes(DAMAGE[kind](weights.read_bytes()))
    rc, _, err = cli(capsys, "eval", run)
    assert_one_error(rc, err, str(weights), "damaged")
    rc, out, err = cli(capsys, "train", "--out", run, "--data", tiny_data, "--resume",
                       "--steps", 6, "--no-progress")
    assert rc == 0, err
    assert "damaged" in err and "resuming from the newest intact checkpoint, step-00000002" in err
    assert json.loads(out)["resumed_from"] == "step-00000002"
    rc, out_ref, err = cli(capsys, "train", "--out", reference, "--data", tiny_data, "--resume",
                           "--steps", 6, "--no-progress")
    assert rc == 0, err
    # steps 3-4 were replayed from step 2: the same numbers as the run that never broke
    assert json.loads(out)["final_loss"] == pytest.approx(json.loads(out_ref)["final_loss"],
                                                         rel=1e-6)


def test_every_checkpoint_damaged_is_one_line(run_at_2_and_4, tiny_data, capsys):
    for ckpt in ck.list_checkpoints(run_at_2_and_4):
        (ckpt / "model.safetensors").write_bytes(b"")
    rc, _, err = cli(capsys, "train", "--out", run_at_2_and_4, "--data", tiny_data, "--resume",
                     "--no-progress")
    assert_one_error(rc, err, "every checkpoint is damaged", "step-00000002", "step-00000004")


def test_damaged_trainer_state_falls_back_too(run_at_2_and_4, tiny_data, capsys):
    (run_at_2_and_4 / "checkpoints" / "step-00000004" / "optimizer.pt").write_bytes(b"\0" * 10)
    rc, out, err = cli(capsys, "train", "--out", run_at_2_and_4, "--data", tiny_data, "--resume",
                       "--no-progress")
    assert rc == 0, err
    assert "trainer state is unreadable" in err and "step-00000002" in err


# ---- the run directory: lock and file system -----------------------------------------------
def test_a_second_train_on_one_run_is_refused(tiny_data, tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "moelab", *map(str, train_argv(
        tiny_data, run, "--steps", 100000))], stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        import time

        deadline = time.time() + 120
        while not (run / "metrics.jsonl").is_file():  # the first run has started
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.2)
        rc, _, err = moelab(*train_argv(tiny_data, run, "--steps", 2))
        assert_one_error(rc, err, "another moelab process is using this run")
        rc, _, err = moelab("train", "--out", run, "--data", tiny_data, "--resume",
                            "--no-progress")
        assert_one_error(rc, err, "another moelab process is using this run")
    finally:
        first.kill()
        first.wait()


def test_out_under_a_regular_file(tiny_data, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    rc, _, err = moelab(*train_argv(tiny_data, blocker / "run", "--steps", 2))
    assert_one_error(rc, err, str(blocker / "run"), f"is under {blocker}, which is a file")
    rc, _, err = cli(capsys, "data", "prepare", "--corpus", "default", "--tokenizer", "bytes",
                     "--out", blocker / "data")
    assert_one_error(rc, err, f"is under {blocker}, which is a file")
    rc, _, err = cli(capsys, "compare", "--presets", "dense-tiny", "--data", tiny_data,
                     "--tokens", 1000, "--out", blocker / "cmp", "--no-progress")
    assert_one_error(rc, err, f"is under {blocker}, which is a file")
    assert blocker.read_text() == "not a directory"


def _can_mount() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0


needs_mount = pytest.mark.skipif(not _can_mount(), reason="needs root and mount namespaces "
                                 "(unshare -m) to make a real read-only or full file system")


def in_namespace(script: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a shell script in a private mount namespace (its mounts vanish with it)."""
    return subprocess.run(["unshare", "-m", "sh", "-ec", script], capture_output=True,
                          text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@needs_mount
def test_read_only_run_and_output_directories(run_at_2_and_4, tiny_data, tmp_path):
    """A read-only file system (a bind mount remounted ro, so root is refused too)."""
    run, ro = run_at_2_and_4, tmp_path / "ro"
    ro.mkdir()
    py = f"{sys.executable} -m moelab"
    p = in_namespace(f"""
        mount --bind {run} {run} && mount -o remount,bind,ro {run}
        mount --bind {ro} {ro} && mount -o remount,bind,ro {ro}
        echo "== resume"; {py} train --out {run} --data {tiny_data} --resume --steps 6 \\
            --no-progress 2>&1 || echo "rc=$?"
        echo "== fresh"; {py} train --preset dense-tiny {' '.join(TINY_SETS)} --data {tiny_data} \\
            --out {ro}/run --steps 2 --no-progress 2>&1 || echo "rc=$?"
        echo "== prepare"; {py} data prepare --corpus default --tokenizer bytes \\
            --out {ro}/data 2>&1 || echo "rc=$?"
        echo "== compare"; {py} compare --presets dense-tiny --data {tiny_data} --tokens 1000 \\
            --out {ro}/cmp --no-progress 2>&1 || echo "rc=$?"
        echo "== eval"; {py} eval {run} 2>&1 || echo "rc=$?"
    """)
    assert p.returncode == 0, p.stdout + p.stderr
    parts = dict(chunk.split("\n", 1) for chunk in p.stdout.split("== ")[1:])
    for name in ("resume", "fresh", "prepare", "compare"):
        lines = [line for line in parts[name].splitlines() if line.strip()]
        assert lines[-1] == "rc=2" and len(lines) == 2, (name, parts[name])
        assert lines[0].startswith("moelab: error: ") and "read-only file system" in lines[0]
    # eval scores the model and says it could not keep eval.json, without failing
    assert "perplexity" in parts["eval"] and "rc=" not in parts["eval"]
    assert "warning: results not saved" in parts["eval"] and "Read-only" in parts["eval"]


@needs_mount
@pytest.mark.slow
def test_full_disk_during_a_save_keeps_the_previous_checkpoint(run_at_2_and_4, tiny_data,
                                                               tmp_path, capsys):
    run, disk = run_at_2_and_4, tmp_path / "disk"
    disk.mkdir()
    size = sum(p.stat().st_size for p in run.rglob("*") if p.is_file())
    need = sum(p.stat().st_size for p in (run / "checkpoints" / "step-00000004").iterdir())
    shutil.rmtree(run / "checkpoints" / "step-00000004")  # resume from step 2, save at 4
    # room for the run as it is plus half a checkpoint: the save at step 4 runs out of space
    kib = (size - need + need // 2) // 1024 + 64
    py = f"{sys.executable} -m moelab"
    p = in_namespace(f"""
        mount -t tmpfs -o size={kib}k tmpfs {disk}
        cp -r {run} {disk}/run
        {py} train --out {disk}/run --data {tiny_data} --resume --steps 6 \\
            --set train.save_every=2 --no-progress 2>&1 || echo "rc=$?"
        cp -r {disk}/run {tmp_path}/after
    """)
    lines = [line for line in p.stdout.splitlines() if line.strip()]
    assert lines[-1] == "rc=2", p.stdout + p.stderr
    assert "Traceback" not in p.stdout
    assert lines[-2].startswith("moelab: error: could not write checkpoint")
    assert "no space left on device" in lines[-2] and "step-00000002 is the newest intact" \
        in lines[-2]
    after = tmp_path / "after"
    assert [c.name for c in ck.list_checkpoints(after)] == ["step-00000002"]
    assert not list((after / "checkpoints").glob(".tmp-*"))  # no half-written directory
    rc, out, err = cli(capsys, "train", "--out", after, "--data", tiny_data, "--resume",
                       "--steps", 6, "--set", "train.save_every=2", "--no-progress")
    assert rc == 0 and json.loads(out)["resumed_from"] == "step-00000002", err


def test_a_failed_checkpoint_write_is_one_line_and_keeps_the_previous(run_at_2_and_4,
                                                                      tiny_data, capsys,
                                                                      monkeypatch):
    """The same without a real full disk: safetensors reports ENOSPC in its own error type."""
    from safetensors import SafetensorError

    def no_space(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: "
                              "StorageFull, message: \"No space left on device\" })")

    monkeypatch.setattr(ck, "st_save_model", no_space)
    rc, _, err = cli(capsys, "train", "--out", run_at_2_and_4, "--data", tiny_data, "--resume",
                     "--steps", 6, "--set", "train.save_every=2", "--no-progress")
    assert_one_error(rc, err, "could not write checkpoint", "step-00000006",
                     "no space left on device", "step-00000004 is the newest intact")
    assert [c.name for c in ck.list_checkpoints(run_at_2_and_4)][-1] == "step-00000004"
    assert not list((run_at_2_and_4 / "checkpoints").glob(".tmp-*"))


# ---- fault injection: SIGKILL during checkpoint saves --------------------------------------
@pytest.mark.slow
def test_sigkill_during_saves_then_resume_equals_uninterrupted(tiny_data, tmp_path):
    """Ten processes killed at random moments while they save a checkpoint after every step;
    each time `--resume` (or a fresh start, before the first save) goes on, never meets a
    damaged checkpoint, and the finished run's losses are the uninterrupted run's."""
    import random
    import signal
    import time

    from moelab.train.metrics import read_metrics

    steps = 40
    argv = [str(a) for a in train_argv(tiny_data, tmp_path / "ref", "--steps", steps, "--set",
                                       "train.save_every=1", "--set", "train.log_every=1")]
    moelab(*argv, check_rc=0)
    want = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "ref") if "loss" in r}
    run = tmp_path / "run"
    argv[argv.index("--out") + 1] = str(run)
    rng = random.Random(0)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    kills = torn = 0
    while kills < 10:
        resume = ["--resume"] if ck.list_checkpoints(run) else []
        proc = subprocess.Popen([sys.executable, "-m", "moelab", *argv, *resume],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        seen = {p.name for p in ck.list_checkpoints(run)}
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:  # until this process saved once
            if {p.name for p in ck.list_checkpoints(run)} - seen:
                break
            time.sleep(0.005)
        while proc.poll() is None and not list((run / "checkpoints").glob(".tmp-*")):
            time.sleep(0.001)  # the next save has begun ...
        time.sleep(rng.uniform(0.0, 0.01))  # ... and is killed somewhere in it (or just after)
        if proc.poll() is not None:
            break  # finished before the kill: the run is complete
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate()
        assert "damaged" not in err.decode(), err.decode()
        kills += 1
        torn += bool(list((run / "checkpoints").glob(".tmp-*")))  # killed inside a save
    rc, out, err = moelab(*argv, "--resume", check_rc=0)
    assert "damaged" not in err
    assert kills >= 5, "the run finished before enough kills: make it longer"
    assert torn >= 5, f"only {torn} of {kills} kills fell inside a save"
    print(f"{kills} kills, {torn} inside a save")
    got = {r["step"]: r["loss"] for r in read_metrics(run) if "loss" in r}
    assert sorted(got) == list(range(1, steps + 1))
    for step, loss in want.items():
        assert got[step] == pytest.approx(loss, rel=1e-6, abs=1e-7), step

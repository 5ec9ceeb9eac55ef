import csv
import json
import shutil

import pytest

from moelab.cli import main


def test_compare_two_presets_end_to_end_and_resume(tiny_data, tmp_path, capsys):
    from train.conftest import TINY

    sets = [s for s in TINY if not s.startswith("model.ffn")]
    sets += ["train.eval_every=4", "train.save_every=100"]
    argv = ["compare", "--presets", "dense-tiny,sigma-moe-tiny", "--data", str(tiny_data),
            "--tokens", str(8 * 64 * 8), "--out", str(tmp_path / "cmp"), "--match-macs",
            "dense-tiny", "--task-limit", "8", "--no-progress"]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 0
    out = tmp_path / "cmp"
    table = (out / "results.md").read_text()
    assert "dense-tiny" in table and "sigma-moe-tiny" in table and "MAC matching" in table
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["model"] for r in rows] == ["dense-tiny", "sigma-moe-tiny"]
    for r in rows:
        assert int(r["tokens"]) == 8 * 64 * 8 and float(r["val_ppl"]) > 1
        assert float(r["train_s"]) > 0
    assert rows[0]["dead_experts"] == "" and rows[1]["dead_experts"] != ""
    macs = [float(r["macs_per_token"]) for r in rows]
    assert abs(macs[1] / macs[0] - 1) <= 0.05
    for png in ("val_loss_vs_tokens.png", "val_loss_vs_time.png"):
        assert (out / png).stat().st_size > 5000
    # two members at once in worker processes: the same members, the same results
    par = argv + ["--jobs", "2"]
    par[par.index("--out") + 1] = str(tmp_path / "cmp-par")
    capsys.readouterr()
    assert main(par) == 0
    assert "training 2 members at once" in capsys.readouterr().out
    par_rows = list(csv.DictReader(open(tmp_path / "cmp-par" / "results.csv")))
    assert [r["model"] for r in par_rows] == [r["model"] for r in rows]
    for a, b in zip(rows, par_rows):
        assert float(b["val_ppl"]) == pytest.approx(float(a["val_ppl"]), rel=1e-4)
    # a second run skips both finished models (their checkpoints are not touched)
    stamp = {p: p.stat().st_mtime_ns for p in out.glob("*/checkpoints/*/model.safetensors")}
    capsys.readouterr()
    assert main(argv) == 0
    log = capsys.readouterr().out
    assert log.count("finished earlier, skipping") == 2
    assert stamp == {p: p.stat().st_mtime_ns for p in out.glob("*/checkpoints/*/model.safetensors")}
    saved = json.loads((out / "dense-tiny" / "compare.json").read_text())["row"]
    assert saved["model"] == "dense-tiny" and saved["train_s"] > 0
    assert saved["tokens_per_s"] == pytest.approx(saved["tokens"] / saved["train_s"])
    # --report-only trains nothing: an unfinished preset is named, not trained
    report = argv + ["--report-only"]
    report[report.index("--presets") + 1] = "dense-tiny,sigma-moe-tiny,gated-tiny"
    capsys.readouterr()
    assert main(report) == 0
    log = capsys.readouterr().out
    assert "gated-tiny: not started, left out of the report" in log
    assert not (out / "gated-tiny").exists()
    table = (out / "results.md").read_text()
    assert "Not finished, so not in this table: gated-tiny (not started)." in table
    (out / "gated-tiny").mkdir()  # a member that has begun training (metrics, no compare.json)
    (out / "gated-tiny" / "metrics.jsonl").write_text("")
    assert main(report) == 0
    assert "gated-tiny: not finished, left out of the report" in capsys.readouterr().out
    assert "Not finished, so not in this table: gated-tiny." in (out / "results.md").read_text()
    shutil.rmtree(out / "gated-tiny")
    # no ordering of the papers pairs sigma-moe with dense, so all are listed as untested
    assert "The papers' orderings" not in table and "not tested" in table and "gated < dense" in table
    # ... and with nothing finished it is a one-line error, not an empty report
    report[report.index("--presets") + 1] = "gated-tiny"
    assert main(report) == 2
    assert "no finished member" in capsys.readouterr().err
    # the same data prepared elsewhere (same shard checksums) still counts as finished
    moved = tmp_path / "data-elsewhere"
    shutil.copytree(tiny_data, moved)
    argv[argv.index(str(tiny_data))] = str(moved)
    capsys.readouterr()
    assert main(argv) == 0
    log = capsys.readouterr().out
    assert log.count("finished earlier, skipping") == 2, log


def test_member_names_and_data_identity(tmp_path):
    from moelab.compare.study import data_identity, member_name

    assert member_name("moe-tiny", 0) == "moe-tiny" and member_name("moe-tiny", 1) == "moe-tiny@s1"
    (tmp_path / "meta.json").write_text(json.dumps({"sha256": {"train": "ab", "val": "cd"}}))
    assert data_identity(tmp_path) == {"sha256": {"train": "ab", "val": "cd"}}
    assert data_identity(tmp_path / "missing") == str((tmp_path / "missing").resolve())


def test_training_clock_sums_step_times_and_reads_the_logged_total():
    from moelab.compare.study import training_clock

    # older lines (no train_wall_s), logged every 10 steps: each step time stands for 10 steps
    old = [{"step": 0, "val_loss": 9.0, "tokens": 0},
           {"step": 10, "loss": 5.0, "step_s": 0.5}, {"step": 20, "loss": 4.0, "step_s": 0.7},
           {"step": 20, "val_loss": 4.5, "tokens": 640}, {"step": 25, "loss": 3.9, "step_s": 0.4}]
    assert training_clock(old) == pytest.approx({0: 0.0, 10: 5.0, 20: 12.0, 25: 14.0})
    # a run that logs its running total (resumes included) is read as written
    new = [{"step": 0, "val_loss": 9.0, "tokens": 0, "train_wall_s": 0.0},
           {"step": 10, "loss": 5.0, "step_s": 0.5, "train_wall_s": 4.2},
           {"step": 20, "loss": 4.0, "step_s": 0.7, "train_wall_s": 9.9},
           {"step": 20, "val_loss": 4.5, "tokens": 640, "train_wall_s": 9.9}]
    assert training_clock(new) == {0: 0.0, 10: 4.2, 20: 9.9}


@pytest.mark.parametrize("bad, message", [(["--jobs", "0"], "jobs=0"),
                                          (["--device", "tpu"], "--device 'tpu'")])
def test_bad_jobs_or_device_is_a_clear_error(tmp_path, tiny_data, capsys, bad, message):
    argv = ["compare", "--presets", "dense-tiny", "--data", str(tiny_data), "--tokens", "512",
            "--out", str(tmp_path / "cmp"), "--no-progress", *bad]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "cmp" / "dense-tiny").exists()  # nothing trained


def test_a_member_failing_in_a_worker_is_a_clean_error(tmp_path, capsys):
    argv = ["compare", "--presets", "dense-tiny,moe-tiny", "--data", str(tmp_path / "no-data"),
            "--tokens", "512", "--out", str(tmp_path / "cmp"), "--jobs", "2", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "no-data does not exist" in err and "Traceback" not in err


def test_finished_member_key_survives_new_config_fields():
    """A member finished by an older moelab (its stored config lacks a field added since, at
    the default) is still finished; a real difference, or a key that no longer parses, is not."""
    from moelab.compare.study import _same_key
    from moelab.config import load_preset

    model = load_preset("moe-tiny").to_dict()["model"]
    key = {"steps": 3, "config": model, "seed": 0, "data": {"train": "abc"}}
    old = json.loads(json.dumps(key))
    del old["config"]["router"]["bias_rate"]  # written before the field existed
    assert _same_key(old, key)
    changed = json.loads(json.dumps(old))
    changed["config"]["router"]["switch_coef"] = 0.5
    assert not _same_key(changed, key)
    assert not _same_key({**old, "seed": 1}, key)
    broken = json.loads(json.dumps(old))
    broken["config"]["router"]["no_such_field"] = 1
    assert not _same_key(broken, key) and not _same_key(None, key)


def test_config_file_members_join_a_study(tiny_data, tmp_path, capsys):
    """A combination no preset has (saved by `moelab info --save`) is a member named by its
    file stem; two members with one name are refused before anything trains."""
    from train.conftest import TINY

    sets = [s for s in TINY if not s.startswith("model.ffn")] + ["train.save_every=100"]
    variant = tmp_path / "gated-shared.yaml"
    argv = ["info", "--preset", "dense-tiny", "--set", "model.attention.gate.position=sdpa",
            "--set", "model.sharing.group_size=1", "--save", str(variant)]
    assert main(argv) == 0 and variant.is_file()
    cmp = ["compare", "--presets", f"dense-tiny,{variant}", "--data", str(tiny_data),
           "--tokens", str(8 * 64 * 4), "--out", str(tmp_path / "cmp"), "--tasks", "",
           "--no-progress"]
    for s in sets:
        cmp += ["--set", s]
    assert main(cmp) == 0
    rows = list(csv.DictReader(open(tmp_path / "cmp" / "results.csv")))
    assert [r["model"] for r in rows] == ["dense-tiny", "gated-shared"]
    assert rows[1]["preset"] == str(variant)
    cfg = json.loads((tmp_path / "cmp" / "gated-shared" / "config.json").read_text())
    assert cfg["model"]["attention"]["gate"]["position"] == "sdpa"
    assert cfg["model"]["sharing"]["group_size"] == 1
    assert cfg["model"]["d_model"] == 64  # the study's --set applies to file members too
    clash = tmp_path / "dense-tiny.json"
    clash.write_text((tmp_path / "cmp" / "dense-tiny" / "config.json").read_text())
    capsys.readouterr()
    cmp[cmp.index("--presets") + 1] = f"dense-tiny,{clash}"
    assert main(cmp) == 2
    assert "two members would be named dense-tiny" in capsys.readouterr().err
    cmp[cmp.index("--presets") + 1] = str(tmp_path / "missing.yaml")
    assert main(cmp) == 2
    assert "missing.yaml" in capsys.readouterr().err


def test_report_lists_each_preset_matching_once_over_seeds(tmp_path):
    from moelab.compare.study import COLUMNS, write_results

    rows = []
    for seed, ppl in ((0, 90.0), (1, 92.0)):
        row = dict.fromkeys(COLUMNS, 1)
        row.update(model=f"moe-tiny@s{seed}" if seed else "moe-tiny", preset="moe-tiny",
                   seed=seed, val_ppl=ppl, dead_experts=0, load_imbalance=1.0,
                   matched="moe-tiny: unchanged (+0.4% MACs vs reference)")
        rows.append(row)
    text = write_results(rows, tmp_path)
    assert text.count("moe-tiny: unchanged") == 1
    assert "| moe-tiny | 0,1 | 91.00 |" in text  # the seed table


def test_study_members_take_a_seed_of_their_own():
    from moelab.compare.study import study_members
    from moelab.errors import ConfigError

    # seed-major; SPEC@sN adds one member at seed N; a pair given twice counts once
    specs = ["dense-tiny", "moe-tiny", "moe-tiny@s1", "x.yaml@s2", "dense-tiny@s0", "a@s1.yaml"]
    assert study_members(specs, (0,)) == [
        ("dense-tiny", 0), ("moe-tiny", 0), ("a@s1.yaml", 0), ("moe-tiny", 1), ("x.yaml", 2)]
    assert study_members(["moe-tiny", "dense-tiny@s1"], (1, 0)) == [
        ("moe-tiny", 1), ("dense-tiny", 1), ("moe-tiny", 0)]
    assert study_members(["moe-tiny@s3"], ()) == [("moe-tiny", 3)]
    with pytest.raises(ConfigError, match="moe-tiny has no seed"):
        study_members(["moe-tiny"], ())


def test_a_second_seed_for_some_members_only(tiny_data, tmp_path, capsys):
    """`--presets a,a@s1` trains a at seeds 0 and 1 and nothing else; the report over
    `a,a@s1,b@s1` names b@s1 alone as unfinished, not every preset at every seed."""
    from train.conftest import TINY

    argv = ["compare", "--presets", "dense-tiny,dense-tiny@s1", "--data", str(tiny_data),
            "--tokens", str(8 * 64 * 2), "--out", str(tmp_path / "cmp"), "--tasks", "",
            "--no-progress"]
    for s in [s for s in TINY if not s.startswith("model.ffn")] + ["train.save_every=100"]:
        argv += ["--set", s]
    assert main(argv) == 0
    out = tmp_path / "cmp"
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [(r["model"], r["seed"]) for r in rows] == [("dense-tiny", "0"), ("dense-tiny@s1", "1")]
    first = json.loads((out / "dense-tiny@s1" / "config.json").read_text())
    assert first["train"]["seed"] == 1
    report = argv + ["--report-only"]
    report[report.index("--presets") + 1] = "dense-tiny,dense-tiny@s1,gated-tiny@s1"
    capsys.readouterr()
    assert main(report) == 0
    log = capsys.readouterr().out
    assert log.count("finished earlier, skipping") == 2
    table = (out / "results.md").read_text()
    assert "Not finished, so not in this table: gated-tiny@s1 (not started)." in table
    assert "| dense-tiny | 0,1 |" in table  # the seed table


def test_a_member_started_at_another_length_is_not_stretched(tiny_data, tmp_path, capsys):
    from train.conftest import TINY

    out = tmp_path / "cmp"
    argv = ["compare", "--presets", "dense-tiny", "--data", str(tiny_data), "--tokens",
            str(8 * 64 * 4), "--out", str(out), "--task-limit", "4", "--no-progress"]
    for s in TINY:
        argv += ["--set", s]
    assert main(argv) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    longer = list(argv)
    longer[longer.index("--tokens") + 1] = str(8 * 64 * 8)
    capsys.readouterr()
    assert main(longer) == 2
    err = capsys.readouterr().err
    assert "was trained for 4 steps (2,048 tokens); this study asks for 8 steps" in err
    assert "use a new --out" in err and "Traceback" not in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

import json

import pytest

from moelab.cli import main


def test_info_json(capsys):
    assert main(["info", "--preset", "gated-tiny", "--json", "--batch", "2", "--seq", "64"]) == 0
    res = json.loads(capsys.readouterr().out)
    for key in ("params_total", "params_active", "macs_forward", "components"):
        assert key in res
    assert res["batch"] == 2 and res["seq_len"] == 64
    assert "attn.q_proj" in res["components"]["macs"]


def test_info_text_and_list(capsys):
    assert main(["info", "--preset", "dense-tiny", "--full-attention"]) == 0
    assert "params total" in capsys.readouterr().out
    assert main(["info", "--list"]) == 0
    assert "gated-tiny" in capsys.readouterr().out


def test_generate_from_untrained_preset(capsys):
    code = main(["generate", "--preset", "dense-tiny", "--set", "model.vocab_size=512",
                 "--prompt", "To be", "--max-new-tokens", "5", "--seed", "1"])
    assert code == 0
    assert capsys.readouterr().out.startswith("To be")


@pytest.mark.parametrize("argv,words", [
    (["info", "--preset", "nope"], "preset 'nope' not found"),
    (["info", "--preset", "dense-tiny", "--set", "model.attention.n_heads=7"], "n_heads: 7"),
    (["info", "--preset", "dense-tiny", "--set", "model.ffn.kind=moo"], "model.ffn.kind"),
    (["info"], "--preset NAME or --config FILE"),
    (["generate", "/nonexistent/run"], "no such run"),
    (["export", "hf", "/nonexistent/run", "--out", "/tmp/x"], "/nonexistent/run"),
    (["info", "--preset", "dense-tiny", "--set", "train.parallel=zero3"], "train.parallel"),
    (["generate", "--preset", "dense-tiny", "--set", "model.vocab_size=100"], "vocab_size is 100"),
    (["convert", "mole-lut", "/nonexistent/run", "--out", "/nonexistent/lut"], "no such run"),
    (["convert", "mole-lut", "/nonexistent/run", "--out", "/nonexistent/lut", "--dtype", "fp8"],
     "--dtype 'fp8': not a lookup-table dtype"),
    (["convert", "mole-lut", "/nonexistent/run", "--out", "/nonexistent/lut", "--block-size",
      "64"], "--block-size 64: only the nf4 dtype"),
    (["eval", "/nonexistent/run", "--storage", "mmap"], "applies to a converted MoLE directory"),
    (["info", "--preset", "dense-tiny", "--batch", "0"], "batch 0: expected a positive"),
    (["info", "--preset", "dense-tiny", "--seq", "0"], "seq_len 0: expected 1..512"),
    (["info", "--preset", "moe-tiny", "--set", "model.ffn.n_experts=0"], "model.ffn.n_experts: 0"),
    (["info", "--preset", "moe-tiny", "--set", "model.ffn.top_k=0"], "model.ffn.top_k: 0"),
    (["generate", "--preset", "dense-tiny", "--num-samples", "0"], "--num-samples 0: expected"),
    (["generate", "--preset", "dense-tiny", "--max-new-tokens", "-3"], "--max-new-tokens -3"),
    (["generate", "--preset", "dense-tiny", "--top-p", "2"], "--top-p 2.0: expected a number in"),
    (["generate", "--preset", "dense-tiny", "--top-p", "0"], "--top-p 0.0: expected a number in"),
    (["generate", "--preset", "dense-tiny", "--top-k", "0"], "--top-k 0: expected an integer"),
    (["generate", "--preset", "dense-tiny", "--temperature", "-1"], "--temperature -1.0"),
])
def test_user_errors_are_one_line(capsys, argv, words):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err
    assert sum(line.startswith("moelab: error:") for line in err.splitlines()) == 1


def test_info_reports_macs_relative_to_dense_baseline(capsys):
    assert main(["info", "--preset", "sigma-moe-tiny", "--json", "--seq", "128"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["baseline"]["name"] == "dense-tiny"
    assert res["baseline"]["macs_ratio"] == pytest.approx(
        res["macs_forward"] / res["baseline"]["macs_forward"])
    assert main(["info", "--preset", "moe-tiny", "--baseline", "gated-tiny"]) == 0
    assert "vs dense baseline gated-tiny" in capsys.readouterr().out


def test_info_save_writes_the_resolved_config(tmp_path, capsys):
    from moelab.config import Config

    out = tmp_path / "wide.json"
    assert main(["info", "--preset", "dense-tiny", "--set", "model.d_model=288",
                 "--save", str(out)]) == 0
    cfg = Config.load(out)
    assert cfg.model.d_model == 288 and cfg.name == "wide"
    assert main(["info", "--preset", "dense-tiny", "--save", str(tmp_path / "x.txt")]) == 2
    assert "--save" in capsys.readouterr().err and not (tmp_path / "x.txt").exists()


def test_info_world_shows_training_state_per_process(capsys):
    assert main(["info", "--preset", "moe-tiny", "--world", "2", "--json"]) == 0
    st = json.loads(capsys.readouterr().out)["training_state"]
    assert st["world"] == 2 and st["fsdp"]["params"] < st["ep"]["params"] < st["ddp"]["params"]
    assert main(["info", "--preset", "moe-tiny", "--world", "2"]) == 0
    assert "training state per process on 2" in capsys.readouterr().out
    assert main(["info", "--preset", "moe-tiny", "--world", "0"]) == 2
    assert "--world 0" in capsys.readouterr().err


def test_data_prepare_parts_merge_verify(tmp_path, capsys):
    import json as _json

    root = tmp_path / "corpus"
    root.mkdir()
    for f in range(2):
        (root / f"{f}.jsonl").write_text("".join(
            _json.dumps({"text": f"file {f} document {i}: " + "some words here " * (i % 7 + 1)})
            + "\n" for i in range(60)))
    common = ["--tokenizer", "bpe:280", "--workers", "1", "--shard-tokens", "500",
              "--split", "hash", "--val-fraction", "0.1", "--test-fraction", "0.1"]
    for i in range(2):
        assert main(["data", "prepare", "--corpus", str(root), "--out", str(tmp_path / f"p{i}"),
                     "--part", f"{i}/2", *common]) == 0
    assert main(["data", "merge", str(tmp_path / "p1"), str(tmp_path / "p0"),
                 "--out", str(tmp_path / "m")]) == 0
    assert main(["data", "verify", str(tmp_path / "m")]) == 0
    assert "shards and the tokenizer match meta.json" in capsys.readouterr().out
    assert main(["data", "merge", str(tmp_path / "p0"), "--out", str(tmp_path / "m2")]) == 2
    err = capsys.readouterr().err
    assert "parts [1] of 2 are missing" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv,words", [
    (["data", "prepare", "--corpus", "/nonexistent/c.jsonl", "--out", "/tmp/moelab-x"],
     "does not exist"),
    (["data", "prepare", "--out", "/tmp/moelab-x", "--part", "2/2"], "part: '2/2'"),
    (["data", "prepare", "--out", "/tmp/moelab-x", "--workers", "0"], "workers: 0"),
    (["data", "verify", "/nonexistent/data"], "does not exist"),
])
def test_data_errors_are_one_line(capsys, argv, words):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1

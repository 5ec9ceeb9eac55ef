"""The lm-evaluation-harness model: registration, equality with the built-in scorer on the local
tasks, rolling log-likelihood, and generation with stop strings."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from fakes import EOS, Bigram, CharTok
from lm_eval.api.instance import Instance

from moelab.eval.harness import MoelabLM, generate_until, run_lm_eval
from moelab.eval.zeroshot import run_tasks

REPO = Path(__file__).resolve().parents[2]


def test_registered_without_hiding_lm_eval_models():
    from lm_eval.api.registry import get_model, model_registry

    assert get_model("moelab") is MoelabLM
    assert "hf" in model_registry  # registering first must not skip lm-eval's own table


def test_lm_eval_scores_equal_builtin_scorer(tiny_run):
    builtin = run_tasks(tiny_run, ["cloze", "minpairs"], limit=40)
    harness = run_lm_eval(tiny_run, ["moelab_cloze", "moelab_minpairs"], limit=40)
    assert harness["moelab_cloze"]["n"] == builtin["cloze"]["n"] == 40
    assert harness["moelab_cloze"]["acc"] == pytest.approx(builtin["cloze"]["acc"], abs=1e-12)
    assert harness["moelab_cloze"]["acc_norm"] == pytest.approx(builtin["cloze"]["acc_norm"],
                                                                abs=1e-12)
    assert harness["moelab_minpairs"]["acc"] == pytest.approx(builtin["minpairs"]["acc"],
                                                              abs=1e-12)
    saved = json.loads((tiny_run / "eval.json").read_text())
    assert saved["tasks"]["cloze"]["acc"] == builtin["cloze"]["acc"]
    assert saved["lm_eval"]["moelab_minpairs"]["acc"] == harness["moelab_minpairs"]["acc"]
    assert (tiny_run / "lm_eval_tasks" / "moelab_cloze.yaml").is_file()


def test_loglikelihood_rolling_is_sum_of_token_logprobs(tiny_run):
    lm = MoelabLM(path=str(tiny_run))
    text = "O, when mine eyes did see Olivia first, Methought she purg'd the air."
    got = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])[0]
    ids = [lm.tok.eos_id] + lm.tok.encode(text)
    assert len(ids) <= lm.max_length
    with torch.no_grad():
        logp_TV = F.log_softmax(lm.model(torch.tensor([ids[:-1]])).logits[0].float(), -1)
    want = float(logp_TV.gather(1, torch.tensor(ids[1:])[:, None]).sum())
    assert got == pytest.approx(want, abs=1e-4)


CYCLE = {EOS: {"a": 1.0}, "a": {"b": 1.0}, "b": {"c": 1.0}, "c": {"d": 1.0}, "d": {" ": 1.0},
         " ": {"a": 1.0}}  # greedy text: "abcd abcd abcd ..."; after "x": EOS (row 0 wins ties)


def test_generate_until_stops_at_stop_strings():
    model, tok = Bigram(CYCLE), CharTok()
    kw = {"until": ["d "], "max_gen_toks": 20}
    got = generate_until(model, tok, [("a", kw), ("c", kw)])
    assert got == ["bc", ""]  # "bcd ..." and "d ..." cut before the stop string
    # both rows share one batch and decoding stops once both have hit a stop string
    assert model.calls[0] == (2, 2) and len(model.calls) == 4
    assert generate_until(model, tok, [("a", {"until": "zz", "max_gen_toks": 6})]) == ["bcd ab"]
    assert generate_until(model, tok, [("x", {"max_gen_toks": 6})]) == [""]  # EOS ends it


def test_generate_until_through_the_adapter(tiny_run):
    lm = MoelabLM(path=str(tiny_run), batch_size=4)
    reqs = [Instance("generate_until", {}, (ctx, {"until": ["e"], "max_gen_toks": 8}), i)
            for i, ctx in enumerate(["The captain", "Anne said", "The captain"])]
    out = lm.generate_until(reqs)
    assert len(out) == 3 and out[0] == out[2]  # greedy: same context, same text
    for text in out:
        assert "e" not in text and len(lm.tok.encode(text)) <= 8


@pytest.mark.slow
def test_python_m_harness_runs_lm_eval_cli(tiny_run, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run(
        [sys.executable, "-m", "moelab.eval.harness", "--model", "moelab", "--model_args",
         f"path={tiny_run}", "--tasks", "moelab_minpairs", "--limit", "4",
         "--output_path", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "moelab_minpairs" in proc.stdout and "acc" in proc.stdout

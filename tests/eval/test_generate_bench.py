"""moelab bench generate: the transformers twin carries the same function, the rows are real."""
import json

import pytest
import torch

from helpers import tiny
from moelab.eval.generate_bench import main, peer_model
from moelab.model import MoELM

MOE = ["model.ffn.kind=moe", "model.ffn.n_experts=4", "model.ffn.top_k=2",
       "model.ffn.expert_dim=16", "model.ffn.n_shared_experts=1", "model.ffn.shared_expert_dim=24"]


@pytest.mark.parametrize("sets", [[], MOE], ids=["llama", "qwen2_moe"])
def test_peer_has_the_same_logits_and_greedy_tokens(sets):
    torch.manual_seed(0)
    m = MoELM(tiny(*sets).model).eval()
    hf = peer_model(m)
    x = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        ours = m(x).logits
        theirs = hf(x).logits
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-4)
    out = m.generate(x, 5, temperature=0)
    ref = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=5, min_new_tokens=5,
                      do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(out, ref)


def test_unsupported_model_is_refused():
    m = MoELM(tiny("model.attention.qk_norm=true").model)
    with pytest.raises(ValueError, match="maps only"):
        peer_model(m)


def test_cli_rows(capsys):
    assert main(["--quick", "--json", "--models", "moe-tiny", "--batches", "2",
                 "--dtypes", "float32", "--new-tokens", "2"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["model"] == "moe-tiny" and row["batch"] == 2 and row["dtype"] == "float32"
    assert row["peer"] == "Qwen2MoeForCausalLM" and row["same_tokens"] is True
    assert row["ratio"] == pytest.approx(row["moelab_tok_s"] / row["peer_tok_s"], rel=0.02)


def test_bad_arguments_exit_2():
    with pytest.raises(SystemExit) as e:
        main(["--new-tokens", "0"])
    assert e.value.code == 2

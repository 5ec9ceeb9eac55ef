"""The log-likelihood scorer against sums computed by hand from a bigram model whose
probabilities are set explicitly, and the cached / truncated paths against plain forwards."""
import math

import pytest
import torch
import torch.nn.functional as F
from fakes import EOS, PROBS, SPACE, Bigram, CharTok, tid

from moelab.eval.zeroshot import (encode_pairs, rolling_windows, score_loglikelihood,
                                  score_minimal_pairs, score_multiple_choice, score_rolling,
                                  score_token_pairs)


def lp(prev, nxt) -> float:
    return math.log(PROBS[prev][nxt])


def test_loglikelihood_matches_hand_sums_and_greedy():
    model, tok = Bigram(), CharTok()
    got = score_loglikelihood(model, tok, [("ab", " c"), ("ab", " dd"), ("ab", " d"), ("", "ab")])
    want = [lp("b", " ") + lp(" ", "c"),
            lp("b", " ") + lp(" ", "d") + lp("d", "d"),
            lp("b", " ") + lp(" ", "d"),
            lp(EOS, "a") + lp("a", "b")]
    assert [g[0] for g in got] == pytest.approx(want, abs=1e-6)
    # greedy: " " after b (0.6), d after " " (0.7), but e (not d) after d and c (not b) after a
    assert [g[1] for g in got] == [False, False, True, False]


def test_multiple_choice_acc_and_length_normalised_acc():
    model, tok = Bigram(), CharTok()
    items = [{"context": "ab", "choices": ["c", "dd"], "label": 1},
             {"context": "ab", "choices": ["e", "c"], "label": 1}]
    res = score_multiple_choice(model, tok, items)
    c = lp("b", " ") + lp(" ", "c")  # log .12
    dd = lp("b", " ") + lp(" ", "d") + lp("d", "d")  # log .042
    e = lp("b", " ") + lp(" ", "e")  # log .06
    assert res["items"][0]["lls"] == pytest.approx([c, dd], abs=1e-6)
    assert res["items"][1]["lls"] == pytest.approx([e, c], abs=1e-6)
    # item 0: raw picks "c" (log .12 > log .042), per character picks "dd" (-3.17 / 2 > -2.12)
    assert (res["items"][0]["pred"], res["items"][0]["pred_norm"]) == (0, 1)
    assert (res["items"][1]["pred"], res["items"][1]["pred_norm"]) == (1, 1)
    assert res["acc"] == 0.5 and res["acc_norm"] == 1.0 and res["n"] == 2


def test_minimal_pairs_share():
    model, tok = Bigram(), CharTok()
    items = [{"good": "ab", "bad": "ba", "phenomenon": "p1"},
             {"good": "ba", "bad": "ab", "phenomenon": "p2"}]
    res = score_minimal_pairs(model, tok, items)
    ab = lp(EOS, "a") + lp("a", "b")
    assert res["items"][0]["lls"][0] == pytest.approx(ab, abs=1e-6)
    assert res["items"][0]["lls"][1] < -50  # "a" after "b" has probability ~e^-60
    assert res["acc"] == 0.5
    assert res["by_phenomenon"] == {"p1": {"acc": 1.0, "n": 1}, "p2": {"acc": 0.0, "n": 1}}


def test_shared_context_is_encoded_once():
    model, tok = Bigram(), CharTok()
    ctx = "ab" * 10
    score_loglikelihood(model, tok, [(ctx, " c"), (ctx, " dd"), (ctx, " e")], use_cache=True)
    # one forward of EOS + context, then one of the three continuations (minus last token)
    assert model.calls == [(1, 21), (3, 2)]


def test_prefix_split_when_a_merge_crosses_the_boundary():
    tok = CharTok(merge=("xy", 30))
    # "ax" + "y": the joint text encodes as [a, xy], so the split moves before the merge
    assert encode_pairs(tok, [("ax", "y")]) == [([EOS, tid("a")], [30])]
    assert encode_pairs(tok, [("ab", " c")]) == [([EOS, 1, 2], [SPACE, 3])]
    assert encode_pairs(tok, [("", "ab")]) == [([EOS], [1, 2])]


@pytest.fixture(scope="module", params=["dense", "moe"])
def real_model(request, tiny_run):
    """The tiny run's model, and a routed-FFN model of the same size with its tokenizer."""
    from conftest import VOCAB
    from helpers import tiny

    from moelab.eval.results import load_run
    from moelab.model import MoELM

    model, tok, cfg, _, _ = load_run(tiny_run)
    if request.param == "moe":
        cfg = tiny(f"model.vocab_size={VOCAB}", "model.ffn.kind=moe", "model.ffn.n_experts=4",
                   "model.ffn.top_k=2", "model.ffn.expert_dim=16")
        model = MoELM(cfg.model).eval()
    return model, tok


def direct_logprob(model, ids: list[int], n_cont: int) -> float:
    """Sum of the last n_cont token log-probs of one unpadded forward over ids."""
    with torch.no_grad():
        logp_TV = F.log_softmax(model(torch.tensor([ids[:-1]])).logits[0].float(), -1)
    tgt = torch.tensor(ids[1:])
    return float(logp_TV.gather(1, tgt[:, None])[:, 0][-n_cont:].double().sum())


def test_cached_and_batched_paths_equal_direct_forward(real_model):
    model, tok = real_model
    ctx = "Anne was much pleased with the news, and wrote to her sister at"
    pairs = [(ctx, " Bath"), (ctx, " once"), (ctx, " Kellynch Hall"), ("The", " captain")]
    cached = score_loglikelihood(model, tok, pairs, batch_size=2, use_cache=True)
    full = score_loglikelihood(model, tok, pairs, batch_size=3, use_cache=False)
    for (c, x), (ctx_ids, cont_ids), a, b in zip(pairs, encode_pairs(tok, pairs), cached, full):
        want = direct_logprob(model, ctx_ids + cont_ids, len(cont_ids))
        assert a[0] == pytest.approx(want, abs=1e-4) and b[0] == pytest.approx(want, abs=1e-4)
        assert a[1] == b[1]


def test_long_context_is_truncated_from_the_left(real_model):
    model, tok = real_model
    reqs = [(list(range(1, 200)), [5, 6, 7])]
    got = score_token_pairs(model, reqs, max_length=64, pad_id=tok.eos_id)[0][0]
    kept = list(range(1, 200))[-(64 + 1 - 3):] + [5, 6, 7]  # 64 input tokens
    assert got == pytest.approx(direct_logprob(model, kept, 3), abs=1e-4)
    with pytest.raises(ValueError, match="does not fit"):
        score_token_pairs(model, [([0], list(range(1, 70)))], max_length=64)


def test_rolling_windows_follow_lm_eval_convention():
    # the example of lm_eval.api.model.LM.loglikelihood_rolling: tokens 0..9, context 4
    assert rolling_windows(list(range(10)), -1, 4) == [
        ([-1], [0, 1, 2, 3]),  # model input = context + continuation[:-1]
        ([3], [4, 5, 6, 7]),
        ([5, 6, 7], [8, 9])]


def test_rolling_equals_sum_of_token_logprobs(real_model):
    model, tok = real_model
    short = "If music be the food of love, play on."
    long = short * 12
    got_short, got_long = score_rolling(model, tok, [short, long], max_length=64)
    ids = tok.encode(short)
    assert got_short == pytest.approx(direct_logprob(model, [tok.eos_id] + ids, len(ids)),
                                      abs=1e-4)
    ids = [tok.eos_id] + tok.encode(long)
    n, L, want = len(ids) - 1, 64, 0.0
    assert n > 2 * L
    for a in range(0, n, L):  # each chunk: its tokens given the L tokens before its last one
        b = min(a + L, n)
        window = ids[max(0, b - L):b + 1]
        want += direct_logprob(model, window, b - a)
    assert got_long == pytest.approx(want, abs=1e-3)

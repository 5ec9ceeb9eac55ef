import math
import re

import pytest
import torch

from helpers import tiny
from moelab.config import load_preset
from moelab.model import MoELM, sample_next


def _m(*sets):
    torch.manual_seed(0)
    return MoELM(tiny(*sets).model).eval()


def test_generate_greedy_matches_uncached_argmax_loop():
    m = _m()
    x = torch.randint(0, 97, (2, 5))
    out = m.generate(x, 8, temperature=0)
    ref = x
    for _ in range(8):
        ref = torch.cat([ref, m(ref).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, ref)
    assert torch.equal(m.generate(x, 8, temperature=0, use_cache=False), ref)


def test_generate_runs_in_inference_mode_and_returns_a_normal_tensor(monkeypatch):
    m = _m().train()
    modes = []
    orig = MoELM.forward

    def spy(self, *a, **kw):
        modes.append(torch.is_inference_mode_enabled())
        return orig(self, *a, **kw)

    monkeypatch.setattr(MoELM, "forward", spy)
    out = m.generate(torch.randint(0, 97, (2, 3)), 4, temperature=0)
    assert modes == [True] * 4 and m.training  # training mode restored
    assert not out.is_inference()
    out[:, 0] = 1  # writable outside inference mode


def test_generate_stops_on_eos_and_pads_finished_rows():
    m = _m()
    x = torch.randint(0, 97, (1, 4))
    greedy = m.generate(x, 6, temperature=0)
    eos = int(greedy[0, 5])  # the second generated token
    out = m.generate(x, 6, temperature=0, eos_id=eos)
    assert out.shape[1] <= 4 + 6 and int(out[0, -1]) == eos
    assert (out[0, 4:] == eos).nonzero()[0].item() <= 1


def test_sampling_filters():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    g = torch.Generator().manual_seed(0)
    assert {int(sample_next(logits, 1.0, 1, None, g)) for _ in range(20)} == {0}
    # top_p 0.5 keeps only the first token (its mass alone is 0.57 >= 0.5)
    assert {int(sample_next(logits, 1.0, None, 0.5, g)) for _ in range(20)} == {0}
    seen = {int(sample_next(logits, 1.0, 2, None, g)) for _ in range(200)}
    assert seen == {0, 1}
    assert int(sample_next(logits, 0.0, None, None, g)) == 0


def test_seeded_sampling_is_reproducible():
    m = _m()
    x = torch.randint(0, 97, (2, 3))
    a = m.generate(x, 10, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(3))
    b = m.generate(x, 10, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_tied_and_untied_head():
    m = _m()
    assert m.head.weight.data_ptr() == m.embed.weight.data_ptr()
    u = _m("model.tie_embeddings=false")
    assert u.head.weight.data_ptr() != u.embed.weight.data_ptr()


def test_depth_scaled_init():
    torch.manual_seed(0)
    cfg = tiny("model.init.scheme=depth_scaled", "model.n_layers=8", "model.d_model=128",
               "model.ffn.d_ff=512").model
    m = MoELM(cfg)
    o_std = m.layers[0].attn.o_proj.weight.std().item()
    q_std = m.layers[0].attn.q_proj.weight.std().item()
    assert abs(q_std - 0.02) < 0.002
    assert abs(o_std - 0.02 / 4) < 0.001  # 0.02 / sqrt(2 * 8)
    assert torch.all(m.layers[0].attn_norm.weight == 1)


def test_loss_and_outputs():
    m = _m()
    x = torch.randint(0, 97, (2, 9))
    out = m(x[:, :-1], x[:, 1:])
    ref = torch.nn.functional.cross_entropy(out.logits.reshape(-1, 97), x[:, 1:].reshape(-1))
    assert torch.allclose(out.loss, ref)
    assert out.aux_loss.item() == 0.0 and out.aux_losses == {}
    out.loss.backward()
    assert all(p.grad is not None for p in m.parameters())


def test_layer_sharing_schedule_shares_parameters():
    m = _m("model.n_layers=4", "model.sharing.group_size=2")
    assert len(m.layers) == 2 and m.schedule == [0, 1, 0, 1]
    x = torch.randint(0, 97, (1, 6))
    full = m(x).logits
    cache = m.new_cache()
    assert len(cache.layers) == 4
    inc = torch.cat([m(x[:, :3], cache=cache).logits] +
                    [m(x[:, t:t + 1], cache=cache).logits for t in range(3, 6)], 1)
    assert (inc - full).abs().max() < 1e-5


def test_meta_device_build_of_paper_preset():
    from moelab.config import load_preset

    with torch.device("meta"):
        m = MoELM(load_preset("gated-paper-1.7b").model)
    assert 1.7e9 < m.num_params() < 1.9e9


def test_moeut_init_stds():
    from moelab.config import load_preset

    torch.manual_seed(0)
    cfg = load_preset("sigma-moe-tiny").with_overrides(
        ["model.init.scheme=moeut", "model.tie_embeddings=false"]).model
    m = MoELM(cfg)
    s = math.sqrt(2 / cfg.n_layers)
    d, E, h = cfg.d_model, cfg.ffn.n_experts, cfg.ffn.expert_dim
    f = m.layers[0].ffn
    assert m.layers[0].attn.q_proj.weight.std().item() == pytest.approx(s / math.sqrt(d), rel=0.05)
    assert f.experts.w1_EDH.std().item() == pytest.approx(s / math.sqrt(d), rel=0.05)
    assert f.experts.w2_EHD.std().item() == pytest.approx(s / math.sqrt(E * h), rel=0.05)
    rows = f.router.weight.norm(dim=-1)
    assert torch.allclose(rows, rows[0].expand_as(rows), rtol=1e-5)  # renormalised rows
    assert m.embed.weight.std().item() == pytest.approx(1 / math.sqrt(d), rel=0.05)
    bound = 1 / math.sqrt(d)  # untied head keeps nn.Linear's default U(-1/sqrt(d), 1/sqrt(d))
    assert m.head.weight.abs().max().item() <= bound + 1e-6


@pytest.mark.parametrize("kwargs,words", [
    ({"max_new_tokens": -1}, "--max-new-tokens -1"),
    ({"temperature": -0.5}, "--temperature -0.5"),
    ({"temperature": float("inf")}, "--temperature inf"),
    ({"top_k": 0}, "--top-k 0"),
    ({"top_p": 0.0}, "--top-p 0.0"),
    ({"top_p": 1.5}, "--top-p 1.5"),
])
def test_generate_refuses_sampling_arguments_out_of_range(kwargs, words):
    from moelab.errors import ConfigError

    m = MoELM(load_preset("dense-tiny").model)
    args = {"max_new_tokens": 2, **kwargs}
    with pytest.raises(ConfigError, match=re.escape(words)):
        m.generate(torch.zeros(1, 3, dtype=torch.long), **args)
    with pytest.raises(ConfigError, match="at least one token"):
        m.generate(torch.zeros(2, 0, dtype=torch.long), 2)
    assert m.generate(torch.zeros(1, 3, dtype=torch.long), 0).shape == (1, 3)  # 0 new: prompt
def test_routing_statistics_only_when_asked():
    """Evaluation and generation skip balance losses and routing metrics (same logits);
    training computes them, and stats=True asks for them in eval mode (report, val loads)."""
    m = _m("model.ffn.kind=moe", "model.ffn.n_experts=4", "model.ffn.top_k=2",
           "model.ffn.expert_dim=16", "model.router.switch_coef=0.01", "model.router.z_coef=0.001")
    x = torch.randint(0, 97, (2, 7))
    off = m(x)
    assert off.aux_losses == {} and off.metrics == {} and off.aux_loss.item() == 0.0
    on = m(x, stats=True)
    assert torch.equal(on.logits, off.logits)
    assert "layer0.ffn_router.switch" in on.aux_losses and "layer1.ffn_router.load" in on.metrics
    assert on.aux_loss.item() > 0
    m.train()
    trained = m(x)
    assert set(trained.aux_losses) == set(on.aux_losses) and set(trained.metrics) == set(on.metrics)
    assert m(x, stats=False).metrics == {}


def test_generate_preallocates_the_cache(monkeypatch):
    m = _m("model.ffn.kind=moe", "model.ffn.n_experts=4", "model.ffn.top_k=1",
           "model.ffn.expert_dim=16")
    seen = []
    orig = m.new_cache

    def spy(capacity=None):
        seen.append(capacity)
        return orig(capacity)

    monkeypatch.setattr(m, "new_cache", spy)
    x = torch.randint(0, 97, (3, 4))
    out = m.generate(x, 6, temperature=0)
    assert seen == [10]
    assert torch.equal(out, m.generate(x, 6, temperature=0, use_cache=False))


def test_rope_tables_computed_once_per_forward(monkeypatch):
    from moelab.layers.rope import RotaryEmbedding

    calls = []
    orig = RotaryEmbedding.rotation_tables

    def counting(self, *a, **k):
        calls.append(1)
        return orig(self, *a, **k)

    m = _m()
    x = torch.randint(0, 97, (1, 6))
    ref = m(x).logits
    monkeypatch.setattr(RotaryEmbedding, "rotation_tables", counting)
    assert torch.equal(m(x).logits, ref)  # same numbers as the per-call tables
    assert len(calls) == 1  # 2 layers x (q, k) share one table


def test_last_only_logits_equal_the_last_row():
    m = _m()
    x = torch.randint(0, 97, (2, 6))
    assert torch.allclose(m(x, last_only=True).logits, m(x).logits[:, -1:], atol=1e-6)
    with pytest.raises(ValueError, match="last_only"):
        m(x, targets_BT=x, last_only=True)

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from helpers import ATTENTION_OPTIONS, tiny
from moelab.config import load_preset, preset_names
from moelab.flops import count
from moelab.model import MoELM


@pytest.mark.parametrize("name", list(ATTENTION_OPTIONS))
def test_params_and_macs_match_module_and_flop_counter(name):
    cfg = tiny(*ATTENTION_OPTIONS[name]).model
    m = MoELM(cfg)
    res = count(cfg, batch=2, seq_len=24, full_attention=True)
    assert res["params_total"] == sum(p.numel() for p in m.parameters())
    x = torch.randint(0, cfg.vocab_size, (2, 24))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        m(x)
    measured = fc.get_total_flops() / 2
    assert abs(res["macs_forward"] - measured) / measured < 0.02, (res["macs_forward"], measured)


def test_causal_counting_is_the_triangle():
    cfg = tiny().model
    full = count(cfg, seq_len=16, full_attention=True)
    causal = count(cfg, seq_len=16)
    H, Dh, L = 4, cfg.head_dim, cfg.n_layers
    # the difference is the upper triangle of scores and mixing: H * (T^2 - T(T+1)/2) * 2 Dh per layer
    assert full["macs_forward"] - causal["macs_forward"] == L * H * (256 - 136) * 2 * Dh


@pytest.mark.parametrize("name", preset_names())
def test_presets_count_equals_meta_model(name):
    cfg = load_preset(name).model
    with torch.device("meta"):
        m = MoELM(cfg)
    res = count(cfg)
    assert res["params_total"] == sum(p.numel() for p in m.parameters())
    assert res["params_active"] <= res["params_total"]


def test_gated_paper_shape():
    res = count(load_preset("gated-paper-1.7b").model)
    # 28 layers x (elementwise gate: d x h x d_k = 2048 x 16 x 128) on top of the ungated model
    ungated = count(load_preset("gated-paper-1.7b").with_overrides(
        ["model.attention.gate.position=none"]).model)
    assert res["params_total"] - ungated["params_total"] == 28 * 2048 * 16 * 128
    assert 1.70e9 < ungated["params_total"] < 1.75e9

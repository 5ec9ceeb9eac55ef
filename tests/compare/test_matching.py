import pytest

from moelab.compare.matching import macs_per_token, match_macs
from moelab.compare.study import tiny_presets
from moelab.config import load_preset
from moelab.errors import ConfigError


@pytest.mark.parametrize("name", tiny_presets())
def test_every_tiny_preset_matches_dense_within_5_percent(name):
    ref = macs_per_token(load_preset("dense-tiny").model, 128)
    # start each model off its own size so the knob really has to move
    cfg = load_preset(name)
    res = match_macs(cfg, ref)
    assert abs(res.macs / ref - 1) <= 0.05, res.describe()
    assert macs_per_token(res.config.model, 128) == res.macs
    big = match_macs(cfg, 1.6 * ref)
    assert abs(big.macs / (1.6 * ref) - 1) <= 0.05, big.describe()
    assert big.knob is not None and big.new != big.old


def test_describe_names_the_knob():
    ref = macs_per_token(load_preset("dense-tiny").model, 128)
    res = match_macs(load_preset("moe-tiny").with_overrides(["model.ffn.top_k=6"]), ref)
    assert res.knob == "ffn.top_k" and res.old == 6 and res.new == 2
    assert "model.ffn.top_k 6 -> 2" in res.describe()


def test_impossible_match_is_a_clear_error():
    with pytest.raises(ConfigError, match="could not bring"):
        match_macs(load_preset("dense-tiny"), 1.0)


def test_mole_is_matched_in_its_deployed_lookup_form():
    ref = macs_per_token(load_preset("dense-tiny").model, 128)
    res = match_macs(load_preset("mole-tiny"), 1.6 * ref)
    assert res.knob == "ffn.d_ff"  # never the routed experts, which become lookup tables
    assert res.config.model.ffn.expert_dim == load_preset("mole-tiny").model.ffn.expert_dim

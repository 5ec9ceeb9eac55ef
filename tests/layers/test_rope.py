"""RoPE against the explicit per-pair rotation, and its frequency scaling against the formulas
written out, in float64."""
import math

import pytest
import torch

from moelab.config import RopeScalingConfig
from moelab.errors import ConfigError
from moelab.layers.rope import RotaryEmbedding


def _explicit(x, offset, rot, theta):
    """Dims i and i + rot/2 of each head are a pair rotated by (offset + t) * theta^(-2i/rot)."""
    out = x.clone()
    half = rot // 2
    for t in range(x.shape[-2]):
        for i in range(half):
            ang = (offset + t) * theta ** (-2 * i / rot)
            c, s = math.cos(ang), math.sin(ang)
            a, b = x[..., t, i], x[..., t, i + half]
            out[..., t, i] = a * c - b * s
            out[..., t, i + half] = b * c + a * s
    return out


@pytest.mark.parametrize("fraction,offset", [(1.0, 0), (1.0, 7), (0.5, 3), (0.25, 0)])
def test_rope_matches_explicit_rotation_and_memo(fraction, offset):
    torch.manual_seed(0)
    rope = RotaryEmbedding(16, fraction, theta=500.0)
    x = torch.randn(2, 3, 5, 16, dtype=torch.float64)
    want = _explicit(x, offset, rope.rot_dim, 500.0)
    assert torch.allclose(rope(x, offset), want, atol=1e-12)
    memo = {}
    assert torch.allclose(rope(x, offset, memo), want, atol=1e-12) and len(memo) == 1
    assert torch.allclose(rope(x * 2, offset, memo), 2 * want, atol=1e-12) and len(memo) == 1


def test_rope_bf16_rotates_in_float32():
    rope = RotaryEmbedding(8)
    x = torch.randn(1, 1, 4, 8)
    assert torch.allclose(rope(x.bfloat16(), 300).float(), rope(x.bfloat16().float(), 300),
                          atol=1e-2)



def _inv_freq(rope: RotaryEmbedding) -> torch.Tensor:
    """The frequencies a RotaryEmbedding uses, read back from its angles at position 1."""
    cos, sin = rope.cos_sin(2, 0, "cpu", torch.float64)
    return torch.atan2(sin[1], cos[1])[: rope.rot_dim // 2]


def test_linear_scaling_divides_every_frequency():
    base = RotaryEmbedding(16, 1.0, 500.0)
    lin = RotaryEmbedding(16, 1.0, 500.0, RopeScalingConfig(kind="linear", factor=4.0))
    assert torch.allclose(_inv_freq(lin), _inv_freq(base) / 4, atol=1e-12)


def test_llama3_scaling_three_bands():
    s = RopeScalingConfig(kind="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_seq_len=64)
    D, theta = 32, 10000.0
    got = _inv_freq(RotaryEmbedding(D, 1.0, theta, s))
    f = theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    want = []
    for fi in f.tolist():
        wavelen = 2 * math.pi / fi
        if wavelen < 64 / 4:  # high frequency: unchanged
            want.append(fi)
        elif wavelen > 64 / 1:  # low frequency: slowed down by the factor
            want.append(fi / 8)
        else:  # between: interpolate in 64 / wavelen
            a = (64 / wavelen - 1) / (4 - 1)
            want.append((1 - a) * fi / 8 + a * fi)
    want = torch.tensor(want, dtype=torch.float64)
    assert torch.allclose(got, want, rtol=1e-12)
    assert (got == f).any() and (got == f / 8).any() and ((got != f) & (got != f / 8)).any()


def test_scaling_config_errors():
    with pytest.raises(ConfigError, match="rope_scaling.kind"):
        RopeScalingConfig(kind="yarn").validate("model.attention.rope_scaling")
    with pytest.raises(ConfigError, match="high_freq_factor"):
        RopeScalingConfig(kind="llama3", low_freq_factor=4, high_freq_factor=1).validate("r")

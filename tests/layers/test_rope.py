"""RoPE against the explicit per-pair rotation, in float64."""
import math

import pytest
import torch

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

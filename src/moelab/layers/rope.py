"""Rotary position embedding with a rotated fraction and a position offset (= cached length)."""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn

from moelab.config import RopeScalingConfig


class RotaryEmbedding(nn.Module):
    """Rotates the first `rot_dim = fraction * head_dim` dims of each head (rotate-half layout).

    `offset` is the number of positions already in the KV cache: new tokens are rotated as
    positions offset .. offset + T - 1 (the MoEUT reference rotated decoded queries as position 0,
    which breaks cached decoding).
    """

    def __init__(self, head_dim: int, fraction: float = 1.0, theta: float = 10000.0,
                 scaling: RopeScalingConfig | None = None):
        super().__init__()
        rot = int(head_dim * fraction) // 2 * 2
        self.rot_dim, self.theta = rot, theta
        self.scaling = scaling if scaling is not None and scaling.kind != "none" else None
        # what tells two layers' tables apart in the forward pass's memo
        self.table_key = (rot, theta, dataclasses.astuple(self.scaling) if self.scaling else None)
        # Frequencies are computed per call in the working dtype rather than kept as a buffer,
        # which `model.to(torch.bfloat16)` would round to a few significant bits.

    def cos_sin(self, T: int, offset: int, device, dtype=torch.float32):
        pos_T = torch.arange(offset, offset + T, device=device, dtype=dtype)
        inv_freq = self.theta ** (-torch.arange(0, self.rot_dim, 2, device=device, dtype=dtype)
                                  / self.rot_dim)
        if self.scaling is not None:
            inv_freq = scale_frequencies(inv_freq, self.scaling)
        freqs_TR = torch.outer(pos_T, inv_freq)  # (T, rot/2)
        emb_TR = torch.cat([freqs_TR, freqs_TR], dim=-1)
        return emb_TR.cos(), emb_TR.sin()

    def rotation_tables(self, T: int, offset: int, device, dtype=torch.float32):
        """(cos, signed sin), each (T, rot): rotate_half(x) * sin = roll(x, rot/2) * signed sin
        with the first half of sin negated, which saves the chunk/neg/cat of rotate-half."""
        cos, sin = self.cos_sin(T, offset, device, dtype)
        half = self.rot_dim // 2
        return cos, torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)

    def forward(self, x_BHTD: torch.Tensor, offset: int = 0,
                tables: dict | None = None) -> torch.Tensor:
        """`tables`: the forward pass's memo (`ForwardContext.rope`), so q and k of every layer
        share one cos/sin computation per pass instead of one each."""
        if self.rot_dim == 0:
            return x_BHTD
        # at least float32 (bf16 angles lose whole positions), float64 stays float64
        dtype = torch.promote_types(x_BHTD.dtype, torch.float32)
        T = x_BHTD.shape[-2]
        key = (*self.table_key, T, offset, dtype, x_BHTD.device)
        if tables is None or key not in tables:
            cs = self.rotation_tables(T, offset, x_BHTD.device, dtype)
            if tables is None:
                tables = {}
            tables[key] = cs
        cos, sin_signed = tables[key]
        full = self.rot_dim == x_BHTD.shape[-1]
        x_rot = (x_BHTD if full else x_BHTD[..., : self.rot_dim]).to(dtype)
        # x cos + rotate_half(x) sin, rotate_half(x) = (-x2, x1) (RoFormer eq. 34, half layout)
        out = torch.addcmul(x_rot * cos, x_rot.roll(self.rot_dim // 2, dims=-1), sin_signed)
        out = out.to(x_BHTD.dtype)
        return out if full else torch.cat([out, x_BHTD[..., self.rot_dim:]], dim=-1)


def scale_frequencies(inv_freq: torch.Tensor, s: RopeScalingConfig) -> torch.Tensor:
    """RoPE frequencies under a `RopeScalingConfig` (linear or Llama 3.1 scaling)."""
    if s.kind == "linear":  # position interpolation: positions / factor
        return inv_freq / s.factor
    if s.kind == "llama3":
        # Llama 3.1: long wavelengths (> L / low) slowed down by `factor`, short ones
        # (< L / high) kept, a linear blend in 1/wavelength between (L = original context)
        wavelen = 2 * math.pi / inv_freq
        smooth = ((s.original_max_seq_len / wavelen - s.low_freq_factor)
                  / (s.high_freq_factor - s.low_freq_factor)).clamp(0, 1)
        return (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
    raise ValueError(f"unknown RoPE scaling {s.kind!r}")

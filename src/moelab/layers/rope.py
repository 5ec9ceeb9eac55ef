"""Rotary position embedding with a rotated fraction and a position offset (= cached length)."""
from __future__ import annotations

import torch
import torch.nn as nn


class RotaryEmbedding(nn.Module):
    """Rotates the first `rot_dim = fraction * head_dim` dims of each head (rotate-half layout).

    `offset` is the number of positions already in the KV cache: new tokens are rotated as
    positions offset .. offset + T - 1 (the MoEUT reference rotated decoded queries as position 0,
    which breaks cached decoding).
    """

    def __init__(self, head_dim: int, fraction: float = 1.0, theta: float = 10000.0):
        super().__init__()
        rot = int(head_dim * fraction) // 2 * 2
        self.rot_dim = rot
        inv_freq = 1.0 / (theta ** (torch.arange(0, rot, 2, dtype=torch.float32) / max(rot, 1)))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def cos_sin(self, T: int, offset: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        pos_T = torch.arange(offset, offset + T, device=device, dtype=torch.float32)
        freqs_TR = torch.outer(pos_T, self.inv_freq.to(device))  # (T, rot/2)
        emb_TR = torch.cat([freqs_TR, freqs_TR], dim=-1)
        return emb_TR.cos(), emb_TR.sin()

    def forward(self, x_BHTD: torch.Tensor, offset: int = 0) -> torch.Tensor:
        if self.rot_dim == 0:
            return x_BHTD
        cos, sin = self.cos_sin(x_BHTD.shape[-2], offset, x_BHTD.device)
        x_rot, x_pass = x_BHTD[..., : self.rot_dim], x_BHTD[..., self.rot_dim:]
        x1, x2 = x_rot.float().chunk(2, dim=-1)
        rotated = torch.cat([-x2, x1], dim=-1)
        out = x_rot.float() * cos + rotated * sin
        return torch.cat([out.to(x_BHTD.dtype), x_pass], dim=-1)

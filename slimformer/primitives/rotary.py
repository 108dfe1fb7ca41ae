"""Rotary position embeddings in the Llama checkpoints' convention (pure tensor math), shared
by the decoding loop and the engine's staged block."""
from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] on the last dim (the rotary convention of Llama checkpoints)."""
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, q, D]; cos, sin: [B, q, D] (B may be 1 and broadcast)."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def apply_rotary_heads_last(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """:func:`apply_rotary` for ``x`` laid out [B, q, H, D] (before the heads' transpose); the
    same values."""
    return x * cos[:, :, None] + rotate_half(x) * sin[:, :, None]

"""W8A8: int8 weights per output channel, int8 activations per token (dynamic) or per layer
(static, from min/max observed through the engine); survey Eq. 5:

    Y = s_x · s_w · (X_int · W_intᵀ)          (symmetric: no zero-point terms)

Per-channel weight scales are what separate this from ``torch.quantization.quantize_dynamic``
(one scale per tensor: SmolLM2 PPL 59); the int8 GEMM itself lives in
:class:`slimformer.formats.Int8Linear`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from slimformer.engine.stage import BlockContext, StageMethod, register_stage
from slimformer.quant.config import W8A8Config

INT8_MAX = 127.0


def static_activation_scale(minmax: dict[str, torch.Tensor]) -> torch.Tensor:
    """Symmetric per-tensor scale ``absmax / 127`` from a min/max observer (scalar, fp32)."""
    return (minmax["absmax"].float() / INT8_MAX).clamp_min(torch.finfo(torch.float32).tiny).reshape(())


def w8a8_linear(module: nn.Module, cfg: W8A8Config, act_scale: Optional[torch.Tensor] = None) -> nn.Module:
    from slimformer.formats import Int8Linear, linear_weight
    from slimformer.primitives.affine import quantize

    qt = quantize(linear_weight(module).detach(), cfg.weight_spec())
    return Int8Linear.from_quantized(qt, module.bias, act_scale=act_scale)


def apply_w8a8(ctx: BlockContext, cfg: W8A8Config) -> None:
    for rel, c in ctx.targets.items():
        scale = static_activation_scale(ctx.stats[rel]["minmax"]) if c.activations == "static" else None
        ctx.replace(rel, w8a8_linear(ctx.module(rel), c, scale))


register_stage(StageMethod(
    name="w8a8", config_cls=W8A8Config, apply=apply_w8a8,
    observers=lambda cfg: ("minmax",) if cfg.activations == "static" else (),
    about="int8 per-channel weights + int8 dynamic per-token or static activations, int8 GEMM"))

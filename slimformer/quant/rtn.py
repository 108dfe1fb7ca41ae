"""Round-to-nearest weight-only quantization: the baseline every other method must beat.

RTN needs no data: each target weight ``W [out, in]`` is quantized independently with the
affine primitive (Eq. 4) and the linear is replaced by a packed :class:`QuantLinear`.
"""
from __future__ import annotations

import torch.nn as nn

from slimformer.engine.stage import BlockContext, StageMethod, register_stage
from slimformer.quant.config import RTNConfig


def rtn_linear(module: nn.Module, cfg: RTNConfig) -> nn.Module:
    """The packed replacement of one linear (nn.Linear or HF Conv1D)."""
    from slimformer.formats import QuantLinear, linear_weight
    from slimformer.primitives.affine import quantize

    qt = quantize(linear_weight(module).detach(), cfg.spec())
    return QuantLinear.from_quantized(qt, module.bias)


def apply_rtn(ctx: BlockContext, cfg: RTNConfig) -> None:
    for rel, c in ctx.targets.items():
        ctx.replace(rel, rtn_linear(ctx.module(rel), c))


register_stage(StageMethod(name="rtn", config_cls=RTNConfig, apply=apply_rtn,
                           about="round-to-nearest weight-only quantization (2-8 bits, any group)"))

"""LLM.int8() (Dettmers et al., 2022): W8A8 with the outlier feature columns kept in 16 bits.

Per target linear ``W [N, K]``:

1. the engine observes the linear's input on calibration data (the shared per-channel
   ``minmax`` observer; ``absmax_j = max(|min_j|, |max_j|)``);
2. outlier columns ``O = {j : absmax_j > threshold}`` (threshold 6.0 in the paper) — features
   whose magnitude would set every token's int8 scale;
3. the regular columns ``W[:, R]`` are quantized to int8 per output channel and run with
   dynamic per-token int8 activations on the int8 GEMM (:class:`~slimformer.formats.Int8Linear`);
   the outlier columns ``W[:, O]`` are stored in float16 and multiplied in fp32.

The paper decides the outlier columns per batch at run time; here they are fixed from
calibration (a static column set keeps the module a plain gather + two GEMMs, and the set is
saved with the model). The result is :class:`~slimformer.formats.outlier.Int8OutlierLinear`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from slimformer.engine.stage import (BlockContext, StageConfig, StageMethod, check_choice,
                                     check_float_range, register_stage)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LLMInt8Config(StageConfig):
    """``threshold``: an input feature whose calibrated absolute maximum exceeds it is an
    outlier column kept in 16 bits (0 keeps every column in 16 bits; a huge value gives plain
    W8A8). ``outlier_dtype``: storage of the outlier weight columns, ``float16`` or
    ``bfloat16``."""

    METHOD: ClassVar[str] = "llm_int8"
    VERSION: ClassVar[int] = 1

    threshold: float = 6.0
    outlier_dtype: str = "float16"

    def validate(self) -> None:
        check_float_range(self.METHOD, "threshold", self.threshold, 0.0, 1e30)
        from slimformer.formats.outlier import OUTLIER_DTYPES

        check_choice(self.METHOD, "outlier_dtype", self.outlier_dtype, tuple(OUTLIER_DTYPES))


# ---------------------------------------------------------------------------------------------
# the math


def outlier_columns(act_absmax: torch.Tensor, threshold: float) -> torch.Tensor:
    """Sorted indices (int64) of the input features with ``absmax > threshold``."""
    return (act_absmax.float() > threshold).nonzero().reshape(-1)


def split_weight(w: torch.Tensor, outlier_idx: torch.Tensor):
    """``W [N, K]`` -> (int8 per-channel :class:`QuantizedTensor` of the regular columns, or
    None when every column is an outlier; the outlier columns ``W[:, O]`` in fp32)."""
    from slimformer.primitives.affine import QuantSpec, quantize

    keep = torch.ones(w.shape[1], dtype=torch.bool)
    keep[outlier_idx] = False
    w = w.detach().to(torch.float32)
    qt = None
    if bool(keep.any()):
        qt = quantize(w[:, keep], QuantSpec(bits=8, symmetric=True, granularity="channel"))
    return qt, w[:, outlier_idx]


def llm_int8_linear(module: nn.Module, act_absmax: torch.Tensor, cfg: LLMInt8Config) -> nn.Module:
    """The :class:`Int8OutlierLinear` replacing one linear (nn.Linear or HF Conv1D)."""
    from slimformer.formats import Int8Linear, linear_weight
    from slimformer.formats.outlier import OUTLIER_DTYPES, Int8OutlierLinear

    idx = outlier_columns(act_absmax, cfg.threshold)
    qt, w_out = split_weight(linear_weight(module), idx)
    int8 = None if qt is None else Int8Linear.from_quantized(qt, None)
    return Int8OutlierLinear.from_parts(int8, idx, w_out.to(OUTLIER_DTYPES[cfg.outlier_dtype]),
                                        module.bias)


# ---------------------------------------------------------------------------------------------
# the stage


def apply_llm_int8(ctx: BlockContext, cfg: LLMInt8Config) -> None:
    from slimformer.quant.smoothquant import act_absmax_from_minmax

    for rel, c in ctx.targets.items():
        absmax = act_absmax_from_minmax(ctx.stats[rel]["minmax"])
        new = llm_int8_linear(ctx.module(rel), absmax, c)
        log.debug("llm_int8 %s.%s: %d outlier columns of %d", ctx.name, rel,
                  new.outlier_idx.numel(), new.in_features)
        ctx.replace(rel, new)


register_stage(StageMethod(
    name="llm_int8", config_cls=LLMInt8Config, apply=apply_llm_int8,
    observers=lambda cfg: ("minmax",),
    about="LLM.int8(): int8 GEMM (per-channel weights, per-token activations) + 16-bit outlier columns"))

__all__ = ["LLMInt8Config", "outlier_columns", "split_weight", "llm_int8_linear", "apply_llm_int8"]

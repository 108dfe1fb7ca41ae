"""SmoothQuant (Xiao et al., 2023): move activation outliers into the weights before W8A8.

A few input channels of a transformer's linears carry activations 10-100x larger than the
rest; a per-token int8 scale is then set by those channels and the others lose their bits.
For a producer -> consumers group (``SmoothGroup`` in the architecture registry: a norm, or
a linear whose output reaches the consumers only through ops that commute with a positive
per-channel scale), channel ``j`` of the producer's output is divided by ``s_j`` and input
column ``j`` of every consumer weight is multiplied by ``s_j``::

    Y = X W^T = (X diag(s)^-1) (W diag(s))^T            (exact in full precision)

    s_j = max|X_j|^alpha / max_i |W_ij|^(1 - alpha)    (max over tokens / over consumer rows)

``alpha`` trades activation range for weight range: 0 leaves activations alone, 1 moves
everything into the weights. The transform changes no shapes and adds no modules: the
smoothed block is an fp32 block equal to the original up to rounding, which the next stage
(``w8a8``) quantizes.

Statistics come from the shared observer layer (per-channel ``minmax`` on the consumers'
input, collected by the engine on the block before it is smoothed).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar, Optional, Sequence

import torch
import torch.nn as nn

from slimformer.engine.stage import BlockContext, StageConfig, StageMethod, check_float_range, register_stage
from slimformer.errors import SlimformerError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SmoothQuantConfig(StageConfig):
    """SmoothQuant's equivalent transformation (no quantization by itself: put a ``w8a8``
    stage after it). ``alpha`` in [0, 1]: migration strength (0.5 in the paper; larger moves
    more of the activation range into the weights). ``targets``/``ignore`` select the
    linears; a group is smoothed only when all its consumers are targets."""

    METHOD: ClassVar[str] = "smoothquant"
    VERSION: ClassVar[int] = 1

    alpha: float = 0.5

    def validate(self) -> None:
        check_float_range(self.METHOD, "alpha", self.alpha, 0.0, 1.0)


# ---------------------------------------------------------------------------------------------
# the math


def smooth_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per input channel ``s = act_absmax^alpha / weight_absmax^(1-alpha)`` (fp32, ``[in]``).

    Channels that were never active on calibration data, or whose weight column is all zero,
    get ``s = 1`` (no evidence to move anything; a tiny ``s`` would blow up the producer).
    """
    a = act_absmax.float()
    w = weight_absmax.float()
    s = a.pow(alpha) / w.pow(1.0 - alpha)
    ok = (a > 0) & (w > 0) & torch.isfinite(s) & (s > 0)
    return torch.where(ok, s, torch.ones_like(s))


def _weight_in_out(module: nn.Module) -> torch.Tensor:
    """[out, in] view of a linear's weight (nn.Linear or HF Conv1D); in-place ops write through."""
    from slimformer.formats import linear_weight

    return linear_weight(module).data


def weight_column_absmax(linears: Sequence[nn.Module]) -> torch.Tensor:
    """``max_i |W_ij|`` over the rows of all consumers (they share the input channels)."""
    return torch.stack([_weight_in_out(m).abs().amax(0) for m in linears]).amax(0).float()


def fold_smoothing(prev: nn.Module, consumers: Sequence[nn.Module], s: torch.Tensor) -> None:
    """Apply the transform in place: divide the producer's output channels by ``s`` (norm
    weight and bias, or a linear's output rows and bias) and multiply the consumers' input
    columns by ``s``."""
    from slimformer.engine.targets import is_linear

    s = s.float()
    if is_linear(prev):
        w = _weight_in_out(prev)  # [out, in]: output channel j is row j
        w.div_(s.to(w.dtype).unsqueeze(1))
    else:
        w = getattr(prev, "weight", None)
        if not isinstance(w, torch.Tensor) or w.dim() != 1 or w.numel() != s.numel():
            raise SlimformerError(f"smoothquant: producer {type(prev).__name__} has no per-channel "
                                  f"weight of size {s.numel()} to fold the scales into")
        w.data.div_(s.to(w.dtype))
    b = getattr(prev, "bias", None)
    if isinstance(b, torch.Tensor):
        b.data.div_(s.to(b.dtype))
    for m in consumers:
        wc = _weight_in_out(m)
        wc.mul_(s.to(wc.dtype).unsqueeze(0))


def act_absmax_from_minmax(minmax: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-channel ``max_t |x_tj|`` from the shared min/max observer."""
    return torch.maximum(minmax["min"].abs(), minmax["max"].abs())


# ---------------------------------------------------------------------------------------------
# the stage


def check_smooth_requires(ctx: BlockContext, method: str = "smoothquant") -> None:
    """Raise unless the model's config has the values the architecture's groups need."""
    cfg = getattr(ctx.config, "text_config", None) or ctx.config
    for attr, want in ctx.arch.smooth_requires:
        have = getattr(cfg, attr, None)
        if have != want:
            raise SlimformerError(f"{method}: architecture '{ctx.arch.name}' needs {attr}={want!r} "
                                  f"for its smoothing groups to be exact; this model has {have!r}")


def smoothable_groups(ctx: BlockContext, method: str = "smoothquant") -> list:
    """The block's smoothing groups (``ctx.arch.smooth_groups``) whose consumers are all
    targets, as ``(group, producer module, [consumer modules])``; raises when a member is
    already quantized (an equivalent transformation must come before quantization). Shared
    by every method that applies an equivalent transformation (SmoothQuant, OmniQuant's LET)."""
    from slimformer.engine.targets import is_linear

    out = []
    for g in ctx.arch.smooth_groups:
        if not all(rel in ctx.targets for rel in g.linears):
            continue  # a consumer is ignored (or not a target): leave the group alone
        consumers = [ctx.module(rel) for rel in g.linears]
        if not all(is_linear(m) for m in consumers):
            raise SlimformerError(f"{method}: {ctx.name}.{g.linears[0]} is already quantized; "
                                  f"put {method} before the quantization stage")
        prev = ctx.module(g.prev)
        if type(prev).__name__ in ("QuantLinear", "Int8Linear"):
            raise SlimformerError(f"{method}: {ctx.name}.{g.prev} is already quantized; "
                                  f"put {method} before the quantization stage")
        out.append((g, prev, consumers))
    return out


def apply_smoothquant(ctx: BlockContext, cfg: SmoothQuantConfig) -> None:
    groups = ctx.arch.smooth_groups
    if not groups:
        log.warning("smoothquant: architecture '%s' has no exact smoothing groups; block unchanged",
                    ctx.arch.name)
        return
    check_smooth_requires(ctx)
    for g, prev, consumers in smoothable_groups(ctx):
        first = g.linears[0]
        alpha = ctx.targets[first].alpha
        s = smooth_scales(act_absmax_from_minmax(ctx.stats[first]["minmax"]),
                          weight_column_absmax(consumers), alpha)
        fold_smoothing(prev, consumers, s)


register_stage(StageMethod(
    name="smoothquant", config_cls=SmoothQuantConfig, apply=apply_smoothquant,
    # per-channel abs-max of each consumer's input (the engine's observers are per stage, not
    # per module: every target gets one; only each group's first linear is read)
    observers=lambda cfg: ("minmax",),
    about="SmoothQuant: migrate activation outliers into the weights (exact in fp32); then w8a8"))

__all__ = ["SmoothQuantConfig", "smooth_scales", "fold_smoothing", "weight_column_absmax",
           "act_absmax_from_minmax", "apply_smoothquant", "check_smooth_requires", "smoothable_groups"]

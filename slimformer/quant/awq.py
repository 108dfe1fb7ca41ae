"""AWQ (Lin et al., 2024; survey §3.1.3): activation-aware weight quantization.

A few input channels carry much larger activations than the rest, and the weight columns they
multiply matter most. AWQ protects them by an exact per-input-channel rescaling before
rounding: for a producer -> consumers group (``SmoothGroup`` in the architecture registry, the
same groups and the same folding as SmoothQuant) ::

    Y = X Wᵀ = (X diag(s)⁻¹) (W diag(s))ᵀ        s_j = mean_t|x_tj|^α  (/ w̄_j^(1-α), "duo")

so a salient column is scaled up before quantization (its relative rounding error shrinks)
and the activation is scaled down by the same factor in the producer (a norm's weight or the
previous linear's rows). ``α`` is searched on a grid per group, each candidate scored by the
group's output error on the calibration data, ``‖X Wᵀ − (X/s) Q(W·s)ᵀ‖²``; ``s = 1`` (plain
RTN) is always a candidate, so the chosen scales never score worse than RTN. Then every
consumer's weights are clipped per quantization group to ``r · max|w|`` with ``r`` searched on
a grid against each group's partial output ``‖X_g (W_g − Q_g)ᵀ‖²`` (AWQ's ``auto_clip``; q/k
are skipped by default, their error passes through the softmax).

Both losses are quadratic forms of the input Gram matrix, ``‖X Dᵀ‖² = n/2 · tr(D H Dᵀ)`` with
``H = 2XᵀX/n`` the engine's ``hessian`` observer (and ``H_gg``, its diagonal block, for a
group's partial output), so every candidate is scored on ALL calibration tokens at the cost of
one ``[out, in] x [in, in]`` product — no activations are kept and the block is not re-run
(re-running the group on captured inputs, as AutoAWQ does, costs ``tokens/in`` times more and
gives the same number). After a group is folded, its consumers see ``X/s``: their Hessian for
the clipping search is ``diag(1/s) H diag(1/s)``.

``mean|x|`` comes from the shared ``abs_mean`` observer; the folding is SmoothQuant's
(:func:`slimformer.quant.smoothquant.fold_smoothing`). With ``quantize: true`` the consumers
become packed :class:`~slimformer.formats.QuantLinear` by RTN; with ``quantize: false`` the
block keeps fp32 weights, scaled and clipped, for the next stage — ``[awq, gptq]``.

Everything runs on the CPU (llm-compressor 0.14's AWQModifier stops on a CPU-only machine with
"Cannot access accelerator device when none is available": it pins its activation cache).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
import torch.nn as nn

from slimformer.engine.stage import (BlockContext, StageMethod, check_bool, check_float_range,
                                     check_int_range, register_stage)
from slimformer.primitives.affine import QuantSpec, expand_groups, fake_quantize
from slimformer.quant.config import RTNConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AWQConfig(RTNConfig):
    """AWQ scale search + clipping search, then RTN (``quantize: true``) or nothing
    (``quantize: false``: a later stage, e.g. gptq, quantizes the scaled, clipped weights).

    The value fields are RTN's (``bits``, ``group_size``, ``symmetric``, ``format``).
    ``grid``: α candidates ``0, 1/grid, ..., (grid-1)/grid``; ``duo_scaling``: divide by the
    mean normalised weight magnitude ``w̄^(1-α)`` as AutoAWQ does; ``clip``: run the clipping
    search, shrinking the range by up to ``max_shrink`` in ``clip_grid`` steps; ``clip_qk``:
    clip q/k too. Observers: ``hessian`` and ``abs_mean`` on the consumers' input.
    """

    METHOD: ClassVar[str] = "awq"
    VERSION: ClassVar[int] = 1

    grid: int = 20
    duo_scaling: bool = True
    clip: bool = True
    clip_grid: int = 20
    max_shrink: float = 0.5
    clip_qk: bool = False
    quantize: bool = True

    def validate(self) -> None:
        super().validate()
        check_int_range(self.METHOD, "grid", self.grid, 1, 1000)
        check_bool(self.METHOD, "duo_scaling", self.duo_scaling)
        check_bool(self.METHOD, "clip", self.clip)
        check_int_range(self.METHOD, "clip_grid", self.clip_grid, 1, 1000)
        check_float_range(self.METHOD, "max_shrink", self.max_shrink, 0.0, 0.99)
        check_bool(self.METHOD, "clip_qk", self.clip_qk)
        check_bool(self.METHOD, "quantize", self.quantize)


# ---------------------------------------------------------------------------------------------
# the math (pure functions of tensors)


def _groups(t: torch.Tensor, gw: int) -> torch.Tensor:
    """[..., cols] -> [..., n_groups, gw], zero-padding a partial last group."""
    cols = t.shape[-1]
    n = math.ceil(cols / gw)
    return nn.functional.pad(t, (0, n * gw - cols)).reshape(*t.shape[:-1], n, gw)


def weight_salience(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """AutoAWQ's ``w̄``: ``|w|`` normalised by its group's max, averaged over rows ([in])."""
    cols = w.shape[1]
    g = _groups(w.abs().float(), spec.group_width(cols))
    g = g / (g.amax(-1, keepdim=True) + 1e-6)
    return g.reshape(w.shape[0], -1)[:, :cols].mean(0)


def scale_candidates(x_absmean: torch.Tensor, w_mean: Optional[torch.Tensor], grid: int) -> list[torch.Tensor]:
    """``s = 1`` then ``x̄^α (/ w̄^(1-α))`` for ``α = k/grid``, each normalised so that
    ``max(s)·min(s) = 1`` (the product's scale is arbitrary; this keeps both sides O(1))."""
    x = x_absmean.float()
    out = [torch.ones_like(x)]
    for k in range(grid):
        a = k / grid
        s = x.pow(a)
        if w_mean is not None:
            s = s / (w_mean.float().pow(1 - a) + 1e-4)
        s = s.clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        out.append(s)
    return out


def search_scales(h: torch.Tensor, w: torch.Tensor, x_absmean: torch.Tensor, spec: QuantSpec,
                  grid: int = 20, duo_scaling: bool = True) -> tuple[torch.Tensor, list[float]]:
    """The per-input-channel scale ``s [in]`` minimising the group output error
    ``tr(D H Dᵀ)``, ``D = Q(w·s)/s − w`` (∝ ``‖X wᵀ − (X/s) Q(w·s)ᵀ‖²``).

    ``h [in, in]``: the consumers' input Hessian; ``w [out, in]``: their stacked weights.
    Returns ``(s, losses)`` with ``losses[0]`` the loss of ``s = 1`` (plain RTN).
    """
    h = h.float()
    w = w.float()
    cands = scale_candidates(x_absmean, weight_salience(w, spec) if duo_scaling else None, grid)
    losses = []
    for s in cands:
        d = fake_quantize(w * s, spec) / s - w
        losses.append(float(((d @ h) * d).sum()))
    best = min(range(len(cands)), key=losses.__getitem__)
    return cands[best], losses


def search_clip(h: torch.Tensor, w: torch.Tensor, spec: QuantSpec, clip_grid: int = 20,
                max_shrink: float = 0.5) -> torch.Tensor:
    """Per (row, group) clipping bound ``r · max|w|`` with ``r ∈ {1, 1 − 1/grid, ...} ≥ 1 −
    max_shrink`` minimising the group's partial-output error ``d_g H_gg d_gᵀ`` (``d = Q(clip(w))
    − w``; ``H_gg``: the diagonal block of the input Hessian for the group's columns).
    Returns the bounds ``[out, n_groups]`` (``r = 1`` is the unclipped range)."""
    w = w.float()
    cols = w.shape[1]
    gw = spec.group_width(cols)
    n = math.ceil(cols / gw)
    hp = nn.functional.pad(h.float(), (0, n * gw - cols, 0, n * gw - cols))
    hb = torch.stack([hp[i * gw:(i + 1) * gw, i * gw:(i + 1) * gw] for i in range(n)])  # [G, gw, gw]
    wg = _groups(w, gw)  # [o, G, gw]
    org_max = wg.abs().amax(-1)  # [o, G]
    best_err = torch.full_like(org_max, float("inf"))
    best_max = org_max.clone()
    for k in range(int(max_shrink * clip_grid + 1e-9) + 1):
        mv = org_max * (1 - k / clip_grid)
        mvc = expand_groups(mv, cols, spec)  # [o, cols]
        d = _groups(fake_quantize(torch.maximum(torch.minimum(w, mvc), -mvc), spec) - w, gw)
        err = torch.einsum("ogk,gkl,ogl->og", d, hb, d)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_max = torch.where(better, mv, best_max)
    return best_max


def apply_clip(w: torch.Tensor, max_val: torch.Tensor, spec: QuantSpec) -> None:
    """Clamp ``w [out, in]`` in place to ``±max_val`` of its group."""
    mvc = expand_groups(max_val, w.shape[1], spec).to(w.dtype)
    torch.maximum(torch.minimum(w, mvc), -mvc, out=w)


# ---------------------------------------------------------------------------------------------
# the stage


def apply_awq(ctx: BlockContext, cfg: AWQConfig) -> None:
    from slimformer.engine.targets import is_linear
    from slimformer.errors import SlimformerError
    from slimformer.formats import linear_weight
    from slimformer.quant.rtn import rtn_linear
    from slimformer.quant.smoothquant import check_smooth_requires, fold_smoothing, smoothable_groups

    rels = list(ctx.targets)
    for rel in rels:
        if not is_linear(ctx.module(rel)):
            raise SlimformerError(f"awq: {ctx.name}.{rel} is already quantized; put awq first")
    if any("hessian" not in ctx.stats.get(rel, {}) for rel in rels):
        # targets outside the blocks (lm_head by name): the engine does not calibrate there
        log.warning("awq: no calibration statistics for %s; plain RTN", ", ".join(rels))
        for rel in rels:
            if ctx.targets[rel].quantize:
                ctx.replace(rel, rtn_linear(ctx.module(rel), ctx.targets[rel]))
        return
    if ctx.arch.smooth_groups:
        check_smooth_requires(ctx, "awq")
    with torch.no_grad():
        s_in: dict[str, torch.Tensor] = {}  # consumer -> scale its input was divided by
        for g, prev, consumers in smoothable_groups(ctx, "awq"):
            first = g.linears[0]
            c = ctx.targets[first]
            w = torch.cat([linear_weight(m).detach().float() for m in consumers])
            s, losses = search_scales(ctx.stats[first]["hessian"], w, ctx.stats[first]["abs_mean"],
                                      c.spec(), c.grid, c.duo_scaling)
            log.debug("awq %s.%s: group output error %.4g, RTN %.4g (%.3fx)", ctx.name, first,
                      min(losses), losses[0], min(losses) / losses[0] if losses[0] else 1.0)
            fold_smoothing(prev, consumers, s)
            for rel in g.linears:
                s_in[rel] = s
        qk = {ctx.arch.attention.q, ctx.arch.attention.k, ctx.arch.attention.fused_qkv} - {None}
        for rel in rels:
            c = ctx.targets[rel]
            if not c.clip or (rel in qk and not c.clip_qk):
                continue
            h = ctx.stats[rel]["hessian"]
            if rel in s_in:  # the input is now X / s
                inv = 1.0 / s_in[rel]
                h = h * inv[:, None] * inv[None, :]
            w = linear_weight(ctx.module(rel))
            apply_clip(w.data, search_clip(h, w.detach(), c.spec(), c.clip_grid, c.max_shrink), c.spec())
        for rel in rels:
            if ctx.targets[rel].quantize:
                ctx.replace(rel, rtn_linear(ctx.module(rel), ctx.targets[rel]))


register_stage(StageMethod(
    name="awq", config_cls=AWQConfig, apply=apply_awq,
    observers=lambda cfg: ("hessian", "abs_mean"),
    about="AWQ: activation-aware per-channel scales + clipping search, then RTN (or gptq)"))

__all__ = ["AWQConfig", "search_scales", "search_clip", "scale_candidates", "weight_salience",
           "apply_clip", "apply_awq"]

"""Unstructured and N:M pruning stages: magnitude, Wanda, SparseGPT (survey §4.1, Tables 5-6).

All three run through the shared engine (no calibration loop here) and end the same way: a
keep-mask (:mod:`slimformer.prune.masks`) and a weight that :func:`~slimformer.formats.sparse.
pack_pruned` stores as a :class:`~slimformer.formats.sparse.SparseLinear` (bitmask + kept values).

* ``magnitude`` — scores ``|W|``; needs no data.
* ``wanda`` (Sun et al., 2023) — scores ``|W_ij|·‖X_j‖₂`` compared within each output row;
  ``‖X_j‖₂`` from the engine's ``channel_norm`` observer. No weight update.
* ``sparsegpt`` (Frantar & Alistarh, 2023) — for each block of ``block_size`` columns, choose
  the mask adaptively by the OBS saliency ``w²/[H⁻¹]²_jj`` of the *current* (already updated)
  weights, then prune column by column, spreading each column's error over the columns not yet
  visited with the inverse-Hessian row (Optimal Brain Surgeon); ``H = 2XᵀX/n`` from the
  engine's ``hessian`` observer, damped by ``dampening·mean(diag H)``. With ``bits`` set, each
  kept column is also quantized in the same pass (the paper's joint sparsification +
  quantization), giving a sparse *quantized* weight (codes of the kept weights + group scales).

``pattern`` is ``"unstructured"`` or ``"N:M"`` (e.g. ``"2:4"``); with N:M, ``sparsity`` must be
``1 - N/M``. Per-layer sparsity comes from the shared ``overrides`` mechanism, e.g.
``overrides: {"re:.*down_proj": {sparsity: 0.3}}``.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
import torch.nn as nn

from slimformer.engine.stage import (BlockContext, StageConfig, StageMethod, check_bool, check_choice,
                                     check_int_range, register_stage)
from slimformer.errors import ConfigError, SlimformerError
from slimformer.primitives.hessian import damped_inverse_cholesky, one_thread
from slimformer.prune.masks import (SCOPES, keep_mask, lowest_k_mask, magnitude_scores, n_pruned, nm_mask,
                                    parse_pattern, wanda_scores)

log = logging.getLogger(__name__)


# =============================================================================================
# configs
# =============================================================================================
@dataclass(frozen=True)
class PruneConfig(StageConfig):
    """Fields every unstructured / N:M pruning stage shares (not a stage by itself).

    ``sparsity`` in [0, 1): fraction of each target weight removed (exactly ⌊s·numel⌋);
    ``pattern``: ``"unstructured"`` or ``"N:M"`` (keep N of every M consecutive input columns
    of each row; then ``sparsity`` must equal ``1 - N/M``).
    """

    METHOD: ClassVar[str] = "prune"

    sparsity: float = 0.5
    pattern: str = "unstructured"

    def validate(self) -> None:
        s = self.sparsity
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 <= s < 1.0:
            raise ConfigError(f"{self.METHOD}.sparsity: invalid value {s!r}; allowed: numbers in [0, 1)")
        nm = parse_pattern(self.pattern, self.METHOD)
        if nm is not None and not math.isclose(s, 1 - nm[0] / nm[1], abs_tol=1e-9):
            raise ConfigError(f"{self.METHOD}.sparsity: {s!r} does not match pattern {self.pattern!r}; "
                              f"allowed: {1 - nm[0] / nm[1]!r} (= 1 - N/M)")

    @property
    def nm(self) -> Optional[tuple[int, int]]:
        return parse_pattern(self.pattern, self.METHOD)


@dataclass(frozen=True)
class MagnitudeConfig(PruneConfig):
    """Magnitude pruning: remove the smallest ``|W|``. ``scope`` (unstructured only): compare
    weights across the whole ``layer`` (classic) or within each output ``row``."""

    METHOD: ClassVar[str] = "magnitude"
    VERSION: ClassVar[int] = 1

    scope: str = "layer"

    def validate(self) -> None:
        super().validate()
        check_choice(self.METHOD, "scope", self.scope, SCOPES)


@dataclass(frozen=True)
class WandaConfig(PruneConfig):
    """Wanda: remove the smallest ``|W_ij|·‖X_j‖₂``; ``scope`` ``row`` (the paper's per-output
    comparison group) or ``layer``. Needs calibration data (input channel norms)."""

    METHOD: ClassVar[str] = "wanda"
    VERSION: ClassVar[int] = 1

    scope: str = "row"

    def validate(self) -> None:
        super().validate()
        check_choice(self.METHOD, "scope", self.scope, SCOPES)


@dataclass(frozen=True)
class SparseGPTConfig(PruneConfig):
    """SparseGPT: OBS mask selection + weight update from the input Hessian.

    ``block_size``: columns per adaptive-mask block (128 in the paper; a multiple of M for
    N:M); ``dampening``: ``λ`` of ``H + λ·mean(diag H)·I`` (0.01); ``bits`` (null = no
    quantization, else 2..8) with ``group_size`` (null = one scale per output channel) and
    ``symmetric``: quantize the kept weights in the same pass.
    """

    METHOD: ClassVar[str] = "sparsegpt"
    VERSION: ClassVar[int] = 1

    block_size: int = 128
    dampening: float = 0.01
    bits: Optional[int] = None
    group_size: Optional[int] = 128
    symmetric: bool = True

    def validate(self) -> None:
        super().validate()
        check_int_range(self.METHOD, "block_size", self.block_size, 1)
        d = self.dampening
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 < d <= 10.0:
            raise ConfigError(f"{self.METHOD}.dampening: invalid value {d!r}; allowed: numbers in (0, 10]")
        check_int_range(self.METHOD, "bits", self.bits, 2, 8, allow_none=True)
        check_int_range(self.METHOD, "group_size", self.group_size, 1, allow_none=True)
        check_bool(self.METHOD, "symmetric", self.symmetric)
        nm = self.nm
        if nm is not None and self.block_size % nm[1]:
            raise ConfigError(f"{self.METHOD}.block_size: {self.block_size} is not a multiple of M={nm[1]} "
                              f"of pattern {self.pattern!r}; allowed: multiples of {nm[1]}")

    def spec(self):
        """The QuantSpec of the joint quantization, or None."""
        if self.bits is None:
            return None
        from slimformer.primitives.affine import QuantSpec

        if self.group_size is None:
            return QuantSpec(bits=self.bits, symmetric=self.symmetric, granularity="channel")
        return QuantSpec(bits=self.bits, symmetric=self.symmetric, granularity="group",
                         group_size=self.group_size)


# =============================================================================================
# SparseGPT math (pure)
# =============================================================================================
@dataclass
class PruneResult:
    """A pruned (optionally quantized) weight: ``weight`` [out, in] fp32 with zeros where
    ``mask`` is False; ``spec``/``scale``/``zero`` when the kept weights lie on a quant grid."""

    weight: torch.Tensor
    mask: torch.Tensor
    spec: object = None
    scale: Optional[torch.Tensor] = None
    zero: Optional[torch.Tensor] = None


def inverse_hessian_cholesky(H: torch.Tensor, dampening: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + λ·mean(diag H)·I)⁻¹`` (fp32), the ``Hinv`` of the
    SparseGPT/GPTQ papers (:func:`slimformer.primitives.hessian.damped_inverse_cholesky`); an
    error when even strong damping cannot make H positive definite."""
    U, _ = damped_inverse_cholesky(H.to(torch.float32), dampening)
    if U is None:
        raise SlimformerError("the input Hessian is not positive definite even with strong damping "
                              "(too few or degenerate calibration tokens?)")
    return U


def sparsegpt_prune(w: torch.Tensor, H: torch.Tensor, sparsity: float, nm: Optional[tuple[int, int]] = None,
                    block_size: int = 128, dampening: float = 0.01, spec=None) -> PruneResult:
    """See :func:`_sparsegpt_prune` (run on one thread)."""
    with one_thread():
        return _sparsegpt_prune(w, H, sparsity, nm, block_size, dampening, spec)


def _sparsegpt_prune(w: torch.Tensor, H: torch.Tensor, sparsity: float, nm: Optional[tuple[int, int]],
                     block_size: int, dampening: float, spec) -> PruneResult:
    """SparseGPT (Algorithm 1 of Frantar & Alistarh 2023) on one weight ``w`` [out, in] with
    input Hessian ``H`` [in, in]. Unstructured: exactly ⌊s·numel⌋ weights pruned overall (each
    block of columns prunes its share, chosen by saliency over the whole block). N:M: the
    mask of each group of M columns is chosen when the sweep reaches it. ``spec``: quantize the
    kept weights in the same sweep (group parameters fixed at each group's first column, from
    the current weights with the known pruned ones excluded)."""
    from slimformer.primitives.affine import compute_qparams, fake_quantize_columns

    W = w.detach().to(torch.float32).clone()  # [R, C]
    rows, cols = W.shape
    H = H.to(torch.float32).clone()
    dead = torch.diag(H) == 0  # inputs never active: their weights cannot matter
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    Hinv = inverse_hessian_cholesky(H, dampening)  # [C, C] upper
    mask = torch.ones(rows, cols, dtype=torch.bool)
    scale = zero = None
    gs = None
    if spec is not None:
        gs = spec.group_size if spec.granularity == "group" else None
        if gs is None:  # one scale per row for the whole sweep
            scale, zero = compute_qparams(W, spec)
        else:
            n_groups = spec.n_groups(cols)
            scale = torch.zeros(rows, n_groups)
            zero = None if spec.symmetric else torch.zeros(rows, n_groups, dtype=torch.uint8)

    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()  # [R, B]
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]  # [B, B]
        d = torch.diag(Hinv1)  # [B]
        if nm is None:
            k = n_pruned(rows * i2, sparsity) - n_pruned(rows * i1, sparsity)  # exact total
            mask1 = lowest_k_mask(W1.pow(2) / d.pow(2).reshape(1, -1), k)
        else:
            mask1 = torch.ones_like(W1, dtype=torch.bool)
        for i in range(count):
            col = i1 + i
            if nm is not None and i % nm[1] == 0:
                sl = slice(i, i + nm[1])
                mask1[:, sl] = nm_mask(W1[:, sl].pow(2) / d[sl].pow(2).reshape(1, -1), *nm)
            if gs is not None and col % gs == 0:  # fix this group's parameters now
                g1 = min(col + gs, cols)
                cur = torch.cat([W1[:, i:] * mask1[:, i:], W[:, i2:]], dim=1)[:, : g1 - col]
                s_g, z_g = compute_qparams(cur, spec)  # [R, 1]
                scale[:, col // gs] = s_g[:, 0]
                if zero is not None:
                    zero[:, col // gs] = z_g[:, 0].to(torch.uint8)
            wc = W1[:, i]  # [R]
            q = wc * mask1[:, i]
            if spec is not None:
                q = fake_quantize_columns(q.reshape(-1, 1), scale, zero, spec, col, cols).reshape(-1)
                q = q * mask1[:, i]
            Q1[:, i] = q
            err = (wc - q) / Hinv1[i, i]  # [R]
            W1[:, i:].sub_(err.reshape(-1, 1) * Hinv1[i, i:].reshape(1, -1))  # OBS update
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        mask[:, i1:i2] = mask1
        W[:, i2:].sub_(Err1 @ Hinv[i1:i2, i2:])  # lazy batch update of the later columns
    return PruneResult(weight=W, mask=mask, spec=spec, scale=scale, zero=zero)


def reconstruction_error(w: torch.Tensor, w_hat: torch.Tensor, H: torch.Tensor) -> float:
    """Layer-wise loss ``tr((W-Ŵ) H (W-Ŵ)ᵀ)`` = ``2/n·‖XWᵀ - XŴᵀ‖²`` for ``H = 2XᵀX/n``."""
    e = (w.to(torch.float64) - w_hat.to(torch.float64))
    return float(((e @ H.to(torch.float64)) * e).sum())


# =============================================================================================
# stages (plumbing: read stats, write modules)
# =============================================================================================
def _check_nm(ctx: BlockContext, rel: str, cfg: PruneConfig, cols: int) -> None:
    nm = cfg.nm
    if nm is not None and cols % nm[1]:
        raise SlimformerError(f"{cfg.METHOD}.pattern: {ctx.name}.{rel} has {cols} input columns, not a "
                              f"multiple of M={nm[1]} of pattern {cfg.pattern!r}")


def _weight(ctx: BlockContext, rel: str) -> tuple[nn.Module, torch.Tensor]:
    from slimformer.formats.linear import linear_weight

    mod = ctx.module(rel)
    return mod, linear_weight(mod).detach()


def apply_magnitude(ctx: BlockContext, cfg: MagnitudeConfig) -> None:
    from slimformer.formats.sparse import pack_pruned

    for rel, c in ctx.targets.items():
        mod, w = _weight(ctx, rel)
        _check_nm(ctx, rel, c, w.shape[1])
        mask = keep_mask(magnitude_scores(w), c.sparsity, c.nm, c.scope)
        ctx.replace(rel, pack_pruned(mod, w, mask))


def apply_wanda(ctx: BlockContext, cfg: WandaConfig) -> None:
    from slimformer.formats.sparse import pack_pruned

    for rel, c in ctx.targets.items():
        mod, w = _weight(ctx, rel)
        _check_nm(ctx, rel, c, w.shape[1])
        mask = keep_mask(wanda_scores(w, ctx.stats[rel]["channel_norm"]), c.sparsity, c.nm, c.scope)
        ctx.replace(rel, pack_pruned(mod, w, mask))


def apply_sparsegpt(ctx: BlockContext, cfg: SparseGPTConfig) -> None:
    from slimformer.formats.sparse import pack_pruned

    for rel, c in ctx.targets.items():
        mod, w = _weight(ctx, rel)
        _check_nm(ctx, rel, c, w.shape[1])
        r = sparsegpt_prune(w, ctx.stats[rel]["hessian"], c.sparsity, c.nm, c.block_size, c.dampening, c.spec())
        ctx.replace(rel, pack_pruned(mod, r.weight.to(w.dtype), r.mask, r.spec, r.scale, r.zero))


register_stage(StageMethod(name="magnitude", config_cls=MagnitudeConfig, apply=apply_magnitude,
                           about="magnitude pruning |W|, unstructured or N:M, sparse storage"))
register_stage(StageMethod(name="wanda", config_cls=WandaConfig, apply=apply_wanda,
                           observers=lambda cfg: ("channel_norm",),
                           about="Wanda pruning |W|*||X||, unstructured or N:M, sparse storage"))
register_stage(StageMethod(name="sparsegpt", config_cls=SparseGPTConfig, apply=apply_sparsegpt,
                           observers=lambda cfg: ("hessian",),
                           about="SparseGPT OBS pruning (+ optional joint quantization), sparse storage"))

__all__ = ["PruneConfig", "MagnitudeConfig", "WandaConfig", "SparseGPTConfig", "PruneResult",
           "inverse_hessian_cholesky", "sparsegpt_prune", "reconstruction_error"]

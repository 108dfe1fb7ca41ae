"""Automatic mixed precision: per-layer bit widths from a measured sensitivity under an
average-bits budget (Q-BERT / HAWQ style; survey §3.1).

Sensitivity of linear ``l`` at ``b`` bits is the Hessian-weighted quantization error

    e_l(b) = tr(ΔW H ΔWᵀ),   ΔW = W - Q_b(W),   H = 2 XᵀX / n  (the engine's ``hessian``)

which is the increase of the layer's summed squared output error, averaged over calibration
tokens (times 2), when ``W`` is rounded to ``b`` bits — the quantity GPTQ minimises, so it
ranks layers by how much their outputs really move. The allocation is the multiple-choice
knapsack

    minimise Σ_l e_l(b_l)   subject to   Σ_l n_l b_l ≤ avg_bits · Σ_l n_l,   b_l ∈ candidates

(``n_l`` = weights of layer ``l``; ``avg_bits`` counts code bits per weight, scales not
included), solved exactly by dynamic programming over the budget in units of the gcd of the
layer costs (:func:`allocate_bits`).

Two stages:

* ``hessian_sensitivity`` (block level): measures ``e_l(b)`` for every target and candidate
  on the engine's Hessians and changes nothing. It logs the table; Python callers pass a
  ``sink`` dict to receive it.
* ``mixed_precision`` (model level): runs one engine pass of ``hessian_sensitivity`` on the
  unquantized model (every layer's sensitivity is needed before any bit is chosen), allocates,
  and then runs the quantizer stage (``rtn`` by default, or any registered stage with
  ``bits``/``group_size``/``symmetric`` fields such as ``gptq``) with the chosen bits as
  per-module ``overrides`` — i.e. an ordinary recipe stage, which
  :func:`plan_mixed_precision` also returns for inspection or saving as YAML.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, ClassVar, Mapping, Optional, Sequence

import torch

from slimformer.engine.stage import (BlockContext, ModelContext, StageConfig, StageMethod, check_bool,
                                     check_float_range, check_int_range, register_stage)
from slimformer.errors import ConfigError

log = logging.getLogger(__name__)

# the quantizer's own fields that the mixed_precision stage sets (not allowed in quantizer_options)
_OWNED = ("bits", "group_size", "symmetric", "targets", "ignore", "overrides")
# most knapsack budget cells the exact DP may use before costs are coarsened (rounded up)
MAX_BUDGET_CELLS = 200_000


def _check_candidates(owner: str, cands: Any) -> tuple[int, ...]:
    if isinstance(cands, int) or not isinstance(cands, (list, tuple)) or not cands:
        raise ConfigError(f"{owner}.candidates: invalid value {cands!r}; allowed: a non-empty list "
                          "of distinct integers 2..8")
    for b in cands:
        check_int_range(owner, "candidates", b, 2, 8)
    if len(set(cands)) != len(cands):
        raise ConfigError(f"{owner}.candidates: duplicate bit widths in {list(cands)}; allowed: distinct "
                          "integers 2..8")
    return tuple(sorted(cands))


# ---------------------------------------------------------------------------------------------
# the math


def hessian_weighted_error(w: torch.Tensor, H: torch.Tensor, spec) -> float:
    """``tr(ΔW H ΔWᵀ)`` for ``ΔW = W - fake_quantize(W, spec)``; ``w`` [N, K], ``H`` [K, K]."""
    from slimformer.primitives.affine import fake_quantize

    w = w.detach().to(torch.float32)
    d = w - fake_quantize(w, spec)  # [N, K]
    return float(((d @ H.to(torch.float32)) * d).sum())


def allocate_bits(sizes: Sequence[int], errors: Sequence[Mapping[int, float]], avg_bits: float,
                  max_cells: int = MAX_BUDGET_CELLS) -> list[int]:
    """Bits per layer minimising ``Σ errors[l][b_l]`` with ``Σ sizes[l]·b_l ≤ avg_bits·Σ sizes``.

    Every layer offers the same candidate bit widths (the keys of ``errors[l]``). Costs are
    counted above the smallest candidate in units of the gcd of all ``sizes[l]·Δb``, so the
    dynamic programme is exact; if that would need more than ``max_cells`` budget cells, the
    unit is enlarged and costs are rounded UP (the budget still holds; the optimum may be
    missed by a little). Raises when even the smallest candidate exceeds the budget.
    """
    if len(sizes) != len(errors) or not sizes:
        raise ValueError("allocate_bits: need one error table per layer (and at least one layer)")
    cands = sorted(errors[0])
    if any(sorted(e) != cands for e in errors):
        raise ValueError("allocate_bits: every layer must offer the same candidate bit widths")
    total = sum(sizes)
    b0 = cands[0]
    spare = Fraction(str(avg_bits)) * total - b0 * total  # budget above "everything at b0"
    if spare < 0:
        raise ConfigError(f"mixed_precision.avg_bits: {avg_bits} is below the smallest candidate {b0}")
    costs = [[n * (b - b0) for b in cands] for n in sizes]  # exact integers
    unit = 0
    for row in costs:
        for c in row:
            unit = math.gcd(unit, c)
    if unit == 0:  # a single candidate
        return [b0] * len(sizes)
    cap = int(spare // unit)
    if cap > max_cells:  # coarsen: bigger unit, costs rounded up, capacity rounded down
        unit = unit * math.ceil(cap / max_cells)
        cap = int(spare // unit)
    cost_u = [[-(-c // unit) for c in row] for row in costs]  # ceil

    inf = float("inf")
    # best[c] = least total error of the layers so far with total cost <= c
    best = torch.zeros(cap + 1, dtype=torch.float64)
    choice = torch.zeros(len(sizes), cap + 1, dtype=torch.int8)
    for i, (row, err) in enumerate(zip(cost_u, errors)):
        nxt = torch.full((cap + 1,), inf, dtype=torch.float64)
        arg = torch.zeros(cap + 1, dtype=torch.int8)
        for j, (c, b) in enumerate(zip(row, cands)):
            if c > cap:
                continue
            cand = torch.full((cap + 1,), inf, dtype=torch.float64)
            cand[c:] = best[: cap + 1 - c] + float(err[b])
            better = cand < nxt
            nxt = torch.where(better, cand, nxt)
            arg[better] = j
        best, choice[i] = nxt, arg
    out: list[int] = []
    c = cap
    for i in range(len(sizes) - 1, -1, -1):
        j = int(choice[i, c])
        out.append(cands[j])
        c -= cost_u[i][j]
    out.reverse()
    return out


# ---------------------------------------------------------------------------------------------
# stage 1: measure (block level, changes nothing)


@dataclass(frozen=True)
class HessianSensitivityConfig(StageConfig):
    """Measure ``tr(ΔW H ΔWᵀ)`` of RTN at each of ``candidates`` bits (``group_size`` columns
    per scale, ``null`` = per channel; ``symmetric``) for every target; the model is left
    unchanged. ``sink`` (Python API only, never serialised): a dict that receives
    ``{module name: {"params": n, "errors": {bits: error}}}``."""

    METHOD: ClassVar[str] = "hessian_sensitivity"
    VERSION: ClassVar[int] = 1

    candidates: tuple[int, ...] = (2, 3, 4, 8)
    group_size: Optional[int] = 64
    symmetric: bool = True
    sink: Optional[dict] = field(default=None, compare=False, repr=False)

    def validate(self) -> None:
        object.__setattr__(self, "candidates", _check_candidates(self.METHOD, self.candidates))
        check_int_range(self.METHOD, "group_size", self.group_size, 1, allow_none=True)
        check_bool(self.METHOD, "symmetric", self.symmetric)
        if self.sink is not None and not isinstance(self.sink, dict):
            raise ConfigError(f"{self.METHOD}.sink: must be a dict or null (Python API only)")

    def spec(self, bits: int):
        from slimformer.quant.config import RTNConfig

        return RTNConfig(bits=bits, group_size=self.group_size, symmetric=self.symmetric).spec()

    def to_dict(self) -> dict:
        d = StageConfig.to_dict(dataclasses.replace(self, sink=None))
        d.pop("sink", None)
        return d


def apply_hessian_sensitivity(ctx: BlockContext, cfg: HessianSensitivityConfig) -> None:
    from slimformer.formats import linear_weight

    for rel, c in ctx.targets.items():
        w = linear_weight(ctx.module(rel))
        H = ctx.stats[rel]["hessian"]
        errs = {b: hessian_weighted_error(w, H, c.spec(b)) for b in c.candidates}
        name = f"{ctx.name}.{rel}" if ctx.name else rel
        log.info("sensitivity %s: %s", name, ", ".join(f"W{b} {e:.4g}" for b, e in errs.items()))
        if cfg.sink is not None:
            cfg.sink[name] = {"params": int(w.numel()), "errors": errs}


register_stage(StageMethod(
    name="hessian_sensitivity", config_cls=HessianSensitivityConfig, apply=apply_hessian_sensitivity,
    observers=lambda cfg: ("hessian",),
    about="measure each linear's Hessian-weighted RTN error per bit width (changes nothing)"))


# ---------------------------------------------------------------------------------------------
# stage 2: allocate and quantize (model level)


@dataclass(frozen=True)
class MixedPrecisionConfig(StageConfig):
    """Per-layer bits chosen from ``candidates`` so that the parameter-weighted average of code
    bits is at most ``avg_bits`` and the summed Hessian-weighted error is least; then
    ``quantizer`` (``rtn``, or a stage like ``gptq`` whose config has bits / group_size /
    symmetric) quantizes every target with its bits. ``quantizer_options``: further fields of
    the quantizer's config (e.g. ``{act_order: true}`` for gptq). ``group_size`` /
    ``symmetric`` apply to both the sensitivity and the quantizer. Per-module ``overrides``
    are not allowed: the stage chooses them."""

    METHOD: ClassVar[str] = "mixed_precision"
    VERSION: ClassVar[int] = 1

    avg_bits: float = 3.5
    candidates: tuple[int, ...] = (3, 4)
    group_size: Optional[int] = 64
    symmetric: bool = True
    quantizer: str = "rtn"
    quantizer_options: dict = field(default_factory=dict)

    def validate(self) -> None:
        o = self.METHOD
        object.__setattr__(self, "candidates", _check_candidates(o, self.candidates))
        check_float_range(o, "avg_bits", self.avg_bits, float(self.candidates[0]), float(self.candidates[-1]))
        check_int_range(o, "group_size", self.group_size, 1, allow_none=True)
        check_bool(o, "symmetric", self.symmetric)
        if self.overrides:
            raise ConfigError(f"{o}.overrides: not allowed; the stage chooses per-layer bits itself "
                              "(use targets / ignore to leave layers out)")
        if not isinstance(self.quantizer_options, dict):
            raise ConfigError(f"{o}.quantizer_options: must be a mapping of the quantizer's fields")
        bad = [k for k in self.quantizer_options if k in _OWNED]
        if bad:
            raise ConfigError(f"{o}.quantizer_options.{bad[0]}: set by mixed_precision itself; allowed: "
                              "other fields of the quantizer's config")
        from slimformer.engine.stage import stage_method

        try:
            qm = stage_method(self.quantizer)
        except ConfigError:
            from slimformer.engine.stage import STAGES

            ok = sorted(n for n, m in STAGES.items() if {"bits", "group_size", "symmetric"}
                        <= set(m.config_cls.field_names()) and not m.model_level)
            raise ConfigError(f"{o}.quantizer: unknown stage {self.quantizer!r}; allowed: "
                              + ", ".join(ok)) from None
        if qm.model_level or not {"bits", "group_size", "symmetric"} <= set(qm.config_cls.field_names()):
            raise ConfigError(f"{o}.quantizer: {self.quantizer!r} has no bits/group_size/symmetric "
                              "fields; allowed: a block-level weight quantizer such as 'rtn' or 'gptq'")
        self.quantizer_config({})  # the quantizer validates its own options here

    def to_dict(self) -> dict:
        # the base class copies dict fields as {pattern: {field: value}}; options are flat
        d = StageConfig.to_dict(dataclasses.replace(self, quantizer_options={}))
        d["quantizer_options"] = dict(self.quantizer_options)
        return d

    def quantizer_config(self, bits: Mapping[str, int]) -> StageConfig:
        """The quantizer stage with ``bits`` (full module name -> bits) as overrides; layers not
        named get the most common allocated width (the smallest candidate when empty)."""
        from slimformer.engine.stage import stage_method

        base = Counter(bits.values()).most_common(1)[0][0] if bits else self.candidates[0]
        d = {**self.quantizer_options, "bits": base, "group_size": self.group_size,
             "symmetric": self.symmetric, "targets": None if self.targets is None else list(self.targets),
             "ignore": list(self.ignore),
             "overrides": {n: {"bits": b} for n, b in bits.items() if b != base}}
        return stage_method(self.quantizer).config_cls.from_dict(d)

    def sensitivity_config(self, sink: Optional[dict] = None) -> HessianSensitivityConfig:
        return HessianSensitivityConfig(candidates=self.candidates, group_size=self.group_size,
                                        symmetric=self.symmetric, targets=self.targets,
                                        ignore=self.ignore, sink=sink)


@dataclass
class MixedPlan:
    """What :func:`plan_mixed_precision` decided: ``bits`` per module, the measured table
    (``params``, ``errors``), the achieved average and the quantizer stage to run."""

    bits: dict[str, int]
    params: dict[str, int]
    errors: dict[str, dict[int, float]]
    avg_bits: float
    quantizer: StageConfig

    def total_error(self, bits: Optional[Mapping[str, int]] = None) -> float:
        bits = self.bits if bits is None else bits
        return sum(self.errors[n][b] for n, b in bits.items())

    def summary(self) -> dict[str, Any]:
        return {"avg_bits": self.avg_bits, "layers_per_bits": dict(sorted(Counter(self.bits.values()).items())),
                "bits": dict(self.bits), "total_error": self.total_error()}

    def table(self) -> str:
        """One row per module: params, chosen bits, error at every candidate."""
        cands = sorted(next(iter(self.errors.values())))
        lines = ["| module | params | bits | " + " | ".join(f"err W{b}" for b in cands) + " |",
                 "|---|---|---|" + "---|" * len(cands)]
        for n, b in self.bits.items():
            lines.append(f"| {n} | {self.params[n]} | {b} | "
                         + " | ".join(f"{self.errors[n][c]:.4g}" for c in cands) + " |")
        return "\n".join(lines)


def plan_mixed_precision(lm, cfg: MixedPrecisionConfig, samples: torch.Tensor, options=None) -> MixedPlan:
    """Measure every target's sensitivity in one engine pass (the model is not changed) and
    allocate bits under ``cfg.avg_bits``."""
    from slimformer.engine.runner import run_blocks

    sink: dict = {}
    run_blocks(lm, [cfg.sensitivity_config(sink)], samples, options)
    names = list(sink)
    sizes = [sink[n]["params"] for n in names]
    errors = [sink[n]["errors"] for n in names]
    chosen = allocate_bits(sizes, errors, cfg.avg_bits)
    bits = dict(zip(names, chosen))
    avg = sum(n * b for n, b in zip(sizes, chosen)) / sum(sizes)
    return MixedPlan(bits=bits, params=dict(zip(names, sizes)), errors=dict(zip(names, errors)),
                     avg_bits=avg, quantizer=cfg.quantizer_config(bits))


def apply_mixed_precision(mctx: ModelContext, cfg: MixedPrecisionConfig) -> None:
    from slimformer.engine.runner import run_blocks

    lm = mctx.lm
    plan = plan_mixed_precision(lm, cfg, mctx.samples, mctx.options)
    log.info("mixed_precision: average %.4f bits (budget %s); layers per bits %s\n%s", plan.avg_bits,
             cfg.avg_bits, plan.summary()["layers_per_bits"], plan.table())
    lm.meta = {**(lm.meta or {}), "mixed_precision": plan.summary()}
    run_blocks(lm, [plan.quantizer], mctx.samples, mctx.options)


register_stage(StageMethod(
    name="mixed_precision", config_cls=MixedPrecisionConfig, apply=lambda ctx, cfg: None,
    apply_model=apply_mixed_precision, needs_samples=lambda cfg: True,
    about="per-layer bits from Hessian-weighted sensitivity under an average-bits budget, then rtn/gptq"))

__all__ = ["HessianSensitivityConfig", "MixedPrecisionConfig", "MixedPlan", "allocate_bits",
           "hessian_weighted_error", "plan_mixed_precision", "apply_mixed_precision"]

"""OmniQuant (Shao et al., 2024; survey §3.1): learn the quantization of a block by gradient
descent against the block's full-precision output.

Two sets of learnable parameters per transformer block, trained with Adam on
``MSE(block_q(X), block_fp(X))`` over the calibration inputs ``X`` the engine hands over
(the inputs the already-compressed previous blocks really produce):

* **LWC — learnable weight clipping.** Per quantization group of every target weight, the
  min/max that set the grid are shrunk by learnable factors ``gamma = sigmoid(g)`` (max) and
  ``beta = sigmoid(b)`` (min)::

      asymmetric:  hi = gamma * max(W_grp, 0),  lo = beta * min(W_grp, 0)
                   s = (hi - lo) / (2^b - 1),   z = round(-lo / s)
      symmetric:   s = gamma * absmax(W_grp) / ((2^b - 1) / 2)     (one factor: the grid is
                   symmetric, so only the absmax matters; beta is not used)
      W_q = s * (clamp(round(W / s) + z, qmin, qmax) - z)

  ``round`` passes gradients straight through (STE); ``gamma = beta = 1`` is exactly RTN
  (same primitive, same float operations). The logits start at ``init_logit`` (4 ->
  factor 0.982, the paper's initialisation).

* **LET — learnable equivalent transformation.** For every smoothing group of the
  architecture registry (a norm or linear producing the input of some linears, the same data
  SmoothQuant uses) a per-channel scale ``s`` (and, where the producer is a norm with a bias
  and every consumer has a bias, a shift ``delta``)::

      Y = X W^T + b = ((X - delta) / s) (W diag(s))^T + (b + W delta)

  which is exact in full precision; only the quantization error changes. ``s`` starts from
  SmoothQuant's ``act_absmax^alpha / weight_absmax^(1 - alpha)`` and is learned in log space
  (always positive); ``delta`` starts at the channel centre ``(min + max) / 2``. The final
  transform is folded into the producer (norm weight / linear rows) and the consumers'
  columns with SmoothQuant's own :func:`fold_smoothing`, so it costs nothing at run time.
  v -> o inside attention is not transformed on Llama (grouped-query attention: the registry
  has no exact group for it); architectures whose registry lists it (OPT, ViT, BERT) get it.

After training the transformed weights are quantized with the learned clipping by the
shared affine primitive and stored as packed :class:`~slimformer.formats.QuantLinear`
modules — the same format as RTN, so the result saves and loads like any RTN model.

The pure math (``lwc_qparams``, ``lwc_fake_quantize``, ``lwc_quantize``, ``let_weights``)
is separate from the stage plumbing (``apply_omniquant``); there is no calibration loop here:
the engine provides the block inputs (``needs_block_inputs``) and the LET initialisation's
activation statistics (the shared ``minmax`` observer).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import ClassVar, Iterator, Optional, Sequence

import torch
import torch.nn as nn

from slimformer.engine.stage import (BlockContext, StageConfig, StageMethod, check_bool,
                                     check_float_range, check_int_range, register_stage)
from slimformer.errors import ConfigError, SlimformerError
from slimformer.primitives.affine import (QuantizedTensor, QuantSpec, _positive, _reduce,
                                          expand_groups, quantize)

log = logging.getLogger(__name__)

# fields a per-module override may change (the training settings are per block)
PER_MODULE_FIELDS = ("bits", "group_size", "symmetric")


@dataclass(frozen=True)
class OmniQuantConfig(StageConfig):
    """OmniQuant weight-only quantization (integer grid, packed like RTN).

    ``bits`` 2..8, ``group_size`` (columns per scale; partial last group allowed; ``null``:
    one scale per output channel), ``symmetric`` — the grid, as in ``rtn``.
    ``lwc`` / ``let``: learn the clipping / the equivalent transformation (at least one).
    ``let_alpha``: SmoothQuant migration strength that initialises the LET scales.
    ``epochs``: passes over the training samples per block (0: no training, the initial
    parameters are used). ``samples``: calibration sequences used for training (the first
    ones the engine hands over; fewer than the paper's 128 so a CPU run stays short).
    ``batch_size``: sequences per Adam step. ``lr_lwc`` / ``lr_let``: Adam learning rates.
    ``init_logit``: initial clipping logit (sigmoid(4) = 0.982).
    """

    METHOD: ClassVar[str] = "omniquant"
    VERSION: ClassVar[int] = 1

    bits: int = 4
    group_size: Optional[int] = 64
    symmetric: bool = True
    lwc: bool = True
    let: bool = True
    let_alpha: float = 0.5
    epochs: int = 2
    samples: int = 16
    batch_size: int = 1
    lr_lwc: float = 5e-2
    lr_let: float = 2e-2
    init_logit: float = 4.0

    def validate(self) -> None:
        m = self.METHOD
        check_int_range(m, "bits", self.bits, 2, 8)
        check_int_range(m, "group_size", self.group_size, 1, allow_none=True)
        check_bool(m, "symmetric", self.symmetric)
        check_bool(m, "lwc", self.lwc)
        check_bool(m, "let", self.let)
        if not (self.lwc or self.let):
            raise ConfigError(f"{m}.lwc: invalid value False with let False; allowed: at least one of "
                              "lwc, let true (with neither, use rtn)")
        check_float_range(m, "let_alpha", self.let_alpha, 0.0, 1.0)
        check_int_range(m, "epochs", self.epochs, 0, 1000)
        check_int_range(m, "samples", self.samples, 1)
        check_int_range(m, "batch_size", self.batch_size, 1)
        check_float_range(m, "lr_lwc", self.lr_lwc, 0.0, 1.0)
        check_float_range(m, "lr_let", self.lr_let, 0.0, 1.0)
        check_float_range(m, "init_logit", self.init_logit, -20.0, 20.0)
        for pat, over in self.overrides.items():
            for k in over:
                if k not in PER_MODULE_FIELDS:
                    raise ConfigError(f"{m}.overrides[{pat!r}].{k}: not a per-module field; allowed: "
                                      + ", ".join(PER_MODULE_FIELDS))

    def spec(self) -> QuantSpec:
        if self.group_size is None:
            return QuantSpec(bits=self.bits, symmetric=self.symmetric, granularity="channel")
        return QuantSpec(bits=self.bits, symmetric=self.symmetric, granularity="group",
                         group_size=self.group_size)


# ---------------------------------------------------------------------------------------------
# LWC: the math (pure functions, differentiable in the clipping factors)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` forward, identity backward (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def lwc_qparams(w: torch.Tensor, gamma: Optional[torch.Tensor], beta: Optional[torch.Tensor],
                spec: QuantSpec) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Scale and zero point of ``w`` [rows, cols] with the group max/min shrunk by ``gamma``
    / ``beta`` ([rows, n_groups] in (0, 1]; ``None`` means 1). The zero point is a float
    holding an integer (STE-rounded), ``None`` when symmetric. With factors 1 this is
    :func:`~slimformer.primitives.affine.compute_qparams` operation for operation."""
    if spec.format != "int" or spec.granularity == "tensor":
        raise ValueError(f"LWC supports integer channel/group grids, got {spec}")
    lo, hi = _reduce(w.to(torch.float32), spec)  # [rows, n_groups] each
    if spec.symmetric:
        amax = torch.maximum(lo.abs(), hi.abs())
        if gamma is not None:
            amax = amax * gamma
        return _positive(amax / ((spec.qmax - spec.qmin) / 2.0)), None
    lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
    if gamma is not None:
        hi = hi * gamma
    if beta is not None:
        lo = lo * beta
    scale = _positive((hi - lo) / spec.qmax)
    zero = round_ste(-lo / scale).clamp(0, spec.qmax)
    return scale, zero


def lwc_fake_quantize(w: torch.Tensor, gamma: Optional[torch.Tensor], beta: Optional[torch.Tensor],
                      spec: QuantSpec) -> torch.Tensor:
    """Differentiable quantize-dequantize of ``w`` [rows, cols] on the LWC grid (fp32).

    Same float operations as ``quantize_values`` + ``dequantize_values`` of the affine
    primitive, with ``round`` replaced by :func:`round_ste`; partial last groups use the
    primitive's group layout (``expand_groups``)."""
    w = w.to(torch.float32)
    cols = w.shape[1]
    scale, zero = lwc_qparams(w, gamma, beta, spec)
    s = expand_groups(scale, cols, spec)  # [rows, cols]
    q = round_ste(w / s)
    if zero is None:
        return q.clamp(spec.qmin, spec.qmax) * s
    z = expand_groups(zero, cols, spec)
    return ((q + z).clamp(spec.qmin, spec.qmax) - z) * s


def lwc_quantize(w: torch.Tensor, gamma: Optional[torch.Tensor], beta: Optional[torch.Tensor],
                 spec: QuantSpec) -> QuantizedTensor:
    """The canonical quantized tensor (integer codes + scales) of ``w`` with the learned
    clipping; dequantizes to exactly :func:`lwc_fake_quantize`'s values."""
    with torch.no_grad():
        scale, zero = lwc_qparams(w, gamma, beta, spec)
        return quantize(w.detach(), spec, scale=scale.detach(),
                        zero=None if zero is None else zero.detach().to(torch.uint8))


# ---------------------------------------------------------------------------------------------
# LET: the math (pure: a dict of tensors in, a dict out)


@dataclass(frozen=True)
class LetGroup:
    """One producer -> consumers group (names relative to the block)."""

    prev: str
    linears: tuple[str, ...]
    prev_is_linear: bool
    shift: bool  # producer is a norm with a bias and every consumer has a bias


def let_weights(weights: dict[str, torch.Tensor], groups: Sequence[LetGroup],
                log_scales: Sequence[torch.Tensor], shifts: Sequence[Optional[torch.Tensor]]
                ) -> dict[str, torch.Tensor]:
    """Apply the equivalent transformations to the block's tensors.

    ``weights`` maps ``"<module>.weight"`` (linears as [out, in]; norms as [C]) and
    ``"<module>.bias"`` to fp32 tensors; groups are applied in order (a linear may be the
    consumer of one group and the producer of the next: up_proj). Returns a new dict; exact
    in full precision, and the same operations as :func:`fold_smoothing` (plus the shift)."""
    cur = dict(weights)
    for g, ls, d in zip(groups, log_scales, shifts):
        s = ls.exp()
        for c in g.linears:
            w = cur[c + ".weight"]
            if d is not None:  # (X - d) W^T + b'  ==  X W^T + b   with  b' = b + W d
                cur[c + ".bias"] = cur[c + ".bias"] + w @ d
            cur[c + ".weight"] = w * s.unsqueeze(0)
        pw = g.prev + ".weight"
        cur[pw] = cur[pw] / s.unsqueeze(1) if g.prev_is_linear else cur[pw] / s
        pb = g.prev + ".bias"
        if pb in cur:
            cur[pb] = ((cur[pb] - d) if d is not None else cur[pb]) / s
    return cur


# ---------------------------------------------------------------------------------------------
# plumbing: one block's learnable state


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


class _BlockProblem:
    """The block's fp32 tensors, the learnable LWC/LET parameters and a differentiable
    forward of the block with them (``torch.func.functional_call``: no module is mutated
    while training)."""

    def __init__(self, ctx: BlockContext, cfg: OmniQuantConfig, groups: list) -> None:
        from slimformer.engine.targets import is_linear
        from slimformer.formats import linear_weight
        from slimformer.quant.smoothquant import act_absmax_from_minmax, smooth_scales, weight_column_absmax

        self.ctx = ctx
        self.specs = {rel: c.spec() for rel, c in ctx.targets.items()}
        self.conv1d: set[str] = set()
        base: dict[str, torch.Tensor] = {}  # "<module>.weight" ([out, in] for linears) / ".bias"

        def add(rel: str, m: nn.Module) -> None:
            if rel + ".weight" in base:
                return
            lin = is_linear(m)
            base[rel + ".weight"] = (linear_weight(m) if lin else m.weight).detach().to(torch.float32)
            if getattr(m, "bias", None) is not None:
                base[rel + ".bias"] = m.bias.detach().to(torch.float32)
            if lin and _is_conv1d(m):
                self.conv1d.add(rel)

        for rel in ctx.targets:
            add(rel, ctx.module(rel))
        # LET groups: (group, producer, consumers) from the shared SmoothQuant helper
        self.groups: list[LetGroup] = []
        self.log_scales: list[torch.Tensor] = []
        self.shifts: list[Optional[torch.Tensor]] = []
        for g, prev, consumers in groups:
            prev_lin = is_linear(prev)
            add(g.prev, prev)
            mm = ctx.stats[g.linears[0]]["minmax"]
            s0 = smooth_scales(act_absmax_from_minmax(mm), weight_column_absmax(consumers), cfg.let_alpha)
            shift = (not prev_lin and getattr(prev, "bias", None) is not None
                     and all(getattr(c, "bias", None) is not None for c in consumers))
            self.groups.append(LetGroup(g.prev, tuple(g.linears), prev_lin, shift))
            self.log_scales.append(nn.Parameter(s0.log()))
            self.shifts.append(nn.Parameter(((mm["min"] + mm["max"]) / 2).float()) if shift else None)
        self.base = base
        # LWC logits, one per quantization group of every target
        self.gammas: dict[str, Optional[torch.Tensor]] = {}
        self.betas: dict[str, Optional[torch.Tensor]] = {}
        for rel, spec in self.specs.items():
            rows, cols = base[rel + ".weight"].shape
            shape = (rows, spec.n_groups(cols))
            on = cfg.lwc
            self.gammas[rel] = nn.Parameter(torch.full(shape, float(cfg.init_logit))) if on else None
            self.betas[rel] = (nn.Parameter(torch.full(shape, float(cfg.init_logit)))
                               if on and not spec.symmetric else None)

    # ---- parameters --------------------------------------------------------------------------
    def lwc_parameters(self) -> list[torch.Tensor]:
        return [p for p in list(self.gammas.values()) + list(self.betas.values()) if p is not None]

    def let_parameters(self) -> list[torch.Tensor]:
        return list(self.log_scales) + [d for d in self.shifts if d is not None]

    def factors(self, rel: str) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        g, b = self.gammas[rel], self.betas[rel]
        return (None if g is None else torch.sigmoid(g)), (None if b is None else torch.sigmoid(b))

    # ---- the transformed, fake-quantized block ------------------------------------------------
    def tensors(self, quant: bool = True, transform: bool = True, clip: bool = True
                ) -> dict[str, torch.Tensor]:
        """Parameter name -> tensor for ``functional_call``: the LET transform (``transform``),
        then fake quantization (``quant``) with the learned clipping (``clip``; without it the
        plain RTN grid). ``transform=False, clip=False`` is RTN."""
        cur = let_weights(self.base, self.groups, self.log_scales, self.shifts) if transform else dict(self.base)
        out = {}
        for key, t in cur.items():
            rel, _, kind = key.rpartition(".")
            if kind == "weight" and rel in self.specs and quant:
                t = lwc_fake_quantize(t, *(self.factors(rel) if clip else (None, None)), self.specs[rel])
            if kind == "weight" and rel in self.conv1d:
                t = t.t()  # HF Conv1D stores [in, out]
            out[key] = t
        return out

    def forward(self, params: dict[str, torch.Tensor], args: tuple, kwargs: dict) -> torch.Tensor:
        out = torch.func.functional_call(self.ctx.block, params, args, kwargs, strict=False)
        return out[0] if isinstance(out, (tuple, list)) else out

    # ---- the result ---------------------------------------------------------------------------
    def reset_to_rtn(self) -> None:
        """Drop the learned parameters: no transformation, clipping factors 1 (plain RTN)."""
        self.groups, self.log_scales, self.shifts = [], [], []
        self.gammas = {rel: None for rel in self.gammas}
        self.betas = {rel: None for rel in self.betas}

    def fold_let(self) -> None:
        """Write the learned LET into the block's modules (shift into the biases, then
        SmoothQuant's fold of the scales): the fp32 block is unchanged up to rounding."""
        from slimformer.formats import linear_weight
        from slimformer.quant.smoothquant import fold_smoothing

        ctx = self.ctx
        with torch.no_grad():
            for g, ls, d in zip(self.groups, self.log_scales, self.shifts):
                prev = ctx.module(g.prev)
                consumers = [ctx.module(c) for c in g.linears]
                if d is not None:
                    d = d.detach()
                    for c in consumers:
                        c.bias.data.add_(linear_weight(c).detach().float() @ d)
                    prev.bias.data.sub_(d)
                fold_smoothing(prev, consumers, ls.detach().exp())

    def pack(self) -> None:
        """Replace every target by a packed QuantLinear with the learned clipping."""
        from slimformer.formats import QuantLinear, linear_weight

        for rel, spec in self.specs.items():
            m = self.ctx.module(rel)
            gamma, beta = self.factors(rel)
            qt = lwc_quantize(linear_weight(m).detach().float(), gamma, beta, spec)
            self.ctx.replace(rel, QuantLinear.from_quantized(qt, getattr(m, "bias", None)))


# ---------------------------------------------------------------------------------------------
# calibration batches


def _batch_size(args: tuple, kwargs: dict) -> int:
    for t in list(args) + list(kwargs.values()):
        if isinstance(t, torch.Tensor) and t.dim() == 3:
            return t.shape[0]
    raise SlimformerError("omniquant: cannot find the hidden states among the block inputs")


def _slice(x, n: int, i: int, j: int):
    """``x[i:j]`` along the batch dim for tensors (and tuples of tensors) of batch size ``n``."""
    if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == n:
        return x[i:j]
    if isinstance(x, (tuple, list)):
        return type(x)(_slice(v, n, i, j) for v in x)
    return x


def microbatches(forward_inputs, samples: int, batch_size: int) -> list[tuple[tuple, dict]]:
    """The first ``samples`` calibration sequences, in steps of ``batch_size`` sequences
    (engine batches are sliced along the batch dim; per-batch tensors shared by all
    sequences, e.g. rotary tables of batch 1, are kept whole)."""
    out: list[tuple[tuple, dict]] = []
    left = samples
    for args, kwargs in forward_inputs():
        n = _batch_size(args, kwargs)
        for i in range(0, n, batch_size):
            j = min(n, i + batch_size, i + left)
            if n == 1 or (i == 0 and j == n):
                out.append((args, kwargs))
            else:
                out.append((_slice(args, n, i, j), {k: _slice(v, n, i, j) for k, v in kwargs.items()}))
            left -= j - i
            if left <= 0:
                return out
    return out


# ---------------------------------------------------------------------------------------------
# the stage


def _mse(problem: _BlockProblem, params: dict, batches, targets) -> float:
    with torch.no_grad():
        tot = sum(float(torch.nn.functional.mse_loss(problem.forward(params, a, kw), y))
                  for (a, kw), y in zip(batches, targets))
    return tot / max(1, len(targets))


# the before/after error is measured on the first few training sequences only (a diagnostic
# for the log and the benchmarks; the whole set would cost two more passes per block)
DIAG_SEQUENCES = 4


def train_block(problem: _BlockProblem, batches: list, targets: list, cfg: OmniQuantConfig,
                name: str = "") -> dict[str, float]:
    """Adam on MSE(quantized block output, fp block output); returns the mean block-output
    MSE on the first ``DIAG_SEQUENCES`` training sequences (``rtn``: the plain RTN grid,
    ``trained``: after training)."""
    k, seen = 0, 0
    while k < len(batches) and seen < DIAG_SEQUENCES:
        seen += _batch_size(*batches[k])
        k += 1
    diag_b, diag_y = batches[:k], targets[:k]
    losses = {"rtn": _mse(problem, problem.tensors(transform=False, clip=False), diag_b, diag_y)}
    groups = []
    if problem.lwc_parameters():
        groups.append({"params": problem.lwc_parameters(), "lr": cfg.lr_lwc})
    if problem.let_parameters():
        groups.append({"params": problem.let_parameters(), "lr": cfg.lr_let})
    if cfg.epochs and groups:
        opt = torch.optim.Adam(groups)
        with torch.enable_grad():
            for epoch in range(cfg.epochs):
                tot = 0.0
                for (a, kw), y in zip(batches, targets):
                    opt.zero_grad(set_to_none=True)
                    loss = torch.nn.functional.mse_loss(problem.forward(problem.tensors(), a, kw), y)
                    if not torch.isfinite(loss):
                        raise SlimformerError(f"omniquant: loss became {float(loss)} in {name} "
                                              f"(epoch {epoch}); lower lr_lwc / lr_let")
                    loss.backward()
                    opt.step()
                    tot += loss.item()
                log.info("omniquant %s epoch %d/%d: train mse %.4g", name, epoch + 1, cfg.epochs,
                         tot / len(batches))
    losses["trained"] = _mse(problem, problem.tensors(), diag_b, diag_y)
    return losses


def apply_omniquant(ctx: BlockContext, cfg: OmniQuantConfig) -> None:
    from slimformer.engine.targets import is_linear
    from slimformer.quant.smoothquant import check_smooth_requires, smoothable_groups

    if ctx.forward_inputs is None:
        raise SlimformerError("omniquant: needs calibration data (block inputs)")
    if ctx.index < 0:
        raise SlimformerError("omniquant: targets outside the transformer blocks are not supported")
    for rel in ctx.targets:
        if not is_linear(ctx.module(rel)):
            raise SlimformerError(f"omniquant: {ctx.name}.{rel} is already quantized; put omniquant "
                                  "first (it quantizes by itself)")
    t0 = time.perf_counter()
    groups = []
    if cfg.let and ctx.arch.smooth_groups:
        check_smooth_requires(ctx, "omniquant")
        groups = smoothable_groups(ctx, "omniquant")
    batches = microbatches(ctx.forward_inputs, cfg.samples, cfg.batch_size)
    # the target: the full-precision block on the inputs the compressed model really produces
    with torch.no_grad():
        targets = [ctx.run_block(a, kw).detach() for a, kw in batches]
    problem = _BlockProblem(ctx, cfg, groups)
    frozen = [(p, p.requires_grad) for p in ctx.block.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    try:
        losses = train_block(problem, batches, targets, cfg, ctx.name)
    finally:
        for p, rg in frozen:
            p.requires_grad_(rg)
    kept_rtn = not losses["trained"] < losses["rtn"]
    if kept_rtn:  # a short training run can end worse than plain rounding: never ship that
        problem.reset_to_rtn()
    problem.fold_let()
    problem.pack()
    secs = time.perf_counter() - t0
    # ``extra``: benchmarks read the numbers from the record (block, losses, seconds)
    log.info("omniquant %s: block output mse rtn %.4g, trained %.4g (%.3fx rtn)%s, %d LET groups, "
             "%d training sequences, %.1fs", ctx.name, losses["rtn"], losses["trained"],
             losses["trained"] / losses["rtn"] if losses["rtn"] > 0 else math.nan,
             " -> not better: block kept at RTN" if kept_rtn else "", len(problem.groups),
             sum(_batch_size(a, kw) for a, kw in batches), secs,
             extra={"omniquant": {"block": ctx.name, **losses, "kept_rtn": kept_rtn, "seconds": secs}})


def _observers(cfg: OmniQuantConfig) -> tuple[str, ...]:
    # LET starts from SmoothQuant's scales: per-channel abs-max of each consumer's input
    return ("minmax",) if cfg.let else ()


register_stage(StageMethod(
    name="omniquant", config_cls=OmniQuantConfig, apply=apply_omniquant, observers=_observers,
    needs_block_inputs=lambda cfg: True,
    about="OmniQuant: learnable weight clipping + equivalent transformation, trained block by block"))

__all__ = ["OmniQuantConfig", "LetGroup", "round_ste", "lwc_qparams", "lwc_fake_quantize",
           "lwc_quantize", "let_weights", "microbatches", "train_block", "apply_omniquant"]

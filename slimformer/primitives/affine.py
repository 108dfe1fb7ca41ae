"""Affine quantization (survey §3.1, Eq. 4) and the value formats NF4 and FP8-e4m3.

One primitive parameterised by granularity serves every method (RTN, GPTQ, AWQ, W8A8, ...):

    x_int   = clamp(round(x / s) + z, qmin, qmax)        (Eq. 4)
    x_quant = s * (x_int - z)

Layout conventions (used everywhere in slimformer):

* A weight ``w`` is quantized along its LAST dim (the input features of an ``nn.Linear``
  weight ``[out, in]``); leading dims are flattened to rows: ``w2 = w.reshape(-1, cols)``.
* ``scale`` and ``zero`` are always 2-D ``[rows | 1, n_groups]`` so they broadcast the same way
  for every granularity:

  ============  ======================  =========================================
  granularity   scale / zero shape      group of columns
  ============  ======================  =========================================
  tensor        [1, 1]                  all
  channel       [rows, 1]               all columns of a row (per output channel)
  token         [rows, 1]               same as channel; the name used for activations
  group         [rows, ceil(cols/g)]    columns [k*g, (k+1)*g); the last may be partial
  ============  ======================  =========================================

* ``int`` codes: symmetric -> ``int8`` in ``[-2^(b-1), 2^(b-1)-1]`` and ``zero is None``;
  asymmetric -> ``uint8`` in ``[0, 2^b-1]`` with an integer ``uint8`` zero point.
  ``nf4`` codes -> ``uint8`` indices into :data:`NF4_CODEBOOK`; ``fp8_e4m3`` codes -> the
  ``uint8`` bit patterns of ``torch.float8_e4m3fn`` values. Codes are unpacked (one per byte);
  packing is a separate step (:mod:`slimformer.primitives.packing`).
* Scales are exact float32 min/max scales. They are NOT rounded to a 2-byte type: SmolLM2's
  baseline weights come from a Q4_1 GGUF and sit on a 4-bit grid, so many ``w / s`` land
  exactly on rounding ties; a scale rounded up to bfloat16 (an earlier design) turned every
  tie into a round-toward-zero, a systematic shrink that cost +9% WikiText-2 PPL for RTN W4
  g64 (23.1 vs 21.1 on one window). A format may still store a scale in 2 bytes when it is
  exactly representable (``is_bf16_exact``), which keeps :func:`dequantize` bit for bit.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Optional

import torch

from slimformer.errors import ConfigError

GRANULARITIES = ("tensor", "channel", "group", "token")
FORMATS = ("int", "nf4", "fp8_e4m3")

# QLoRA (Dettmers et al. 2023, App. E): the 16 quantiles of N(0, 1) normalised to [-1, 1], with
# an exact zero. Indices 0..15 are the 4-bit codes.
NF4_CODEBOOK = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)

FP8_E4M3_MAX = 448.0  # largest finite torch.float8_e4m3fn
_SCALE_TINY = 2.0 ** -100  # floor of every scale (an all-zero group quantizes to code 0)
_SCALE_MAX = 2.0 ** 100
DOUBLE_QUANT_BLOCK = 256  # QLoRA: second-level quantization of the NF4 scales in blocks of 256


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized. Validated at construction; serializable with to_dict().

    bits:        2..8 for ``int``; ``nf4`` needs 4 and ``fp8_e4m3`` needs 8.
    symmetric:   zero point fixed at 0 (signed codes) or a per-group integer zero point.
    granularity: "tensor" | "channel" | "group" | "token" (see the module docstring).
    group_size:  columns per group when granularity == "group"; need not divide the row.
    format:      "int" (affine integers) | "nf4" (QLoRA codebook, absmax scale) |
                 "fp8_e4m3" (float8 values with an absmax scale to 448).
    double_quant: nf4 only: store the per-group scales themselves quantized to int8 in blocks
                 of 256 (QLoRA's double quantization); the scale used is the dequantized one.
    """

    bits: int = 4
    symmetric: bool = True
    granularity: str = "group"
    group_size: int = 128
    format: str = "int"
    double_quant: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ConfigError(f"QuantSpec.bits must be an integer in 2..8, got {self.bits!r}")
        if not isinstance(self.symmetric, bool):
            raise ConfigError(f"QuantSpec.symmetric must be true or false, got {self.symmetric!r}")
        if self.granularity not in GRANULARITIES:
            raise ConfigError(f"QuantSpec.granularity must be one of {', '.join(GRANULARITIES)}; "
                              f"got {self.granularity!r}")
        if (isinstance(self.group_size, bool) or not isinstance(self.group_size, int)
                or self.group_size <= 0):
            raise ConfigError(f"QuantSpec.group_size must be a positive integer, got {self.group_size!r}")
        if self.format not in FORMATS:
            raise ConfigError(f"QuantSpec.format must be one of {', '.join(FORMATS)}; got {self.format!r}")
        if self.format == "nf4":
            if self.bits != 4:
                raise ConfigError(f"QuantSpec.bits must be 4 for format 'nf4', got {self.bits}")
            if not self.symmetric:
                raise ConfigError("QuantSpec.symmetric must be true for format 'nf4' (absmax scaling)")
        if self.format == "fp8_e4m3":
            if self.bits != 8:
                raise ConfigError(f"QuantSpec.bits must be 8 for format 'fp8_e4m3', got {self.bits}")
            if not self.symmetric:
                raise ConfigError("QuantSpec.symmetric must be true for format 'fp8_e4m3'")
        if self.double_quant and self.format != "nf4":
            raise ConfigError(f"QuantSpec.double_quant is only for format 'nf4', not {self.format!r}")

    # integer code range (for "int"; nf4/fp8 codes are indices / bit patterns)
    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.symmetric else (1 << self.bits) - 1

    @property
    def code_dtype(self) -> torch.dtype:
        return torch.int8 if (self.format == "int" and self.symmetric) else torch.uint8

    def n_groups(self, cols: int) -> int:
        """Number of scale columns for a row of ``cols`` values."""
        return math.ceil(cols / self.group_size) if self.granularity == "group" else 1

    def group_width(self, cols: int) -> int:
        """Columns covered by one scale (the last group may be shorter)."""
        return self.group_size if self.granularity == "group" else cols

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantSpec":
        if not isinstance(d, dict):
            raise ConfigError(f"QuantSpec must be a mapping, got {type(d).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"QuantSpec has no field {unknown[0]!r}; fields: {', '.join(sorted(known))}")
        return cls(**d)


@dataclass
class QuantizedTensor:
    """The canonical result of quantizing one tensor (unpacked codes + parameters).

    codes: [rows, cols] integer codes (dtype ``spec.code_dtype``), one per byte.
    scale: [rows | 1, n_groups] float32.
    zero:  [rows | 1, n_groups] uint8 integer zero points, or None when symmetric.
    shape: the original tensor shape (rows = prod(shape[:-1]), cols = shape[-1]).
    dq_scale: for nf4 + double_quant, the second-level representation of ``scale``
        (``{"codes": int8, "absmax": float32, "offset": float32}``) that reproduces it exactly.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: Optional[torch.Tensor]
    spec: QuantSpec
    shape: tuple[int, ...]
    dq_scale: Optional[dict[str, torch.Tensor]] = field(default=None)

    @property
    def rows(self) -> int:
        return self.codes.shape[0]

    @property
    def cols(self) -> int:
        return self.codes.shape[1]


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _as_rows(w: torch.Tensor) -> torch.Tensor:
    """[..., cols] -> [rows, cols] float32."""
    if w.dim() == 0:
        raise ConfigError("cannot quantize a 0-d tensor")
    return w.reshape(-1, w.shape[-1]).to(torch.float32)


def _check_finite(w: torch.Tensor, name: str = "tensor") -> None:
    if not torch.isfinite(w).all():
        from slimformer.errors import SlimformerError

        raise SlimformerError(f"{name} contains NaN or inf; cannot quantize it")


def _group_view(w2: torch.Tensor, g: int) -> torch.Tensor:
    """[rows, cols] -> [rows, n_groups, g], zero-padding a partial last group.

    Zero padding is harmless for min/max statistics because the ranges below always include 0.
    """
    rows, cols = w2.shape
    n = math.ceil(cols / g)
    pad = n * g - cols
    if pad:
        w2 = torch.nn.functional.pad(w2, (0, pad))
    return w2.reshape(rows, n, g)


def _positive(scale: torch.Tensor) -> torch.Tensor:
    """float32 scale kept in [tiny, max] so an all-zero group never divides by zero."""
    return scale.to(torch.float32).clamp(_SCALE_TINY, _SCALE_MAX)


def round_scale(scale: torch.Tensor) -> torch.Tensor:
    """Round a positive scale UP to the next bfloat16 value (kept as float32).

    Every value then survives a bfloat16 round trip exactly, so compressed formats store scales
    in 2 bytes (and PyTorch's int4 CPU kernel, which takes bfloat16 scales, uses them as they
    are) without changing a single dequantized value. bfloat16 keeps float32's exponent range,
    so tiny scales are not flushed. Rounding up (never down) means the range the scale was
    computed for is still covered: no extra clipping; the grid gets at most 2^-8 coarser.
    """
    s = scale.to(torch.float32).clamp(_SCALE_TINY, _SCALE_MAX)
    h = s.to(torch.bfloat16)
    up = torch.nextafter(h, torch.full_like(h, float("inf")))
    h = torch.where(h.to(torch.float32) < s, up, h)
    return h.to(torch.float32)


def is_bf16_exact(t: torch.Tensor) -> bool:
    """True if every value of ``t`` survives a bfloat16 round trip."""
    return bool(torch.equal(t.to(torch.bfloat16).to(t.dtype), t))


def expand_groups(p: torch.Tensor, cols: int, spec: QuantSpec, start: int = 0,
                  stop: Optional[int] = None) -> torch.Tensor:
    """Per-group parameters [r, n_groups] -> per-column [r, stop-start] for columns start:stop.

    This is what GPTQ needs to quantize a column block with group scales fixed earlier.
    """
    stop = cols if stop is None else stop
    if spec.granularity != "group":
        return p[:, :1].expand(p.shape[0], stop - start)
    idx = torch.arange(start, stop, device=p.device) // spec.group_size  # [k]
    return p[:, idx]


def group_index(cols: int, spec: QuantSpec) -> torch.Tensor:
    """[cols] long: the scale column used by each input column."""
    if spec.granularity != "group":
        return torch.zeros(cols, dtype=torch.long)
    return torch.arange(cols) // spec.group_size


# ---------------------------------------------------------------------------------------------
# parameters
# ---------------------------------------------------------------------------------------------
def _reduce(w2: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) per quantization group, each [rows | 1, n_groups]."""
    if spec.granularity == "tensor":
        return w2.min().reshape(1, 1), w2.max().reshape(1, 1)
    if spec.granularity in ("channel", "token"):
        return w2.amin(dim=1, keepdim=True), w2.amax(dim=1, keepdim=True)
    gv = _group_view(w2, spec.group_size)  # [rows, n, g]
    return gv.amin(dim=2), gv.amax(dim=2)


def compute_qparams(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Min/max quantization parameters of ``w`` along its last dim.

    Returns ``(scale [rows|1, n_groups] float32, zero [rows|1, n_groups] uint8 | None)``.

    * int, symmetric: ``s = absmax / ((2^b - 1) / 2)`` -- the half-step wider grid uses all
      2^b codes ([-8, 7] for 4 bits) instead of wasting -8; the largest magnitude rounds to
      +-(2^(b-1) - 1/2) and is clamped by at most s/2, the same bound as any rounding error.
    * int, asymmetric: the range is widened to include 0 (so 0 and zero padding are exact),
      ``s = (max - min) / (2^b - 1)``, ``z = round(-min / s)``.
    * nf4: ``s = absmax`` (codes index a codebook on [-1, 1]); with double_quant,
      :func:`quantize` replaces it by its reconstruction from the int8 second level.
    * fp8_e4m3: ``s = absmax / 448``.
    """
    w2 = _as_rows(w)
    _check_finite(w2)
    lo, hi = _reduce(w2, spec)
    if spec.format == "int" and not spec.symmetric:
        lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
        scale = _positive((hi - lo) / spec.qmax)
        zero = torch.round(-lo / scale).clamp(0, spec.qmax).to(torch.uint8)
        return scale, zero
    amax = torch.maximum(lo.abs(), hi.abs())
    if spec.format == "int":
        scale = amax / ((spec.qmax - spec.qmin) / 2.0)
    elif spec.format == "nf4":
        scale = amax
    else:
        scale = amax / FP8_E4M3_MAX
    return _positive(scale), None


def quantize_scales(scale: torch.Tensor, block: int = DOUBLE_QUANT_BLOCK) -> dict[str, torch.Tensor]:
    """QLoRA double quantization: scales [r, n] -> int8 codes + per-256-block absmax + mean.

    The scales are positive and cluster around their mean, so they are centred first
    (``offset``) and the residual is quantized symmetrically to int8 in blocks of ``block``
    (flattened row-major). QLoRA uses an 8-bit float map here; a linear int8 grid is simpler
    and the reconstructed scale is clamped positive, so NF4 quality is unchanged in practice.
    """
    flat = scale.reshape(-1).to(torch.float32)  # [N]
    offset = flat.mean().reshape(1)
    c = flat - offset
    nb = math.ceil(flat.numel() / block)
    cb = torch.nn.functional.pad(c, (0, nb * block - c.numel())).reshape(nb, block)
    absmax = round_scale(cb.abs().amax(dim=1) / 127.0)  # [nb]
    codes = torch.round(cb / absmax[:, None]).clamp(-127, 127).to(torch.int8)
    return {"codes": codes.reshape(-1)[: flat.numel()].reshape(scale.shape).contiguous(),
            "absmax": absmax, "offset": offset}


def dequantize_scales(dq: dict[str, torch.Tensor], block: int = DOUBLE_QUANT_BLOCK) -> torch.Tensor:
    """Inverse of :func:`quantize_scales`; deterministic so a loader reproduces it bit for bit."""
    codes = dq["codes"]
    flat = codes.reshape(-1).to(torch.float32)
    per = dq["absmax"].repeat_interleave(block)[: flat.numel()]
    s = flat * per + dq["offset"]
    return s.clamp_min(_SCALE_TINY).reshape(codes.shape)


# ---------------------------------------------------------------------------------------------
# quantize / dequantize
# ---------------------------------------------------------------------------------------------
def _nf4_encode(x: torch.Tensor) -> torch.Tensor:
    """Nearest codebook index of values in [-1, 1] (any shape) -> uint8."""
    cb = NF4_CODEBOOK.to(x.device)
    mids = (cb[1:] + cb[:-1]) / 2  # [15] decision boundaries
    return torch.bucketize(x.clamp(-1, 1), mids).to(torch.uint8)


def quantize_values(w: torch.Tensor, scale_cols: torch.Tensor, zero_cols: Optional[torch.Tensor],
                    spec: QuantSpec) -> torch.Tensor:
    """Codes of ``w`` [rows, k] given per-column parameters [rows|1, k] (elementwise Eq. 4).

    The building block GPTQ uses column by column with group scales fixed in advance.
    """
    w = w.to(torch.float32)
    if spec.format == "int":
        q = torch.round(w / scale_cols)
        if zero_cols is not None:
            q = q + zero_cols.to(torch.float32)
        return q.clamp(spec.qmin, spec.qmax).to(spec.code_dtype)
    if spec.format == "nf4":
        return _nf4_encode(w / scale_cols)
    x = (w / scale_cols).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX)
    return x.to(torch.float8_e4m3fn).view(torch.uint8)


def dequantize_values(codes: torch.Tensor, scale_cols: torch.Tensor,
                      zero_cols: Optional[torch.Tensor], spec: QuantSpec,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize_values` for per-column parameters (broadcasting)."""
    if spec.format == "int":
        v = codes.to(torch.float32)
        if zero_cols is not None:
            v = v - zero_cols.to(torch.float32)
    elif spec.format == "nf4":
        v = NF4_CODEBOOK.to(codes.device)[codes.long()]
    else:
        v = codes.view(torch.float8_e4m3fn).to(torch.float32)
    return (v * scale_cols).to(dtype)


def quantize(w: torch.Tensor, spec: QuantSpec, scale: Optional[torch.Tensor] = None,
             zero: Optional[torch.Tensor] = None) -> QuantizedTensor:
    """Quantize ``w`` [..., cols]; parameters from :func:`compute_qparams` unless given."""
    w2 = _as_rows(w)
    if scale is None:
        scale, zero = compute_qparams(w2, spec)
    else:
        _check_finite(w2)
    scale = scale.to(torch.float32)
    rows, cols = w2.shape
    _check_qparams(scale, zero, rows, cols, spec)
    dq = None
    if spec.format == "nf4" and spec.double_quant:
        # the codes must be chosen against the scale a loader will actually reconstruct
        dq = quantize_scales(scale)
        scale = dequantize_scales(dq)
    codes = quantize_values(w2, expand_groups(scale, cols, spec),
                            None if zero is None else expand_groups(zero, cols, spec), spec)
    return QuantizedTensor(codes=codes.contiguous(), scale=scale.contiguous(),
                           zero=None if zero is None else zero.to(torch.uint8).contiguous(),
                           spec=spec, shape=tuple(w.shape), dq_scale=dq)


def _check_qparams(scale: torch.Tensor, zero: Optional[torch.Tensor], rows: int, cols: int,
                   spec: QuantSpec) -> None:
    n = spec.n_groups(cols)
    want = (1, 1) if spec.granularity == "tensor" else (rows, n)
    if tuple(scale.shape) != want:
        raise ValueError(f"scale has shape {tuple(scale.shape)}, expected {want} for {spec}")
    if spec.symmetric and zero is not None and bool((zero != 0).any()):
        raise ValueError("symmetric spec given a non-zero zero point")
    if not spec.symmetric and spec.format == "int" and zero is None:
        raise ValueError("asymmetric spec needs a zero point")


def dequantize(qt: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Codes -> real values, shape ``qt.shape``."""
    spec = qt.spec
    zero = qt.zero if (qt.zero is not None and not spec.symmetric) else None
    out = dequantize_values(qt.codes, expand_groups(qt.scale, qt.cols, spec),
                            None if zero is None else expand_groups(zero, qt.cols, spec), spec, dtype)
    return out.reshape(qt.shape)


def fake_quantize(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """quantize -> dequantize, same shape and dtype as ``w``. Simulation only: nothing shrinks."""
    return dequantize(quantize(w, spec), dtype=torch.float32).to(w.dtype)


def quantize_columns(w_block: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor],
                     spec: QuantSpec, start: int, cols: int) -> torch.Tensor:
    """Codes for columns ``start : start + k`` of a weight of ``cols`` columns.

    ``w_block`` is [rows, k]; ``scale``/``zero`` are the full per-group parameters
    [rows|1, n_groups] (e.g. fixed by GPTQ at each group's first column). Column ``j`` uses
    group ``j // group_size``.
    """
    stop = start + w_block.shape[1]
    s = expand_groups(scale, cols, spec, start, stop)
    z = None if zero is None else expand_groups(zero, cols, spec, start, stop)
    return quantize_values(w_block, s, z, spec)


def fake_quantize_columns(w_block: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor],
                          spec: QuantSpec, start: int, cols: int) -> torch.Tensor:
    """Quantize-dequantize of a column block with fixed group parameters (GPTQ's q = Q(w))."""
    stop = start + w_block.shape[1]
    s = expand_groups(scale, cols, spec, start, stop)
    z = None if zero is None else expand_groups(zero, cols, spec, start, stop)
    return dequantize_values(quantize_values(w_block, s, z, spec), s, z, spec)


# ---------------------------------------------------------------------------------------------
# activations (W8A8, survey Eq. 5)
# ---------------------------------------------------------------------------------------------
def quantize_per_token_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric per-token int8: x [..., K] -> (codes int8 [..., K], scale f32 [..., 1]).

    One scale per row (token) keeps an outlier token from crushing the resolution of all the
    others -- the failure of per-tensor dynamic quantization. Symmetric, so the int GEMM needs
    no zero-point correction term (C = 0 in Eq. 5). Codes use [-127, 127].
    """
    x = x.to(torch.float32)
    scale = (x.abs().amax(dim=-1, keepdim=True) / 127.0).clamp_min(1e-12)
    q = torch.round(x / scale).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_static_int8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Static int8 activation quantization with a calibrated scale (scalar or [K] / [..., 1])."""
    return torch.round(x.to(torch.float32) / scale).clamp(-127, 127).to(torch.int8)


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(|ref|^2 / |ref - approx|^2)."""
    ref = ref.to(torch.float64)
    err = (ref - approx.to(torch.float64)).pow(2).sum()
    if err == 0:
        return float("inf")
    return float(10 * torch.log10(ref.pow(2).sum() / err))


def with_spec(qt: QuantizedTensor, **changes: Any) -> QuantSpec:
    """A copy of the spec of ``qt`` with fields changed (validated)."""
    return replace(qt.spec, **changes)

"""Quantized replacements for linear layers that stay packed in memory and compute fast on CPU.

Two modules, chosen by what PyTorch's CPU kernels can do (measured, see
``benchmarks/bench_kernels.py`` and ``benchmarks/RESULTS.md`` "Kernels"):

* :class:`QuantLinear` -- weight-only 2..8-bit int, NF4 or FP8, kept in the canonical packed
  codes. Few-token inputs (decode, speculative verification) of 4-bit and 8-bit int weights run
  slimformer's own kernels (:mod:`slimformer.kernels`: the packed bytes are unpacked in
  registers and multiplied into fp32 activations, ~7x faster than the fp32 GEMV it replaces
  for int4; int8 is what an ``head: int8`` recipe stores the LM head as);
  many-token inputs (prefill) and every other scheme dequantize tile by tile and use the fp32
  GEMM. Without a C++ compiler, 4-bit weights whose scales are bfloat16-exact fall back to
  PyTorch's blocked int4 layout (``_convert_weight_to_int4pack_for_cpu``, bf16 activations).
* :class:`Int8Linear` -- W8A8 (survey Eq. 5): int8 per-channel weights and int8 activations with
  a scale per token, multiplied by an int8 GEMM with int32 accumulation. With slimformer's C++
  kernels (backend ``int_mm``, the default when they build) the int8 codes ``[N, K]`` are kept
  as they are and one call quantizes every token in one pass, multiplies in int8 with int32
  accumulation -- PyTorch's ``torch._int_mm`` for many tokens, our own VNNI row product for up
  to 8 (decode, speculative verify: ``_int_mm`` re-lays out the whole weight on every call) --
  and rescales the int32 result in one pass (``benchmarks/RESULTS.md``, "W8A8 prefill").
  Without the kernels the weight lives in fbgemm's packed int8 format (backend ``fbgemm``): one
  token is one call of fbgemm's dynamic linear (for a single row its per-tensor activation scale
  IS the per-token scale); for many tokens each row is first divided by its own absmax, so the
  kernel's per-tensor grid equals a per-token grid. Without either, the ``int_mm`` backend runs
  the same steps as separate PyTorch ops.

Both expose :meth:`quantized` (the canonical :class:`QuantizedTensor`, for saving) and
:meth:`nbytes` (bytes held, including kernel-packed storage that ``state_dict`` cannot see).
"""
from __future__ import annotations

import itertools
import math
import warnings
import weakref
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimformer.primitives.affine import (QuantizedTensor, QuantSpec, dequantize_scales,
                                          dequantize_values, expand_groups, is_bf16_exact)
from slimformer.kernels import cpu_kernels
from slimformer.primitives.packing import pack_codes, unpack_codes

INT4PACK_GROUPS = (32, 64, 128, 256)  # group sizes PyTorch's CPU int4 kernel accepts
INT4PACK_MAX_M = 16  # tokens up to which the fused int4 kernel beats dequantize + fp32 GEMM
KERNEL_MAX_M = 16  # tokens up to which our int4 kernel beats dequantize + fp32 GEMM (measured)
TILE_COLS = 1024  # output features dequantized at a time: bounds the fp32 scratch memory


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight of an ``nn.Linear`` or HF GPT-2 ``Conv1D`` as [out, in] (a view, no copy)."""
    if isinstance(module, nn.Linear):
        return module.weight
    if type(module).__name__ == "Conv1D":  # HF Conv1D: y = x @ W + b with W [in, out]
        return module.weight.t()
    if isinstance(module, (QuantLinear, Int8Linear)):
        raise TypeError(f"{type(module).__name__} is already quantized")
    raise TypeError(f"not a linear layer: {type(module).__name__}")


def linear_bias(module: nn.Module) -> Optional[torch.Tensor]:
    return getattr(module, "bias", None)


def _nbytes(*ts: Optional[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


# =============================================================================================
# plain fp32 linears in a decode step
# =============================================================================================
def few_token_linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)``, except that a plain fp32 ``nn.Linear`` fed at most ``KERNEL_MAX_M`` tokens
    (a decode or verify step) runs our fp32 kernel: MKL's GEMV streams the weights with one
    thread at ~11 GB/s here, the kernel with all threads at 20-30 GB/s (``benchmarks/RESULTS.md``
    "Kernels"). Same sums in another order: results agree to float rounding, not bitwise.
    The decoding loop calls its linears through this; the model itself is not changed.
    (Called ~200 times per decode step: the checks are ordered cheapest first.)"""
    if type(module) is nn.Linear and x.dtype is torch.float32 and x.numel() <= KERNEL_MAX_M * x.shape[-1]:
        w = module.weight
        k = cpu_kernels()
        if (k is not None and w.dtype is torch.float32
                and not (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad))):
            x2 = x.reshape(-1, x.shape[-1])
            if torch.compiler.is_compiling():  # the dispatcher op: traceable, registered in C++
                y = torch.ops.slimformer.f32_linear(x2, w)
            else:
                y = k.f32_linear(x2, w)
            b = module.bias
            if b is not None:
                y += b
            return y.view(*x.shape[:-1], y.shape[-1])
    return module(x)


# =============================================================================================
# weight-only
# =============================================================================================
class QuantLinear(nn.Module):
    """Weight-only quantized linear: y = x @ dequant(W)^T + b with W kept packed.

    Build with :meth:`from_quantized`; ``backend`` is "int4pack" or "dequant" (see module doc).
    """

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, backend: str):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.spec, self.backend = spec, backend
        self.bias: Optional[torch.Tensor]

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def from_quantized(cls, qt: QuantizedTensor, bias: Optional[torch.Tensor] = None,
                       backend: Optional[str] = None) -> "QuantLinear":
        """Wrap a quantized [out, in] weight. ``backend`` None picks the fastest that fits."""
        if len(qt.shape) != 2:
            raise ValueError(f"QuantLinear needs a 2-D weight, got shape {qt.shape}")
        n, k = qt.shape
        spec = qt.spec
        fits = (spec.format == "int" and spec.bits == 4 and spec.granularity == "group"
                and spec.group_size in INT4PACK_GROUPS and is_bf16_exact(qt.scale))
        if backend is None:  # our kernel reads the canonical layout; int4pack only without it
            backend = "int4pack" if fits and cpu_kernels() is None else "dequant"
        if backend == "int4pack" and not fits:
            raise ValueError(f"int4pack backend needs 4-bit int groups of {INT4PACK_GROUPS} "
                             f"with bfloat16-exact scales; got {spec}")
        m = cls(k, n, spec, backend)
        m.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32).clone())
        if backend == "int4pack":
            m._init_int4pack(qt)
        else:
            m._init_dequant(qt)
        return m

    def _init_dequant(self, qt: QuantizedTensor) -> None:
        spec = qt.spec
        self.register_buffer("qweight", pack_codes(qt.codes, spec))  # [N, ceil(K*bits/8)] uint8
        if qt.dq_scale is not None:  # NF4 double quant: the scales themselves are int8
            self.register_buffer("scale", None)
            self.register_buffer("scale_codes", qt.dq_scale["codes"].clone())  # [N, G] int8
            self.register_buffer("scale_absmax", qt.dq_scale["absmax"].clone())  # [ceil(N*G/256)]
            self.register_buffer("scale_offset", qt.dq_scale["offset"].clone())  # [1]
        else:
            s = qt.scale
            self.register_buffer("scale", s.to(torch.bfloat16) if is_bf16_exact(s) else s.clone())
        self.register_buffer("zero", None if qt.zero is None else qt.zero.clone())

    def _init_int4pack(self, qt: QuantizedTensor) -> None:
        n, k = qt.shape
        g = qt.spec.group_size
        n_pad, k_pad = -n % 64, -k % g  # kernel works on 64-row blocks and whole groups
        u = qt.codes.to(torch.int32) + (8 if qt.spec.symmetric else 0)  # [N, K] in 0..15
        u = F.pad(u, (0, k_pad, 0, n_pad), value=8 if qt.spec.symmetric else 0)
        # blocked layout: view(N/64, K, 32) byte [b, k, j] = q[64b+j, k] | q[64b+j+32, k] << 4
        self.register_buffer("qweight", torch._convert_weight_to_int4pack_for_cpu(u, 1))
        # kernel dequant: w = (q - 8) * s + z  ==  (q - zero) * s  with  z = (8 - zero) * s
        s = qt.scale  # [N, G]
        zero = torch.full_like(s, 8.0) if qt.zero is None else qt.zero.to(torch.float32)
        z = (8.0 - zero) * s
        sz = torch.stack([s, z], dim=-1)  # [N, G, 2]
        gp = math.ceil((k + k_pad) / g)
        sz = F.pad(sz, (0, 0, 0, gp - sz.shape[1], 0, n_pad))
        self.register_buffer("scale_zeros", sz.transpose(0, 1).contiguous().to(torch.bfloat16))
        self.register_buffer("zero", None if qt.zero is None else qt.zero.clone())  # [N, G]
        self._k_pad = k + k_pad

    # ---- canonical view ----------------------------------------------------------------------
    def scales(self) -> torch.Tensor:
        """Per-group scales [N, G] float32 exactly as used."""
        if self.backend == "int4pack":
            g = math.ceil(self.in_features / self.spec.group_size)
            return self.scale_zeros[:g, : self.out_features, 0].t().to(torch.float32).contiguous()
        if self.scale is None:
            return dequantize_scales({"codes": self.scale_codes, "absmax": self.scale_absmax,
                                      "offset": self.scale_offset})
        return self.scale.to(torch.float32)

    def codes(self) -> torch.Tensor:
        """Unpacked codes [N, K] of ``spec.code_dtype``."""
        n, k = self.out_features, self.in_features
        if self.backend == "dequant":
            return unpack_codes(self.qweight, self.spec, k)
        u = self.qweight.view(-1, self._k_pad, 32)  # [NB, Kp, 32]
        q = torch.cat([u & 15, u >> 4], dim=-1)  # [NB, Kp, 64]
        q = q.permute(0, 2, 1).reshape(-1, self._k_pad)[:n, :k]  # [N, K]
        if self.spec.symmetric:
            return (q.to(torch.int16) - 8).to(torch.int8)
        return q.to(torch.uint8).contiguous()

    def quantized(self) -> QuantizedTensor:
        dq = None
        if self.backend == "dequant" and self.scale is None:
            dq = {"codes": self.scale_codes, "absmax": self.scale_absmax, "offset": self.scale_offset}
        return QuantizedTensor(codes=self.codes(), scale=self.scales(), zero=self.zero,
                               spec=self.spec, shape=(self.out_features, self.in_features),
                               dq_scale=dq)

    def nbytes(self) -> int:
        return _nbytes(*self.buffers())

    # ---- compute -----------------------------------------------------------------------------
    def dequantized_weight(self, rows: Optional[slice] = None) -> torch.Tensor:
        """fp32 weight [n, K] for output rows ``rows`` (all by default). Scratch, not stored."""
        rows = rows or slice(0, self.out_features)
        if self.backend == "int4pack":
            return self._int4pack_tile_t(rows.start, rows.stop).t()[:, : self.in_features]
        spec, k = self.spec, self.in_features
        ck = cpu_kernels() if spec.bits in (4, 8) and not torch.compiler.is_compiling() else None
        kargs = self._cached_kernel_args() if ck is not None else None
        if kargs:  # the same values, ~20x faster (a prefill's tiles)
            if spec.bits == 8:
                return ck.int8w_dequant(*kargs, rows.start, rows.stop)
            return ck.int4_dequant(*kargs, k, rows.start, rows.stop)
        codes = unpack_codes(self.qweight[rows], spec, k)  # [n, K]
        s = self.scales()
        s = s if s.shape[0] == 1 else s[rows]
        z = None if self.zero is None else (self.zero if self.zero.shape[0] == 1 else self.zero[rows])
        return dequantize_values(codes, expand_groups(s, k, spec),
                                 None if z is None else expand_groups(z, k, spec), spec)

    def _int4pack_tile_t(self, n0: int, n1: int) -> torch.Tensor:
        """Dequantized W^T [Kp, n] for output features n0:n1 (n0 a multiple of 64)."""
        kp, g = self._k_pad, self.spec.group_size
        b0, b1 = n0 // 64, math.ceil(n1 / 64)
        u = self.qweight.view(-1, kp, 32)[b0:b1]  # [nb, Kp, 32]
        q = torch.cat([u & 15, u >> 4], dim=-1).permute(1, 0, 2).reshape(kp, -1)  # [Kp, nb*64]
        sz = self.scale_zeros[:, b0 * 64: b1 * 64].to(torch.float32)  # [Gp, nb*64, 2]
        gp = sz.shape[0]
        qg = q.view(gp, g, -1).to(torch.float32).sub_(8.0)  # [Gp, g, n]: broadcast, no repeats
        w = torch.addcmul(sz[:, None, :, 1], qg, sz[:, None, :, 0]).view(kp, -1)  # (q-8)*s + z
        return w[:, : n1 - n0]

    def kernel_fits(self) -> bool:
        """Whether few-token inputs can run our int4 / int8 kernel on this module's packed codes."""
        s = self.spec
        if not (self.backend == "dequant" and s.format == "int" and s.bits in (4, 8)
                and s.granularity in ("group", "channel") and self.scale is not None
                and self.scale.shape[0] == self.out_features):
            return False
        if self.zero is not None and self.zero.shape != self.scale.shape:
            return False
        return self.scale.shape[1] == 1 or s.bits == 8 or s.group_size % 2 == 0

    def _kernel_name(self) -> str:
        return "int4_linear" if self.spec.bits == 4 else "int8w_linear"

    def _kernel_args(self) -> Optional[tuple]:
        """(qweight, scale, zero, group_size, zero_const) for our int4 / int8 kernel, or None."""
        if not self.kernel_fits() or cpu_kernels() is None:
            return None
        # signed codes are stored + 2^(bits-1) (8 for int4, 128 for int8)
        offset = float(1 << (self.spec.bits - 1)) if self.spec.code_dtype == torch.int8 else 0.0
        zero = None if self.zero is None else self.zero.to(torch.float32) + offset
        gs = self.spec.group_size if self.spec.granularity == "group" else self.in_features
        return (self.qweight, self.scale, zero, gs, offset)

    # the kernel arguments are cached (a decode step calls ~200 of these modules; the checks
    # and the float zero points cost more than a small layer's kernel) and dropped whenever the
    # buffers may have been replaced or rewritten
    def _cached_kernel_args(self) -> Optional[tuple]:
        kargs = self.__dict__.get("_kargs", False)
        if kargs is False:
            kargs = self.__dict__["_kargs"] = self._kernel_args()
        return kargs

    def _apply(self, fn, *args, **kwargs):
        self.__dict__.pop("_kargs", None)
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self.__dict__.pop("_kargs", None)
        return super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dtype is torch.float32 and x.numel() <= KERNEL_MAX_M * self.in_features
                and not (torch.is_grad_enabled() and x.requires_grad)):  # the kernel has no backward
            if torch.compiler.is_compiling():  # the dispatcher op: traceable, registered in C++
                kargs = self._kernel_args()
                if kargs is not None:
                    op = getattr(torch.ops.slimformer, self._kernel_name())
                    return self._finish(op(x.reshape(-1, self.in_features), *kargs), x)
            else:
                k = cpu_kernels()  # None also when switched off (SLIMFORMER_NO_KERNELS) meanwhile
                kargs = self._cached_kernel_args() if k is not None else None
                if kargs:
                    fn = getattr(k, self._kernel_name())
                    return self._finish(fn(x.reshape(-1, self.in_features), *kargs), x)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(torch.float32)  # [M, K]
        m = x2.shape[0]
        if self.backend == "int4pack" and m <= INT4PACK_MAX_M:
            xp = F.pad(x2, (0, self._k_pad - self.in_features)).to(torch.bfloat16)
            y = torch._weight_int4pack_mm_for_cpu(xp, self.qweight, self.spec.group_size,
                                                  self.scale_zeros)  # [M, Np] bf16
            y = y[:, : self.out_features].to(torch.float32)
        else:
            y = x2.new_empty(m, self.out_features)
            if self.backend == "int4pack":
                xp = F.pad(x2, (0, self._k_pad - self.in_features))
                for n0 in range(0, self.out_features, TILE_COLS):
                    n1 = min(n0 + TILE_COLS, self.out_features)
                    y[:, n0:n1] = xp @ self._int4pack_tile_t(n0, n1)
            else:
                for n0 in range(0, self.out_features, TILE_COLS):
                    n1 = min(n0 + TILE_COLS, self.out_features)
                    y[:, n0:n1] = x2 @ self.dequantized_weight(slice(n0, n1)).t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def _finish(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.bias is not None:
            y += self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        s = self.spec
        kind = f"int{s.bits}" if s.format == "int" else s.format  # nf4 / fp8_e4m3 name their bits
        return (f"in={self.in_features}, out={self.out_features}, {kind} "
                f"{'sym' if s.symmetric else 'asym'} {s.granularity}"
                f"{s.group_size if s.granularity == 'group' else ''}, backend={self.backend}")


# =============================================================================================
# W8A8
# =============================================================================================
def _fbgemm_available() -> bool:
    return any(e in torch.backends.quantized.supported_engines for e in ("x86", "fbgemm"))


def default_int8_backend() -> str:
    """``int_mm`` with our fused kernel when it builds (fastest at every token count measured),
    else fbgemm's packed weights, else ``int_mm`` as plain PyTorch ops."""
    if cpu_kernels() is not None or not _fbgemm_available():
        return "int_mm"
    return "fbgemm"


# fbgemm's packed weight is a TorchScript object that torch.compile cannot trace. Compiled code
# calls it through this custom op instead, by an integer handle: dynamo sees an opaque,
# functional op (so a fused q/k/v GEMM called by three slices is computed once by CSE) and
# the element-wise work around it is fused by inductor.
_PACKED: dict[int, object] = {}
_HANDLES = itertools.count()


def _fbgemm_per_token(x2: torch.Tensor, packed) -> torch.Tensor:
    """x2 [M, K] fp32 -> [M, N]: fbgemm's dynamic int8 linear with one grid per token."""
    if x2.shape[0] == 1:  # one token: the kernel's per-tensor scale is per-token
        return torch.ops.quantized.linear_dynamic(x2, packed, False)
    amax = x2.abs().amax(dim=-1, keepdim=True).clamp_min_(1e-30)  # [M, 1]
    # every row now spans the same range, so one per-tensor grid is a per-token grid
    y = torch.ops.quantized.linear_dynamic(x2 / amax, packed, False)  # [M, N]
    return y.mul_(amax)


@torch.library.custom_op("slimformer::int8_linear", mutates_args=())
def int8_linear_op(x2: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    return _fbgemm_per_token(x2.contiguous(), _PACKED[handle])


@int8_linear_op.register_fake
def _int8_linear_fake(x2: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    return x2.new_empty(x2.shape[0], out_features)


class Int8Linear(nn.Module):
    """W8A8 linear: int8 per-channel weights x int8 per-token activations, int32 accumulation.

    ``act_scale`` (optional, a calibrated per-tensor scale) clips the activations to
    +-127 * act_scale; the grid inside that range is still chosen per token (never coarser than
    the static grid). The ``int_mm`` backend gives bit-identical outputs with or without the C++
    kernel (tested); fbgemm quantizes each token's range on its own asymmetric uint8 grid, so
    its outputs differ from ``int_mm``'s at the quantization-noise level.
    """

    def __init__(self, in_features: int, out_features: int, backend: str):
        super().__init__()
        self.in_features, self.out_features, self.backend = in_features, out_features, backend
        self.spec = QuantSpec(bits=8, symmetric=True, granularity="channel")
        self._packed = None

    @classmethod
    def from_quantized(cls, qt: QuantizedTensor, bias: Optional[torch.Tensor] = None,
                       act_scale: Optional[torch.Tensor | float] = None,
                       backend: Optional[str] = None) -> "Int8Linear":
        spec = qt.spec
        if not (spec.format == "int" and spec.bits == 8 and spec.symmetric
                and spec.granularity in ("channel", "tensor")):
            raise ValueError(f"Int8Linear needs symmetric 8-bit int per-channel weights, got {spec}")
        n, k = qt.shape
        backend = backend or default_int8_backend()
        m = cls(k, n, backend)
        scale = qt.scale.to(torch.float32).expand(n, 1).reshape(n).contiguous()  # [N]
        m.register_buffer("weight_scale", scale)
        m.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32).clone())
        m.register_buffer("act_scale", None if act_scale is None
                          else torch.as_tensor(act_scale, dtype=torch.float32).reshape(1).clone())
        codes = qt.codes.to(torch.int8)
        if backend == "fbgemm":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # quantized-tensor creation is marked deprecated
                qw = torch._make_per_channel_quantized_tensor(
                    codes, scale.to(torch.float64), torch.zeros(n, dtype=torch.long), 0)
                m._set_packed(torch.ops.quantized.linear_prepack(qw, None))
            m.register_buffer("weight_int8", None)
        else:
            m.register_buffer("weight_int8", codes.contiguous())  # [N, K]
        return m

    def _set_packed(self, packed) -> None:
        self._packed = packed
        self._handle = next(_HANDLES)
        _PACKED[self._handle] = packed
        weakref.finalize(self, _PACKED.pop, self._handle, None)

    def weight_codes(self) -> torch.Tensor:
        """int8 codes [N, K]."""
        if self.backend == "fbgemm":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return torch.ops.quantized.linear_unpack(self._packed)[0].int_repr().contiguous()
        return self.weight_int8

    def quantized(self) -> QuantizedTensor:
        return QuantizedTensor(codes=self.weight_codes(), scale=self.weight_scale.reshape(-1, 1),
                               zero=None, spec=self.spec, shape=(self.out_features, self.in_features))

    def nbytes(self) -> int:
        n, k = self.out_features, self.in_features
        packed = n * k + 4 * n if self.backend == "fbgemm" else 0  # int8 B + int32 column offsets
        return packed + _nbytes(*self.buffers())

    def __getstate__(self):  # deepcopy / pickle: the fbgemm handle is rebuilt from codes
        state = self.__dict__.copy()
        if self._packed is not None:
            state["_packed_codes"] = self.weight_codes()
            state["_packed"] = None
            state.pop("_handle", None)
        return state

    def __setstate__(self, state):
        codes = state.pop("_packed_codes", None)
        self.__dict__.update(state)
        if codes is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                qw = torch._make_per_channel_quantized_tensor(
                    codes, self.weight_scale.to(torch.float64),
                    torch.zeros(self.out_features, dtype=torch.long), 0)
                self._set_packed(torch.ops.quantized.linear_prepack(qw, None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(torch.float32)  # [M, K]
        if self.backend == "int_mm":
            kern = cpu_kernels()
            if kern is not None:  # quantize, int8 GEMM, rescale and bias in one call
                args = (x2, self.weight_int8, self.weight_scale, self.bias, self.act_scale)
                if torch.compiler.is_compiling():  # the dispatcher op: traceable
                    y = torch.ops.slimformer.w8a8_linear(*args)
                else:
                    y = kern.w8a8_linear(*args)
                return y.reshape(*lead, self.out_features).to(x.dtype)
        if self.act_scale is not None:
            lim = 127.0 * self.act_scale
            x2 = torch.maximum(torch.minimum(x2, lim), -lim)
        y = self._forward_fbgemm(x2) if self.backend == "fbgemm" else self._forward_int_mm(x2)
        if self.bias is not None:
            y = y.add_(self.bias)
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def _forward_fbgemm(self, x2: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return int8_linear_op(x2, self._handle, self.out_features)
        return _fbgemm_per_token(x2, self._packed)

    def _forward_int_mm(self, x2: torch.Tensor) -> torch.Tensor:
        # x2 is already clipped to the static range, if any: the grid is per token inside it
        s = x2.abs().amax(dim=-1, keepdim=True).clamp_min_(1e-30) / 127.0  # [M, 1]
        # x * (1 / s), not x / s: PyTorch itself turns a division by one number into that, so
        # this is the one form that gives the same codes at every M (and the kernel's)
        q = torch.round(x2 * (1.0 / s)).clamp_(-127, 127).to(torch.int8)  # [M, K]
        acc = torch._int_mm(q, self.weight_int8.t())  # [M, N] int32 (Eq. 5, C = 0)
        y = acc * self.weight_scale.view(1, -1)  # [M, N] float: s_w per output channel
        return y.mul_(s)  # s_x per token

    def extra_repr(self) -> str:
        mode = "static" if self.act_scale is not None else "dynamic per-token"
        return f"in={self.in_features}, out={self.out_features}, W8A8 {mode}, backend={self.backend}"

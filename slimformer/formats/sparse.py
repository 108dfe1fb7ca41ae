"""Sparse storage for pruned linears: a packed bitmask plus the kept values.

:class:`SparseLinear` holds, for a pruned weight ``W [out, in]`` with keep-mask ``M``:

* ``mask_bits`` — ``uint8 [out, ceil(in/8)]``: 1 bit per weight (bit ``j % 8`` of byte
  ``j // 8`` is column ``j``; the canonical 1-bit layout of :mod:`slimformer.primitives.packing`);
* ``values`` — ``[nnz]`` the kept weights in row-major order, in the dense weight's own dtype,
  so a save -> load round trip rebuilds exactly the same dense weight (bit-identical logits);
* or, for a pruned AND quantized weight (SparseGPT joint with quantization), ``qvalues`` — the
  kept weights' integer codes bit-packed at ``spec.bits`` each — with the per-group ``scale``
  [out, groups] (and ``zero`` for asymmetric codes) of :mod:`slimformer.primitives.affine`.

Bytes at 50% sparsity in fp32: ``1/8 + 0.5·4 = 2.125`` bytes per weight = 0.53× dense. With
4-bit codes (g128): ``1/8 + 0.5·0.5 + scales`` ≈ 0.1× dense.

N:M patterns use the same bitmask: for 2:4 a bitmask costs 4 bits per group of 4, exactly what
two 2-bit column indices cost, so a separate index packing would save nothing; for 4:8 the
bitmask (8 bits) beats indices (4 × 3 bits). Index packing pays only for N/M ≤ 1/4.

**When a layer stays dense.** The bitmask costs 1/32 of an fp32 weight (1/16 of a bf16 one), so
below ~3.1% sparsity a sparse layer would be *larger* than the dense one, and just above it the
saving is a few percent for a slower forward. :func:`pack_pruned` therefore keeps a layer as a
plain dense linear (with its zeros written in) when its sparsity is below :data:`MIN_SPARSITY`
(5%) — unless it is quantized, where the codes must be stored anyway.

**CPU speed (honest).** There is no sparse GEMM kernel on this CPU that beats dense fp32 at 50%
sparsity (torch's CSR matmul is slower than the dense one and its int64 indices would make the
weight *bigger* than dense). ``forward`` therefore rebuilds the dense weight from the bitmask
and the values on every call (a table lookup of the mask bytes + ``masked_scatter``) and runs
the dense GEMM. Measured on SmolLM2-135M at 50% against dense fp32 in one process: 512-token
prefill 0.88x dense speed, greedy decode 0.06x (the rebuild dominates a one-token step; one
1536x576 layer: 16 ms vs 0.08 ms for one token, 57 vs 38 ms for 512) — see
``benchmarks/RESULTS.md`` "Unstructured and 2:4 pruning vs llm-compressor (issue 5)". The format
is for **size** (disk and memory), like packed W4; 2:4 speed needs a GPU's sparse tensor cores.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimformer.primitives.affine import QuantSpec, dequantize_values, expand_groups, quantize
from slimformer.primitives.packing import pack, pack_codes, packed_cols, unpack_codes

# below this fraction of zeros a pruned layer stays dense (see module docstring)
MIN_SPARSITY = 0.05

# byte value -> its 8 bits, least significant first: unpacking a mask is one table lookup
# (an embedding lookup: measured ~4x faster on CPU than shifts or bool advanced indexing)
_BITS = ((torch.arange(256).reshape(-1, 1) >> torch.arange(8)) & 1).to(torch.uint8)  # [256, 8]


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """bool [out, in] -> uint8 [out, ceil(in/8)] (1 bit per weight)."""
    return pack(mask.to(torch.uint8), 1)


def unpack_mask(bits: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_mask`: uint8 [out, ceil(cols/8)] -> bool [out, cols]."""
    if bits.shape[-1] != packed_cols(cols, 1):
        raise ValueError(f"mask rows have {bits.shape[-1]} bytes, expected {packed_cols(cols, 1)}")
    m = F.embedding(bits.long(), _BITS).reshape(bits.shape[0], -1).bool()  # [out, 8*bytes]
    return m if m.shape[1] == cols else m[:, :cols]


class SparseLinear(nn.Module):
    """y = x @ W^T + b with ``W`` stored as bitmask + kept values (or kept codes + scales).

    Build with :meth:`from_mask`. ``nbytes()`` is what it really holds (the packed buffers).
    """

    def __init__(self, in_features: int, out_features: int, spec: Optional[QuantSpec] = None,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.spec = spec  # None: values stored as floats of ``dtype``
        self.dtype = dtype
        self.bias: Optional[torch.Tensor]

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def from_mask(cls, weight: torch.Tensor, mask: torch.Tensor, bias: Optional[torch.Tensor] = None,
                  spec: Optional[QuantSpec] = None, scale: Optional[torch.Tensor] = None,
                  zero: Optional[torch.Tensor] = None) -> "SparseLinear":
        """Pack ``weight`` [out, in] keeping the entries where ``mask`` is True.

        With ``spec`` (+ the per-group ``scale``/``zero`` the weight was quantized with) the
        kept entries are stored as ``spec.bits``-bit codes instead of floats.
        """
        if weight.dim() != 2 or mask.shape != weight.shape:
            raise ValueError(f"weight {tuple(weight.shape)} and mask {tuple(mask.shape)} must be the same 2-D shape")
        n, k = weight.shape
        mask = mask.to(torch.bool)
        m = cls(k, n, spec, weight.dtype)
        m.register_buffer("mask_bits", pack_mask(mask))
        w = weight.detach()
        if spec is None:
            m.register_buffer("values", w[mask].clone())  # [nnz], row-major
            m.register_buffer("qvalues", None)
            m.register_buffer("scale", None)
            m.register_buffer("zero", None)
        else:
            if scale is None:
                raise ValueError("a quantized SparseLinear needs the scale the weight was quantized with")
            qt = quantize(w.to(torch.float32), spec, scale=scale, zero=zero)
            m.register_buffer("values", None)
            m.register_buffer("qvalues", pack_codes(qt.codes[mask].reshape(1, -1), spec).reshape(-1))
            m.register_buffer("scale", qt.scale.clone())
            m.register_buffer("zero", None if qt.zero is None else qt.zero.clone())
        m.nnz = int(mask.sum())
        m.register_buffer("bias", None if bias is None else bias.detach().clone())
        return m

    # ---- canonical view ----------------------------------------------------------------------
    def mask(self) -> torch.Tensor:
        """bool [out, in], True = kept."""
        return unpack_mask(self.mask_bits, self.in_features)

    def sparsity(self) -> float:
        return 1.0 - self.nnz / (self.in_features * self.out_features)

    def dense_weight(self) -> torch.Tensor:
        """The dense weight [out, in] (scratch memory, rebuilt on every call; never stored)."""
        mask = self.mask()
        if self.spec is None:
            w = torch.zeros(self.out_features, self.in_features, dtype=self.values.dtype)
            return w.masked_scatter_(mask, self.values)
        spec, k = self.spec, self.in_features
        codes = torch.zeros(self.out_features, k, dtype=spec.code_dtype)
        codes.masked_scatter_(mask, unpack_codes(self.qvalues.reshape(1, -1), spec, self.nnz).reshape(-1))
        z = None if self.zero is None else expand_groups(self.zero, k, spec)
        w = dequantize_values(codes, expand_groups(self.scale, k, spec), z, spec)
        return w.masked_fill_(~mask, 0.0) if z is not None else w

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers())

    # ---- compute -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dense_weight()
        b = None if self.bias is None else self.bias.to(w.dtype)
        return F.linear(x.to(w.dtype), w, b).to(x.dtype)

    def extra_repr(self) -> str:
        vals = f"{self.spec.format}{self.spec.bits} codes" if self.spec is not None else str(self.dtype)
        return (f"in={self.in_features}, out={self.out_features}, sparsity={self.sparsity():.3f}, "
                f"values={vals}")


def pack_pruned(module: nn.Module, weight: torch.Tensor, mask: torch.Tensor,
                spec: Optional[QuantSpec] = None, scale: Optional[torch.Tensor] = None,
                zero: Optional[torch.Tensor] = None) -> nn.Module:
    """The module that replaces a pruned linear: a :class:`SparseLinear`, or — for a float
    weight below :data:`MIN_SPARSITY` — the original module with ``weight * mask`` written
    into it (the bitmask would cost more than the zeros save)."""
    from slimformer.formats.linear import linear_bias, linear_weight

    sparsity = 1.0 - float(mask.sum()) / mask.numel()
    if spec is None and sparsity < MIN_SPARSITY:
        with torch.no_grad():
            linear_weight(module).copy_(weight.masked_fill(~mask, 0.0))
        return module
    return SparseLinear.from_mask(weight, mask, linear_bias(module), spec, scale, zero)


# ---- save / load (registered with slimformer.formats.serialize) --------------------------------
def _to_tensors(m: SparseLinear) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    t = {"mask": m.mask_bits}
    info: dict[str, Any] = {"nnz": m.nnz, "dtype": str(m.dtype).replace("torch.", "")}
    if m.spec is None:
        t["values"] = m.values
    else:
        info["spec"] = m.spec.to_dict()
        t["qvalues"] = m.qvalues
        t["scale"] = m.scale
        if m.zero is not None:
            t["zero"] = m.zero
    return t, info


def _build(info: dict[str, Any], get) -> SparseLinear:
    n, k = info["out_features"], info["in_features"]
    spec = QuantSpec.from_dict(info["spec"]) if info.get("spec") else None
    m = SparseLinear(k, n, spec, getattr(torch, info.get("dtype", "float32")))
    bits = get("mask")
    if tuple(bits.shape) != (n, packed_cols(k, 1)):
        raise ValueError(f"SparseLinear mask has shape {tuple(bits.shape)}, expected {(n, packed_cols(k, 1))}")
    m.register_buffer("mask_bits", bits)
    m.register_buffer("values", get("values"))
    m.register_buffer("qvalues", get("qvalues"))
    m.register_buffer("scale", get("scale"))
    m.register_buffer("zero", get("zero"))
    m.register_buffer("bias", get("bias"))
    m.nnz = int(info["nnz"])
    return m


__all__ = ["MIN_SPARSITY", "SparseLinear", "pack_mask", "unpack_mask", "pack_pruned"]


def _register() -> None:
    from slimformer.formats.serialize import register_module_format

    register_module_format(SparseLinear, _to_tensors, _build)


_register()

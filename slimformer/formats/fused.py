"""Run-time fusion of int8 linears that read the same input (q/k/v, gate/up).

A W8A8 block calls ``q_proj(x)``, ``k_proj(x)`` and ``v_proj(x)`` on the same tensor, so three
int8 GEMMs each quantize ``x`` again (a full pass over the activations per call) and each pay
the kernel's fixed cost. :func:`fuse_int8_siblings` packs the siblings' int8 rows into ONE
prepacked weight; the first sibling called computes the fused product once and every sibling
returns its own column slice of it. The HF modules keep calling their projections as before:
nothing in the model's forward is rewritten.

The result is bit-identical to the unfused modules: the activation grid is per token (it
depends on ``x`` only), the int8 products accumulate exactly in int32, and each output column
is rescaled by its own weight scale, so which other rows share the GEMM changes nothing.

Saved folders never contain the fused form: a :class:`FusedInt8Slice` saves as the plain
``Int8Linear`` it stands for, and loading fuses again.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from slimformer.formats.linear import Int8Linear
from slimformer.primitives.affine import QuantizedTensor


def sibling_groups(arch) -> list[tuple[str, ...]]:
    """Block-relative names of linears that read the same input, from the registry's data:
    separate q/k/v projections and a gated MLP's gate/up."""
    groups = []
    att = arch.attention
    qkv = tuple(dict.fromkeys(n for n in (att.q, att.k, att.v) if n))
    if len(qkv) > 1:
        groups.append(qkv)
    if arch.mlp.gate:
        groups.append((arch.mlp.gate, arch.mlp.up))
    return groups


class FusedInt8Group(nn.Module):
    """One prepacked int8 weight for several same-input linears, with a one-entry cache of the
    last input's fused output (consumed by the siblings, then dropped)."""

    def __init__(self, members: list[Int8Linear]):
        super().__init__()
        codes = torch.cat([m.weight_codes() for m in members])
        scale = torch.cat([m.weight_scale for m in members])
        qt = QuantizedTensor(codes=codes, scale=scale.reshape(-1, 1), zero=None, spec=members[0].spec,
                             shape=(codes.shape[0], codes.shape[1]))
        # the fused GEMM adds no bias; each slice adds its own
        self.linear = Int8Linear.from_quantized(qt, None, backend=members[0].backend)
        self.bounds: list[tuple[int, int]] = []
        start = 0
        for m in members:
            self.bounds.append((start, start + m.out_features))
            start += m.out_features
        self._key: Optional[tuple] = None
        self._out: Optional[torch.Tensor] = None
        self._pending = 0

    def slice_output(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            # traced code has no identity cache: each slice asks for the fused product of the
            # same input, and the graph's common-subexpression pass computes it once
            a, b = self.bounds[index]
            return self.linear(x)[..., a:b]
        # the cache holds the input tensor itself: identity + version cannot be confused with a
        # new tensor that happens to reuse the same memory
        # (inference tensors keep no version counter: identity alone, within one forward)
        version = None if x.is_inference() else x._version
        if self._out is None or self._key is None or self._key[0] is not x or self._key[1] != version:
            self._out = self.linear(x)
            self._key = (x, version)
            self._pending = len(self.bounds)
        a, b = self.bounds[index]
        out = self._out[..., a:b]
        self._pending -= 1
        if self._pending == 0:  # every sibling has read it: do not keep activations alive
            self._out, self._key = None, None
        return out


class FusedInt8Slice(nn.Module):
    """Stands in for one member of a :class:`FusedInt8Group` (same in/out features, bias)."""

    SAVED_TYPE = "Int8Linear"

    def __init__(self, group: FusedInt8Group, index: int, original: Int8Linear):
        super().__init__()
        self.in_features, self.out_features = original.in_features, original.out_features
        self.register_buffer("bias", original.bias)
        self.act_scale = None
        self.spec = original.spec
        self.backend = original.backend
        self._group = [group]  # a list: not a registered submodule (saved once per slice)
        self.index = index

    @property
    def group(self) -> FusedInt8Group:
        return self._group[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.group.slice_output(self.index, x)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)

    # what the serializer and the size accounting see: the plain Int8Linear rows
    def weight_codes(self) -> torch.Tensor:
        a, b = self.group.bounds[self.index]
        return self.group.linear.weight_codes()[a:b]

    @property
    def weight_scale(self) -> torch.Tensor:
        a, b = self.group.bounds[self.index]
        return self.group.linear.weight_scale[a:b]

    def quantized(self) -> QuantizedTensor:
        return QuantizedTensor(codes=self.weight_codes(), scale=self.weight_scale.reshape(-1, 1), zero=None,
                               spec=self.spec, shape=(self.out_features, self.in_features))

    def nbytes(self) -> int:
        # this slice's share of the group's packed weight, scales and column offsets
        return self.out_features * (self.in_features + 8) + (0 if self.bias is None else 4 * self.out_features)

    def unfused(self) -> Int8Linear:
        return Int8Linear.from_quantized(self.quantized(), self.bias, backend=self.backend)

    def extra_repr(self) -> str:
        a, b = self.group.bounds[self.index]
        return f"in={self.in_features}, out={self.out_features}, rows {a}:{b} of a fused int8 GEMM"


def fuse_int8_siblings(model: nn.Module, arch) -> int:
    """Fuse every group of same-input dynamic ``Int8Linear`` siblings in every block (in
    place); returns how many groups were fused. Groups with a static activation scale, a
    different backend or any member that is not an Int8Linear are left alone."""
    from slimformer.models.registry import get_module, set_module

    fused = 0
    for block in arch.get_blocks(model):
        for names in sibling_groups(arch):
            try:
                members = [get_module(block, n) for n in names]
            except Exception:
                continue
            if not all(type(m) is Int8Linear and m.act_scale is None for m in members):
                continue
            if len({(m.backend, m.in_features) for m in members}) != 1:
                continue
            group = FusedInt8Group(members)
            for i, (n, m) in enumerate(zip(names, members)):
                set_module(block, n, FusedInt8Slice(group, i, m))
            fused += 1
    return fused


def unfuse_int8_siblings(model: nn.Module) -> int:
    """Undo :func:`fuse_int8_siblings` (e.g. before a method that edits single linears)."""
    n = 0
    for name, m in list(model.named_modules()):
        if isinstance(m, FusedInt8Slice):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, m.unfused())
            n += 1
    return n

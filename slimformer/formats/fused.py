"""Run-time fusion of int8 linears that read the same input (q/k/v, gate/up), and of a whole
gated W8A8 MLP into one kernel call (:class:`Int8GatedMLP`).

A W8A8 block calls ``q_proj(x)``, ``k_proj(x)`` and ``v_proj(x)`` on the same tensor, so three
int8 GEMMs each quantize ``x`` again (a full pass over the activations per call) and each pay
the kernel's fixed cost. :func:`fuse_int8_siblings` packs the siblings' int8 rows into ONE
prepacked weight; the first sibling called computes the fused product once and every sibling
returns its own column slice of it. The HF modules keep calling their projections as before:
nothing in the model's forward is rewritten.

The result is bit-identical to the unfused modules: the activation grid is per token (it
depends on ``x`` only), the int8 products accumulate exactly in int32, and each output column
is rescaled by its own weight scale, so which other rows share the GEMM changes nothing.

With slimformer's C++ kernels, a gated MLP whose gate/up are such a fused pair and whose down
projection is an ``Int8Linear`` then becomes an :class:`Int8GatedMLP`: quantize, gate/up GEMM,
SiLU * up, re-quantize and the down GEMM in one call, the intermediate activations never
written out in fp32 (outputs agree with the unfused modules to SiLU's float rounding).

Saved folders never contain the fused form: a :class:`FusedInt8Slice` saves as the plain
``Int8Linear`` it stands for, an :class:`Int8GatedMLP` keeps its children's names, and loading
fuses again.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimformer.formats.linear import KERNEL_MAX_M, Int8Linear
from slimformer.kernels import cpu_kernels
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


def _is_silu(act) -> bool:
    if not callable(act):
        return False
    probe = torch.linspace(-6, 6, 25)
    try:
        return torch.equal(act(probe), F.silu(probe))
    except Exception:
        return False


class Int8GatedMLP(nn.Module):
    """A gated MLP (``down(act(gate(x)) * up(x))``) whose gate/up are one fused int8 GEMM and
    whose down projection is an ``Int8Linear``: one kernel call does the two int8 GEMMs, and
    the gate/up output is rescaled, put through SiLU * up and re-quantized row by row without
    ever being written out in fp32 (at 512 tokens that round trip cost more than the GEMMs'
    own differences; ``benchmarks/RESULTS.md``).

    It holds the original MLP's children under their own names, so the state dict and saved
    folders are the same as the unfused model's; ``load`` builds it again. Anything the
    kernel does not take (no kernels, autograd, non-fp32 input, unfused members) runs the
    plain expression. Not bit-identical to the unfused modules: SiLU is computed with our
    exponential (agrees to float rounding).
    """

    def __init__(self, mlp: nn.Module, gate: str, up: str, down: str):
        super().__init__()
        for name, child in mlp.named_children():
            setattr(self, name, child)
        self._names = (gate, up, down)

    def _members(self):
        return tuple(getattr(self, n) for n in self._names)

    def fusable(self) -> bool:
        gate, up, down = self._members()
        return (isinstance(gate, FusedInt8Slice) and isinstance(up, FusedInt8Slice)
                and gate.group is up.group and len(gate.group.bounds) == 2
                and (gate.index, up.index) == (0, 1) and gate.bias is None and up.bias is None
                and gate.out_features == up.out_features == down.in_features
                and type(down) is Int8Linear and down.backend == "int_mm"
                and gate.group.linear.backend == "int_mm")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = self._members()
        kern = cpu_kernels()
        if (kern is not None and x.dtype == torch.float32 and self.fusable()
                and not (torch.is_grad_enabled() and x.requires_grad)):
            lin = gate.group.linear
            args = (x.reshape(-1, x.shape[-1]), lin.weight_int8, lin.weight_scale, lin.act_scale,
                    down.weight_int8, down.weight_scale, down.bias, down.act_scale)
            if torch.compiler.is_compiling():
                y = torch.ops.slimformer.w8a8_gated_mlp(*args)
            else:
                y = kern.w8a8_gated_mlp(*args)
            return y.view(*x.shape[:-1], y.shape[-1])
        return down(self.act_fn(gate(x)) * up(x))


def fuse_int8_mlps(model: nn.Module, arch) -> int:
    """Replace every block's gated MLP whose gate/up are fused int8 siblings (and whose
    activation is SiLU, and down an ``Int8Linear``) by an :class:`Int8GatedMLP`; returns how
    many. Needs the C++ kernels; a no-op without them."""
    from slimformer.models.registry import get_module, set_module

    if cpu_kernels() is None or not arch.mlp.gate:
        return 0
    parent = arch.mlp.gate.rsplit(".", 1)[0]
    if not parent or parent != arch.mlp.up.rsplit(".", 1)[0] or parent != arch.mlp.down.rsplit(".", 1)[0]:
        return 0
    names = tuple(p.rsplit(".", 1)[1] for p in (arch.mlp.gate, arch.mlp.up, arch.mlp.down))
    n = 0
    for block in arch.get_blocks(model):
        try:
            mlp = get_module(block, parent)
        except Exception:
            continue
        if isinstance(mlp, Int8GatedMLP) or not _is_silu(getattr(mlp, "act_fn", None)):
            continue
        fused = Int8GatedMLP(mlp, *names)
        if fused.fusable():
            set_module(block, parent, fused)
            n += 1
    return n


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


class Int8WeightOnlyGroup(nn.Module):
    """Symmetric 8-bit weight-only linears (:class:`QuantLinear`) that read the same input
    (q/k/v, gate/up) as ONE kernel call for a few tokens: ``cat([m(x) for m in members], -1)``
    bit for bit (each output column is its member's own sum), without copying the weights.
    The decoding loop builds these for its own use (a W8 draft's decode step: 4 instead of 7
    calls per block); the model keeps its modules. Other inputs call the members."""

    def __init__(self, members: list, group_size: int):
        super().__init__()
        self._members = list(members)  # a plain list: not registered (the model owns them)
        self.in_features = members[0].in_features
        self.out_features = sum(m.out_features for m in members)
        self.group_size = group_size
        biases = [m.bias for m in members]
        self.bias = None if all(b is None for b in biases) else torch.cat(
            [torch.zeros(m.out_features) if b is None else b.detach().float() for m, b in zip(members, biases)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dtype is torch.float32 and x.numel() <= KERNEL_MAX_M * self.in_features
                and not (torch.is_grad_enabled() and x.requires_grad)):
            qs, ss = [m.qweight for m in self._members], [m.scale for m in self._members]
            x2 = x.reshape(-1, self.in_features)
            if torch.compiler.is_compiling():
                y = torch.ops.slimformer.int8w_linear_cat(x2, qs, ss, self.group_size)
            else:
                k = cpu_kernels()
                y = None if k is None else k.int8w_linear_cat(x2, qs, ss, self.group_size)
            if y is not None:
                if self.bias is not None:
                    y += self.bias
                return y.view(*x.shape[:-1], self.out_features)
        return torch.cat([m(x) for m in self._members], dim=-1)


def fuse_weight_only(members: list) -> Optional[Int8WeightOnlyGroup]:
    """An :class:`Int8WeightOnlyGroup` of ``members`` when our kernel can run them as one call
    (all symmetric 8-bit per-channel or same-group-size QuantLinears of one input width, the
    C++ kernels built), else None."""
    from slimformer.formats.linear import QuantLinear

    if len(members) < 2 or not all(type(m) is QuantLinear for m in members):
        return None
    args = [m._cached_kernel_args() if m.spec.bits == 8 else None for m in members]
    if any(a is None or a[2] is not None or a[4] != 128.0 for a in args):  # zero points: not here
        return None
    if len({(m.in_features, a[3], a[1].shape[1], a[1].dtype) for m, a in zip(members, args)}) != 1:
        return None
    return Int8WeightOnlyGroup(members, args[0][3])

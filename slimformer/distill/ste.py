"""Training quantized students: fake-quant linears with a straight-through estimator (QAT-style
KD after RTN / GPTQ).

A packed :class:`~slimformer.formats.QuantLinear` has no trainable weight. :func:`to_fake_quant`
swaps each one for a :class:`FakeQuantLinear` holding a trainable fp32 weight ``w`` initialised
from the dequantized weight; its forward uses

    ``w_q = w + (Q(w) - w).detach()``   (the straight-through estimator)

so the forward sees exactly the quantized weight while the gradient reaches ``w`` as if ``Q``
were the identity. ``Q`` quantizes onto the **fixed** grid of the original module: its per-group
scales (and zero points) are kept as they were, not recomputed from the moving weight. So the
forward during training is exactly what the re-packed model computes, re-quantization after
training is exact (:func:`from_fake_quant`: same spec, same scales, new codes, a real packed
QuantLinear again — the saved model is still really W4), and with a zero learning rate the
codes come back unchanged. The price: weights that drift past the grid's range clamp to its end
codes (the scales do not learn — this is not LSQ).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimformer.primitives.affine import (QuantizedTensor, dequantize_values, expand_groups,
                                          quantize_values)

QUANTIZED_MODES = ("frozen", "ste")


class FakeQuantLinear(nn.Module):
    """``y = x @ w_q^T + b`` with ``w_q = w + (Q(w) - w).detach()`` on a fixed quantization grid
    (see the module docstring). Build with :meth:`from_quant_linear`; back with :meth:`to_quant_linear`."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], qt: QuantizedTensor,
                 backend: str) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight.detach().to(torch.float32).clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(torch.float32).clone())
        self.spec, self.backend = qt.spec, backend
        self.register_buffer("scale", qt.scale.clone())
        self.register_buffer("zero", None if qt.zero is None else qt.zero.clone())
        self._dq_scale = qt.dq_scale  # nf4 double-quant representation of ``scale``, kept as it was

    @classmethod
    def from_quant_linear(cls, ql) -> "FakeQuantLinear":
        return cls(ql.dequantized_weight(), ql.bias, ql.quantized(), ql.backend)

    def _cols(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        k, spec = self.in_features, self.spec
        s = expand_groups(self.scale, k, spec)
        z = None if (self.zero is None or spec.symmetric) else expand_groups(self.zero, k, spec)
        return s, z

    def codes(self) -> torch.Tensor:
        """Codes of the current weight on the fixed grid ``[out, in]``."""
        s, z = self._cols()
        return quantize_values(self.weight.detach(), s, z, self.spec)

    def quantized_weight(self) -> torch.Tensor:
        """``Q(w)``: the current weight rounded onto the fixed grid (no gradient)."""
        s, z = self._cols()
        return dequantize_values(quantize_values(self.weight.detach(), s, z, self.spec), s, z, self.spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        wq = w + (self.quantized_weight() - w).detach()  # STE: forward Q(w), gradient d/dw = identity
        return F.linear(x, wq.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def to_quant_linear(self):
        """The packed QuantLinear of the current weight: same spec, scales and backend."""
        from slimformer.formats import QuantLinear

        qt = QuantizedTensor(codes=self.codes().contiguous(), scale=self.scale, zero=self.zero, spec=self.spec,
                             shape=(self.out_features, self.in_features), dq_scale=self._dq_scale)
        return QuantLinear.from_quantized(qt, None if self.bias is None else self.bias.detach(),
                                          backend=self.backend)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, fake-quant {self.spec}"


def to_fake_quant(model: nn.Module) -> list[str]:
    """Replace every QuantLinear in ``model`` by a :class:`FakeQuantLinear` (in place); the names
    of the replaced modules."""
    from slimformer.formats import QuantLinear
    from slimformer.models.registry import set_module

    names = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    for n in names:
        set_module(model, n, FakeQuantLinear.from_quant_linear(model.get_submodule(n)))
    return names


def from_fake_quant(model: nn.Module) -> list[str]:
    """Re-pack every FakeQuantLinear in ``model`` into a real QuantLinear (in place); the names."""
    from slimformer.models.registry import set_module

    names = [n for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)]
    for n in names:
        set_module(model, n, model.get_submodule(n).to_quant_linear())
    return names

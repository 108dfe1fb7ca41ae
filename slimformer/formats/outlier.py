"""LLM.int8() (Dettmers et al., 2022; survey §3.1): an int8 GEMM for the regular input
features and a 16-bit GEMM for the few outlier features.

A handful of hidden-state features of a transformer carry magnitudes 10-100x larger than the
rest. A per-token int8 activation scale is set by them, and every other feature of that token
loses its resolution. LLM.int8() splits the input features ``K`` into outlier columns ``O``
(features whose calibrated magnitude exceeds a threshold, 6.0 in the paper) and the regular
columns ``R = K \\ O``::

    Y = s_x · s_w · (X_R,int8 · W_R,int8ᵀ)   +   X_O · W_Oᵀ (16-bit weights)   +   b
        └── Int8Linear on the regular columns ──┘   └── outlier part, fp32 compute ──┘

The regular part IS an :class:`~slimformer.formats.Int8Linear` (int8 per-output-channel
weights of ``W[:, R]``, dynamic per-token int8 activations, fbgemm int8 GEMM) — reused, not
re-implemented. The outlier weight columns are stored in float16 (or bfloat16) and multiplied
in fp32, so the outlier features carry no quantization error beyond the 16-bit weight storage.

The inner Int8Linear is kept out of the module tree on purpose: the format registry walks
``named_modules`` for packed types, and a registered type nested inside another would be
saved and counted twice.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn

from slimformer.formats.linear import Int8Linear

OUTLIER_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


class Int8OutlierLinear(nn.Module):
    """``y = Int8Linear(x[:, R]) + x[:, O] @ W_O16ᵀ + b`` with ``O`` fixed at calibration.

    Buffers: ``outlier_idx`` / ``regular_idx`` (int32 column indices, sorted),
    ``outlier_weight`` ``[N, |O|]`` 16-bit, ``bias`` fp32 or None. The regular part is
    ``self.int8`` (an :class:`Int8Linear` over ``|R|`` inputs, None when every column is an
    outlier).
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias: Optional[torch.Tensor]

    @property
    def int8(self) -> Optional[Int8Linear]:
        return self.__dict__["_int8"]

    @classmethod
    def from_parts(cls, int8: Optional[Int8Linear], outlier_idx: torch.Tensor,
                   outlier_weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> "Int8OutlierLinear":
        """Assemble from the regular part (an Int8Linear over the non-outlier columns, without
        bias), the outlier column indices and their 16-bit weight columns ``[N, |O|]``."""
        idx = torch.as_tensor(outlier_idx).reshape(-1).to(torch.long)
        n, n_o = outlier_weight.shape
        if n_o != idx.numel():
            raise ValueError(f"outlier_weight has {n_o} columns for {idx.numel()} outlier indices")
        if outlier_weight.dtype not in OUTLIER_DTYPES.values():
            raise ValueError(f"outlier weights must be float16 or bfloat16, got {outlier_weight.dtype}")
        k_reg = 0 if int8 is None else int8.in_features
        if int8 is not None and (int8.out_features != n or int8.bias is not None):
            raise ValueError("the int8 part must have the same outputs and no bias of its own")
        k = k_reg + n_o
        if n_o and not (bool((idx.diff() > 0).all()) and int(idx[0]) >= 0 and int(idx[-1]) < k):
            raise ValueError(f"outlier indices must be sorted, distinct and in [0, {k})")
        m = cls(k, n)
        keep = torch.ones(k, dtype=torch.bool)
        keep[idx] = False
        m.register_buffer("outlier_idx", idx.to(torch.int32))
        m.register_buffer("regular_idx", keep.nonzero().reshape(-1).to(torch.int32))
        m.register_buffer("outlier_weight", outlier_weight.detach().contiguous().clone())
        m.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32).clone())
        m.__dict__["_int8"] = int8
        return m

    # ---- the two parts (public so tests can check each one exactly) ------------------------
    def regular_part(self, x2: torch.Tensor) -> torch.Tensor:
        """Int8 GEMM over the regular columns of ``x2`` [M, K] -> [M, N] fp32."""
        if self.int8 is None:
            return x2.new_zeros(x2.shape[0], self.out_features)
        xr = x2 if self.outlier_idx.numel() == 0 else x2.index_select(1, self.regular_idx)  # [M, |R|]
        return self.int8(xr)

    def outlier_part(self, x2: torch.Tensor) -> torch.Tensor:
        """16-bit-weight GEMM over the outlier columns of ``x2`` [M, K] (fp32 compute)."""
        if self.outlier_idx.numel() == 0:
            return x2.new_zeros(x2.shape[0], self.out_features)
        xo = x2.index_select(1, self.outlier_idx)  # [M, |O|]
        return xo @ self.outlier_weight.to(torch.float32).t()  # [M, N]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(torch.float32)  # [M, K]
        y = self.regular_part(x2)
        if self.outlier_idx.numel():
            y = y + self.outlier_part(x2)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def nbytes(self) -> int:
        own = sum(t.numel() * t.element_size() for t in self.buffers() if t is not None)
        return own + (0 if self.int8 is None else self.int8.nbytes())

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, outliers={self.outlier_idx.numel()} "
                f"({str(self.outlier_weight.dtype).replace('torch.', '')}), rest W8A8 dynamic per-token")


# ---------------------------------------------------------------------------------------------
# save / load through the format registry; the int8 part is saved by Int8Linear's own entry
# ---------------------------------------------------------------------------------------------
def _to_tensors(m: Int8OutlierLinear) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from slimformer.formats.serialize import MODULE_FORMATS

    t = {"outlier_idx": m.outlier_idx, "outlier_weight": m.outlier_weight}
    info: dict[str, Any] = {"outliers": int(m.outlier_idx.numel())}
    if m.int8 is not None:
        it, iinfo = MODULE_FORMATS["Int8Linear"][1](m.int8)
        t.update({f"int8.{k}": v for k, v in it.items()})
        info["int8"] = {"in_features": m.int8.in_features, "out_features": m.int8.out_features, **iinfo}
    return t, info


def _build(info: dict[str, Any], get) -> Int8OutlierLinear:
    from slimformer.formats.serialize import MODULE_FORMATS

    int8 = None
    if "int8" in info:
        int8 = MODULE_FORMATS["Int8Linear"][2](info["int8"], lambda k: get(f"int8.{k}"))
    return Int8OutlierLinear.from_parts(int8, get("outlier_idx"), get("outlier_weight"), get("bias"))


def _register() -> None:
    from slimformer.formats.serialize import register_module_format

    register_module_format(Int8OutlierLinear, _to_tensors, _build)


_register()

__all__ = ["Int8OutlierLinear", "OUTLIER_DTYPES"]

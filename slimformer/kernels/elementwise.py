"""RMSNorm and rotary embedding for the decoding loop and the engine, on our C++ kernels where
a call is small.

A SmolLM2 decode step calls 61 RMSNorms and 60 rotary embeddings. Each is five to eight small
PyTorch ops; together ~15% of an eager fp32 step on a 2-core host (one transformers RMSNorm call
~39 us, ``F.rms_norm`` ~25 us, our kernel ~10 us). The kernels compute the same values bit for
bit. The RMSNorm sums the squares in the order of ATen's float sum, so a step's logits do not
change. Large inputs (the engine's calibration batches), autograd, other dtypes and
``torch.compile`` take PyTorch's fused ``rms_norm`` (the same numbers too) and the plain rotary ops.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimformer.kernels import cpu_kernels
from slimformer.primitives.rotary import apply_rotary_heads_last

# transformers' RMSNorms whose forward is weight * (x * rsqrt(mean(x^2) + variance_epsilon)) in
# float32 (Gemma's (1 + weight) form is not among them)
RMS_NORM_CLASSES = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"})
KERNEL_MAX_ROWS = 64  # rows up to which a norm runs our kernel (call overhead dominates)
# the kernel's sum order is that of ATen's AVX2 reduction, which x86 builds run on AVX2 and
# AVX-512 CPUs; elsewhere the norm stays on PyTorch's op (the same values by definition)
ATEN_SUM_ORDER_KNOWN = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def _eager_fp32(x: torch.Tensor, w: torch.Tensor) -> bool:
    return (x.dtype is torch.float32 and w.dtype is torch.float32 and not torch.compiler.is_compiling()
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)))


def fast_rms_norm(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``module`` itself, or a function computing ``module(x)`` in one call: our C++ kernel for
    a few eager float32 rows, PyTorch's ``rms_norm`` otherwise (the same values either way). Only
    the classes in ``RMS_NORM_CLASSES`` are taken: the formula is known for them, not for
    another class."""
    w = getattr(module, "weight", None)
    if (type(module).__name__ not in RMS_NORM_CLASSES or not isinstance(w, torch.Tensor) or w.dim() != 1
            or not isinstance(getattr(module, "variance_epsilon", None), float)):
        return module
    kern = cpu_kernels() if ATEN_SUM_ORDER_KNOWN else None

    def run(x: torch.Tensor) -> torch.Tensor:
        w, eps = module.weight, module.variance_epsilon  # per call: the model's, even if replaced
        if (kern is not None and x.numel() <= KERNEL_MAX_ROWS * w.shape[0] and _eager_fp32(x, w)
                and x.shape[-1] == w.shape[0]):
            return kern.rms_norm(x, w, eps)
        return F.rms_norm(x, (x.shape[-1],), w, eps)
    return run


def rotary_heads_last(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x`` [B, S, H, D] (heads before their transpose) with ``cos`` /
    ``sin`` [B, S, D]: the values of :func:`~slimformer.primitives.rotary.apply_rotary` on
    ``x.transpose(1, 2)``, in the [B, S, H, D] layout; one C++ call for eager float32 tensors."""
    kern = cpu_kernels()
    if kern is not None and _eager_fp32(x, cos) and sin.dtype is torch.float32 and x.shape[-1] % 2 == 0:
        return kern.rotary(x, cos, sin)
    return apply_rotary_heads_last(x, cos, sin)

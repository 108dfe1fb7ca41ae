"""Causal prefill attention for transformers models: our C++ kernel where it applies, SDPA elsewhere.

PyTorch's CPU flash-attention kernel splits a 512-token prompt into query tiles against one
512-key tile, so a causal prompt pays for the whole square and masks half of it away.
``cpu_kernels().causal_attention`` computes each block of query rows against the keys up to
its last row only (about half the work) in fp32, with grouped-query attention read in place:
on SmolLM2's 9-head x 512-token square it takes 1.9 ms where SDPA takes 4.3 ms
(``benchmarks/RESULTS.md`` "Causal prefill attention"). Same sums in another order: outputs
agree with SDPA to float rounding (tested at 1e-5).

:func:`install` registers the kernel with transformers' ``AttentionInterface`` and points a
model's config at it. Only a plain causal square takes the kernel: no attention mask (an
unpadded prompt), as many keys as queries (prefill without a cache), fp32 without autograd,
head dim a multiple of 16, not inside ``torch.compile``. Everything else -- decode steps,
padded batches, training, autocast, dropout -- goes to transformers' own SDPA function
unchanged. Every causal LM slimformer hands out (``LoadedModel``: loaded, compressed, tiny --
the fp32 baseline too, so speed ratios between a compressed model and its baseline never
credit the attention kernel to compression) has it installed; ``SLIMFORMER_NO_KERNELS=1``
turns it off with the other kernels.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from slimformer.kernels import cpu_kernels

NAME = "slimformer-causal"


def _kernel_takes(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether the kernel computes exactly what causal SDPA would for these tensors."""
    n = query.shape[2]
    return (n > 1 and key.shape[2] == n
            and query.dtype == key.dtype == value.dtype == torch.float32
            and query.shape[-1] % 16 == 0 and query.shape[1] % key.shape[1] == 0
            and not (torch.is_grad_enabled() and (query.requires_grad or key.requires_grad))
            and not torch.compiler.is_compiling())


def kernel_causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            scale: float) -> Optional[torch.Tensor]:
    """The kernel's ``[B, L, H, D]`` output for an unmasked causal square, or ``None`` when the
    kernel cannot take these tensors (no kernels, not fp32, autograd, compiling, odd head dim)."""
    kern = cpu_kernels()
    if kern is None or not _kernel_takes(query, key, value):
        return None
    return kern.causal_attention(query, key, value, float(scale))


def attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                      scaling: Optional[float] = None, is_causal: Optional[bool] = None, **kwargs):
    """transformers' attention-function signature: returns ``(output [B, L, H, D], None)``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if (attention_mask is None and dropout == 0.0 and is_causal is not False
            and getattr(module, "is_causal", True) and kwargs.get("softcap") is None
            and kwargs.get("sliding_window") is None and not kwargs.get("output_attentions", False)):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        out = kernel_causal_attention(query, key, value, scale)
        if out is not None:
            return out, None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                  scaling=scaling, is_causal=is_causal, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    if NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(NAME, attention_forward)
        # masks are built as for SDPA: none at all for an unpadded causal prompt
        ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


def install(model: nn.Module) -> bool:
    """Route ``model``'s SDPA attention through :func:`attention_forward`. Returns whether it
    was installed: models on another implementation (eager, flex, ...) are left alone."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "_attn_implementation", None) not in ("sdpa", NAME):
        return False
    _register()
    for sub in model.modules():  # the config of every sub-model that carries its own choice
        c = getattr(sub, "config", None)
        if c is not None and getattr(c, "_attn_implementation", None) == "sdpa":
            c._attn_implementation = NAME
    return True


def installed(model: nn.Module) -> bool:
    return getattr(getattr(model, "config", None), "_attn_implementation", None) == NAME

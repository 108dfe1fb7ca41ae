"""Attention for transformers models: our C++ kernel where it applies, SDPA elsewhere.

* **Causal prefill.** PyTorch's CPU flash-attention kernel splits a 512-token prompt into query
  tiles against one 512-key tile, so a causal prompt pays for the whole square and masks half of
  it away. ``cpu_kernels().causal_attention`` computes each block of query rows against the keys
  up to its last row only (about half the work) in fp32, with grouped-query attention read in
  place: on SmolLM2's 9-head x 512-token square it takes 1.9 ms where SDPA takes 4.3 ms
  (``benchmarks/RESULTS.md`` "Causal prefill attention").
* **Short bidirectional (encoder) attention.** SDPA's CPU kernel costs ~2.5 ms per call on a
  batch of 64 sentences of 10-20 tokens (12 heads) whatever the length -- per-head fixed costs
  -- where ``cpu_kernels().masked_attention`` (the same tiles, every key visible, the additive
  mask added before the softmax) takes 0.3-0.8 ms. It is used up to ``ENCODER_MAX_KEYS`` keys;
  at 256 keys they tie and at 512 SDPA wins (``benchmarks/RESULTS.md``, token pruning "Stop 16").
* **Decode and verify steps over a KV cache** (our decoding loop, ``slimformer.decoding``).
  SDPA costs ~30 us for one SmolLM2 query against 160 cached keys, ~60 us in a compiled step
  (which attends over the whole masked cache) and ~90 us for an 8-token verify step with its
  mask: fixed costs, per head. ``cpu_kernels().decode_attention`` reads the visible keys in
  place (no mask tensor: query ``i`` of row ``b`` sees slots ``start[b]`` .. its own) and takes
  ~8-12 us and ~40 us. A whole SmolLM2 step: target -0.7 ms, compiled W8A8 draft -1.4 ms,
  8-token verify -3.2 ms (``benchmarks/RESULTS.md``, "Stop 17"). The runner calls it directly
  (:func:`kernel_decode_attention`, up to ``DECODE_MAX_QUERIES`` queries), not through
  ``AttentionInterface``.

Same sums in another order: outputs agree with SDPA to float rounding (tested at 1e-5).

:func:`install` registers the kernel with transformers' ``AttentionInterface`` and points a
model's config at it. Only fp32 without autograd, head dim a multiple of 16, not inside
``torch.compile``, no dropout / softcap / sliding window / returned weights takes the kernel,
and then: a causal module only for a plain causal square (no attention mask: an unpadded
prompt; as many keys as queries: prefill without a cache); a non-causal module (an encoder)
for up to ``ENCODER_MAX_KEYS`` keys with no mask or a mask shared by the heads (a bool or
additive ``[B|1, 1, Lq|1, Lk]``). Everything else -- HF's own decode steps, padded causal
batches, training, autocast -- goes to transformers' own SDPA function unchanged. Every causal LM and
encoder slimformer hands out (``LoadedModel``: loaded, compressed, tiny -- the uncompressed
baselines too, so speed ratios between a compressed or token-pruned model and its baseline never
credit the attention kernel to compression) has it installed; ``SLIMFORMER_NO_KERNELS=1`` turns
it off with the other kernels.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from slimformer.kernels import cpu_kernels

NAME = "slimformer-causal"  # (the name predates the encoder path)
ENCODER_MAX_KEYS = 128  # masked_attention beats SDPA up to here (see the module doc)
DECODE_MAX_QUERIES = 16  # decode / verify steps; longer feeds (a prompt chunk) stay on SDPA


def _common_ok(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, compiling_ok: bool = False) -> bool:
    """fp32, head dim a multiple of 16, whole query groups per KV head, no autograd, not inside
    ``torch.compile`` (unless the caller goes through the dispatcher op)."""
    return (query.dtype == key.dtype == value.dtype == torch.float32
            and query.shape[-1] % 16 == 0 and query.shape[1] % key.shape[1] == 0
            and not (torch.is_grad_enabled() and (query.requires_grad or key.requires_grad
                                                  or value.requires_grad))
            and (compiling_ok or not torch.compiler.is_compiling()))


def _kernel_takes(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether the causal kernel computes exactly what causal SDPA would for these tensors."""
    n = query.shape[2]
    return n > 1 and key.shape[2] == n and _common_ok(query, key, value)


def kernel_causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            scale: float) -> Optional[torch.Tensor]:
    """The kernel's ``[B, L, H, D]`` output for an unmasked causal square, or ``None`` when the
    kernel cannot take these tensors (no kernels, not fp32, autograd, compiling, odd head dim)."""
    kern = cpu_kernels()
    if kern is None or not _kernel_takes(query, key, value):
        return None
    return kern.causal_attention(query, key, value, float(scale))


def kernel_decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, start: torch.Tensor,
                            first: torch.Tensor, scale: float) -> Optional[torch.Tensor]:
    """Attention of ``q`` [B, H, q, D] new queries over a KV cache ``key`` / ``value`` [B, Hkv, T, D]
    (a decode or verify step): query ``i`` of row ``b`` sits at slot ``first[b] + i`` and sees keys
    ``start[b]`` .. its own slot (a pad query before ``start[b]``: its own key only). Returns
    ``[B, q, H, D]``, or ``None`` when the kernel cannot take these tensors (no kernels, more than
    ``DECODE_MAX_QUERIES`` queries, not fp32, autograd, odd head dim). Inside ``torch.compile`` it
    is the dispatcher op ``torch.ops.slimformer.decode_attention``."""
    kern = cpu_kernels()
    if kern is None or query.shape[2] > DECODE_MAX_QUERIES or not _common_ok(query, key, value, compiling_ok=True):
        return None
    if torch.compiler.is_compiling():
        return torch.ops.slimformer.decode_attention(query, key, value, start, first, float(scale))
    return kern.decode_attention(query, key, value, start, first, float(scale))


def attention_bias(mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A bool attention mask (True = attend) as the additive float32 bias the kernel takes
    (0 / -inf); None (and a float mask) stays as it is."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=torch.float32).masked_fill(~mask, float("-inf"))


def kernel_masked_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            mask: Optional[torch.Tensor], scale: float) -> Optional[torch.Tensor]:
    """The kernel's ``[B, Lq, H, D]`` output for bidirectional attention with ``mask`` (None, bool
    = attend, or additive float) shared by the heads, or ``None`` when the kernel cannot take
    these tensors (see the module doc)."""
    kern = cpu_kernels()
    if kern is None or key.shape[2] > ENCODER_MAX_KEYS or not _common_ok(query, key, value):
        return None
    bias = None
    if mask is not None:
        B, _, lq, _ = query.shape
        if (mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[0] not in (1, B)
                or mask.shape[2] not in (1, lq) or mask.shape[3] != key.shape[2]):
            return None
        if mask.dtype not in (torch.bool, torch.float32):
            return None
        bias = attention_bias(mask)
    return kern.masked_attention(query, key, value, bias, float(scale))


def attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                      scaling: Optional[float] = None, is_causal: Optional[bool] = None, **kwargs):
    """transformers' attention-function signature: returns ``(output [B, L, H, D], None)``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if (dropout == 0.0 and kwargs.get("softcap") is None and kwargs.get("sliding_window") is None
            and not kwargs.get("output_attentions", False)):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        out = None
        if is_causal is not False and getattr(module, "is_causal", True):
            if attention_mask is None:
                out = kernel_causal_attention(query, key, value, scale)
        elif not is_causal:  # an encoder's attention
            out = kernel_masked_attention(query, key, value, attention_mask, scale)
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


def uninstall(model: nn.Module) -> nn.Module:
    """Put ``model`` back on transformers' stock SDPA (e.g. a reference timing without our
    kernels). Returns ``model``."""
    for sub in model.modules():
        c = getattr(sub, "config", None)
        if c is not None and getattr(c, "_attn_implementation", None) == NAME:
            c._attn_implementation = "sdpa"
    return model


def installed(model: nn.Module) -> bool:
    return getattr(getattr(model, "config", None), "_attn_implementation", None) == NAME

"""LM-head quantization (recipe field ``head``).

The engine compresses the transformer blocks; the vocabulary projection sits outside them. In
a small decoder it is the largest matrix: SmolLM2-135M's tied 49152 x 576 head is 113 MB in
fp32, which every decode step reads in full -- half of what a W8A8 step streams. ``int8``
stores it as int8 codes with one symmetric scale per vocabulary row (weight-only: activations
stay fp32, so unlike a W8A8 head no per-token activation rounding enters the logits) in a
:class:`~slimformer.formats.QuantLinear`, whose few-token kernel reads the codes directly.

A tied input embedding keeps its own fp32 table (a lookup reads one row per token, so its size
costs disk, not decode time); the saved config then says ``tie_word_embeddings: false``.
"""
from __future__ import annotations

import torch.nn as nn

from slimformer.errors import SlimformerError

FORMATS = {"int8": dict(bits=8, symmetric=True, granularity="channel")}


def quantize_head(lm, fmt: str) -> nn.Module:
    """Replace ``lm``'s LM head (found through the architecture registry) by its ``fmt``
    quantized copy; returns the new module. The model must be a causal LM whose head is still
    a plain ``nn.Linear``."""
    from slimformer.formats import QuantLinear
    from slimformer.models.registry import get_module, set_module
    from slimformer.primitives.affine import QuantSpec, quantize

    if fmt not in FORMATS:
        raise SlimformerError(f"head: unknown format {fmt!r}; allowed: {', '.join(FORMATS)}")
    spec = lm.arch
    if spec.kind != "causal-lm" or not spec.head:
        raise SlimformerError(f"head: {fmt} needs a causal LM with an LM head; '{lm.name}' is a "
                              f"{spec.kind} model ({spec.name})")
    name = spec.resolve(lm.model, spec.head)
    head = get_module(lm.model, name)
    if type(head) is not nn.Linear:
        raise SlimformerError(f"head: '{name}' is a {type(head).__name__}, not a plain nn.Linear "
                              "(already quantized?)")
    qt = quantize(head.weight.detach().float(), QuantSpec(**FORMATS[fmt]))
    new = QuantLinear.from_quantized(qt, head.bias)
    set_module(lm.model, name, new)  # a tied embedding keeps the fp32 tensor it shares
    for cfg in {id(c): c for c in (lm.model.config, getattr(lm.model.config, "get_text_config", lambda: None)())
                if c is not None}.values():
        if getattr(cfg, "tie_word_embeddings", False):
            cfg.tie_word_embeddings = False
    return new

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
from slimformer.quant.config import RTNConfig

# what recipe.head accepts -> how the head is quantized (int8: one symmetric scale per
# vocabulary row, by the same RTN the stages use)
FORMATS = {"int8": RTNConfig(bits=8, group_size=None, symmetric=True)}


def has_lm_head(lm) -> bool:
    """Whether ``lm`` is a causal LM with an LM head the ``head`` field can act on."""
    return lm.arch.kind == "causal-lm" and bool(lm.arch.head)


def quantize_head(lm, fmt: str) -> nn.Module:
    """Replace ``lm``'s LM head (found through the architecture registry) by its ``fmt``
    quantized copy; returns the new module. The model must be a causal LM whose head is still
    a plain ``nn.Linear``."""
    from slimformer.models.registry import get_module, set_module
    from slimformer.quant.rtn import rtn_linear

    if fmt not in FORMATS:
        raise SlimformerError(f"head: unknown format {fmt!r}; allowed: {', '.join(FORMATS)}")
    spec = lm.arch
    if not has_lm_head(lm):
        raise SlimformerError(f"head: {fmt} needs a causal LM with an LM head; '{lm.name}' is a "
                              f"{spec.kind} model ({spec.name})")
    name = spec.resolve(lm.model, spec.head)
    head = get_module(lm.model, name)
    if type(head) is not nn.Linear:
        raise SlimformerError(f"head: '{name}' is a {type(head).__name__}, not a plain nn.Linear "
                              "(already quantized?)")
    new = rtn_linear(head, FORMATS[fmt])
    set_module(lm.model, name, new)  # a tied embedding keeps the fp32 tensor it shares
    cfg = lm.model.config
    for c in (cfg, cfg.get_text_config()):
        if getattr(c, "tie_word_embeddings", False):
            c.tie_word_embeddings = False
    return new

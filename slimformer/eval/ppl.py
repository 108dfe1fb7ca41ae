"""WikiText-2 perplexity, exactly the protocol of DESIGN.md.

Non-overlapping windows of ``window`` tokens over the whole tokenized test string; each window
is scored on its own (no context carried over), PPL = exp(mean over windows of the mean token
NLL). This is the GPTQ/SparseGPT protocol, which is what compression papers report; it is not
lm-eval's rolling word-perplexity.
"""
from __future__ import annotations

import logging
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimformer.data import wikitext2_test_text
from slimformer.errors import SlimformerError
from slimformer.eval.common import check_limit, max_positions, need_tokenizer, progress

log = logging.getLogger(__name__)

DEFAULT_WINDOW = 2048
QUICK_WINDOWS = 16
VARIANTS = ("quick", "full")


def window_nll(model: nn.Module, window_ids: torch.Tensor) -> float:
    """Mean next-token NLL (nats) over one window ``[T]``: T-1 predictions."""
    logits = model(input_ids=window_ids[None]).logits[0]  # [T, V]
    # predict token t+1 from position t; cross_entropy = -log_softmax gathered at the target
    return float(F.cross_entropy(logits[:-1].float(), window_ids[1:], reduction="mean"))


@torch.inference_mode()
def perplexity(model: nn.Module, ids: torch.Tensor, window: int = DEFAULT_WINDOW,
               max_windows: Optional[int] = None, show_progress: bool = False) -> dict:
    """Perplexity of a causal LM on a 1-D tensor of token ids.

    Returns ``{"ppl", "nll", "windows", "window", "tokens"}`` so a caller can tell exactly what
    was scored (a trailing partial window is dropped, as in the protocol).
    """
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    if window < 2:
        raise SlimformerError(f"perplexity window must be >= 2 tokens (got {window})")
    n = ids.numel() // window
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise SlimformerError(f"text has {ids.numel()} tokens: not one full window of {window}")
    nlls = []
    for i in progress(range(n), show_progress, "perplexity", unit="win"):
        nlls.append(window_nll(model, ids[i * window:(i + 1) * window]))
    nll = sum(nlls) / n
    return {"ppl": math.exp(nll), "nll": nll, "windows": n, "window": window,
            "tokens": n * window}


def tokenize_wikitext2(tokenizer) -> torch.Tensor:
    """The joined WikiText-2 test string tokenized once, no special tokens (the protocol)."""
    enc = tokenizer(wikitext2_test_text(), add_special_tokens=False, verbose=False)
    return torch.tensor(enc["input_ids"], dtype=torch.long)


def wikitext2(lm, variant: str = "quick", limit: Optional[int] = None,
              show_progress: bool = True) -> dict:
    """WikiText-2 test perplexity of a loaded causal LM: ``quick`` = 16 windows, ``full`` = all.

    The window is 2048 tokens, capped by the model's maximum positions (tiny test models
    have 512); the result says which window was used and whether it was capped. ``limit``
    caps the number of windows further (for smoke runs; the result then says so).
    """
    if variant not in VARIANTS:
        raise SlimformerError(f"wikitext2 variant must be one of {', '.join(VARIANTS)}, not '{variant}'")
    check_limit(limit)
    tok = need_tokenizer(lm, "wikitext2")
    window = DEFAULT_WINDOW
    cap = max_positions(lm.model)
    capped = cap is not None and cap < window
    if capped:
        log.warning("wikitext2: window capped to the model's %d positions (protocol: %d)", cap, window)
        window = cap
    max_windows = QUICK_WINDOWS if variant == "quick" else None
    if limit is not None:
        max_windows = limit if max_windows is None else min(max_windows, limit)
    res = perplexity(lm.model, tokenize_wikitext2(tok), window=window, max_windows=max_windows,
                     show_progress=show_progress)
    res["window_capped"] = capped
    return res

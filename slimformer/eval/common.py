"""Helpers shared by the evaluation tasks: model limits, progress bars, checks."""
from __future__ import annotations

import sys
from typing import Iterable, Optional, TypeVar

import torch.nn as nn
from tqdm.auto import tqdm

from slimformer.errors import SlimformerError

T = TypeVar("T")

# config attributes that bound the sequence length, in the order HF families use them
_POSITION_ATTRS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")


def max_positions(model: nn.Module) -> Optional[int]:
    """The longest sequence the model's config says it handles, or None if it does not say."""
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    for attr in _POSITION_ATTRS:
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def progress(it: Iterable[T], enabled: bool, desc: str, total: Optional[int] = None,
             unit: str = "it") -> Iterable[T]:
    """A tqdm bar on stderr, or the bare iterable when progress is off.

    Bars go to stderr so the CLI's table on stdout stays machine-readable.
    """
    if not enabled:
        return it
    return tqdm(it, desc=desc, total=total, unit=unit, file=sys.stderr, leave=False,
                dynamic_ncols=True)


def check_limit(limit: Optional[int]) -> Optional[int]:
    """``limit`` must be None or a positive item count: 0 would evaluate nothing."""
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, int):
        raise SlimformerError(f"limit must be a positive integer, not {limit!r}")
    if limit <= 0:
        raise SlimformerError(f"limit must be a positive number of items (got {limit})")
    return limit


def need_tokenizer(lm, task: str):
    if lm.tokenizer is None:
        raise SlimformerError(f"task '{task}' needs a tokenizer but model '{lm.name}' has none")
    return lm.tokenizer

"""Small statistics written out so results do not depend on scipy/sklearn being installed.

Everything here is a pure function on tensors or sequences of numbers.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from slimformer.errors import SlimformerError


def rankdata(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks of a 1-D tensor, ties given the mean of the ranks they span.

    Average ranks for ties are what makes Spearman's rho equal Pearson's r on the ranks, the
    definition every reference implementation (scipy, STS-B scripts) uses.
    """
    x = torch.as_tensor(x, dtype=torch.float64).flatten()
    n = x.numel()
    order = torch.argsort(x, stable=True)
    sorted_x = x[order]
    ranks = torch.empty(n, dtype=torch.float64)
    i = 0
    while i < n:
        j = i
        while j + 1 < n and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        # positions i..j (0-based) share ranks i+1..j+1: their mean is (i + j) / 2 + 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson correlation in float64; NaN when either side is constant."""
    x = torch.as_tensor(x, dtype=torch.float64).flatten()
    y = torch.as_tensor(y, dtype=torch.float64).flatten()
    if x.numel() != y.numel() or x.numel() < 2:
        raise SlimformerError(f"correlation needs two equally long series of >= 2 values "
                              f"(got {x.numel()} and {y.numel()})")
    xc, yc = x - x.mean(), y - y.mean()
    denom = math.sqrt(float((xc * xc).sum()) * float((yc * yc).sum()))
    if denom == 0.0:
        return float("nan")
    return float((xc * yc).sum()) / denom


def spearman(x: Sequence[float] | torch.Tensor, y: Sequence[float] | torch.Tensor) -> float:
    """Spearman's rank correlation: Pearson's r of the tie-averaged ranks."""
    return pearson(rankdata(torch.as_tensor(x)), rankdata(torch.as_tensor(y)))


def argmax_accuracy(scores: list[list[float]], gold: list[int]) -> float:
    """Fraction of items whose highest score is the gold choice (first index wins ties)."""
    if not scores:
        raise SlimformerError("accuracy over zero items")
    hits = sum(int(max(range(len(s)), key=lambda i: s[i]) == g) for s, g in zip(scores, gold))
    return hits / len(scores)

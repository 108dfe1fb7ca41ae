"""Importance of coupled structures (attention heads, FFN channels, whole blocks) — pure math.

A *coupled group* is every weight slice that must go together when one structure is removed
(survey §4.1; LLM-Pruner's dependency groups): an FFN channel ``j`` of a SwiGLU MLP is row
``j`` of ``gate`` and ``up`` and column ``j`` of ``down``; a query head ``h`` is rows
``h·d .. (h+1)·d`` of ``q`` and the same columns of ``o`` (``d`` = head dim). A group is
described by :class:`Part`\\ s — (role, axis) — and a ``unit`` (rows/columns per structure).

Importance is computed in two steps, both pure:

1. an *element-wise* score with the weight's shape ``[out, in]``:

   * :func:`magnitude_scores` ``W²`` (weight norm of the group, squared);
   * :func:`taylor_scores` ``|W ⊙ ∂L/∂W|`` (LLM-Pruner's first-order Taylor term: the loss
     change when the weight is zeroed, to first order; ``L`` = LM loss on calibration text);
   * :func:`activation_scores` ``W²_ij ‖X_j‖²`` (the energy input channel ``j`` contributes
     to the layer's output over the calibration tokens: ``Σ_t ‖x_tj W_:j‖² = ‖X_j‖² ‖W_:j‖²``),
     defined on the *consumer* of a group (``o``, ``down``), whose inputs are the structure's
     activations;

2. :func:`group_scores` sums the element-wise scores over every part of the group.

Blocks are scored by :func:`block_scores_from` (the sum over the block's parameters for
magnitude / Taylor) or by block influence ``1 - cos(h_in, h_out)`` (ShortGPT; collected by
:func:`slimformer.engine.collect_statistics`).

Selection helpers turn scores into kept indices: :func:`keep_top` (uniform width),
:func:`keep_heads_in_groups` (grouped-query attention: the same number of query heads kept in
every KV group) and :func:`global_removal` (non-uniform widths: the globally cheapest removal
steps across blocks).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

IMPORTANCE = ("magnitude", "activation", "taylor")


@dataclass(frozen=True)
class Part:
    """One weight slice of a coupled group: ``axis`` 0 = output rows, 1 = input columns."""

    role: str
    axis: int


# ---------------------------------------------------------------------------------------------
# element-wise scores ([out, in], fp32)


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().float().pow(2)


def taylor_scores(weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``|W ⊙ G|``: first-order estimate of the loss change when each weight is set to zero."""
    if grad.shape != weight.shape:
        raise ValueError(f"gradient shape {tuple(grad.shape)} != weight shape {tuple(weight.shape)}")
    return (weight.detach().float() * grad.float()).abs()


def activation_scores(weight: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """``W²_ij · ‖X_j‖²`` for a consumer linear whose input channel ``j`` has norm ``‖X_j‖``."""
    if input_norm.shape != (weight.shape[1],):
        raise ValueError(f"input norm shape {tuple(input_norm.shape)} != ({weight.shape[1]},)")
    return weight.detach().float().pow(2) * input_norm.float().pow(2)[None, :]


# ---------------------------------------------------------------------------------------------
# groups


def group_scores(parts: Sequence[tuple[torch.Tensor, int]], unit: int) -> torch.Tensor:
    """Sum element-wise scores over coupled slices -> one score per structure.

    ``parts``: ``(scores [out, in], axis)``; along ``axis`` the matrix has ``n · unit``
    entries (``n`` structures of ``unit`` rows/columns each, contiguous). Returns ``[n]``.
    """
    total = None
    for s, axis in parts:
        per_line = s.sum(dim=1 - axis)  # one value per row (axis 0) or column (axis 1)
        if per_line.numel() % unit:
            raise ValueError(f"{per_line.numel()} lines are not a whole number of {unit}-wide structures")
        g = per_line.reshape(-1, unit).sum(1)
        if total is not None and g.shape != total.shape:
            raise ValueError(f"coupled parts disagree on the structure count: {g.numel()} vs {total.numel()}")
        total = g if total is None else total + g
    if total is None:
        raise ValueError("a coupled group needs at least one part")
    return total


def block_scores_from(per_param: Sequence[torch.Tensor]) -> float:
    """A block's importance as the sum of its parameters' element-wise scores."""
    return float(sum(float(s.sum()) for s in per_param))


# ---------------------------------------------------------------------------------------------
# selection


def keep_top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the ``keep`` highest scores, in ascending index order (ties: lower index)."""
    if not 1 <= keep <= scores.numel():
        raise ValueError(f"keep must be in 1..{scores.numel()}, got {keep}")
    order = torch.argsort(scores, descending=True, stable=True)[:keep]
    return order.sort().values


def keep_heads_in_groups(head_scores: torch.Tensor, num_kv_heads: int, keep_per_group: int) -> torch.Tensor:
    """Grouped-query attention: query heads ``g·G .. (g+1)·G - 1`` share KV head ``g``; keep the
    ``keep_per_group`` best query heads of *every* group so the layout stays a regular GQA
    (each KV head still serves the same number of query heads) and no KV head is touched."""
    n = head_scores.numel()
    if n % num_kv_heads:
        raise ValueError(f"{n} query heads do not split into {num_kv_heads} KV groups")
    per = head_scores.reshape(num_kv_heads, n // num_kv_heads)
    out = [keep_top(per[g], keep_per_group) + g * per.shape[1] for g in range(num_kv_heads)]
    return torch.cat(out)


def removal_steps(scores: torch.Tensor, step: int) -> torch.Tensor:
    """Costs of removing a layer's structures ``step`` at a time, cheapest first: the sorted
    scores summed in consecutive chunks of ``step`` (a leftover ``n % step`` is never removed).
    Ascending, so removing the k cheapest steps of a layer is always a prefix."""
    s = scores.float().sort().values
    n = (s.numel() // step) * step
    return s[:n].reshape(-1, step).sum(1)


def head_removal_steps(head_scores: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """For grouped-query attention, one step removes the weakest remaining query head of every
    KV group; its cost is the sum of those heads' scores (ascending over steps)."""
    per = head_scores.float().reshape(num_kv_heads, -1).sort(dim=1).values
    return per.sum(0)


def global_removal(step_costs: Sequence[torch.Tensor], n_remove: int, max_remove: Sequence[int]) -> list[int]:
    """How many removal steps to take in each layer so that ``n_remove`` steps in total remove
    the least total importance (LLM-Pruner / Sheared-LLaMA style non-uniform widths).

    ``step_costs[l]`` must be ascending (:func:`removal_steps`); layer ``l`` gives up at most
    ``max_remove[l]`` steps. Greedy over the merged costs is optimal because each layer's
    costs are ascending: the cheapest ``n_remove`` costs always form a prefix per layer.
    """
    if n_remove < 0 or n_remove > sum(max_remove):
        raise ValueError(f"cannot remove {n_remove} steps; at most {sum(max_remove)}")
    cand = [(float(c), l, r) for l, costs in enumerate(step_costs)
            for r, c in enumerate(costs[:max_remove[l]].tolist())]
    cand.sort(key=lambda t: (t[0], t[2], t[1]))  # cost, then earlier steps first
    counts = [0] * len(step_costs)
    for _, l, r in cand[:n_remove]:
        counts[l] += 1
    return counts


__all__ = ["IMPORTANCE", "Part", "magnitude_scores", "taylor_scores", "activation_scores", "group_scores",
           "block_scores_from", "keep_top", "keep_heads_in_groups", "removal_steps", "head_removal_steps",
           "global_removal"]

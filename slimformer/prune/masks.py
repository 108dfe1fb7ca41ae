"""Pruning masks: pure functions from importance scores to a boolean keep-mask (survey §4.1).

Convention everywhere: a mask has the weight's shape ``[out, in]`` and ``True`` means KEEP.
Scores are "higher = more important" (|W| for magnitude, |W|·‖X_j‖₂ for Wanda, w²/[H⁻¹]²_jj
for SparseGPT), so pruning removes the lowest scores.

* **unstructured** — remove exactly :func:`n_pruned` weights, either in each row (``scope
  "row"``, Wanda's per-output comparison group) or across the whole matrix (``scope "layer"``,
  classic magnitude pruning).
* **N:M** — in every group of ``M`` consecutive input columns of every row keep exactly ``N``
  (2:4 is what sparse tensor cores run; 4:8 is looser).

Ties are broken deterministically: scores are sorted with a *stable* sort, so among equal
scores the lower (flattened) index is pruned first. The count is exact, never "≤ threshold"
(which would prune every tied weight and overshoot the target).
"""
from __future__ import annotations

import math
import re
from typing import Optional

import torch

from slimformer.errors import ConfigError

SCOPES = ("row", "layer")
_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_pattern(pattern: str, owner: str = "prune") -> Optional[tuple[int, int]]:
    """``"unstructured"`` -> ``None``; ``"N:M"`` -> ``(N, M)`` with ``1 <= N < M``."""
    if pattern == "unstructured":
        return None
    m = _NM.match(pattern) if isinstance(pattern, str) else None
    if m is None or not 1 <= int(m.group(1)) < int(m.group(2)):
        raise ConfigError(f"{owner}.pattern: invalid value {pattern!r}; allowed: 'unstructured' or "
                          "'N:M' with 1 <= N < M (e.g. '2:4', '4:8')")
    return int(m.group(1)), int(m.group(2))


def n_pruned(numel: int, sparsity: float) -> int:
    """How many of ``numel`` weights a target ``sparsity`` removes: ⌊sparsity·numel⌋ (the
    epsilon keeps e.g. 0.3·10 = 2.9999999999999996 at 3)."""
    return int(math.floor(sparsity * numel + 1e-9))


def _lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` lowest entries along the last dim (stable: ties -> lower index)."""
    return torch.sort(scores, dim=-1, stable=True).indices[..., :k]


def lowest_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask removing exactly the ``k`` lowest scores of the whole tensor — the same set as
    the stable sort (everything below the k-th value, then the lowest-index ties), found with
    one O(n) selection instead of sorting a whole layer."""
    flat = scores.reshape(-1)
    mask = torch.ones(flat.numel(), dtype=torch.bool)
    if k >= flat.numel():
        mask[:] = False
    elif k > 0:
        thr = flat.kthvalue(k).values
        below = flat < thr
        ties = torch.nonzero(flat == thr).reshape(-1)
        mask[below] = False
        mask[ties[: k - int(below.sum())]] = False
    return mask.reshape(scores.shape)


def unstructured_mask(scores: torch.Tensor, sparsity: float, scope: str = "row") -> torch.Tensor:
    """Keep-mask removing exactly ``n_pruned`` lowest scores per row or per matrix."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if scope == "layer":
        return lowest_k_mask(scores, n_pruned(scores.numel(), sparsity))
    mask = torch.ones_like(scores, dtype=torch.bool)
    k = n_pruned(scores.shape[-1], sparsity)
    if k:
        mask.scatter_(-1, _lowest(scores, k), False)
    return mask


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask with exactly ``n`` kept in every group of ``m`` consecutive columns of each
    row. ``scores`` is ``[rows, cols]`` (or ``[rows, groups*m]`` of any leading dims) with
    ``cols % m == 0``."""
    if not 1 <= n < m:
        raise ValueError(f"N:M needs 1 <= N < M, got {n}:{m}")
    cols = scores.shape[-1]
    if cols % m:
        raise ValueError(f"{cols} columns are not a multiple of M={m}")
    g = scores.reshape(*scores.shape[:-1], cols // m, m)  # [..., groups, M]
    mask = torch.ones_like(g, dtype=torch.bool)
    mask.scatter_(-1, _lowest(g, m - n), False)
    return mask.reshape(scores.shape)


def keep_mask(scores: torch.Tensor, sparsity: float, nm: Optional[tuple[int, int]] = None,
              scope: str = "row") -> torch.Tensor:
    """One entry point: N:M when ``nm`` is given (``sparsity`` is then ``1 - N/M``), else
    unstructured at ``sparsity`` over ``scope``."""
    return nm_mask(scores, *nm) if nm is not None else unstructured_mask(scores, sparsity, scope)


def magnitude_scores(w: torch.Tensor) -> torch.Tensor:
    """|W| (fp32)."""
    return w.detach().abs().to(torch.float32)


def wanda_scores(w: torch.Tensor, act_norm: torch.Tensor) -> torch.Tensor:
    """Wanda (Sun et al., 2023): ``S_ij = |W_ij| · ‖X_j‖₂`` — weight [out, in] times the L2
    norm of input channel ``j`` over all calibration tokens ([in])."""
    if act_norm.shape != (w.shape[-1],):
        raise ValueError(f"act_norm has shape {tuple(act_norm.shape)}, expected ({w.shape[-1]},)")
    return w.detach().abs().to(torch.float32) * act_norm.to(torch.float32).reshape(1, -1)


def check_nm(mask: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of ``m`` consecutive columns of every row keeps exactly ``n``."""
    cols = mask.shape[-1]
    if cols % m:
        return False
    return bool((mask.reshape(-1, cols // m, m).sum(-1) == n).all())


__all__ = ["SCOPES", "parse_pattern", "n_pruned", "lowest_k_mask", "unstructured_mask", "nm_mask", "keep_mask",
           "magnitude_scores", "wanda_scores", "check_nm"]

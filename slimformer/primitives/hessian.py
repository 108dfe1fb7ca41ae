"""Second-order helpers GPTQ and SparseGPT share: the damped inverse-Hessian Cholesky factor
and a one-thread section for their column sweeps."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import torch

MAX_DAMP_RETRIES = 6


def damped_inverse_cholesky(h: torch.Tensor, dampening_frac: float) -> tuple[Optional[torch.Tensor], float]:
    """Upper Cholesky factor ``U`` of ``(H + λI)⁻¹`` with ``λ = dampening_frac · mean(diag H)``,
    growing ``λ`` tenfold while a factorization fails. Returns ``(U, λ)``; ``U`` is None when
    every try failed. ``h`` must have no zero diagonal entries."""
    n = h.shape[0]
    mean_diag = float(h.diagonal().mean())
    damp = dampening_frac * mean_diag
    eye = torch.eye(n, dtype=h.dtype)
    for _ in range(MAX_DAMP_RETRIES + 1):
        L, info = torch.linalg.cholesky_ex(h + damp * eye)
        if int(info) == 0:
            u, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if int(info) == 0 and bool(torch.isfinite(u).all()):
                return u, damp
        damp = max(damp * 10.0, 1e-6 * mean_diag)
    return None, damp


@contextmanager
def one_thread():
    """Column sweeps are thousands of small vector ops: with several OpenMP threads each op
    pays a fork/join, and on a loaded machine a descheduled worker stalls every one of them
    (measured: a 960x576 GPTQ layer 0.55 s with one thread vs 8-28 s with two, most of it in
    ``cholesky_inverse``; a 576x1536 SparseGPT weight 4.3 s vs 52 s)."""
    n = torch.get_num_threads()
    if n > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if n > 1:
            torch.set_num_threads(n)

"""How fast decoding could be: memory bandwidth and bytes of weights read per token.

A batch-1 decode step reads every weight of every block and the LM head once, so
``bandwidth / weight_bytes_per_token`` is the roofline for tokens/s; reporting measured decode
speed as a fraction of it says how much is left to gain (and makes W8A8/W4 comparable).
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn as nn

from slimformer.eval.size import memory_bytes


def _median_rate(fn, nbytes: int, repeats: int) -> float:
    """Median of ``nbytes`` / seconds over ``repeats`` timed calls of ``fn`` (after one untimed)."""
    fn()
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        rates.append(nbytes / (time.perf_counter() - t))
    return statistics.median(rates)


def measure_bandwidth(mbytes: int = 256, repeats: int = 7) -> float:
    """Bytes/s of a large tensor copy (each copy reads and writes ``mbytes``): median of repeats."""
    src = torch.ones(mbytes * 2**20 // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    return _median_rate(lambda: dst.copy_(src), 2 * src.numel() * 4, repeats)


def measure_read_bandwidth(mbytes: int = 512, cols: int = 576, repeats: int = 7) -> float:
    """Bytes/s at which PyTorch's fp32 matrix-vector product streams a weight of ``mbytes``
    (``cols`` columns, larger than the last-level cache share): the operation a batch-1 decode
    step is made of, so ``this / weight_bytes_per_token`` is what the best GEMV could reach.
    Median of repeats; often above :func:`measure_bandwidth` (a copy also writes)."""
    w = torch.ones(mbytes * 2**20 // (4 * cols), cols)
    x = torch.ones(1, cols)
    return _median_rate(lambda: x @ w.t(), w.numel() * 4, repeats)


def weight_bytes_per_token(runner) -> int:
    """Bytes a batch-1 decode step must read: the run blocks, the final norm and the LM head.

    The token embedding is a row lookup and is not counted (unless tied to the head, where the
    head reads it in full); rotary tables are negligible.
    """
    blocks = runner.spec.get_blocks(runner.model)[: runner.exit_layer]
    mods = list(blocks) + [runner.head] + ([runner.final_norm] if runner.final_norm is not None else [])
    return memory_bytes(nn.ModuleList(mods))  # packed storage counted, fbgemm handles too


def bandwidth_limit(bandwidth: float, bytes_per_token: int) -> float:
    """Upper bound on decode tokens/s at batch 1."""
    return bandwidth / bytes_per_token

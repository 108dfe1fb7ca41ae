"""Prefill kernels side by side, on SmolLM2-135M's shapes, in one process:

* the W8A8 linear: slimformer's one-call kernel (per-token quantization in one pass, an int8
  product -- ours up to 8 tokens, ``torch._int_mm`` beyond -- rescale + bias in one pass) vs
  ``Int8Linear``'s fbgemm route (``quantized::linear_dynamic``, row scaling around it) vs the
  fp32 GEMM (MKL), over all 30 blocks' fused q/k/v, o, gate/up and down weights (distinct
  weights per block, so they stream from memory as in a real forward);
* causal prefill attention: slimformer's kernel vs PyTorch's SDPA (its CPU flash kernel), 9
  query heads sharing 3 KV heads, head dim 64.

Medians of --reps interleaved runs; ratios are the peer's time / ours.

    python benchmarks/bench_prefill_kernels.py [--threads 2] [--reps 15] [--tokens 512]
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

from slimformer.formats.linear import _fbgemm_per_token
from slimformer.kernels import cpu_kernels

# SmolLM2-135M: hidden 576, intermediate 1536, fused q/k/v (576 + 2 x 192) and gate/up
SHAPES = [("qkv", 576, 960), ("o", 576, 576), ("gate/up", 576, 3072), ("down", 1536, 576)]
BLOCKS = 30


def medians(fns: dict, reps: int) -> dict:
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def linears(m: int, reps: int) -> dict:
    kern = cpu_kernels()
    layers = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized-tensor creation is marked deprecated
        for _ in range(BLOCKS):
            for _, k, n in SHAPES:
                w = torch.randn(n, k) * 0.05
                scale = w.abs().amax(1) / 127
                codes = torch.round(w / scale[:, None]).to(torch.int8)
                qw = torch._make_per_channel_quantized_tensor(codes, scale.double(), torch.zeros(n, dtype=torch.long), 0)
                layers.append((torch.randn(m, k), w, codes, scale, torch.ops.quantized.linear_prepack(qw, None)))

    def ours():
        for x, _, codes, scale, _ in layers:
            kern.w8a8_linear(x, codes, scale, None, None)

    def fbgemm():  # Int8Linear's fbgemm backend route
        for x, _, _, _, packed in layers:
            _fbgemm_per_token(x, packed)

    def fp32():
        for x, w, _, _, _ in layers:
            F.linear(x, w)

    return medians({"ours": ours, "fbgemm": fbgemm, "fp32": fp32}, reps)


def attention(n: int, reps: int) -> dict:
    kern = cpu_kernels()
    q = torch.randn(1, n, 9, 64).transpose(1, 2)
    k, v = torch.randn(1, 3, n, 64), torch.randn(1, 3, n, 64)
    out = kern.causal_attention(q, k, v, 0.125)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, scale=0.125)
    err = float((out - ref.transpose(1, 2)).abs().max())
    t = medians({"ours": lambda: [kern.causal_attention(q, k, v, 0.125) for _ in range(BLOCKS)],
                 "sdpa": lambda: [F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True,
                                                                 scale=0.125) for _ in range(BLOCKS)]}, reps)
    return {**t, "max_abs_diff": err}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--tokens", type=int, default=512)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if cpu_kernels() is None:
        raise SystemExit("slimformer's C++ kernels did not build: nothing to compare")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {BLOCKS} blocks, medians of {args.reps}")
    print("| what | M | ours ms | peer | peer ms | peer / ours |")
    print("|---|---|---|---|---|---|")
    for m in (1, args.tokens):
        t = linears(m, args.reps)
        for peer in ("fbgemm", "fp32"):
            print(f"| W8A8 linears, all blocks | {m} | {t['ours']:.2f} | {peer} | {t[peer]:.2f} | "
                  f"{t[peer] / t['ours']:.2f}x |")
    a = attention(args.tokens, args.reps)
    print(f"| causal attention, all blocks | {args.tokens} | {a['ours']:.2f} | SDPA | {a['sdpa']:.2f} | "
          f"{a['sdpa'] / a['ours']:.2f}x |")
    print(f"attention max |ours - SDPA| = {a['max_abs_diff']:.1e}")


if __name__ == "__main__":
    main()

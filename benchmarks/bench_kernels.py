"""Per-layer kernel speed on SmolLM2-135M's linear shapes: fp32 nn.Linear (MKL) vs our fp32
few-token kernel, slimformer's QuantLinear (W4 g64 / g128: our int4 kernel for few tokens),
PyTorch's own int4 kernel (``_weight_int4pack_mm_for_cpu``, needs bf16 scales) and Int8Linear
(W8A8, per-token activations) and the int8 weight-only QuantLinear (``w8``: our int8 kernel for
few tokens, C++-dequantized tiles + fp32 GEMM for many), for decode (M=1), a speculative verify step (M=5) and a
512-token prefill (M=512). Medians of --reps timed calls; ratios are fp32 time / ours,
measured in the same process.

    python benchmarks/bench_kernels.py [--threads 1] [--reps 30] [--cold]

``--cold`` cycles through enough copies of each layer (>= 256 MB) that every call reads its
weights from DRAM, as a decode step does (a 135M model does not fit in the caches); without
it, one layer is called repeatedly and sits in L2/L3.

One thread by default: on a shared 2-core machine multi-threaded timings are dominated by
scheduler stalls of the second thread.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn

from slimformer.formats import Int8Linear, QuantLinear
from slimformer.formats.linear import few_token_linear
from slimformer.kernels import cpu_kernels
from slimformer.primitives.affine import QuantSpec, compute_qparams, quantize, round_scale

# (name, in_features, out_features): hidden 576, intermediate 1536, 9 heads / 3 KV heads of 64
SHAPES = [("q/o_proj", 576, 576), ("k/v_proj", 576, 192), ("gate/up_proj", 576, 1536),
          ("down_proj", 1536, 576)]


def median_us(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--cold", action="store_true", help="weights from DRAM: cycle through copies")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if cpu_kernels() is None:
        raise SystemExit("slimformer's C++ kernels are not available here (no compiler?)")
    g64 = QuantSpec(4, True, "group", 64)
    rows = []
    with torch.inference_mode():
        for name, k, n in SHAPES:
            copies = max(1, (256 << 20) // (4 * k * n)) if args.cold else 1
            lins = [nn.Linear(k, n) for _ in range(copies)]
            mods = {"fp32 kernel": [], "W4 g64": [], "W4 g128": [], "W4 g64 torch int4": [], "W8A8": [],
                    "W8 weight-only": []}
            for lin in lins:
                w, b = lin.weight.detach(), lin.bias.detach()
                s, _ = compute_qparams(w, g64)
                mods["fp32 kernel"].append(lambda x, lin=lin: few_token_linear(lin, x))
                mods["W4 g64"].append(QuantLinear.from_quantized(quantize(w, g64), b))
                mods["W4 g128"].append(QuantLinear.from_quantized(quantize(w, QuantSpec(4, True, "group", 128)), b))
                mods["W4 g64 torch int4"].append(QuantLinear.from_quantized(
                    quantize(w, g64, scale=round_scale(s)), b, backend="int4pack"))
                mods["W8A8"].append(Int8Linear.from_quantized(quantize(w, QuantSpec(8, True, "channel")), b))
                mods["W8 weight-only"].append(QuantLinear.from_quantized(quantize(w, QuantSpec(8, True, "channel")), b))

            def timed(fs, x):
                return median_us(lambda: [f(x) for f in fs], args.reps) / len(fs)

            for m in (1, 5, 512):
                x = torch.randn(m, k)
                t32 = timed(lins, x)
                row = [name, f"{k}x{n}", m, t32]
                for fs in mods.values():
                    t = timed(fs, x)
                    row += [t, t32 / t]
                rows.append(row)
    head = "| layer | in x out | M | fp32 us | " + " | ".join(f"{k} us | {k} x" for k in mods) + " |"
    print(f"torch {torch.__version__}, threads={args.threads}, reps={args.reps}, cold={args.cold}, "
          f"cpu capability {torch.backends.cpu.get_cpu_capability()}")
    print(head)
    print("|" + "---|" * (4 + 2 * len(mods)))
    for r in rows:
        cells = [str(r[0]), r[1], str(r[2]), f"{r[3]:.0f}"]
        for i in range(4, len(r), 2):
            cells += [f"{r[i]:.0f}", f"{r[i + 1]:.2f}"]
        print("| " + " | ".join(cells) + " |")
    tot = {}
    for m in (1, 5, 512):
        sel = [r for r in rows if r[2] == m]
        counts = {"q/o_proj": 2, "k/v_proj": 2, "gate/up_proj": 2, "down_proj": 1}  # per block
        f32 = sum(counts[r[0]] * r[3] for r in sel)
        parts = [f"{k} {f32 / sum(counts[r[0]] * r[4 + 2 * i] for r in sel):.2f}x"
                 for i, k in enumerate(mods)]
        tot[m] = f"M={m}: one block's 7 linears, fp32 {f32:.0f} us; speed-up " + ", ".join(parts)
    for v in tot.values():
        print(v)


if __name__ == "__main__":
    main()

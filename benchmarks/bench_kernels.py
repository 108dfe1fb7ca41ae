"""Per-layer kernel speed on SmolLM2-135M's linear shapes: fp32 nn.Linear vs slimformer's
QuantLinear (W4 g64 / g128) and Int8Linear (W8A8, per-token activations), for decode (M=1)
and a 512-token prefill (M=512). Medians of --reps timed calls; ratios are fp32 time / ours,
measured in the same process.

    python benchmarks/bench_kernels.py [--threads 1] [--reps 30]

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
from slimformer.primitives.affine import QuantSpec, quantize

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
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    with torch.inference_mode():
        for name, k, n in SHAPES:
            lin = nn.Linear(k, n)
            w, b = lin.weight.detach(), lin.bias.detach()
            mods = {"W4 g64": QuantLinear.from_quantized(quantize(w, QuantSpec(4, True, "group", 64)), b),
                    "W4 g128": QuantLinear.from_quantized(quantize(w, QuantSpec(4, True, "group", 128)), b),
                    "W8A8": Int8Linear.from_quantized(quantize(w, QuantSpec(8, True, "channel")), b)}
            for m in (1, 512):
                x = torch.randn(m, k)
                t32 = median_us(lambda: lin(x), args.reps)
                row = [name, f"{k}x{n}", m, t32]
                for mod in mods.values():
                    t = median_us(lambda: mod(x), args.reps)
                    row += [t, t32 / t]
                rows.append(row)
    head = "| layer | in x out | M | fp32 us | " + " | ".join(f"{k} us | {k} x" for k in mods) + " |"
    print(f"torch {torch.__version__}, threads={args.threads}, reps={args.reps}, "
          f"cpu capability {torch.backends.cpu.get_cpu_capability()}")
    print(head)
    print("|" + "---|" * (4 + 2 * len(mods)))
    for r in rows:
        cells = [str(r[0]), r[1], str(r[2]), f"{r[3]:.0f}"]
        for i in range(4, len(r), 2):
            cells += [f"{r[i]:.0f}", f"{r[i + 1]:.2f}"]
        print("| " + " | ".join(cells) + " |")
    tot = {}
    for m in (1, 512):
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

"""Encoder early exit on MiniLM-L6: SST-2 probe accuracy and throughput vs the full model.

A logistic probe on the final layer's mean-pooled embedding (trained on ``--train`` SST-2 train
rows, seed 0) is the full model; exit heads for blocks 1..5 are distilled from it. Full and
early-exit passes use the same block-by-block code and are timed interleaved on the 872 dev
sentences; medians of ``--runs``.

    python benchmarks/bench_early_exit.py --train 2000 --runs 3 --threads 1
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
import logging
import random
import statistics
import time

import torch

from slimformer.data import sst2
from slimformer.decoding.early_exit import distill_exit_heads, early_exit_predict, pooled_layer_states
from slimformer.eval import train_logistic_probe
from slimformer.models import load

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit  # noqa: E402

log = logging.getLogger("bench_early_exit")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="minilm-l6")
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--thresholds", default="0.8,0.9,0.95,0.99")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load(args.model)
    train = random.Random(0).sample(sst2("train"), args.train)
    dev = sst2("dev")
    sents, y = [s for s, _ in dev], torch.tensor([l for _, l in dev])
    states = pooled_layer_states(lm, [s for s, _ in train])  # [L, N, H]
    w, b = train_logistic_probe(states[-1], torch.tensor([l for _, l in train]))
    heads = distill_exit_heads(states, w, b, train_logistic_probe)
    L = states.shape[0]
    thresholds = [float(t) for t in args.thresholds.split(",")]
    times = {t: [] for t in [2.0] + thresholds}  # 2.0: never exit = the full model
    res = {}
    early_exit_predict(lm, heads, sents[:64], 2.0)  # warm-up
    for r in range(args.runs):
        for t in times:
            t0 = time.perf_counter()
            pred, ex = early_exit_predict(lm, heads, sents, t)
            times[t].append(time.perf_counter() - t0)
            res[t] = (float((pred == y).double().mean()), float(ex.double().mean() + 1))
        log.info("run %d: %s", r, "  ".join(f"{t}:{times[t][-1]:.2f}s" for t in times))
    full_s = statistics.median(times[2.0])
    out = {"model": args.model, "train": args.train, "dev": len(dev), "runs": args.runs,
           "threads": torch.get_num_threads(), "blocks": L,
           "full": {"acc": res[2.0][0], "sent_per_s": len(dev) / full_s}}
    for t in thresholds:
        s = statistics.median(times[t])
        out[f"exit@{t}"] = {"acc": res[t][0], "acc_drop_points": 100 * (res[2.0][0] - res[t][0]),
                            "mean_blocks": res[t][1], "sent_per_s": len(dev) / s,
                            "speedup_vs_full": full_s / s}
    emit(out, args.json)


if __name__ == "__main__":
    main()

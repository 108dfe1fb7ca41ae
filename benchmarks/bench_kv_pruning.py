"""KV-cache pruning on SmolLM2-135M: WikiText-2 perplexity vs KV budget (issue 5).

Each 2048-token window of the WikiText-2 test protocol (slimformer.eval.ppl: same tokens, same
non-overlapping windows) is fed through slimformer's own decode loop in chunks of ``--chunk``
tokens; before each chunk the cache is cut back by the policy so that no query ever attends
to more than ``budget x 2048`` keys (its own chunk included), and every token is scored from
the logits it got then. Policies: ``window`` (4 attention sinks + most recent tokens,
StreamingLLM) and ``h2o`` (sinks + recent window + heaviest accumulated attention, per KV
head; ``h2o-norm`` divides by the queries that saw the token; ``h2o-hf0.1`` gives the heavy
hitters a fixed 10% of the context and the recent window the rest of the budget, instead of the
``--recent-fraction`` split). At 100% nothing is evicted, so both policies equal the dense model; the script checks
that against slimformer.eval.ppl.perplexity on the same windows.

Quality only (no timing), so it may run outside the CPU lock at low priority:

    nice -n 10 python benchmarks/bench_kv_pruning.py --windows 3 --chunk 64 --threads 1 \
        --policies window,h2o,h2o-norm --plot benchmarks/kv_pruning.png

Runs on disjoint window ranges (``--first-window``, ``--json``) can be pooled into one table and
plot afterwards with ``--merge-json a.json,b.json --plot ...`` (no model run).
"""
from __future__ import annotations

import argparse
import logging
import time

import torch

from common import emit

log = logging.getLogger("bench_kv_pruning")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--windows", type=int, default=4, help="2048-token windows scored (first N)")
    ap.add_argument("--window", type=int, default=2048)
    ap.add_argument("--chunk", type=int, default=32, help="tokens fed per forward")
    ap.add_argument("--budgets", default="0.25,0.5,0.75,1.0")
    ap.add_argument("--policies", default="window,h2o",
                    help="window, h2o, h2o-norm (h2o with normalize), h2o-hf<x> (heavy_fraction x),"
                         " h2o-norm-hf<x>")
    ap.add_argument("--first-window", type=int, default=0,
                    help="skip this many windows (tune on windows not reported)")
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--recent-fraction", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    ap.add_argument("--plot", default=None, help="PNG path for the PPL-vs-budget curve")
    ap.add_argument("--json", default=None)
    ap.add_argument("--merge-json", default=None,
                    help="comma-separated --json outputs of runs on disjoint windows (same budgets, "
                         "chunk, sinks): pool their windows into one table and plot, no model run")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.merge_json:
        rows, dense, budgets, policies = merge(args)
        report(args, rows, dense, budgets, policies)
        return

    from slimformer import load
    from slimformer.eval.ppl import perplexity, tokenize_wikitext2
    from slimformer.prune.kv import KVPruningConfig, kv_pruned_perplexity

    lm = load("smollm2-135m")
    ids = tokenize_wikitext2(lm.tokenizer)[args.first_window * args.window:]
    budgets = [float(b) for b in args.budgets.split(",")]
    policies = args.policies.split(",")

    t0 = time.perf_counter()
    dense = perplexity(lm.model, ids, window=args.window, max_windows=args.windows)
    log.info("dense (HF forward, eval.ppl) PPL %.4f in %.0fs", dense["ppl"], time.perf_counter() - t0)

    rows = []
    for budget in budgets:
        for policy in policies if budget < 1.0 else policies[:1]:  # 100%: no eviction, one run
            name, *opts = policy.split("-")
            hf = [float(o[2:]) for o in opts if o.startswith("hf")]
            if any(o != "norm" and not o.startswith("hf") for o in opts):
                raise SystemExit(f"unknown policy {policy!r}")
            cfg = KVPruningConfig(policy=name, budget=budget, sinks=args.sinks,
                                  recent_fraction=args.recent_fraction, chunk=args.chunk,
                                  normalize="norm" in opts, heavy_fraction=hf[0] if hf else 0.0)
            t0 = time.perf_counter()
            res = kv_pruned_perplexity(lm, ids, cfg, window=args.window, max_windows=args.windows)
            dt = time.perf_counter() - t0
            names = policies if budget == 1.0 else [policy]
            for name in names:
                rows.append({"policy": name, "budget": budget, "budget_tokens": res["budget_tokens"],
                             "ppl": res["ppl"], "ratio_to_dense": res["ppl"] / dense["ppl"],
                             "window_nlls": res["window_nlls"], "seconds": dt})
            log.info("%s budget %.2f (%d slots): PPL %.4f (%.3fx dense) in %.0fs", policy, budget,
                     res["budget_tokens"], res["ppl"], res["ppl"] / dense["ppl"], dt)

    report(args, rows, dense, budgets, policies)


def merge(args):
    """Pool --json outputs over disjoint windows: PPL = exp(mean window NLL), as eval.ppl."""
    import json
    import math

    runs = [json.load(open(p)) for p in args.merge_json.split(",")]
    first = runs[0]
    for r in runs[1:]:
        for k in ("window", "chunk", "sinks", "recent_fraction"):
            if r[k] != first[k]:
                raise SystemExit(f"--merge-json: runs differ in {k}: {first[k]} vs {r[k]}")
    spans = sorted((r["first_window"], r["first_window"] + r["windows"]) for r in runs)
    if any(a[1] > b[0] for a, b in zip(spans, spans[1:])):
        raise SystemExit(f"--merge-json: overlapping windows {spans}")
    n = sum(r["windows"] for r in runs)
    dense_nll = sum(r["windows"] * math.log(r["dense_ppl"]) for r in runs) / n
    dense = {"ppl": math.exp(dense_nll)}
    keys = [(row["policy"], row["budget"]) for row in first["rows"]]
    keys = [k for k in keys if all(any((x["policy"], x["budget"]) == k for x in r["rows"]) for r in runs)]
    rows = []
    for policy, budget in keys:
        parts = [next(x for x in r["rows"] if (x["policy"], x["budget"]) == (policy, budget)) for r in runs]
        nlls = [v for x in parts for v in x["window_nlls"]]
        ppl = math.exp(sum(nlls) / len(nlls))
        rows.append({"policy": policy, "budget": budget, "budget_tokens": parts[0]["budget_tokens"],
                     "ppl": ppl, "ratio_to_dense": ppl / dense["ppl"], "window_nlls": nlls,
                     "seconds": sum(x["seconds"] for x in parts)})
    policies = list(dict.fromkeys(p for p, _ in keys))
    budgets = sorted({b for _, b in keys})
    args.first_window = min(r["first_window"] for r in runs)
    args.windows = n
    for k in ("window", "chunk", "sinks", "recent_fraction"):
        setattr(args, k, first[k])
    contiguous = all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    args.span = (f"{spans[0][0]}..{spans[-1][1] - 1}" if contiguous
                 else ", ".join(f"{a}..{b - 1}" for a, b in spans))
    log.info("merged %d runs: windows %s", len(runs), args.span)
    return rows, dense, budgets, policies


def report(args, rows, dense, budgets, policies) -> None:
    span = getattr(args, "span", f"{args.first_window}..{args.first_window + args.windows - 1}")
    print(f"\nSmolLM2-135M WikiText-2, windows {span} "
          f"of {args.window} tokens, chunk {args.chunk}, recent fraction {args.recent_fraction}, "
          f"{args.sinks} sinks; dense PPL (eval.ppl) {dense['ppl']:.4f}\n")
    print("| KV budget | slots | " + " | ".join(f"{p} PPL (x dense)" for p in policies)
          + " | h2o <= window |")
    print("|---|---|" + "---|" * len(policies) + "---|")
    for budget in budgets:
        by = {r["policy"]: r for r in rows if r["budget"] == budget}
        cells = [f"{by[p]['ppl']:.3f} ({by[p]['ratio_to_dense']:.3f}x)" for p in policies]
        ok = ""
        h2o = [p for p in policies if p.startswith("h2o") and p in by]
        if h2o and "window" in by:
            ok = ", ".join(f"{p}: {'yes' if by[p]['ppl'] <= by['window']['ppl'] + 1e-9 else 'NO'}" for p in h2o)
        print(f"| {budget:.0%} | {by[policies[0]]['budget_tokens']} | " + " | ".join(cells) + f" | {ok} |")

    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for p in policies:
            pts = sorted((r["budget"], r["ppl"]) for r in rows if r["policy"] == p)
            ax.plot([100 * b for b, _ in pts], [v for _, v in pts], marker="o", label=p)
        ax.axhline(dense["ppl"], color="gray", ls="--", label="dense")
        ax.set_xlabel(f"KV budget (% of {args.window}-token context)")
        ax.set_ylabel("WikiText-2 PPL")
        ax.set_title(f"SmolLM2-135M KV-cache pruning (windows {span}, chunk {args.chunk})", fontsize=10)
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        log.info("plot written to %s", args.plot)

    emit({"dense_ppl": dense["ppl"], "first_window": args.first_window, "windows": args.windows,
          "window": args.window,
          "chunk": args.chunk, "sinks": args.sinks, "recent_fraction": args.recent_fraction,
          "rows": rows}, args.json)


if __name__ == "__main__":
    main()

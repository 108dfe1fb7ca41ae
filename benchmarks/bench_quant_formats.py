"""Quality and size of the issue-4 value formats and allocations, one row per recipe, against the
uncompressed model measured in the same process.

SmolLM2 (WikiText-2 quick PPL, bytes of the quantized linears vs their fp32 weights, whole model
in memory; compressed with the protocol's 128 x 512 calibration samples where a recipe needs
them)::

    python benchmarks/bench_quant_formats.py --model smollm2-135m \
        --recipes llm-int8,nf4,fp8,mixed-w3.5,w4-g64,w3-g64

MiniLM (STS-B test Spearman)::

    python benchmarks/bench_quant_formats.py --model minilm-l6 --recipes w8a8,llm-int8

A recipe is a named recipe, a YAML path, or ``w<B>-g<G>`` (uniform RTN, symmetric) for any
bits/group. Prints a markdown table with ratios to fp32; ``--json`` also writes the rows.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import emit  # noqa: E402


def recipe_of(name: str):
    from slimformer.quant import RTNConfig
    from slimformer.recipe import Recipe, load_recipe, named_recipes

    m = re.fullmatch(r"w(\d)-g(\d+)", name)
    if m and name not in named_recipes():
        return Recipe(stages=(RTNConfig(bits=int(m[1]), group_size=int(m[2]), symmetric=True),), name=name)
    return load_recipe(name)


def describe(lm) -> dict:
    """Linear bytes, whole-model bytes, and what the formats hold (outliers, bits)."""
    from slimformer.eval.size import memory_bytes
    from slimformer.formats.serialize import quantized_modules, quantized_nbytes

    held, fp32 = quantized_nbytes(lm.model)
    out = {"linear_bytes": held, "linear_fp32_bytes": fp32, "memory_bytes": memory_bytes(lm.model)}
    mods = quantized_modules(lm.model)
    outl = [(m.outlier_idx.numel(), m.in_features) for m in mods.values() if hasattr(m, "outlier_idx")]
    if outl:
        out["outlier_columns"] = sum(o for o, _ in outl)
        out["outlier_fraction"] = sum(o for o, _ in outl) / sum(k for _, k in outl)
        out["layers_with_outliers"] = sum(1 for o, _ in outl if o)
        out["layers"] = len(outl)
    mp = (lm.meta or {}).get("mixed_precision")
    if mp:
        out["avg_bits"] = mp["avg_bits"]
        out["layers_per_bits"] = mp["layers_per_bits"]
        by_role: dict = {}
        for n, b in mp["bits"].items():
            by_role.setdefault(n.rsplit(".", 1)[-1], []).append(b)
        out["bits_by_role"] = {r: sum(v) / len(v) for r, v in by_role.items()}
        out["bits_by_block"] = [mp["bits"][n] for n in mp["bits"]]
    return out


def quality(lm, windows: int) -> dict:
    if lm.arch.kind == "causal-lm":
        from slimformer.data import wikitext2_test_text
        from slimformer.eval.ppl import perplexity

        ids = torch.tensor(lm.tokenizer(wikitext2_test_text(), add_special_tokens=False).input_ids)
        return {"ppl": perplexity(lm.model, ids, window=2048, max_windows=windows)["ppl"]}
    from slimformer.eval.encoders import stsb

    return {"stsb": stsb(lm, None, show_progress=False)["spearman"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--recipes", required=True, help="comma-separated recipe names / paths / wB-gG")
    ap.add_argument("--windows", type=int, default=16, help="WikiText-2 windows of 2048 (16 = quick)")
    ap.add_argument("--samples", type=int, default=128, help="calibration sequences (protocol: 128)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--fp32-quality", type=float, default=None,
                    help="skip the fp32 evaluation and use this PPL / STS-B (e.g. 20.7135, measured "
                         "by the same protocol in benchmarks/RESULTS.md) when the CPU is scarce")
    ap.add_argument("--json", help="write all rows here")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    import slimformer

    recipes = [r for r in a.recipes.split(",") if r]
    rows = []
    base = slimformer.load(a.model)
    t = time.perf_counter()
    if a.fp32_quality is None:
        q = quality(base, a.windows)
    else:
        q = {"ppl" if base.arch.kind == "causal-lm" else "stsb": a.fp32_quality, "given": True}
    rows.append({"recipe": "fp32", **q, **describe(base), "compress_s": 0.0, "eval_s": time.perf_counter() - t})
    print(f"done fp32: {rows[-1]}", file=sys.stderr, flush=True)
    del base
    for name in recipes:
        rec = recipe_of(name)
        lm = slimformer.load(a.model)
        t = time.perf_counter()
        lm = slimformer.compress(lm, rec, calibration={"samples": a.samples}, progress=False)
        cs = time.perf_counter() - t
        t = time.perf_counter()
        q = quality(lm, a.windows)
        rows.append({"recipe": name, **q, **describe(lm), "compress_s": cs, "eval_s": time.perf_counter() - t})
        print(f"done {name}: {rows[-1]}", file=sys.stderr, flush=True)
        del lm

    key = "ppl" if "ppl" in rows[0] else "stsb"
    ref = rows[0]
    if key == "ppl":
        print("| recipe | PPL (WikiText-2, %d windows) | PPL / fp32 | quantized-linear bytes / fp32 | "
              "model in memory / fp32 | compress s | notes |" % a.windows)
    else:
        print("| recipe | STS-B Spearman x100 | delta vs fp32 | quantized-linear bytes / fp32 | "
              "model in memory / fp32 | compress s | notes |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        lin = r["linear_bytes"] / r["linear_fp32_bytes"] if r["linear_fp32_bytes"] else None
        notes = []
        if "outlier_columns" in r:
            notes.append(f"{r['outlier_columns']} outlier cols ({100 * r['outlier_fraction']:.2f}% of inputs) "
                         f"in {r['layers_with_outliers']}/{r['layers']} layers")
        if "avg_bits" in r:
            notes.append(f"avg {r['avg_bits']:.4f} bits, layers per bits {r['layers_per_bits']}")
        qual = f"{r[key]:.4f}" if key == "ppl" else f"{r[key]:.2f}"
        if r.get("given"):
            qual += " (given, not re-measured)"
        rel = f"{r[key] / ref[key]:.4f}" if key == "ppl" else f"{r[key] - ref[key]:+.2f}"
        print(f"| {r['recipe']} | {qual} | {rel} | {'1' if lin is None else f'{lin:.4f}'} | "
              f"{r['memory_bytes'] / ref['memory_bytes']:.3f} | {r['compress_s']:.1f} | {'; '.join(notes)} |")
    if a.json:
        emit({"model": a.model, "windows": a.windows, "rows": rows}, a.json)


if __name__ == "__main__":
    main()

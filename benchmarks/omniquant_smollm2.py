"""Quality of whole-model quantization recipes on SmolLM2-135M: WikiText-2 PPL and wall time.

Each recipe (named or a YAML path) is applied to a fresh copy of the bundled fp32 SmolLM2
through ``slimformer.compress`` (protocol calibration: WikiText-2 valid tokens, seed 0;
``--calib-samples`` sequences of ``--calib-len`` tokens), then scored with the project's
WikiText-2 protocol (quick = first 16 windows of 2048). Prints one row per recipe with PPL,
PPL / fp32, PPL / the first row, compression and evaluation wall time. Rows measured earlier
can be given with ``--known 'label=ppl'`` (they are printed first, marked "known", and
serve as the reference of the ratio column); ``--fp32-ppl`` likewise (default: measured).

    python benchmarks/omniquant_smollm2.py --known 'rtn w4-g64=28.6767' --recipe omniquant-w4-g64
    python benchmarks/omniquant_smollm2.py --recipe benchmarks/recipes/rtn-w3-g64.yaml \
        --recipe omniquant-w3-g64 --fp32-ppl 20.7135
"""
from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch

from common import emit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", action="append", default=[])
    ap.add_argument("--known", action="append", default=[], help="label=ppl rows measured before")
    ap.add_argument("--fp32-ppl", type=float, default=None)
    ap.add_argument("--windows", type=int, default=16, help="2048-token windows (16 = quick)")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--save", default=None, help="folder: each compressed model is saved to <save>/<recipe>")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    blocks: list[dict] = []  # OmniQuant's per-block record (block-output MSE vs RTN), if any

    class _Records(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if hasattr(record, "omniquant"):
                blocks.append(record.omniquant)

    lg = logging.getLogger("slimformer.quant.omniquant")
    lg.setLevel(logging.INFO)
    lg.addHandler(_Records())

    import slimformer
    from slimformer.compress import CalibrationConfig
    from slimformer.eval import perplexity, tokenize_wikitext2

    base = slimformer.load("smollm2-135m")
    ids = tokenize_wikitext2(base.tokenizer)

    def ppl(model) -> float:
        return float(perplexity(model, ids, window=2048, max_windows=args.windows)["ppl"])

    rows: list[dict] = []
    for k in args.known:
        label, _, v = k.rpartition("=")
        rows.append({"recipe": label, "ppl": float(v), "known": True})
    fp32 = args.fp32_ppl
    if fp32 is None:
        t = time.perf_counter()
        fp32 = ppl(base.model)
        print(f"fp32 PPL {fp32:.4f} ({time.perf_counter() - t:.0f} s)", flush=True)
    cal = CalibrationConfig(samples=args.calib_samples, seq_len=args.calib_len)
    for r in args.recipe:
        blocks.clear()
        lm = copy.copy(base)
        lm.model = copy.deepcopy(base.model)
        t = time.perf_counter()
        out = None if args.save is None else Path(args.save) / Path(r).name.removesuffix(".yaml")
        q = slimformer.compress(lm, r, out_dir=out, overwrite=True, calibration=cal, progress=False)
        c_wall = time.perf_counter() - t
        t = time.perf_counter()
        p = ppl(q.model)
        e_wall = time.perf_counter() - t
        rows.append({"recipe": r, "ppl": p, "compress_s": c_wall, "eval_s": e_wall, "known": False,
                     "blocks": list(blocks)})
        if blocks:
            ratios = sorted(b["trained"] / b["rtn"] for b in blocks)
            print(f"{r}: per-block trained/RTN block-output MSE: median {statistics.median(ratios):.3f}, "
                  f"range {ratios[0]:.3f}..{ratios[-1]:.3f}, blocks kept at RTN "
                  f"{sum(b['kept_rtn'] for b in blocks)}/{len(blocks)}", flush=True)
        print(f"{r}: PPL {p:.4f}, compress {c_wall:.0f} s, eval {e_wall:.0f} s", flush=True)
        del lm, q
    ref = rows[0]["ppl"] if rows else None
    print(f"\nWikiText-2 ({args.windows} x 2048), fp32 PPL {fp32:.4f}; calibration "
          f"{args.calib_samples} x {args.calib_len}\n")
    print(f"| recipe | PPL | x fp32 | x {rows[0]['recipe'] if rows else '-'} | compress wall | eval wall |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        cw = "known" if row["known"] else f"{row['compress_s']:.0f} s"
        ew = "known" if row["known"] else f"{row['eval_s']:.0f} s"
        print(f"| {row['recipe']} | {row['ppl']:.4f} | {row['ppl'] / fp32:.3f} | {row['ppl'] / ref:.3f} | "
              f"{cw} | {ew} |")
    emit({"fp32_ppl": fp32, "windows": args.windows, "calib": [args.calib_samples, args.calib_len],
          "rows": rows}, args.json)


if __name__ == "__main__":
    main()

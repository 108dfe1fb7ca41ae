"""OmniQuant on the first blocks of SmolLM2-135M: block output error vs RTN, per setting.

For each setting (LWC only, LWC + LET, ...) the first ``--blocks`` blocks of the real model
are compressed through the engine (the rest of the model is cut off, so nothing else runs)
and the stage's own per-block numbers are read back from its log record: the MSE of the
block output against the fp32 block output on the training samples for plain RTN (same
bits/group) and after training, and the seconds per block. Prints one row per setting with
the median ratio trained/RTN and the median seconds per block.

    python benchmarks/omniquant_blocks.py --blocks 3 --bits 3 --samples 32 --epochs 2 \
        --setting lwc --setting lwc+let

A setting is ``lwc``, ``let`` or ``lwc+let``, optionally with ``:key=value,...`` config
overrides (e.g. ``lwc:lr_lwc=0.005``).
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


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.rows: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        if hasattr(record, "omniquant"):
            self.rows.append(record.omniquant)


def parse_setting(text: str, base: dict) -> dict:
    name, _, rest = text.partition(":")
    parts = set(name.split("+"))
    if not parts <= {"lwc", "let"}:
        raise SystemExit(f"bad setting {text!r}: use lwc, let or lwc+let[:key=value,...]")
    cfg = {**base, "lwc": "lwc" in parts, "let": "let" in parts}
    for kv in filter(None, rest.split(",")):
        k, _, v = kv.partition("=")
        cfg[k] = type(base.get(k, 0.0))(v) if k in base else float(v)
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=3)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--setting", action="append", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    rec = _Records()
    lg = logging.getLogger("slimformer.quant.omniquant")
    lg.setLevel(logging.INFO)
    lg.addHandler(rec)

    import slimformer
    from slimformer.data import calibration_samples
    from slimformer.engine.runner import EngineOptions, run
    from slimformer.quant.omniquant import OmniQuantConfig

    base_lm = slimformer.load("smollm2-135m")
    blocks = base_lm.arch.get_blocks(base_lm.model)
    del blocks[args.blocks:]  # only the first blocks: the engine stops after them
    samples = calibration_samples(base_lm.tokenizer, n=args.samples, seq_len=512)
    base = {"bits": args.bits, "group_size": args.group_size, "samples": args.samples,
            "epochs": args.epochs}
    out = {"blocks": args.blocks, "bits": args.bits, "group_size": args.group_size,
           "samples": args.samples, "epochs": args.epochs, "settings": []}
    print("| setting | per-block trained/RTN block-output MSE (* = block kept at RTN) | median ratio | median s/block |")
    print("|---|---|---|---|")
    for s in args.setting or ["lwc", "lwc+let"]:
        cfg = OmniQuantConfig(**parse_setting(s, base))
        lm = copy.deepcopy(base_lm)
        rec.rows.clear()
        t = time.perf_counter()
        run(lm, [cfg], samples, EngineOptions(batch_size=8, progress=False))
        wall = time.perf_counter() - t
        ratios = [r["trained"] / r["rtn"] for r in rec.rows]
        secs = [r["seconds"] for r in rec.rows]
        out["settings"].append({"setting": s, "config": cfg.to_dict(), "rows": list(rec.rows),
                                "median_ratio": statistics.median(ratios), "wall_s": wall})
        print(f"| {s} | {' '.join(f"{x:.3f}{'*' if r['kept_rtn'] else ''}" for x, r in zip(ratios, rec.rows))} | {statistics.median(ratios):.3f} | "
              f"{statistics.median(secs):.1f} |", flush=True)
    emit(out, args.json)


if __name__ == "__main__":
    main()

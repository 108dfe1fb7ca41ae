"""Structured pruning on SmolLM2-135M: dense vs pruned vs pruned + recovery, in one process.

Reports parameters, WikiText-2 quick PPL (protocol of DESIGN.md) before and after a short
recovery fine-tune (LoRA merged back, or full; on WikiText-2 *validation* windows, never the
test text), and prefill / decode speed of the pruned model as a ratio to the dense one timed in
the same process (interleaved runs, medians). Only the speed part takes the shared CPU lock
(``--lock``), so the long training/PPL parts can run niced outside it::

    nice -n 19 python benchmarks/bench_structured.py --recover-steps 64 \
        --variants taylor-uniform,taylor-global,magnitude-uniform,activation-uniform

The pruned model *before* recovery is saved (``--save``, default
``benchmarks/.cache/smollm2-prune20``; uniform widths, so it is also a plain Hugging Face folder)
for the distillation comparison; the recovered one next to it with a ``-<mode>`` suffix.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import fcntl
import json
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slimformer.data import calibration_samples, token_ids  # noqa: E402
from slimformer.distill.batches import chunk  # noqa: E402
from slimformer.engine import EngineOptions, run  # noqa: E402
from slimformer.eval import SpeedConfig, parameter_count, perplexity, speed_metrics, tokenize_wikitext2  # noqa: E402
from slimformer.formats import save_compressed  # noqa: E402
from slimformer.models import load  # noqa: E402
from slimformer.prune.lora import RecoverConfig, recover  # noqa: E402
from slimformer.prune.structured import StructuredPruneConfig  # noqa: E402

CACHE = Path(__file__).resolve().parent / ".cache"


@contextlib.contextmanager
def cpu_lock(path: str | None):
    if not path:
        yield
        return
    with open(path, "a") as fh:
        t0 = time.perf_counter()
        fcntl.flock(fh, fcntl.LOCK_EX)
        print(f"  (waited {time.perf_counter() - t0:.0f}s for {path})", flush=True)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def variant_config(name: str, heads: int, inter: int, samples: int) -> StructuredPruneConfig:
    importance, alloc = name.split("-")
    return StructuredPruneConfig(importance=importance, heads=heads, intermediate=inter, allocation=alloc,
                                 multiple_of=64 if alloc == "global" else 1, samples=samples)


def print_speed(speed: dict, runs: int) -> None:
    print()
    print("| speed (median of %d, same process, threads %d) | dense | pruned | pruned / dense |" % (runs, speed["threads"]))
    print("|---|---|---|---|")
    print(f"| prefill {speed['prefill_tokens']} tokens (ms) | {speed['baseline_prefill_ms']:.1f} | "
          f"{speed['prefill_ms']:.1f} | {speed['prefill_speedup']:.3f}x faster |")
    print(f"| greedy decode {speed['decode_tokens']} tokens (tok/s) | {speed['baseline_decode_tok_s']:.1f} | "
          f"{speed['decode_tok_s']:.1f} | {speed['decode_speedup']:.3f}x faster |")


def load_dense():
    return load("smollm2-135m")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--intermediate", type=int, default=1088)
    ap.add_argument("--samples", type=int, default=8, help="calibration sequences for the importance")
    ap.add_argument("--main", default="taylor-uniform", help="the variant that is recovered, timed and saved")
    ap.add_argument("--variants", default="", help="extra variants scored before recovery (importance-allocation)")
    ap.add_argument("--ppl-windows", type=int, default=16, help="WikiText-2 windows of 2048 (16 = quick)")
    ap.add_argument("--recover-mode", default="lora", choices=("lora", "full"))
    ap.add_argument("--recover-steps", type=int, default=64, help="AdamW steps of --batch x --seq-len tokens")
    ap.add_argument("--lr", type=float, default=0.0)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--runs", type=int, default=5, help="speed runs (medians)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads for scoring/PPL/training (0 = default); "
                    "speed is always timed with the default")
    ap.add_argument("--lock", default="/tmp/slimformer-cpu.lock", help="flock file for the speed part ('' = none)")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--save", default=str(CACHE / "smollm2-prune20"))
    ap.add_argument("--json", default=str(CACHE / "bench_structured.json"))
    ap.add_argument("--speed-only", action="store_true", help="only time the model saved in --save against "
                    "dense (under --lock); JSON next to --json with a -speed suffix")
    ap.add_argument("--only-variants", action="store_true", help="score --variants only (dense row from "
                    "--resume's JSON), no recovery or speed: for a second process while the first waits")
    ap.add_argument("--resume", action="store_true", help="reuse the dense/pruned rows of --json and the "
                    "pruned model saved in --save (a run that was stopped after pruning)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    t0 = time.perf_counter()
    threads0 = torch.get_num_threads()
    if args.speed_only:
        pruned_lm, dense = load(args.save), load_dense()
        with cpu_lock(args.lock):
            sp = speed_metrics(pruned_lm, baseline=dense, config=SpeedConfig(runs=args.runs), show_progress=False)
        print_speed(sp, args.runs)
        out = str(Path(args.json).with_suffix("")) + "-speed.json"
        Path(out).write_text(json.dumps({"args": vars(args), "speed": sp}, indent=2, default=str) + "\n")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    # only one model lives in memory at a time (the shared machine OOM-killed a run holding the
    # dense model, the pruned one and the training activations together)
    args.resume_from, args.json_variants = args.json, str(Path(args.json).with_suffix("")) + "-variants.json"
    prev = None if args.only_variants else (
        json.loads(Path(args.json).read_text()) if args.resume and Path(args.json).exists() else None)
    if prev is not None:  # continue a stopped run from its saved pruned model and measured rows
        main_lm = load(args.save)
        rows: list[dict] = prev["rows"][:2]
        n_dense, p_dense = rows[0]["params"], rows[0]["ppl"]
        print(f"resumed: dense PPL {p_dense:.3f} and pruned PPL {rows[1]['ppl']:.3f} from {args.json}; "
              f"pruned model from {args.save}", flush=True)
    tok = (main_lm if prev is not None else load_dense()).tokenizer
    test_ids = tokenize_wikitext2(tok)
    calib = calibration_samples(tok, n=128, seq_len=512)  # the protocol's calibration draw

    def ppl(lm) -> float:
        return perplexity(lm.model, test_ids, window=2048, max_windows=args.ppl_windows)["ppl"]

    def dump() -> None:  # after every stage, so a long run that is stopped keeps what it measured
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2, default=str) + "\n")

    def prune_variant(name: str, save: bool):
        lm = load_dense()
        cfg = variant_config(name, args.heads, args.intermediate, args.samples)
        tp = time.perf_counter()
        run(lm, [cfg], calib, EngineOptions(progress=False))
        secs = time.perf_counter() - tp
        n = parameter_count(lm.model)
        p = ppl(lm)
        rows.append({"model": f"pruned {name}", "params": n, "ppl": p, "prune_seconds": secs,
                     "widths": lm.meta["structure"]["widths"]})
        print(f"{name}: {n / 1e6:.2f}M params ({100 * (1 - n / n_dense):.1f}% removed), PPL {p:.3f}, "
              f"pruning {secs:.0f}s", flush=True)
        if save and args.save:
            save_compressed(lm, args.save, meta={"recipe": {"stages": [cfg.to_dict()]}}, overwrite=True)
            print(f"  saved {args.save}", flush=True)
        dump()
        return lm

    extra = [v for v in args.variants.split(",") if v and v != args.main]
    if args.only_variants:
        rows = [json.loads(Path(args.resume_from).read_text())["rows"][0]]
        n_dense, p_dense = rows[0]["params"], rows[0]["ppl"]
        args.json = args.json_variants
        for name in extra:
            prune_variant(name, save=False)
        return
    if prev is None:
        dense = load_dense()
        rows = []
        n_dense = parameter_count(dense.model)
        p_dense = ppl(dense)
        del dense
        rows.append({"model": "SmolLM2-135M fp32 (dense)", "params": n_dense, "ppl": p_dense})
        print(f"dense: {n_dense / 1e6:.2f}M params, PPL {p_dense:.3f}  ({time.perf_counter() - t0:.0f}s)", flush=True)
        main_lm = prune_variant(args.main, save=True)
    # recovery: non-overlapping windows of the detokenized WikiText-2 validation text
    windows = chunk(token_ids(tok, "wikitext2-detok"), args.seq_len)
    lr = args.lr or (1e-3 if args.recover_mode == "lora" else 5e-5)
    steps = args.recover_steps
    rc = RecoverConfig(mode=args.recover_mode, rank=args.rank, steps=steps, lr=lr, batch_size=args.batch,
                       seq_len=args.seq_len, warmup=min(10, steps // 10))
    cpu0 = time.process_time()
    tl = recover(main_lm, windows, rc, progress=True)
    cpu = time.process_time() - cpu0
    n_rec = parameter_count(main_lm.model)
    p_rec = ppl(main_lm)
    rows.append({"model": f"pruned {args.main} + {args.recover_mode} recovery", "params": n_rec, "ppl": p_rec,
                 "recover_seconds": tl.seconds, "recover_cpu_seconds": cpu, "recover_steps": steps, "recover_tokens": steps * args.batch * args.seq_len,
                 "loss_first": tl.loss[0], "loss_last": tl.loss[-1], "lr": lr})
    print(f"recovered ({args.recover_mode}, {steps} steps x {args.batch} x {args.seq_len} tokens, {tl.seconds:.0f}s wall, "
          f"{cpu:.0f}s CPU): "
          f"PPL {p_rec:.3f}, loss {tl.loss[0]:.3f} -> {tl.loss[-1]:.3f}", flush=True)
    if args.save:
        out = f"{args.save}-{args.recover_mode}"
        save_compressed(main_lm, out, meta={"recovery": rc.to_dict()}, overwrite=True)
        print(f"  saved {out}", flush=True)
    dump()

    speed = None
    if not args.skip_speed:
        torch.set_num_threads(threads0)
        dense = load_dense()
        with cpu_lock(args.lock):
            speed = speed_metrics(main_lm, baseline=dense, config=SpeedConfig(runs=args.runs), show_progress=False)
        rows[-1]["speed"] = speed
        dump()
        del dense
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in extra:  # other importance / allocation choices, scored before recovery only
        prune_variant(name, save=False)  # returned model dropped at once

    print()
    print(f"| model | params | params vs dense | WikiText-2 PPL ({args.ppl_windows} x 2048) | PPL vs dense |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['params'] / 1e6:.2f}M | {r['params'] / n_dense:.3f}x | {r['ppl']:.3f} | "
              f"{r['ppl'] / p_dense:.3f}x |")
    if speed:
        print_speed(speed, args.runs)
    dump()
    print(f"\ntotal {time.perf_counter() - t0:.0f}s; json: {args.json}")


if __name__ == "__main__":
    main()

"""Our decode loop vs Hugging Face ``generate``: same process, same prompts, interleaved runs.

Reports median tokens/s of each, their ratio, whether the tokens are identical, and our decode
tokens/s as a fraction of the memory-bandwidth limit (bandwidth / bytes of weights read per
token; bandwidth measured with a large tensor copy in this process).

    python benchmarks/bench_generate.py --model smollm2-135m --prompts 3 --runs 3
    python benchmarks/bench_generate.py --compile --compare-compiled out/smollm2-w8a8 --compare out/smollm2-w4-g64

Every variant of our loop is checked against the first (fp32 eager) for identical tokens, and
HF ``generate`` against it too. ``--compare`` models are compressed, so their tokens may differ.

``--steps N`` also times N single decode steps alternating ours, HF's forward and HF's matrix
products alone (MKL's GEMV over every linear): HF step / its products is the most any loop whose
products stream at MKL's rate can gain over HF on this machine. The "fp32 ceiling" line is the
roofline from the bandwidth measured after the runs (a moving target on a shared machine).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
import logging
import statistics
import time

import torch

from slimformer.data import wikitext2_test_text
from slimformer.decoding import CausalRunner, generate
from slimformer.decoding.speed import (bandwidth_limit, measure_bandwidth, measure_read_bandwidth,
                                      weight_bytes_per_token)
from slimformer.models import load

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit  # noqa: E402

log = logging.getLogger("bench_generate")


def wikitext_prompts(tok, n: int, length: int) -> list[list[int]]:
    """``n`` prompts of exactly ``length`` tokens from distinct WikiText-2 paragraphs."""
    paras = [p.strip() for p in wikitext2_test_text().split("\n\n") if len(p.strip()) > 600]
    out = []
    for p in paras:
        ids = tok(p)["input_ids"]
        if len(ids) >= length:
            out.append(ids[:length])
        if len(out) == n:
            break
    return out


def hf_generate(lm, ids: list[int], max_new: int) -> tuple[list[int], float]:
    x = torch.tensor([ids])
    with torch.inference_mode():
        t = time.perf_counter()
        y = lm.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new,
                              do_sample=False, pad_token_id=lm.tokenizer.eos_token_id)
        dt = time.perf_counter() - t
    return y[0, len(ids):].tolist(), dt


def step_times(lm, runner: CausalRunner, ids: list[int], steps: int) -> tuple[float, float, float]:
    """Median seconds of ONE decode step, ours vs the HF model's forward with its DynamicCache
    vs the HF step's matrix products alone (every linear of the model, LM head included, on one
    token through ``F.linear``, i.e. MKL's GEMV), alternating step by step (the finest
    interleaving: all three see the same machine load). HF step / its products bounds what any
    loop whose products stream at MKL's rate can gain over HF ``generate``."""
    from transformers import DynamicCache

    x = torch.tensor([ids])
    weights = [m.weight for m in lm.model.modules() if isinstance(m, torch.nn.Linear)]
    xs = {w.shape[1]: torch.randn(1, w.shape[1]) for w in weights}
    ours_t, hf_t, mm_t = [], [], []
    with torch.inference_mode():
        cache = runner.new_cache(1, len(ids) + steps + 1)
        tok_o = runner.prefill(x, torch.zeros(1, dtype=torch.long), cache)[:, -1].argmax(-1)
        hf_cache = DynamicCache()
        out = lm.model(x, past_key_values=hf_cache, use_cache=True)
        tok_h = out.logits[:, -1].argmax(-1)
        for _ in range(steps):
            t = time.perf_counter()
            tok_o = runner.forward(tok_o[:, None], cache)[:, -1].argmax(-1)
            ours_t.append(time.perf_counter() - t)
            t = time.perf_counter()
            out = lm.model(tok_h[:, None], past_key_values=hf_cache, use_cache=True)
            tok_h = out.logits[:, -1].argmax(-1)
            hf_t.append(time.perf_counter() - t)
            t = time.perf_counter()
            for w in weights:
                torch.nn.functional.linear(xs[w.shape[1]], w)
            mm_t.append(time.perf_counter() - t)
    return statistics.median(ours_t), statistics.median(hf_t), statistics.median(mm_t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-new", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3, help="interleaved repetitions per prompt")
    ap.add_argument("--steps", type=int, default=0, help="also time N single decode steps, alternating")
    ap.add_argument("--no-hf", action="store_true", help="only our loop (e.g. for compressed models)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (0 = leave as is); 1 avoids OpenMP thrashing on a shared, oversubscribed CPU")
    ap.add_argument("--compile", action="store_true",
                    help="also run the fp32 model with CausalRunner(compile=True) (compiled decode step)")
    ap.add_argument("--compare", action="append", default=[], metavar="MODEL",
                    help="also run our loop on this (compressed) model, e.g. a W8A8 or W4 folder")
    ap.add_argument("--compare-compiled", action="append", default=[], metavar="MODEL",
                    help="like --compare, and also with the compiled decode step (needs --compile)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    if args.compare_compiled and not args.compile:
        ap.error("--compare-compiled needs --compile (its ratio is to the compiled fp32 loop)")
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    lm = load(args.model)
    prompts = wikitext_prompts(lm.tokenizer, args.prompts, args.prompt_len)
    # variants of our loop: (name, model, runner); the first is the reference for ratios
    variants = [("ours", lm, CausalRunner(lm))]
    if args.compile:
        variants.append(("ours-compiled", lm, CausalRunner(lm, compile=True)))
    for path, comp in [(p, False) for p in args.compare] + [(p, True) for p in args.compare_compiled]:
        other = load(path)
        name = Path(path).name
        variants.append((name, other, CausalRunner(other)))
        if comp:
            variants.append((name + "-compiled", other, CausalRunner(other, compile=True)))
    compile_s = {}
    for name, m, runner in variants:  # warm-up; a compiled variant compiles here
        t = time.perf_counter()
        # same cache capacity as the timed runs (a compiled step is specialized to it)
        generate(m, prompts[0], args.max_new, runner=runner)
        if runner.compile:
            compile_s[name] = time.perf_counter() - t
            log.info(f"{name}: compiled in {compile_s[name]:.1f} s")
    tps = {n: [] for n, _, _ in variants}
    dec = {n: [] for n, _, _ in variants}
    same = {n: [] for n, _, _ in variants}
    hf_tps, identical = [], []
    for r in range(args.runs):
        for i, p in enumerate(prompts):
            line = f"run {r} prompt {i}:"
            ref_tokens = None  # the first variant's (fp32 eager) tokens
            for name, m, runner in variants:
                res = generate(m, p, args.max_new, runner=runner)
                tps[name].append(res.tokens_per_s)
                dec[name].append((res.num_new_tokens - 1) / res.decode_s)
                if ref_tokens is None:
                    ref_tokens = res.tokens[0]
                same[name].append(res.tokens[0] == ref_tokens)
                line += f"  {name} {res.tokens_per_s:.1f}"
            if not args.no_hf:
                toks, dt = hf_generate(lm, p, args.max_new)
                hf_tps.append(len(toks) / dt)
                identical.append(toks == ref_tokens)
                line += f"  hf {hf_tps[-1]:.1f} tok/s  identical={identical[-1]}"
            log.info(line)
    bw, read_bw = measure_bandwidth(), measure_read_bandwidth()
    out = {
        "model": args.model, "prompts": len(prompts), "prompt_len": args.prompt_len,
        "max_new": args.max_new, "runs": args.runs, "threads": torch.get_num_threads(),
        "bandwidth_GBps": bw / 1e9, "gemv_read_bandwidth_GBps": read_bw / 1e9,
    }
    base = statistics.median(dec["ours"])
    base_c = statistics.median(dec["ours-compiled"]) if args.compile else None
    table = ["| variant | tok/s (prefill + decode) | decode tok/s | decode / fp32 (same mode) | "
             "weight MB per token | bandwidth limit tok/s | fraction of limit | compile s |",
             "|---|---|---|---|---|---|---|---|"]
    for name, m, runner in variants:
        bpt = weight_bytes_per_token(runner)
        limit = bandwidth_limit(bw, bpt)
        d = statistics.median(dec[name])
        fp32 = base_c if name.endswith("-compiled") else base
        key = "ours" if name == "ours" else name.replace("-", "_")
        out.update({f"{key}_tok_s_median": statistics.median(tps[name]),
                    f"{key}_decode_tok_s_median": d, f"{key}_weight_MB_per_token": bpt / 1e6,
                    f"{key}_bandwidth_limit_tok_s": limit,
                    f"{key}_decode_fraction_of_bandwidth_limit": d / limit,
                    f"{key}_decode_over_fp32": d / fp32,
                    f"{key}_tokens_same_as_ours": all(same[name])})
        if name in compile_s:
            out[f"{key}_compile_s"] = compile_s[name]
        table.append(f"| {name} | {statistics.median(tps[name]):.2f} | {d:.2f} | {d / fp32:.2f}x | "
                     f"{bpt / 1e6:.0f} | {limit:.1f} | {d / limit:.2f} | "
                     f"{'%.0f' % compile_s[name] if name in compile_s else '-'} |")
    if args.steps:
        so, sh, sm = step_times(lm, variants[0][2], prompts[0], args.steps)
        out.update(step_ms_ours=1e3 * so, step_ms_hf_forward=1e3 * sh, step_ratio_hf_over_ours=sh / so,
                   step_ms_hf_products_alone=1e3 * sm, step_ratio_hf_over_its_products=sh / sm)
        table.append(f"\none decode step, alternating x{args.steps}: ours {1e3 * so:.1f} ms, HF forward "
                     f"{1e3 * sh:.1f} ms ({sh / so:.2f}x ours), HF's matrix products alone (MKL) "
                     f"{1e3 * sm:.1f} ms: a loop whose products stream at MKL's rate gains at most "
                     f"{sh / sm:.2f}x over HF")
    if hf_tps:
        h = statistics.median(hf_tps)
        out.update(hf_tok_s_median=h, ratio_ours_over_hf=statistics.median(tps["ours"]) / h,
                   tokens_identical=all(identical))
        if args.compile:
            out["ratio_ours_compiled_over_hf"] = statistics.median(tps["ours-compiled"]) / h
        table.insert(2, f"| HF generate | {h:.2f} | - | - | - | - | - | - |")
        # what any fp32 loop could reach here: every weight byte streamed at the GEMV rate
        stream = max(bw, read_bw)
        ceiling = bandwidth_limit(stream, weight_bytes_per_token(variants[0][2]))
        out.update(fp32_ceiling_tok_s=ceiling, fp32_ceiling_over_hf=ceiling / h)
        table.append(f"\nfp32 ceiling here: {ceiling:.1f} tok/s (weights streamed at "
                     f"{stream / 1e9:.1f} GB/s, no other cost) = {ceiling / h:.2f}x HF generate")
    print("\n".join(table))
    emit(out, args.json)


if __name__ == "__main__":
    main()

"""W8A8 vs fp32 in one process: quality and CPU speed (issue 3, "Done when").

SmolLM2-135M: WikiText-2 PPL (quick: 16 x 2048-token windows), prefill latency of a 512-token
prompt, greedy decode tokens/s over 128 new tokens — medians of interleaved runs, so load
drift on a shared machine hits both models alike. Both models run slimformer's causal prefill
attention kernel (so the ratio credits only the int8 linears); one more row times the fp32
model on transformers' stock SDPA attention for reference. MiniLM-L6: STS-B test Spearman and encode
throughput. Targets: PPL <= 1.02x fp32, prefill >= 2.5x, decode >= 1.5x; MiniLM drop <= 0.5
point, encode >= 2x.

    python benchmarks/bench_w8a8_speed.py [--runs 5] [--windows 16] [--skip-minilm] [--append]
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

log = logging.getLogger("bench_w8a8_speed")
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADING = "## W8A8 speed vs fp32 (engine owner)"


def _head_note(q) -> str:
    """What the W8A8 model's LM head is (the recipe's ``head: int8`` or fp32)."""
    from slimformer.formats import QuantLinear

    head = q.model.get_output_embeddings()
    return "W8A8 int8 head dequantized per tile" if isinstance(head, QuantLinear) else "fp32 lm_head in both"


def _smollm2(args) -> list[tuple[str, str, str, str]]:
    from slimformer import compress, load
    from slimformer.eval.ppl import wikitext2
    from slimformer.eval.speed import SpeedConfig, speed_metrics

    base = load("smollm2-135m")
    q = copy.deepcopy(base)
    t0 = time.perf_counter()
    compress(q, "w8a8", progress=False)
    t_compress = time.perf_counter() - t0
    rows = [("SmolLM2 compress time (s)", "", f"{t_compress:.1f}", "")]
    log.info("compressed SmolLM2 in %.1fs; perplexity next", t_compress)
    if args.windows > 0:
        p_base = wikitext2(base, "quick", limit=args.windows, show_progress=False)["ppl"]
        p_q = wikitext2(q, "quick", limit=args.windows, show_progress=False)["ppl"]
        rows.append((f"SmolLM2 PPL wikitext2 ({args.windows} windows)", f"{p_base:.3f}", f"{p_q:.3f}",
                     f"{p_q / p_base:.4f}x (target <= 1.02x)"))
        log.info("PPL fp32 %.3f, W8A8 %.3f; speed next", p_base, p_q)
    cfg = SpeedConfig(runs=args.runs, warmup=1)
    sp = speed_metrics(q, baseline=base, config=cfg, show_progress=False)
    rows.append(("SmolLM2 prefill 512 tok, next-token logits (ms, median)", f"{sp['baseline_prefill_ms']:.1f}",
                 f"{sp['prefill_ms']:.1f}", f"{sp['prefill_speedup']:.2f}x faster (target >= 2.5x)"))
    full = speed_metrics(q, baseline=base, config=dataclasses.replace(cfg, prefill_logits="all"),
                         show_progress=False)
    rows.append(("SmolLM2 512-tok forward, logits at every position (ms)", f"{full['baseline_prefill_ms']:.1f}",
                 f"{full['prefill_ms']:.1f}", f"{full['prefill_speedup']:.2f}x ({_head_note(q)})"))
    rows.append(("SmolLM2 greedy decode 128 tok (tok/s)", f"{sp['baseline_decode_tok_s']:.1f}",
                 f"{sp['decode_tok_s']:.1f}", f"{sp['decode_speedup']:.2f}x faster (target >= 1.5x)"))
    # both models above run slimformer's causal prefill attention kernel (load() installs it on
    # every causal LM); for reference, the fp32 model on transformers' own SDPA attention
    stock = copy.deepcopy(base)
    stock.model.config._attn_implementation = "sdpa"
    ref = speed_metrics(q, baseline=stock, config=dataclasses.replace(cfg, decode_tokens=1), show_progress=False)
    rows.append(("SmolLM2 prefill 512 tok, fp32 on transformers' SDPA (ms)", f"{ref['baseline_prefill_ms']:.1f}",
                 f"{ref['prefill_ms']:.1f}", f"{ref['prefill_speedup']:.2f}x (reference: stock fp32 attention)"))
    return rows


def _minilm(args) -> list[tuple[str, str, str, str]]:
    from slimformer import compress, load
    from slimformer.eval.encoders import stsb
    from slimformer.eval.speed import SpeedConfig, speed_metrics

    base = load("minilm-l6")
    q = copy.deepcopy(base)
    compress(q, "w8a8", progress=False)
    s_base = stsb(base, show_progress=False)["spearman"]
    s_q = stsb(q, show_progress=False)["spearman"]
    sp = speed_metrics(q, baseline=base, config=SpeedConfig(runs=args.runs, warmup=1), show_progress=False)
    return [("MiniLM STS-B test Spearman x100", f"{s_base:.2f}", f"{s_q:.2f}",
             f"{s_q - s_base:+.2f} points (target >= -0.5)"),
            ("MiniLM encode (sentences/s)", f"{sp['baseline_sentences_s']:.1f}", f"{sp['sentences_s']:.1f}",
             f"{sp['encode_speedup']:.2f}x faster (target >= 2x)")]


def table(rows: list[tuple[str, str, str, str]]) -> str:
    head = ("metric", "fp32", "W8A8", "ratio")
    w = [max(len(r[i]) for r in [head] + rows) for i in range(4)]
    line = lambda r: "| " + " | ".join(c.ljust(w[i]) for i, c in enumerate(r)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (x + 2) for x in w) + "|"] + [line(r) for r in rows])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="timed runs per model (median)")
    ap.add_argument("--windows", type=int, default=16, help="PPL windows (16 = protocol 'quick'; 0 skips)")
    ap.add_argument("--skip-minilm", action="store_true")
    ap.add_argument("--append", action="store_true", help=f"append the table to {RESULTS.name}")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    torch.manual_seed(0)
    rows = _smollm2(args)
    print(table(rows), flush=True)  # partial result first: the MiniLM part takes minutes more
    if not args.skip_minilm:
        rows += _minilm(args)
    out = table(rows)
    if not args.skip_minilm:
        print(out)
    if args.append:
        cmd = "python " + " ".join(["benchmarks/bench_w8a8_speed.py"] + sys.argv[1:])
        when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        text = (f"\n{HEADING}\n\n`{cmd}` — {when}, torch {torch.__version__}, "
                f"{torch.get_num_threads()} threads, shared 2-core machine\n\n{out}\n")
        with open(RESULTS, "a", encoding="utf-8") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

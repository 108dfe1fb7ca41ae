"""Speculative decoding on WikiText-2 prompts, side by side in one process (greedy).

Input-grounded prompts ("a paragraph, then: repeat it") are where prompt lookup shines. Per
prompt, interleaved: our plain loop, our prompt lookup, our early-exit self-draft, HF
``generate`` and HF ``generate(prompt_lookup_num_tokens=...)``. Reports median tokens/s, ratios
to our plain loop, token identity with our plain loop, and acceptance.

    python benchmarks/bench_speculative.py --prompts 20 --max-new 128 --threads 1
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
import logging
import statistics
import time

import torch

from slimformer.data import wikitext2_test_text, wikitext_detokenize
from slimformer.decoding import CausalRunner, generate
from slimformer.decoding.speculative import PromptLookupDraft, early_exit_draft, speculative_generate
from slimformer.models import load

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit  # noqa: E402

log = logging.getLogger("bench_speculative")


def grounded_prompts(tok, n: int, para_tokens: int) -> list[list[int]]:
    """``n`` prompts: a WikiText-2 paragraph (detokenized: "1 @,@ 000" -> "1,000", " , " -> ", ";
    cut to ``para_tokens``), an instruction to repeat it, and its first few words — the output
    should quote the input. (The raw WikiText spacing is not text a model reproduces: with it,
    SmolLM2 "repairs" the spacing while copying and most drafts are rejected.)"""
    paras = [wikitext_detokenize(p.strip()) for p in wikitext2_test_text().split("\n\n")
             if len(p.strip()) > 600]
    out = []
    for p in paras[:n]:
        ids = tok(p)["input_ids"][:para_tokens]
        para = tok.decode(ids)
        head = " ".join(para.split()[:6])
        out.append(tok(f"{para}\n\nRepeat the paragraph above word for word:\n\n{head}")["input_ids"])
    return out


def hf(lm, ids: list[int], max_new: int, lookup: int = 0) -> tuple[list[int], float]:
    x = torch.tensor([ids])
    kw = {"prompt_lookup_num_tokens": lookup} if lookup else {}
    with torch.inference_mode():
        t = time.perf_counter()
        y = lm.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new,
                              do_sample=False, pad_token_id=lm.tokenizer.eos_token_id, **kw)
        dt = time.perf_counter() - t
    return y[0, len(ids):].tolist(), dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--para-tokens", type=int, default=160)
    ap.add_argument("--max-new", type=int, default=128)
    ap.add_argument("--num-draft", type=int, default=8)
    ap.add_argument("--hf-lookup", type=int, default=10, help="HF prompt_lookup_num_tokens")
    ap.add_argument("--self-draft-layers", type=int, default=0, help="also time an early-exit self-draft")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--compile", action="store_true",
                    help="also time our plain loop with the compiled decode step (CausalRunner(compile=True))")
    ap.add_argument("--json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    lm = load(args.model)
    runner = CausalRunner(lm)
    prompts = grounded_prompts(lm.tokenizer, args.prompts, args.para_tokens)
    generate(lm, prompts[0], 4, runner=runner)  # warm-up
    compiled = None
    if args.compile:
        compiled = CausalRunner(lm, compile=True)
        t = time.perf_counter()
        generate(lm, prompts[0], 4, runner=compiled)
        log.info("compiled decode step in %.1f s", time.perf_counter() - t)
    modes = (["ours", "ours_lookup", "hf", "hf_lookup"] + (["ours_selfdraft"] if args.self_draft_layers else [])
             + (["ours_compiled"] if compiled else []))
    tps = {m: [] for m in modes}
    same = {m: [] for m in modes}
    acc = {m: [] for m in modes}
    for i, p in enumerate(prompts):
        ref = generate(lm, p, args.max_new, runner=runner)
        tps["ours"].append(ref.tokens_per_s)
        same["ours"].append(True)
        r = speculative_generate(lm, p, args.max_new, runner=runner, draft=PromptLookupDraft(3),
                                 num_draft=args.num_draft, adaptive=True)
        tps["ours_lookup"].append(r.tokens_per_s)
        same["ours_lookup"].append(r.tokens == ref.tokens)
        acc["ours_lookup"].append(r.stats["tokens_per_step"])
        if args.self_draft_layers:
            r = speculative_generate(lm, p, args.max_new, runner=runner, num_draft=4, adaptive=True,
                                     draft=early_exit_draft(lm, args.self_draft_layers))
            tps["ours_selfdraft"].append(r.tokens_per_s)
            same["ours_selfdraft"].append(r.tokens == ref.tokens)
            acc["ours_selfdraft"].append(r.stats["tokens_per_step"])
        if compiled is not None:
            r = generate(lm, p, args.max_new, runner=compiled)
            tps["ours_compiled"].append(r.tokens_per_s)
            same["ours_compiled"].append(r.tokens == ref.tokens)
        for m, look in (("hf", 0), ("hf_lookup", args.hf_lookup)):
            toks, dt = hf(lm, p, args.max_new, look)
            tps[m].append(len(toks) / dt)
            same[m].append(toks == ref.tokens[0])
        log.info("prompt %d (%d tokens): %s", i, len(p),
                 "  ".join(f"{m} {tps[m][-1]:.1f}" for m in modes))
    base = statistics.median(tps["ours"])
    out = {"model": args.model, "prompts": len(prompts), "max_new": args.max_new,
           "threads": torch.get_num_threads(), "num_draft": args.num_draft, "hf_lookup": args.hf_lookup}
    for m in modes:
        out[m] = {"tok_s_median": statistics.median(tps[m]),
                  "ratio_to_ours_plain": statistics.median(tps[m]) / base,
                  "median_of_per_prompt_ratios": statistics.median(a / b for a, b in zip(tps[m], tps["ours"])),
                  "identical_to_ours_plain": f"{sum(same[m])}/{len(same[m])}"}
        if acc[m]:
            out[m]["tokens_per_target_forward"] = statistics.median(acc[m])
    emit(out, args.json)


if __name__ == "__main__":
    main()

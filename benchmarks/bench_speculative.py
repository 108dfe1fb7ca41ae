"""Speculative decoding on WikiText-2 prompts, side by side in one process (greedy).

Input-grounded prompts ("a paragraph, then: repeat it") are where prompt lookup shines;
``--continue-prompts`` uses plain continuations instead (the first ``--para-tokens`` tokens of a
paragraph), where only a model draft can help. Per prompt, interleaved: our plain loop, our
prompt lookup, our early-exit self-draft, each ``--draft`` model (e.g. the same model compressed:
a W4 or W8A8 folder), HF ``generate`` and HF ``generate(prompt_lookup_num_tokens=...)``.
Reports median tokens/s, ratios to our plain loop, token identity with our plain loop, and
tokens per target forward.

    python benchmarks/bench_speculative.py --prompts 20 --max-new 128 --threads 1
    python benchmarks/bench_speculative.py --continue-prompts --draft out/smollm2-w4-g64 --no-hf
    python benchmarks/bench_speculative.py --continue-prompts --no-hf --no-lookup --draft-compile \
        --draft out/smollm2-w8 --draft out/smollm2-w8a8-h8@int8-head --draft-max-k 7
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
from slimformer.decoding.speculative import (PromptLookupDraft, early_exit_draft, model_draft,
                                             speculative_generate)
from slimformer.models import load

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit  # noqa: E402

log = logging.getLogger("bench_speculative")


def paragraphs(n: int) -> list[str]:
    """The first ``n`` long (> 600 characters) WikiText-2 test paragraphs, detokenized."""
    paras = [wikitext_detokenize(p.strip()) for p in wikitext2_test_text().split("\n\n")
             if len(p.strip()) > 600]
    return paras[:n]


def grounded_prompts(tok, n: int, para_tokens: int) -> list[list[int]]:
    """``n`` prompts: a WikiText-2 paragraph (detokenized: "1 @,@ 000" -> "1,000", " , " -> ", ";
    cut to ``para_tokens``), an instruction to repeat it, and its first few words — the output
    should quote the input. (The raw WikiText spacing is not text a model reproduces: with it,
    SmolLM2 "repairs" the spacing while copying and most drafts are rejected.)"""
    out = []
    for p in paragraphs(n):
        ids = tok(p)["input_ids"][:para_tokens]
        para = tok.decode(ids)
        head = " ".join(para.split()[:6])
        out.append(tok(f"{para}\n\nRepeat the paragraph above word for word:\n\n{head}")["input_ids"])
    return out


def continue_prompts(tok, n: int, para_tokens: int) -> list[list[int]]:
    """``n`` plain continuation prompts: the first ``para_tokens`` tokens of detokenized
    WikiText-2 paragraphs (nothing to copy from: prompt lookup has little to find)."""
    return [tok(p)["input_ids"][:para_tokens] for p in paragraphs(n)]


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
    ap.add_argument("--draft", action="append", default=[], metavar="MODEL[@int8-head]",
                    help="also time speculative decoding with this draft model (repeatable); a "
                         "'@int8-head' suffix gives this draft a W8A8 copy of its LM head")
    ap.add_argument("--draft-compile", action="store_true", help="compile the --draft models' decode steps")
    ap.add_argument("--draft-int8-head", action="store_true",
                    help="the --draft models propose with a W8A8 copy of their LM head")
    ap.add_argument("--draft-k", type=int, default=4, help="start draft length of --draft runs (adaptive)")
    ap.add_argument("--draft-max-k", type=int, default=0, help="longest adaptive draft (default 2 x --draft-k)")
    ap.add_argument("--continue-prompts", action="store_true",
                    help="plain continuation prompts instead of 'repeat the paragraph'")
    ap.add_argument("--no-hf", action="store_true", help="skip the two HF generate runs")
    ap.add_argument("--no-lookup", action="store_true", help="skip our prompt lookup run")
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
    make = continue_prompts if args.continue_prompts else grounded_prompts
    prompts = make(lm.tokenizer, args.prompts, args.para_tokens)
    drafts = {}
    for spec in args.draft:
        path, _, opt = spec.partition("@")
        if opt not in ("", "int8-head"):
            ap.error(f"--draft {spec}: the only suffix is '@int8-head'")
        name = "draft_" + Path(path).name.replace("-", "_") + ("_h8a8" if opt else "")
        drafts[name] = model_draft(lm, load(path), compile=args.draft_compile,
                                   int8_head=args.draft_int8_head or bool(opt))
    generate(lm, prompts[0], 4, runner=runner)  # warm-up
    compiled = None
    if args.compile:
        compiled = CausalRunner(lm, compile=True)
        t = time.perf_counter()
        generate(lm, prompts[0], args.max_new, runner=compiled)  # full length: the timed cache size
        log.info("compiled decode step in %.1f s", time.perf_counter() - t)
    modes = (["ours"] + ([] if args.no_lookup else ["ours_lookup"]) + ([] if args.no_hf else ["hf", "hf_lookup"])
             + (["ours_selfdraft"] if args.self_draft_layers else []) + list(drafts)
             + (["ours_compiled"] if compiled else []))
    for d in drafts.values():  # warm-up at full length: a compiled draft compiles for this cache size
        speculative_generate(lm, prompts[0], args.max_new, runner=runner, draft=d, num_draft=args.draft_k,
                             adaptive=True, max_draft=args.draft_max_k or None)
    tps = {m: [] for m in modes}
    same = {m: [] for m in modes}
    acc = {m: [] for m in modes}
    for i, p in enumerate(prompts):
        ref = generate(lm, p, args.max_new, runner=runner)
        tps["ours"].append(ref.tokens_per_s)
        same["ours"].append(True)
        if not args.no_lookup:
            r = speculative_generate(lm, p, args.max_new, runner=runner, draft=PromptLookupDraft(3),
                                     num_draft=args.num_draft, adaptive=True)
            tps["ours_lookup"].append(r.tokens_per_s)
            same["ours_lookup"].append(r.tokens == ref.tokens)
            acc["ours_lookup"].append(r.stats["tokens_per_step"])
        for name, d in drafts.items():
            r = speculative_generate(lm, p, args.max_new, runner=runner, draft=d, num_draft=args.draft_k,
                                     adaptive=True, max_draft=args.draft_max_k or None)
            tps[name].append(r.tokens_per_s)
            same[name].append(r.tokens == ref.tokens)
            acc[name].append(r.stats["tokens_per_step"])
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
        for m, look in ((() if args.no_hf else (("hf", 0), ("hf_lookup", args.hf_lookup)))):
            toks, dt = hf(lm, p, args.max_new, look)
            tps[m].append(len(toks) / dt)
            same[m].append(toks == ref.tokens[0])
        log.info("prompt %d (%d tokens): %s", i, len(p),
                 "  ".join(f"{m} {tps[m][-1]:.1f}" for m in modes))
    base = statistics.median(tps["ours"])
    out = {"model": args.model, "prompts": len(prompts), "max_new": args.max_new,
           "threads": torch.get_num_threads(), "num_draft": args.num_draft, "hf_lookup": args.hf_lookup,
           "prompt_kind": "continue" if args.continue_prompts else "repeat", "drafts": args.draft, "draft_compile": args.draft_compile,
           "draft_int8_head": args.draft_int8_head,
           "draft_k": args.draft_k, "draft_max_k": args.draft_max_k or 2 * args.draft_k}
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

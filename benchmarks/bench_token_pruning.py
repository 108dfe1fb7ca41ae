"""MiniLM-L6 token pruning / merging vs the unpruned encoder in one process (issue 5).

For each setting: STS-B test Spearman (slimformer.eval.encoders.stsb, mean pooling weighted by
token size) and encode throughput as a ratio to the unpruned model, timed with
slimformer.eval.speed (interleaved runs, median) on

* STS-B sentences batched as the STS-B eval batches them (64 per batch, longest first —
  sentences are ~10-25 tokens, so a batch is short and padded), and
* 128-token WikiText-2 passages (``--long`` texts): where token reduction has room to pay;
  quality there is the mean cosine between pruned and unpruned embeddings (no labels).

``--recover STEPS``: before scoring, fine-tune each pruned model for STEPS steps so that its
pooled embeddings match the unpruned model's (:func:`slimformer.prune.tokens.recover_token_pruning`:
self-distillation on unlabelled STS-B *dev* + SST-2 train sentences, no labels; EViT and ToMe
report accuracy after fine-tuning with the reduction in place). Speed does not depend on it.

Both sides run slimformer's encoder attention kernel (``slimformer.kernels.attention``, installed
on every encoder slimformer loads), so the ratio credits only the token reduction;
``--sdpa-reference`` also times both on transformers' stock SDPA. The reduction between blocks
runs as one C++ call at inference (``evit_reduce``; recovery trains through the PyTorch ops).
``--save-recovered DIR`` / ``--load-recovered DIR`` keep the recovered weights, so a re-score or
re-time does not repeat the recovery run.

Target (issue 5): throughput >= 1.3x with STS-B drop <= 1 point. Timing: run under the lock

    flock /tmp/slimformer-cpu.lock python benchmarks/bench_token_pruning.py --runs 5 --json /tmp/tp.json
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import time
from pathlib import Path

import torch

from common import emit

log = logging.getLogger("bench_token_pruning")

DEFAULT_CONFIGS = "evit:0.85,tome-rate:0.05,evit:0.7"


def parse_config(spec: str):
    """``evit:0.7`` / ``evit-mean:0.7`` / ``evit-drop:0.7`` / ``evit-pool:0.7`` / ``tome:4`` (r)
    / ``tome-rate:0.1`` (merge_rate) -> TokenPruningConfig. ``evit:0.9/0.5/0.55/0.55/0.5/1``:
    one keep rate per block (the last must be 1)."""
    from slimformer.prune.tokens import TokenPruningConfig

    name, _, val = spec.partition(":")
    if name == "tome":
        return TokenPruningConfig(method="tome", r=int(val))
    if name == "tome-rate":
        return TokenPruningConfig(method="tome", merge_rate=float(val))
    kw = {"keep_rate": tuple(float(v) for v in val.split("/")) if "/" in val else float(val)}
    if name == "evit-mean":
        kw["score"] = "mean"
    elif name == "evit-drop":
        kw["dropped"] = "drop"
    elif name == "evit-pool":
        kw["dropped"] = "pool"
    elif name != "evit":
        raise SystemExit(f"unknown config '{spec}'")
    return TokenPruningConfig(**kw)


def long_texts(tok, n: int, tokens: int) -> list[str]:
    """``n`` passages of ``tokens`` MiniLM tokens cut from the WikiText-2 test text."""
    from slimformer.data import wikitext2_test_text

    ids = tok(wikitext2_test_text()[:400_000], add_special_tokens=False)["input_ids"]
    step = tokens - 2  # [CLS] and [SEP] come back when the text is encoded
    return [tok.decode(ids[i * step:(i + 1) * step]) for i in range(n)]


def token_blocks(lm, texts: list[str], batch_size: int) -> int:
    """Tokens x blocks the encoder processes on ``texts`` batched as embed() batches them
    (longest first, padded per batch): the load-independent share of compute that token
    reduction removes (attention's quadratic part aside)."""
    from slimformer.eval.encoders import MAX_SEQ_LEN

    order = sorted(texts, key=len, reverse=True)
    total = 0
    with torch.inference_mode():
        for s in range(0, len(order), batch_size):
            enc = lm.tokenizer(order[s:s + batch_size], padding=True, truncation=True,
                               max_length=MAX_SEQ_LEN, return_tensors="pt")
            out = lm.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                           output_hidden_states=True)
            total += sum(h.shape[0] * h.shape[1] for h in out.hidden_states[:-1])  # block inputs
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default=DEFAULT_CONFIGS)
    ap.add_argument("--runs", type=int, default=5, help="timed runs per model (median)")
    ap.add_argument("--sentences", type=int, default=512, help="STS-B sentences per timed run")
    ap.add_argument("--long", type=int, default=128, help="128-token passages per timed run (0 skips)")
    ap.add_argument("--long-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--skip-speed", action="store_true", help="quality only")
    ap.add_argument("--count-only", action="store_true",
                    help="only count tokens x blocks processed (no STS-B, no timing)")
    ap.add_argument("--recover", type=int, default=0, metavar="STEPS",
                    help="self-distillation recovery steps per pruned model (0: off-the-shelf)")
    ap.add_argument("--recover-lr", type=float, default=2e-5)
    ap.add_argument("--recover-batch", type=int, default=32)
    ap.add_argument("--save-recovered", default=None, metavar="DIR",
                    help="write each recovered encoder's weights to DIR/<config>.pt")
    ap.add_argument("--load-recovered", default=None, metavar="DIR",
                    help="take each config's recovered weights from DIR/<config>.pt (written by "
                         "--save-recovered) instead of training: re-score / re-time without the "
                         "recovery run")
    ap.add_argument("--sdpa-reference", action="store_true",
                    help="also time the unpruned and the pruned encoder on transformers' stock SDPA "
                         "instead of our attention kernel (both sides of the main ratio use the kernel)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.recover and args.load_recovered:
        raise SystemExit("--recover trains, --load-recovered loads: pick one")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    from slimformer import load
    from slimformer.data import stsb as stsb_pairs
    from slimformer.eval.encoders import ENCODE_BATCH, embed, stsb
    from slimformer.eval.speed import SpeedConfig, _interleaved_medians, speed_metrics
    from slimformer.prune.tokens import apply_token_pruning, recover_token_pruning, recovery_sentences

    lm = load("minilm-l6")
    base = dataclasses.replace(lm)
    if args.count_only:
        from slimformer.data import stsb as stsb_data

        sents = [s for pair in stsb_data("test") for s in pair[:2]][:args.sentences]
        texts = long_texts(lm.tokenizer, args.long, args.long_tokens)
        b_s, b_l = token_blocks(base, sents, ENCODE_BATCH), token_blocks(base, texts, ENCODE_BATCH)
        print(f"\ntokens x blocks processed (padded batches of {ENCODE_BATCH}), unpruned = 1; "
              f"{len(sents)} STS-B sentences, {len(texts)} {args.long_tokens}-token passages\n")
        print("| setting | STS-B sentences | bound on speed-up | 128-token passages | bound on speed-up |")
        print("|---|---|---|---|---|")
        for spec in args.configs.split(","):
            p = apply_token_pruning(dataclasses.replace(lm), parse_config(spec))
            r_s, r_l = token_blocks(p, sents, ENCODE_BATCH) / b_s, token_blocks(p, texts, ENCODE_BATCH) / b_l
            print(f"| {spec} | {r_s:.3f} | {1 / r_s:.2f}x | {r_l:.3f} | {1 / r_l:.2f}x |", flush=True)
        return
    s_base = stsb(base, show_progress=False)["spearman"]
    log.info("unpruned STS-B %.3f", s_base)
    texts = long_texts(lm.tokenizer, args.long, args.long_tokens) if args.long else []
    ref_long = embed(base, texts) if texts else None
    speed_cfg = SpeedConfig(encoder_sentences=args.sentences, encoder_batch=ENCODE_BATCH,
                            runs=args.runs, warmup=1)

    def time_embed(m, items: list[str]) -> float:
        t0 = time.perf_counter()
        embed(m, items, batch_size=ENCODE_BATCH)
        return time.perf_counter() - t0


    rows = []
    for spec in args.configs.split(","):
        cfg = parse_config(spec)
        weights = Path(args.save_recovered or args.load_recovered or ".") / f"{spec.replace('/', '_')}.pt"
        if args.load_recovered:
            model = copy.deepcopy(lm.model)
            model.load_state_dict(torch.load(weights, weights_only=True))
            p, rec = apply_token_pruning(dataclasses.replace(lm, model=model), cfg), {"loaded": str(weights)}
            log.info("%s: recovered weights from %s", spec, weights)
        elif args.recover:  # own weights: training must not touch the baseline's
            p = apply_token_pruning(dataclasses.replace(lm, model=copy.deepcopy(lm.model)), cfg)
            t0 = time.perf_counter()
            tlog = recover_token_pruning(p, recovery_sentences(), steps=args.recover, lr=args.recover_lr,
                                         batch_size=args.recover_batch)
            rec = {"steps": args.recover, "lr": args.recover_lr, "batch": args.recover_batch,
                   "seconds": round(time.perf_counter() - t0, 1), "first_loss": tlog.loss[0],
                   "last_loss": tlog.loss[-1]}
            log.info("%s: recovered in %.0f s, loss %.4f -> %.4f", spec, rec["seconds"], tlog.loss[0], tlog.loss[-1])
            if args.save_recovered:
                weights.parent.mkdir(parents=True, exist_ok=True)
                torch.save(p.model.inner.state_dict(), weights)
                rec["saved"] = str(weights)
        else:
            p, rec = apply_token_pruning(dataclasses.replace(lm), cfg), None
        s = stsb(p, show_progress=False)["spearman"]
        row = {"config": spec, "settings": cfg.to_dict(), "stsb": s, "stsb_delta": s - s_base}
        if rec:
            row["recovery"] = rec
        if texts:
            row["long_cosine"] = float(torch.nn.functional.cosine_similarity(embed(p, texts), ref_long).mean())
        if not args.skip_speed:
            sp = speed_metrics(p, baseline=base, config=speed_cfg, show_progress=False)
            row.update(stsb_sent_s=sp["sentences_s"], base_stsb_sent_s=sp["baseline_sentences_s"],
                       stsb_speedup=sp["encode_speedup"])
            if args.sdpa_reference:
                from slimformer.kernels.attention import uninstall

                sents = [x for pair in stsb_pairs("test") for x in pair[:2]][:args.sentences]
                # (a new LoadedModel installs the kernel: uninstall after building it)
                p_sdpa = dataclasses.replace(p, model=copy.deepcopy(p.model))
                uninstall(p_sdpa.model.inner)
                b_sdpa = dataclasses.replace(base, model=copy.deepcopy(base.model))
                uninstall(b_sdpa.model)
                ts = _interleaved_medians([lambda m=m: time_embed(m, sents) for m in (base, p, b_sdpa, p_sdpa)],
                                          speed_cfg, False, "sdpa reference")
                row.update(sdpa_ref={"base_kernel_s": ts[0], "pruned_kernel_s": ts[1], "base_sdpa_s": ts[2],
                                     "pruned_sdpa_s": ts[3], "kernel_speedup_unpruned": ts[2] / ts[0],
                                     "speedup_kernel": ts[0] / ts[1], "speedup_sdpa": ts[2] / ts[3],
                                     "pruned_kernel_vs_base_sdpa": ts[2] / ts[1]})
            if texts:
                t_p, t_b = _interleaved_medians([lambda: time_embed(p, texts), lambda: time_embed(base, texts)],
                                                speed_cfg, False, "long")
                row.update(long_texts_s=len(texts) / t_p, base_long_texts_s=len(texts) / t_b,
                           long_speedup=t_b / t_p)
        rows.append(row)
        log.info("%s: %s", spec, {k: (round(v, 4) if isinstance(v, float) else v)
                                  for k, v in row.items() if k != "settings"})

    print(f"\nMiniLM-L6 token pruning; unpruned STS-B {s_base:.2f}; {torch.get_num_threads()} threads; "
          f"speed = medians of {args.runs} interleaved runs, ratio to unpruned in the same process\n")
    print("| setting | STS-B | Δ points | STS-B batches speed-up | 128-tok speed-up | 128-tok cosine | "
          "target on STS-B batches (≥1.3x, ≥-1 pt) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        sp = r.get("stsb_speedup")
        lp = r.get("long_speedup")
        ok = ""
        if sp is not None:
            ok = "yes" if sp >= 1.3 and r["stsb_delta"] >= -1.0 else "no"
        print(f"| {r['config']} | {r['stsb']:.2f} | {r['stsb_delta']:+.2f} | "
              f"{'%.2fx' % sp if sp else '-'} | {'%.2fx' % lp if lp else '-'} | "
              f"{'%.4f' % r['long_cosine'] if 'long_cosine' in r else '-'} | {ok} |")
    for r in rows:
        if "sdpa_ref" in r:
            x = r["sdpa_ref"]
            print(f"\n{r['config']} on STS-B batches, medians of interleaved runs: pruned/unpruned both on our "
                  f"attention kernel {x['speedup_kernel']:.2f}x, both on stock SDPA {x['speedup_sdpa']:.2f}x; "
                  f"the kernel alone on the unpruned encoder {x['kernel_speedup_unpruned']:.2f}x; pruned on the "
                  f"kernel vs unpruned on SDPA {x['pruned_kernel_vs_base_sdpa']:.2f}x")
    emit({"stsb_base": s_base, "runs": args.runs, "threads": torch.get_num_threads(), "rows": rows},
         args.json)


if __name__ == "__main__":
    main()

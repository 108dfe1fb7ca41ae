"""Peer runner: compress a causal LM with vLLM's llm-compressor and score it on WikiText-2.

Runs INSIDE the llm-compressor venv (benchmarks/setup_peers.sh) and never imports slimformer, so
the two tools share only files: the fp32 HF folder (benchmarks/export_smollm2.py), the
calibration token ids (benchmarks/peers/make_calib.py) and the WikiText-2 test text.

    .venv-llmc/bin/python benchmarks/peers/llmc_run.py \
        --model benchmarks/.cache/smollm2-135m-fp32 --scheme gptq-w4-g64 \
        --calib benchmarks/.cache/calib_smollm2_128x512.pt \
        --out benchmarks/.cache/llmc/gptq-w4-g64 --json benchmarks/.cache/llmc/gptq-w4-g64.json

Writes JSON {scheme, ppl_quick, wall_s, peak_rss_mb, disk_bytes, ok, error, ...}. A failure
(at load, compression, evaluation or save) is caught and recorded with its message; whatever
was measured before it is kept. The exit status is 0 when the JSON was written.

Measurements:
* wall_s: wall time of `oneshot(...)` alone (model load, eval and save excluded).
* peak_rss_mb: ru_maxrss of this process right after compression (load + compression);
  peak_rss_mb_total is the same at the very end (eval and save included).
* ppl_quick: DESIGN.md protocol on the model exactly as llm-compressor leaves it in memory
  (quantized weights are fake-quantized / pruned weights are zero in memory): wiki.test.raw,
  rows = [l + "\n" if l.strip() else "" for l in raw.split("\n")[:-1]], text = "\n\n".join(rows),
  tokenized once without special tokens, non-overlapping 2048-token windows, first 16,
  PPL = exp(mean over windows of the mean next-token NLL of the window).
* disk_bytes: all files of the folder written by llm-compressor's save_pretrained
  (save_compressed=True) plus the tokenizer; for scheme "none" the input folder.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WIKI_TEST = ROOT / "slimformer" / "data" / "files" / "wikitext-2" / "wiki.test.raw"
WINDOW = 2048
QUICK_WINDOWS = 16

# scheme -> (family, parameters). "sym" quantization is used throughout (llm-compressor's W4A16
# preset is symmetric; slimformer's RTN W4 g64 target is symmetric), --asym flips it.
SCHEMES = {
    "none": ("none", {}),
    "rtn-w4-g64": ("rtn", dict(bits=4, group=64)),
    "rtn-w4-g128": ("rtn", dict(bits=4, group=128)),
    "gptq-w4-g64": ("gptq", dict(bits=4, group=64, actorder=None)),
    "gptq-w4-g64-actorder": ("gptq", dict(bits=4, group=64, actorder="static")),
    "gptq-w4-g128": ("gptq", dict(bits=4, group=128, actorder=None)),
    "gptq-w4-g128-actorder": ("gptq", dict(bits=4, group=128, actorder="static")),
    "gptq-w3-g64": ("gptq", dict(bits=3, group=64, actorder=None)),
    "gptq-w3-g64-actorder": ("gptq", dict(bits=3, group=64, actorder="static")),
    "awq-w4-g64": ("awq", dict(bits=4, group=64)),
    "smoothquant-w8a8": ("smoothquant", dict(weights="rtn")),
    "smoothquant-gptq-w8a8": ("smoothquant", dict(weights="gptq")),
    "sparsegpt-50": ("sparsegpt", dict(sparsity=0.5, mask="0:0")),
    "sparsegpt-2of4": ("sparsegpt", dict(sparsity=0.5, mask="2:4")),
    "wanda-50": ("wanda", dict(sparsity=0.5, mask="0:0")),
    "wanda-2of4": ("wanda", dict(sparsity=0.5, mask="2:4")),
}
IGNORE = ["lm_head"]  # tied to embed_tokens in SmolLM2; every tool leaves it in fp32


def rss_mb() -> float:
    # ru_maxrss is KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for p in ("llmcompressor", "compressed-tensors", "transformers", "torch", "accelerate", "datasets"):
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            pass
    return out


# ---- recipes --------------------------------------------------------------------------------

def weight_scheme(bits: int, group: int | None, symmetric: bool, actorder=None):
    """A custom compressed-tensors scheme: int weights, per-group (or per-channel), no act quant."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    wargs = dict(num_bits=bits, type="int", symmetric=symmetric,
                 strategy="group" if group else "channel", dynamic=False)
    if group:
        wargs["group_size"] = group
    if actorder is not None:
        wargs["actorder"] = actorder
    return {"group_0": QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**wargs))}


def build_recipe(scheme: str, symmetric: bool, bypass_divisibility: bool, smoothing_strength: float):
    family, p = SCHEMES[scheme]
    qkw = dict(ignore=IGNORE)
    if bypass_divisibility:
        qkw["bypass_divisibility_checks"] = True
    if family == "rtn":
        from llmcompressor.modifiers.quantization import QuantizationModifier

        return [QuantizationModifier(config_groups=weight_scheme(p["bits"], p["group"], symmetric), **qkw)]
    if family == "gptq":
        from llmcompressor.modifiers.quantization import GPTQModifier

        # actorder must be given explicitly: GPTQModifier's default is "static"
        return [GPTQModifier(config_groups=weight_scheme(p["bits"], p["group"], symmetric),
                             actorder=p["actorder"], **qkw)]
    if family == "awq":
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.modifiers.transform.awq import AWQModifier

        return [AWQModifier(),
                QuantizationModifier(config_groups=weight_scheme(p["bits"], p["group"], symmetric), **qkw)]
    if family == "smoothquant":
        from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
        from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

        # W8A8 preset: int8 symmetric per-channel weights, dynamic int8 symmetric per-token activations
        q = GPTQModifier if p["weights"] == "gptq" else QuantizationModifier
        return [SmoothQuantModifier(smoothing_strength=smoothing_strength),
                q(targets=["Linear"], scheme="W8A8", **qkw)]
    if family == "sparsegpt":
        from llmcompressor.modifiers.pruning import SparseGPTModifier

        return [SparseGPTModifier(sparsity=p["sparsity"], mask_structure=p["mask"], targets=["Linear"],
                                  ignore=IGNORE)]
    if family == "wanda":
        from llmcompressor.modifiers.pruning import WandaPruningModifier

        return [WandaPruningModifier(sparsity=p["sparsity"], mask_structure=p["mask"], targets=["Linear"],
                                     ignore=IGNORE)]
    raise ValueError(f"no recipe for scheme {scheme!r}")


# ---- evaluation (DESIGN.md protocol, reimplemented here on purpose) ---------------------------

def wikitext2_ids(tokenizer):
    import torch

    raw = WIKI_TEST.read_text(encoding="utf-8")
    rows = [line + "\n" if line.strip() else "" for line in raw.split("\n")[:-1]]
    text = "\n\n".join(rows)
    return torch.tensor(tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)


def perplexity(model, ids, window: int = WINDOW, max_windows: int = QUICK_WINDOWS, log=print) -> dict:
    import torch
    import torch.nn.functional as F

    n = min(ids.numel() // window, max_windows)
    nlls = []
    with torch.inference_mode():
        for i in range(n):
            w = ids[i * window:(i + 1) * window]                       # [T]
            logits = model(input_ids=w[None], use_cache=False).logits[0]  # [T, V]
            # predict token t+1 from position t: T-1 predictions per window
            nlls.append(float(F.cross_entropy(logits[:-1].float(), w[1:], reduction="mean")))
            log(f"  window {i + 1}/{n}: nll={nlls[-1]:.4f}")
    nll = sum(nlls) / n
    return {"ppl": math.exp(nll), "nll": nll, "windows": n, "window": window, "window_nlls": nlls}


# ---- main -----------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, type=Path, help="fp32 HF folder")
    ap.add_argument("--scheme", required=True, choices=list(SCHEMES))
    ap.add_argument("--calib", type=Path, help="torch.save'd int64 tensor [n, seq] of token ids")
    ap.add_argument("--out", type=Path, help="folder for llm-compressor's saved model")
    ap.add_argument("--json", required=True, type=Path)
    ap.add_argument("--asym", action="store_true", help="asymmetric weight quantization (default symmetric)")
    ap.add_argument("--bypass-divisibility", action="store_true",
                    help="pass bypass_divisibility_checks=True (lets group sizes that do not divide the row through llmc's early check)")
    ap.add_argument("--smoothing-strength", type=float, default=0.8)
    ap.add_argument("--windows", type=int, default=QUICK_WINDOWS, help="eval windows (16 = quick)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    a = ap.parse_args()

    def log(msg):
        print(f"[llmc_run {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    res = {"scheme": a.scheme, "ppl_quick": None, "wall_s": None, "peak_rss_mb": None,
           "disk_bytes": None, "ok": False, "error": None,
           "stage": None, "model": str(a.model), "calib": str(a.calib) if a.calib else None,
           "out": str(a.out) if a.out else None, "symmetric": not a.asym,
           "bypass_divisibility_checks": a.bypass_divisibility,
           "argv": sys.argv, "cpu_count": os.cpu_count(),
           # the machine is shared: wall times only compare between runs under similar load
           "loadavg_start": os.getloadavg()}

    def write():
        a.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = a.json.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(res, indent=2) + "\n")
        tmp.replace(a.json)

    def fail(stage, e):
        res["ok"] = False
        res["stage"] = stage
        res["error"] = f"{type(e).__name__}: {e}"
        res["traceback"] = traceback.format_exc()[-4000:]
        log(f"FAILED at {stage}: {res['error']}")

    try:
        res["stage"] = "import"
        import torch

        if a.threads:
            torch.set_num_threads(a.threads)
        res["torch_threads"] = torch.get_num_threads()
        res["versions"] = versions()
        from transformers import AutoModelForCausalLM, AutoTokenizer

        res["stage"] = "load"
        tok = AutoTokenizer.from_pretrained(str(a.model), local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(str(a.model), dtype=torch.float32, local_files_only=True)
        model.eval()
        res["rss_after_load_mb"] = rss_mb()

        if a.scheme != "none":
            if a.calib is None or a.out is None:
                raise SystemExit("--calib and --out are required for a compression scheme")
            res["stage"] = "calib"
            calib = torch.load(str(a.calib))
            if calib.dtype != torch.int64 or calib.dim() != 2:
                raise ValueError(f"calibration tensor must be int64 [n, seq], got {calib.dtype} {tuple(calib.shape)}")
            n, seq = calib.shape
            res["n_calib"], res["seq_len"] = int(n), int(seq)
            from datasets import Dataset

            ds = Dataset.from_dict({"input_ids": calib.tolist(),
                                    "attention_mask": torch.ones_like(calib).tolist()})

            res["stage"] = "recipe"
            recipe = build_recipe(a.scheme, not a.asym, a.bypass_divisibility, a.smoothing_strength)
            res["recipe"] = [repr(m)[:600] for m in recipe]

            res["stage"] = "compress"
            from llmcompressor import oneshot

            log(f"oneshot {a.scheme} on {n}x{seq} calibration tokens")
            t0 = time.perf_counter()
            try:
                model = oneshot(model=model, tokenizer=tok, dataset=ds, recipe=recipe,
                                num_calibration_samples=int(n), max_seq_length=int(seq),
                                shuffle_calibration_samples=False, save_compressed=True)
            finally:
                res["wall_s"] = time.perf_counter() - t0
                res["peak_rss_mb"] = rss_mb()
                res["loadavg_after_compress"] = os.getloadavg()
                write()
            log(f"oneshot done in {res['wall_s']:.1f}s, peak RSS {res['peak_rss_mb']:.0f} MB")
            if SCHEMES[a.scheme][0] in ("sparsegpt", "wanda"):
                lin = [m for name, m in model.named_modules()
                       if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head")]
                z = sum(int((m.weight == 0).sum()) for m in lin)
                t = sum(m.weight.numel() for m in lin)
                res["linear_sparsity"] = z / t
        else:
            res["peak_rss_mb"] = rss_mb()

        res["stage"] = "eval"
        log("evaluating wikitext2 quick")
        t0 = time.perf_counter()
        ids = wikitext2_ids(tok)
        pp = perplexity(model, ids, max_windows=a.windows, log=log)
        res["eval_s"] = time.perf_counter() - t0
        res["ppl_quick" if a.windows == QUICK_WINDOWS else "ppl"] = pp["ppl"]
        res["nll"], res["windows"], res["window"] = pp["nll"], pp["windows"], pp["window"]
        res["window_nlls"] = pp["window_nlls"]
        res["eval_tokens_total"] = int(ids.numel())
        log(f"ppl = {pp['ppl']:.4f}")
        write()

        res["stage"] = "save"
        if a.scheme == "none":
            res["disk_bytes"] = folder_bytes(a.model)
        else:
            # llm-compressor wraps save_pretrained: save_compressed packs weights (quantized) or
            # picks a sparse format (pruned). This may change the in-memory model: eval came first.
            import shutil

            tmp = a.out.with_name(a.out.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(str(tmp), save_compressed=True)
            tok.save_pretrained(str(tmp))
            shutil.rmtree(a.out, ignore_errors=True)
            tmp.replace(a.out)
            res["disk_bytes"] = folder_bytes(a.out)
            st = sorted(a.out.glob("*.safetensors"))
            res["safetensors_bytes"] = sum(p.stat().st_size for p in st)
            try:
                cfg = json.loads((a.out / "config.json").read_text())
                qc = cfg.get("quantization_config") or cfg.get("compression_config") or {}
                res["saved_format"] = qc.get("format") or qc.get("sparsity_config", {}).get("format")
                res["saved_quantization_config"] = qc
            except Exception:
                pass
        res["stage"] = "done"
        res["ok"] = True
    except BaseException as e:  # noqa: BLE001 - record every failure, including SystemExit
        fail(res["stage"], e)
    res["peak_rss_mb_total"] = rss_mb()
    res["loadavg_end"] = os.getloadavg()
    write()
    log(f"wrote {a.json}: ok={res['ok']} ppl_quick={res['ppl_quick']} error={res['error']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

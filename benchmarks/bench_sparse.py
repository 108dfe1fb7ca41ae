"""Sparse storage of pruned SmolLM2 (issue 5): bytes, bit-identical reload, CPU speed vs dense.

Reads the folders that ``benchmarks/vs_llmcompressor.py --save`` wrote for our pruning recipes
(``benchmarks/.cache/ours/<recipe>``) and llm-compressor's JSON for the same schemes, and:

1. bytes of the pruned layers as saved (mask + values, from the safetensors header) vs the same
   layers dense fp32, the whole folder vs the dense fp32 folder and vs llm-compressor's folder;
2. bit-identical reload: compresses ``--compress`` (a recipe) in this process, takes the logits
   of a 512-token WikiText-2 window, saves (to ``.cache/ours/<recipe>``), reloads and compares
   with ``torch.equal``; each saved folder of ``--recipes`` is loaded, saved again and reloaded;
3. speed of the sparse-stored model vs the dense fp32 model in this process: prefill latency
   and greedy decode tokens/s, medians of interleaved runs (slimformer.eval.speed).

    python benchmarks/bench_sparse.py --compress magnitude-50 --runs 3 --decode-tokens 16
    python benchmarks/bench_sparse.py --compress '' --speed ''   # after vs_llmcompressor.py --save
"""
from __future__ import annotations

import argparse
import json
import struct
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from vs_llmcompressor import CACHE, FP32  # noqa: E402  (same folders as the side-by-side)


def _header(path: Path) -> dict:
    """The safetensors header: tensor name -> {dtype, shape, data_offsets}."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n))


def _folder_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def size_row(recipe: str) -> dict:
    folder = CACHE / "ours" / recipe
    doc = json.loads((folder / "slimformer.json").read_text())
    pruned = {n: i for n, i in doc["modules"].items() if i["type"] == "SparseLinear"}
    head = _header(folder / "model.safetensors")
    stored = sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in head.items()
                 if k != "__metadata__" and k.rpartition(".")[0] in pruned)
    dense = sum(4 * i["in_features"] * i["out_features"] for i in pruned.values())
    nnz = sum(i["nnz"] for i in pruned.values())
    theirs = None
    js = CACHE / "llmc" / f"{recipe}.json"
    if js.exists():
        theirs = json.loads(js.read_text()).get("disk_bytes")
    return {"recipe": recipe, "layers": len(pruned), "sparsity": 1 - nnz / (dense / 4),
            "pruned_stored": stored, "pruned_dense": dense, "pruned_ratio": stored / dense,
            "folder": _folder_bytes(folder), "dense_folder": _folder_bytes(FP32), "llmc_folder": theirs}


def _logits_after_reload(lm, ids) -> tuple[torch.Tensor, torch.Tensor]:
    from slimformer.formats import load_compressed, save_compressed

    with torch.inference_mode():
        ref = lm.model(input_ids=ids, use_cache=False).logits
    with tempfile.TemporaryDirectory() as tmp:
        save_compressed(lm, Path(tmp) / "m")
        back = load_compressed(Path(tmp) / "m")
        with torch.inference_mode():
            got = back.model(input_ids=ids, use_cache=False).logits
    return ref, got


def compressed_here(recipe: str) -> dict:
    """Compress ``recipe`` here, keep the logits, save to ``.cache/ours/<recipe>``, reload: the
    in-memory compressed model vs its reload."""
    import slimformer
    from slimformer.eval import tokenize_wikitext2
    from slimformer.formats import load_compressed, save_compressed

    lm = slimformer.compress(slimformer.load(str(FP32)), recipe, progress=False)
    ids = tokenize_wikitext2(lm.tokenizer)[:512].reshape(1, -1)
    with torch.inference_mode():
        ref = lm.model(input_ids=ids, use_cache=False).logits
    save_compressed(lm, CACHE / "ours" / recipe, overwrite=True)
    back = load_compressed(CACHE / "ours" / recipe)
    with torch.inference_mode():
        got = back.model(input_ids=ids, use_cache=False).logits
    return {"model": f"{recipe} (compressed in this process)", "bit_identical": bool(torch.equal(ref, got)),
            "max_abs_diff": float((ref - got).abs().max())}


def roundtrip(saved: str) -> dict:
    """A saved folder (e.g. the side-by-side's SparseGPT output) loaded -> logits -> saved
    again -> loaded -> logits."""
    import slimformer
    from slimformer.eval import tokenize_wikitext2

    lm = slimformer.load(str(CACHE / "ours" / saved))
    ids = tokenize_wikitext2(lm.tokenizer)[:512].reshape(1, -1)
    ref, got = _logits_after_reload(lm, ids)
    return {"model": f"{saved} (saved folder, saved again)", "bit_identical": bool(torch.equal(ref, got)),
            "max_abs_diff": float((ref - got).abs().max())}


def speed(recipe: str, runs: int, decode_tokens: int) -> dict:
    import slimformer
    from slimformer.eval.speed import SpeedConfig, speed_metrics

    sparse = slimformer.load(str(CACHE / "ours" / recipe))
    dense = slimformer.load(str(FP32))
    cfg = SpeedConfig(prefill_tokens=512, decode_prompt_tokens=32, decode_tokens=decode_tokens, runs=runs)
    return {"recipe": recipe, **speed_metrics(sparse, dense, cfg, show_progress=False)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--compress", default="magnitude-50",
                    help="recipe compressed in this process, saved and reloaded ('' = none); "
                         "magnitude needs no calibration, so this takes seconds")
    ap.add_argument("--recipes", default="sparsegpt-50,sparsegpt-2of4,wanda-50,wanda-2of4",
                    help="more saved folders (.cache/ours/<recipe>) to size and round-trip; missing ones are skipped")
    ap.add_argument("--speed", default=None, help="saved recipe folder timed vs dense (default: --compress; '' = skip)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--decode-tokens", type=int, default=16)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    out: dict = {"roundtrip": []}
    if a.compress:
        out["roundtrip"].append(compressed_here(a.compress))
    saved = [r for r in a.recipes.split(",") if r and (CACHE / "ours" / r / "slimformer.json").exists()]
    out["roundtrip"] += [roundtrip(r) for r in saved]
    print("| model | logits after save -> load (512 WikiText-2 tokens) |\n|---|---|")
    for r in out["roundtrip"]:
        print(f"| {r['model']} | {'bit-identical' if r['bit_identical'] else 'DIFFER'} "
              f"(max abs diff {r['max_abs_diff']:.3g}) |", flush=True)
    out["sizes"] = [size_row(r) for r in ([a.compress] if a.compress else []) + saved]
    mib = 2 ** 20
    print("\n| recipe | sparsity | pruned layers stored MiB | same layers dense MiB | ratio | our folder MiB | "
          "dense folder MiB | llm-compressor folder MiB | ours / theirs |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in out["sizes"]:
        th = r["llmc_folder"]
        th_mib = "–" if th is None else f"{th / mib:.1f}"
        vs = "–" if th is None else f"{r['folder'] / th:.3f}"
        print(f"| {r['recipe']} | {r['sparsity']:.4f} | {r['pruned_stored'] / mib:.1f} | {r['pruned_dense'] / mib:.1f} | "
              f"{r['pruned_ratio']:.3f} | {r['folder'] / mib:.1f} | {r['dense_folder'] / mib:.1f} | {th_mib} | {vs} |",
              flush=True)
    which = a.compress if a.speed is None else a.speed
    if which:
        s = out["speed"] = speed(which, a.runs, a.decode_tokens)
        print(f"\n| model ({torch.get_num_threads()} threads) | prefill 512 tok ms | decode tok/s |")
        print("|---|---|---|")
        print(f"| dense fp32 | {s['baseline_prefill_ms']:.0f} | {s['baseline_decode_tok_s']:.2f} |")
        print(f"| {which} (SparseLinear) | {s['prefill_ms']:.0f} | {s['decode_tok_s']:.2f} |")
        print(f"| ratio (sparse vs dense, >1 = faster) | {s['prefill_speedup']:.2f}x | {s['decode_speedup']:.2f}x |")
    if a.json:
        a.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

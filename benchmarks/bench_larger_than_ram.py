"""Compress a model larger than the memory budget: peak RSS vs the model's fp32 size.

Writes (once, into ``--cache``) a synthetic Llama of >= 3B parameters with random weights as
sharded safetensors (one shard per block, ~13 GB fp32), then compresses it through the
streaming engine — the model is built on ``meta``, each block is read from its shard when
reached, compressed, written to the output folder and dropped — with RTN W4 g64 and with
W8A8-static (min/max observers: calibration runs layer by layer through the engine). Each
compression runs in a fresh child process so its peak RSS (``ru_maxrss``) is its own.
Target: peak RSS <= 25% of the fp32 size.

    python benchmarks/bench_larger_than_ram.py [--cache DIR] [--recipes w4-g64,w8a8-static] [--append]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

log = logging.getLogger("bench_larger_than_ram")
HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
HEADING = "## Larger than RAM: streamed compression of a synthetic 3B Llama (engine owner)"

# 28 blocks of hidden 3072 / MLP 8192 (full multi-head attention) + a 32000 x 3072 embedding
# tied to the head: 28 * 113.2M + 98.3M = 3.27B parameters, 13.1 GB in fp32
CONFIG = dict(vocab_size=32000, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
              num_attention_heads=24, num_key_value_heads=24, head_dim=128, max_position_embeddings=2048,
              tie_word_embeddings=True, rms_norm_eps=1e-5, pad_token_id=256, bos_token_id=257,
              eos_token_id=258)
SMOKE = dict(CONFIG, hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=4, head_dim=64, vocab_size=1000)
DONE_MARK = ".complete"


def n_params(cfg: dict) -> int:
    h, i, L, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    q = cfg["num_attention_heads"] * cfg["head_dim"]
    block = h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h
    return L * block + v * h * (1 if cfg["tie_word_embeddings"] else 2) + h


def write_synthetic(folder: Path, config: dict, seed: int = 0) -> None:
    """One shard per block, written block by block (never the whole model in memory)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from slimformer.models.tiny import byte_tokenizer

    if (folder / DONE_MARK).exists():
        log.info("synthetic model already at %s", folder)
        return
    need = n_params(config) * 4
    free = shutil.disk_usage(folder.parent if folder.parent.exists() else HERE).free
    if free < need * 1.3 + 8e9:  # the model + the compressed outputs + slack
        raise SystemExit(f"not enough disk: {free / 1e9:.1f} GB free, need ~{(need * 1.3 + 8e9) / 1e9:.1f} GB")
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    cfg = LlamaConfig(**config)
    g = torch.Generator().manual_seed(seed)
    h, i, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    L = cfg.num_hidden_layers
    weight_map, total = {}, 0

    def rnd(*shape):  # std 0.02 like HF's init; fp32
        return torch.randn(*shape, generator=g) * 0.02

    shards = L + 1
    for b in range(L + 1):
        name = f"model-{b + 1:05d}-of-{shards:05d}.safetensors"
        if b < L:
            p = f"model.layers.{b}."
            t = {p + "self_attn.q_proj.weight": rnd(q, h), p + "self_attn.k_proj.weight": rnd(kv, h),
                 p + "self_attn.v_proj.weight": rnd(kv, h), p + "self_attn.o_proj.weight": rnd(h, q),
                 p + "mlp.gate_proj.weight": rnd(i, h), p + "mlp.up_proj.weight": rnd(i, h),
                 p + "mlp.down_proj.weight": rnd(h, i),
                 p + "input_layernorm.weight": torch.ones(h), p + "post_attention_layernorm.weight": torch.ones(h)}
        else:
            t = {"model.embed_tokens.weight": rnd(cfg.vocab_size, h), "model.norm.weight": torch.ones(h)}
        save_file(t, str(folder / name), metadata={"format": "pt"})
        for k, v in t.items():
            weight_map[k] = name
            total += v.numel() * 4
        del t
        log.info("wrote shard %d/%d", b + 1, shards)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    cfg.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    (folder / DONE_MARK).write_text(f"{total}\n")


def child(model_dir: str, recipe: str, out: str, samples: int, seq_len: int) -> None:
    """Runs in a fresh process: compress, then report peak RSS and time as one JSON line."""
    from slimformer import compress
    from slimformer.compress import CalibrationConfig

    t0 = time.perf_counter()
    cal = CalibrationConfig(samples=samples, seq_len=seq_len, batch_size=4, offload=True)
    # reload=False: how much memory compressing takes, not loading the result back
    compress(model_dir, recipe, out_dir=out, calibration=cal, stream=True, overwrite=True, reload=False)
    dt = time.perf_counter() - t0
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    size = sum(p.stat().st_size for p in Path(out).rglob("*") if p.is_file())
    print(json.dumps({"peak_rss_bytes": peak_kb * 1024, "seconds": dt, "out_bytes": size}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=HERE / ".cache" / "synthetic-llama-3b")
    ap.add_argument("--recipes", default="w4-g64,w8a8-static")
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--calib-len", type=int, default=128)
    ap.add_argument("--keep", action="store_true", help="keep the compressed outputs")
    ap.add_argument("--append", action="store_true", help=f"append the table to {RESULTS.name}")
    ap.add_argument("--smoke", action="store_true", help="a tiny model, to check the script itself")
    ap.add_argument("--child", nargs=3, metavar=("MODEL", "RECIPE", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.child:
        child(*args.child, args.calib_samples, args.calib_len)
        return 0
    config = SMOKE if args.smoke else CONFIG
    if args.smoke:
        args.cache = args.cache.parent / "synthetic-llama-smoke"
    t0 = time.perf_counter()
    write_synthetic(args.cache, config)
    fp32 = sum(p.stat().st_size for p in args.cache.glob("*.safetensors"))
    params = n_params(config)
    log.info("model: %.2fB params, %.2f GB of fp32 safetensors (written/checked in %.0fs)",
             params / 1e9, fp32 / 1e9, time.perf_counter() - t0)
    rows = []
    for recipe in args.recipes.split(","):
        out = args.cache.parent / f"out-{recipe}"
        cmd = [sys.executable, __file__, "--child", str(args.cache), recipe, str(out),
               "--calib-samples", str(args.calib_samples), "--calib-len", str(args.calib_len)]
        log.info("compressing with %s ...", recipe)
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            log.error("%s failed:\n%s", recipe, res.stderr[-3000:])
            return 1
        r = json.loads(res.stdout.strip().splitlines()[-1])
        ratio = r["peak_rss_bytes"] / fp32
        rows.append((recipe, f"{r['peak_rss_bytes'] / 2**30:.2f}", f"{ratio:.1%}",
                     "yes" if ratio <= 0.25 else "NO", f"{r['out_bytes'] / 1e9:.2f}", f"{r['seconds']:.0f}"))
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    head = ("recipe", "peak RSS (GiB)", "peak RSS / fp32 size", "<= 25%", "output (GB)", "time (s)")
    w = [max(len(x[k]) for x in [head] + rows) for k in range(len(head))]
    line = lambda r: "| " + " | ".join(c.ljust(w[k]) for k, c in enumerate(r)) + " |"  # noqa: E731
    table = "\n".join([line(head), "|" + "|".join("-" * (x + 2) for x in w) + "|"] + [line(r) for r in rows])
    info = (f"synthetic Llama, {params / 1e9:.2f}B parameters, fp32 safetensors {fp32 / 1e9:.2f} GB "
            f"({fp32 / 2**30:.2f} GiB), {config['num_hidden_layers']} blocks; calibration "
            f"{args.calib_samples} x {args.calib_len} tokens, activations offloaded")
    print(info)
    print(table)
    if args.append:
        cmd = "python " + " ".join(["benchmarks/bench_larger_than_ram.py"] + sys.argv[1:])
        when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        with open(RESULTS, "a", encoding="utf-8") as f:
            f.write(f"\n{HEADING}\n\n`{cmd}` — {when}, torch {torch.__version__}\n\n{info}\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Side by side, one script: slimformer RTN vs llm-compressor RTN (W4A16) on SmolLM2-135M.

Both tools start from the same fp32 folder (benchmarks/export_smollm2.py), quantize the same
block linears (lm_head untouched, symmetric, per group) and are scored by the same WikiText-2
protocol. Ours runs in this process; llm-compressor runs in its own venv
(benchmarks/setup_peers.sh) through benchmarks/peers/llmc_run.py, whose JSON is read back.
Prints a table: PPL, compression wall time, peak RSS of each side, and the ratios.

    python benchmarks/rtn_vs_llmcompressor.py [--groups 64 128] [--windows 16]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "benchmarks" / ".cache"
FP32 = CACHE / "smollm2-135m-fp32"
VENV_PY = ROOT / ".venv-llmc" / "bin" / "python"


def ours(group: int, windows: int) -> dict:
    """Compress in a child process so peak RSS is this method's alone."""
    code = f"""
import json, resource, time, torch
import slimformer
from slimformer.data import wikitext2_test_text
from slimformer.eval.ppl import perplexity
lm = slimformer.load({str(FP32)!r})
t = time.perf_counter()
q = slimformer.compress(lm, "w4-g{group}", progress=False)
wall = time.perf_counter() - t
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
ids = torch.tensor(q.tokenizer(wikitext2_test_text(), add_special_tokens=False).input_ids)
ppl = perplexity(q.model, ids, window=2048, max_windows={windows})["ppl"]
print(json.dumps({{"ppl": ppl, "wall_s": wall, "peak_rss_mb": rss}}))
"""
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def theirs(group: int, windows: int) -> dict:
    js = CACHE / "llmc" / f"side-by-side-g{group}.json"
    js.parent.mkdir(parents=True, exist_ok=True)
    cmd = [str(VENV_PY), str(ROOT / "benchmarks/peers/llmc_run.py"), "--model", str(FP32),
           "--scheme", f"rtn-w4-g{group}", "--calib", str(CACHE / "calib_smollm2_128x512.pt"),
           "--out", str(CACHE / "llmc" / f"side-by-side-g{group}"), "--json", str(js),
           "--windows", str(windows)]
    subprocess.run(cmd, check=False, capture_output=True, text=True)
    r = json.loads(js.read_text())
    return {"ppl": r.get("ppl_quick"), "wall_s": r.get("wall_s"), "peak_rss_mb": r.get("peak_rss_mb"),
            "error": None if r.get("ok") else str(r.get("error", "")).split("\n")[0][:120]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--groups", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--windows", type=int, default=16)
    a = ap.parse_args()
    for need in (FP32, VENV_PY, CACHE / "calib_smollm2_128x512.pt"):
        if not need.exists():
            sys.exit(f"missing {need}: run benchmarks/setup_peers.sh, benchmarks/export_smollm2.py "
                     "and benchmarks/peers/make_calib.py first")
    rows = []
    for g in a.groups:
        o, t = ours(g, a.windows), theirs(g, a.windows)
        rows.append((g, o, t))
    print("| W4 group | slimformer PPL | llm-compressor PPL | PPL ratio | slimformer s | llm-compressor s | "
          "time ratio | slimformer RSS MB | llm-compressor RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for g, o, t in rows:
        if t["ppl"] is None:
            print(f"| {g} | {o['ppl']:.4f} | refused: {t['error']} | – | {o['wall_s']:.1f} | – | – | "
                  f"{o['peak_rss_mb']:.0f} | – |")
            continue
        print(f"| {g} | {o['ppl']:.4f} | {t['ppl']:.4f} | {o['ppl'] / t['ppl']:.4f} | {o['wall_s']:.1f} | "
              f"{t['wall_s']:.1f} | {o['wall_s'] / t['wall_s']:.2f} | {o['peak_rss_mb']:.0f} | "
              f"{t['peak_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()

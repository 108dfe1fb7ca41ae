"""GPTQ / AWQ quality runs on SmolLM2-135M: recipe x calibration source -> WikiText-2 PPL.

Each run compresses the same fp32 folder as benchmarks/vs_llmcompressor.py (made by
benchmarks/export_smollm2.py) in a child process with a recipe (name or YAML path) and a
calibration source from slimformer.data.CALIBRATION_SOURCES (128 x 512 tokens, seed 0), then
scores WikiText-2 (16 windows of 2048 = quick). Prints one markdown row per run with the PPL
ratio to the first row, the compression wall time and the child's peak RSS, and the engine's
per-block GPTQ summary (Hessian-weighted error vs RTN, rows the guard kept from RTN).

    python benchmarks/gptq_awq_quality.py --run gptq-w4-g64 --run w4-g64
    python benchmarks/gptq_awq_quality.py --run gptq-w4-g64@wikitext2 --run gptq-w4-g64@sst2
    python benchmarks/gptq_awq_quality.py --samples 8 --windows 2 --run w4-g64 --run gptq-w4-g64
    python benchmarks/gptq_awq_quality.py --threads 1 --offload --stream --run gptq-w4-g64

A run is RECIPE[@SOURCE] (default source wikitext2, the protocol). Quality-only runs: no CPU
lock needed (nice -n 19); wall times from such runs are not comparable.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FP32 = ROOT / "benchmarks" / ".cache" / "smollm2-135m-fp32"

CHILD = r"""
import json, logging, resource, sys, time, torch
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(message)s")
import slimformer
from slimformer.compress import CalibrationConfig
from slimformer.data import wikitext2_test_text
from slimformer.eval.ppl import perplexity
recipe, source, windows, model, samples = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
threads, offload, stream = int(sys.argv[6]), sys.argv[7] == "1", sys.argv[8] == "1"
if threads:
    torch.set_num_threads(threads)
cal = CalibrationConfig(source=source, samples=samples, offload=offload)
if stream:  # weights read block by block from safetensors, each compressed block written out
    import tempfile
    out = tempfile.mkdtemp(prefix="gptq-stream-") + "/model"
    t = time.perf_counter()
    slimformer.compress(model, recipe, out_dir=out, calibration=cal, stream=True, reload=False, progress=False)
    wall = time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    q = slimformer.load(out)
else:
    lm = slimformer.load(model)
    t = time.perf_counter()
    q = slimformer.compress(lm, recipe, calibration=cal, progress=False)
    wall = time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
ids = torch.tensor(q.tokenizer(wikitext2_test_text(), add_special_tokens=False).input_ids)
ppl = perplexity(q.model, ids, window=2048, max_windows=windows)["ppl"]
if stream:
    import shutil
    shutil.rmtree(out.rsplit("/", 1)[0], ignore_errors=True)
print(json.dumps({"ppl": ppl, "wall_s": wall, "peak_rss_mb": rss}))
"""

SUMMARY = re.compile(r"gptq \S+: Hessian-weighted error (\S+) vs RTN (\S+) \(\S+\); (\d+)/(\d+) rows kept RTN")


def run_one(recipe: str, source: str, windows: int, model: str, samples: int = 128,
            threads: int = 0, offload: bool = False, stream: bool = False) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, recipe, source, str(windows), model, str(samples),
                          str(threads), "1" if offload else "0", "1" if stream else "0"],
                         capture_output=True, text=True)
    if out.returncode != 0:
        return {"ppl": None, "error": (out.stderr.strip().splitlines() or ["?"])[-1][:200]}
    r = json.loads(out.stdout.strip().splitlines()[-1])
    blocks = [m.groups() for m in SUMMARY.finditer(out.stderr)]
    if blocks:
        g = sum(float(b[0]) for b in blocks)
        rt = sum(float(b[1]) for b in blocks)
        r["gptq_vs_rtn_herr"] = g / rt if rt else None
        r["rows_kept_rtn"] = f"{sum(int(b[2]) for b in blocks)}/{sum(int(b[3]) for b in blocks)}"
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", action="append", required=True, help="RECIPE[@SOURCE]")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--model", default=str(FP32))
    ap.add_argument("--samples", type=int, default=128,
                    help="calibration sequences of 512 tokens (128 = the protocol; fewer = a reduced budget)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads in the child (0 = torch's default)")
    ap.add_argument("--offload", action="store_true",
                    help="keep the calibration activations between blocks on disk (lower peak RSS)")
    ap.add_argument("--stream", action="store_true",
                    help="stream the weights from safetensors block by block and write each compressed "
                         "block out (slimformer compress --stream); wall time and peak RSS include that")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    rows = []
    for spec in a.run:
        recipe, _, source = spec.partition("@")
        r = run_one(recipe, source or "wikitext2", a.windows, a.model, a.samples, a.threads, a.offload,
                    a.stream)
        r.update(recipe=recipe, source=source or "wikitext2", samples=a.samples, windows=a.windows,
                 threads=a.threads, offload=a.offload, stream=a.stream)
        rows.append(r)
        print(f"done {spec}: {r}", file=sys.stderr, flush=True)
    base = rows[0].get("ppl")
    print("| recipe | calibration | PPL | PPL / first row | compress s | peak RSS MB | "
          "Σ H-error GPTQ / RTN | rows kept RTN |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ppl = r.get("ppl")
        print(f"| {r['recipe']} | {r['source']} | {'%.4f' % ppl if ppl else '(' + str(r.get('error')) + ')'} | "
              f"{'%.4f' % (ppl / base) if ppl and base else '–'} | "
              f"{'%.1f' % r['wall_s'] if r.get('wall_s') else '–'} | "
              f"{'%.0f' % r['peak_rss_mb'] if r.get('peak_rss_mb') else '–'} | "
              f"{'%.3f' % r['gptq_vs_rtn_herr'] if r.get('gptq_vs_rtn_herr') else '–'} | "
              f"{r.get('rows_kept_rtn', '–')} |")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

"""Side by side, one script: a slimformer recipe vs an llm-compressor scheme on SmolLM2-135M.

Both tools start from the same fp32 folder (benchmarks/export_smollm2.py), use the same
128 x 512 calibration tensor (benchmarks/peers/make_calib.py), leave lm_head untouched and are
scored by the same WikiText-2 protocol (quick = 16 windows of 2048). Ours runs in a child
process (so its peak RSS is its own); llm-compressor runs in its own venv
(benchmarks/setup_peers.sh) through benchmarks/peers/llmc_run.py, whose JSON is read back.
Prints one table row per pair: PPL, compression wall time, peak RSS of each side and the ratios.

    python benchmarks/vs_llmcompressor.py --pair w4-g64:rtn-w4-g64 --pair w4-g128:rtn-w4-g128
    python benchmarks/vs_llmcompressor.py --pair gptq-w4-g64:gptq-w4-g64-actorder --threads 2

A pair is OUR_RECIPE:THEIR_SCHEME (recipe name or YAML path; scheme from llmc_run.SCHEMES);
``OUR_RECIPE:-`` runs ours alone (schemes llm-compressor refuses), ``-:THEIR_SCHEME`` theirs alone.
``--samples N`` (< 128) calibrates both sides on the first N of the 128 protocol sequences (a
smaller budget when the machine is too loaded for the full one; the sampler's draws are a prefix).
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
CALIB = CACHE / "calib_smollm2_128x512.pt"
VENV_PY = ROOT / ".venv-llmc" / "bin" / "python"


def ours(recipe: str, windows: int, threads: int | None, save: Path | None, samples: int = 128) -> dict:
    """Compress in a child process so peak RSS is this method's alone."""
    code = f"""
import json, resource, time, torch
if {threads!r}: torch.set_num_threads({threads!r})
import slimformer
from slimformer.data import wikitext2_test_text
from slimformer.eval.ppl import perplexity
lm = slimformer.load({str(FP32)!r})
from slimformer.data import calibration_samples
# the protocol's samples are exactly the tensor llm-compressor gets (make_calib.py draws them
# with the same function); check it rather than trust it
assert torch.equal(calibration_samples(lm.tokenizer, {samples}, 512), torch.load({str(CALIB)!r})[:{samples}])
t = time.perf_counter()
q = slimformer.compress(lm, {recipe!r}, progress=False, calibration={{"samples": {samples}}})
wall = time.perf_counter() - t
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
disk = None
if {str(save) if save else None!r}:
    from pathlib import Path
    from slimformer.formats import save_compressed
    save_compressed(q, {str(save) if save else None!r}, overwrite=True)
    disk = sum(f.stat().st_size for f in Path({str(save) if save else None!r}).rglob("*") if f.is_file())
ids = torch.tensor(q.tokenizer(wikitext2_test_text(), add_special_tokens=False).input_ids)
ppl = perplexity(q.model, ids, window=2048, max_windows={windows})["ppl"]
print(json.dumps({{"ppl": ppl, "wall_s": wall, "peak_rss_mb": rss, "disk_bytes": disk}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        return {"ppl": None, "error": (out.stderr.strip().splitlines() or ["?"])[-1][:160]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def theirs(scheme: str, windows: int, threads: int | None, samples: int = 128) -> dict:
    js = CACHE / "llmc" / f"{scheme}.json"
    js.parent.mkdir(parents=True, exist_ok=True)
    calib = CALIB
    if samples != 128:
        import torch

        calib = CACHE / f"calib_smollm2_{samples}x512.pt"
        torch.save(torch.load(str(CALIB))[:samples].clone(), str(calib))
    cmd = [str(VENV_PY), str(ROOT / "benchmarks/peers/llmc_run.py"), "--model", str(FP32),
           "--scheme", scheme, "--calib", str(calib), "--out", str(CACHE / "llmc" / scheme),
           "--json", str(js), "--windows", str(windows)]
    if threads:
        cmd += ["--threads", str(threads)]
    subprocess.run(cmd, check=False, capture_output=True, text=True)
    r = json.loads(js.read_text())
    ppl = r.get("ppl_quick") if r.get("ppl_quick") is not None else r.get("ppl")  # "ppl" when windows != 16
    return {"ppl": ppl, "wall_s": r.get("wall_s"), "peak_rss_mb": r.get("peak_rss_mb"),
            "disk_bytes": r.get("disk_bytes"),
            "error": None if r.get("ok") else str(r.get("error", "")).split("\n")[0][:160]}


def _fmt(v, spec=".4f"):
    return "–" if v is None else format(v, spec)


def _ratio(a, b, spec=".3f"):
    return "–" if a is None or b is None or not b else format(a / b, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pair", action="append", required=True, help="OUR_RECIPE:THEIR_SCHEME (see module doc)")
    ap.add_argument("--windows", type=int, default=16, help="WikiText-2 windows of 2048 (16 = quick)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads on both sides")
    ap.add_argument("--save", action="store_true", help="also save our model and report its bytes on disk")
    ap.add_argument("--json", type=Path, help="write all rows here")
    ap.add_argument("--samples", type=int, default=128, choices=range(1, 129), metavar="1..128",
                    help="calibration sequences on both sides (first N of the 128)")
    a = ap.parse_args()
    for need in (FP32, VENV_PY, CALIB):
        if not need.exists():
            sys.exit(f"missing {need}: run benchmarks/setup_peers.sh, benchmarks/export_smollm2.py "
                     "and benchmarks/peers/make_calib.py first")
    rows = []
    for pair in a.pair:
        mine, _, peer = pair.partition(":")
        if not peer:
            sys.exit(f"--pair {pair!r}: expected OUR_RECIPE:THEIR_SCHEME ('-' for one side only)")
        save = CACHE / "ours" / Path(mine).stem if a.save and mine != "-" else None
        o = ours(mine, a.windows, a.threads, save, a.samples) if mine != "-" else {"ppl": None, "error": "not run"}
        t = theirs(peer, a.windows, a.threads, a.samples) if peer != "-" else {"ppl": None, "error": "not run"}
        rows.append({"ours_recipe": mine, "their_scheme": peer, "ours": o, "theirs": t})
        print(f"done {pair}: ours {o} | theirs {t}", file=sys.stderr, flush=True)
    print("| slimformer recipe | llm-compressor scheme | our PPL | their PPL | PPL ratio | our s | their s | "
          "time ratio | our RSS MB | their RSS MB | RSS ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        o, t = r["ours"], r["theirs"]
        their_ppl = _fmt(t.get("ppl")) if t.get("ppl") is not None else f"({t.get('error')})"
        our_ppl = _fmt(o.get("ppl")) if o.get("ppl") is not None else f"({o.get('error')})"
        print(f"| {r['ours_recipe']} | {r['their_scheme']} | {our_ppl} | {their_ppl} | "
              f"{_ratio(o.get('ppl'), t.get('ppl'), '.4f')} | {_fmt(o.get('wall_s'), '.1f')} | "
              f"{_fmt(t.get('wall_s'), '.1f')} | {_ratio(o.get('wall_s'), t.get('wall_s'), '.2f')} | "
              f"{_fmt(o.get('peak_rss_mb'), '.0f')} | {_fmt(t.get('peak_rss_mb'), '.0f')} | "
              f"{_ratio(o.get('peak_rss_mb'), t.get('peak_rss_mb'), '.2f')} |")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

"""Print the llm-compressor peer results (benchmarks/.cache/llmc/*.json) as a markdown table.
Standard library only; runs with any python.

    python benchmarks/peers/summarize.py [DIR]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def fmt(v, spec):
    return "–" if v is None else format(v, spec)


def main() -> None:
    d = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "benchmarks/.cache/llmc"
    print("| scheme | ok | ppl_quick | wall_s | peak RSS MB | disk bytes | error |")
    print("|---|---|---|---|---|---|---|")
    for p in sorted(d.glob("*.json")):
        r = json.loads(p.read_text())
        err = (r.get("error") or "").split("\n")[0][:160]
        print(f"| {r['scheme']} | {r['ok']} | {fmt(r.get('ppl_quick'), '.4f')} | {fmt(r.get('wall_s'), '.1f')} "
              f"| {fmt(r.get('peak_rss_mb'), '.0f')} | {fmt(r.get('disk_bytes'), ',')} | {err} |")


if __name__ == "__main__":
    main()

"""Write the shared calibration tensor so slimformer and the peer tools calibrate on IDENTICAL
samples: slimformer.data.calibration_samples(tokenizer, 128, 512) (DESIGN.md protocol: 128 windows
of 512 tokens from tokenized wiki.valid.tokens, torch.Generator().manual_seed(0)) with the SmolLM2
tokenizer of the fp32 export. Runs with the SYSTEM python.

    python benchmarks/peers/make_calib.py [--model benchmarks/.cache/smollm2-135m-fp32] \
        [--n 128 --seq 512] [--out benchmarks/.cache/calib_smollm2_128x512.pt]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=ROOT / "benchmarks/.cache/smollm2-135m-fp32")
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    out = a.out or ROOT / f"benchmarks/.cache/calib_smollm2_{a.n}x{a.seq}.pt"

    from transformers import AutoTokenizer

    from slimformer.data import calibration_samples

    tok = AutoTokenizer.from_pretrained(str(a.model), local_files_only=True)
    ids = calibration_samples(tok, a.n, a.seq)  # [n, seq] int64
    assert ids.dtype == torch.int64 and tuple(ids.shape) == (a.n, a.seq), (ids.dtype, ids.shape)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    torch.save(ids, tmp)
    tmp.replace(out)
    print(f"{out}  shape={tuple(ids.shape)} dtype={ids.dtype} first={ids[0, :8].tolist()}")


if __name__ == "__main__":
    main()

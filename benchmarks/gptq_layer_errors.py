"""GPTQ variants on real SmolLM2-135M layers: the layer loss tr((W-Q) H (W-Q)ᵀ) of each
variant relative to RTN's, for q/o/gate/down of a few blocks (Hessians from the engine's
observer on the protocol's calibration text, blocks run in fp32 one after another).

    python benchmarks/gptq_layer_errors.py --samples 8 --bits 4 --group 64 --blocks 0,10,29

Prints one row per layer: GPTQ / RTN for (act-order off/on) x (group scales lazy/static), and
the mean over layers. Small (a few CPU-minutes): the point is the comparison, not the speed.
"""
from __future__ import annotations

import argparse

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--blocks", default="0,10,29")
    ap.add_argument("--model", default="smollm2-135m")
    a = ap.parse_args()

    import slimformer
    from slimformer.data import calibration_samples
    from slimformer.engine import ActivationCache, block_forward
    from slimformer.engine.runner import _calibrate, capture_block_inputs
    from slimformer.formats import linear_weight
    from slimformer.primitives.affine import QuantSpec, dequantize, quantize
    from slimformer.quant.gptq import gptq_quantize, hessian_error

    lm = slimformer.load(a.model)
    ids = calibration_samples(lm.tokenizer, a.samples, 512)
    cache = ActivationCache(None)
    with torch.no_grad():
        rest = capture_block_inputs(lm, ids, 4, cache)
    states = list(cache)
    wanted = {int(b) for b in a.blocks.split(",")}
    names = ["self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"]
    spec = QuantSpec(bits=a.bits, symmetric=True, granularity="group", group_size=a.group)
    variants = [(False, "lazy"), (False, "static"), (True, "lazy"), (True, "static")]
    tot: dict = {v: [] for v in variants}
    print("| block | linear | dead ch. | " + " | ".join(f"{'act-order' if v[0] else 'no act-order'}, {v[1]}"
                                                     for v in variants) + " |")
    print("|---|---|---|" + "---|" * len(variants))
    with torch.no_grad():
        for bi, b in enumerate(lm.arch.get_blocks(lm.model)):
            if bi > max(wanted):
                break
            if bi in wanted:
                stats = _calibrate(b, {n: ("hessian",) for n in names}, states, rest)
                for n in names:
                    w = linear_weight(b.get_submodule(n)).detach()
                    h = stats[n]["hessian"]
                    rtn = float(hessian_error(w, dequantize(quantize(w, spec)), h).sum())
                    row = []
                    for act, gq in variants:
                        e = float(hessian_error(w, gptq_quantize(w, h, spec, actorder=act, group_qparams=gq).weight,
                                                h).sum()) / rtn
                        tot[(act, gq)].append(e)
                        row.append(f"{e:.3f}")
                    print(f"| {bi} | {n} | {int((h.diagonal() <= 0).sum())} | " + " | ".join(row) + " |", flush=True)
            states = [block_forward(b, h, x, kw) for h, (x, kw) in zip(states, rest)]
    print("| mean | | | " + " | ".join(f"{sum(v) / len(v):.3f}" for v in tot.values()) + " |")


if __name__ == "__main__":
    main()

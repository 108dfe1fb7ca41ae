"""Where a speculative round's time goes, SmolLM2-135M: our decode loop's single forwards timed
in one process (interleaved medians), the pieces of Leviathan's cost model.

* target (fp32) one-token step, eager: the plain loop's per-token cost;
* target verify steps of 8 and 9 tokens (a draft of 7 or 8 plus the pending token), eager;
* the draft's one-token step (a compressed folder), compiled (``CausalRunner(compile=True)``)
  and eager, and its two-token step (catching up after a round whose proposals were all
  accepted) -- compiled steps as the loop runs them (from a shape's third call on, the compiled
  bytecode is called directly, without Dynamo's frame hook); ``--draft-int8-head`` gives the draft a W8A8 head (as ``bench_speculative.py --draft-int8-head``).

Each forward runs after a 160-token prefill into a 320-slot cache and is rolled back, so every
timing sees the same context.

    python benchmarks/bench_decode_steps.py --draft out/smollm2-w8a8-h8 [--draft-int8-head] [--runs 5] [--threads 2]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from common import emit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", default="smollm2-135m")
    ap.add_argument("--draft", required=True, help="a compressed folder (e.g. out/smollm2-w8a8-h8)")
    ap.add_argument("--runs", type=int, default=5, help="interleaved rounds (median of their medians)")
    ap.add_argument("--calls", type=int, default=20, help="timed forwards per round")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--draft-int8-head", action="store_true", help="the draft's head as W8A8 (speculative.py)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from slimformer import load
    from slimformer.decoding import CausalRunner

    t_lm, d_lm = load(args.target), load(args.draft)
    target, draft_c, draft_e = CausalRunner(t_lm), CausalRunner(d_lm, compile=True), CausalRunner(d_lm)
    if args.draft_int8_head:
        from slimformer.decoding.speculative import _int8_head

        draft_c.head = draft_e.head = _int8_head(draft_c.head)
    prompt = torch.randint(100, 20000, (1, 160), generator=torch.Generator().manual_seed(0))

    def timed(runner, q: int) -> float:
        cache = runner.new_cache(1, 320)
        with torch.inference_mode():
            runner.prefill(prompt, torch.zeros(1, dtype=torch.long), cache)
            length = cache.length.clone()
            x = torch.randint(100, 20000, (1, q))
            for _ in range(2):
                runner.forward(x, cache)
                cache.rollback(length)
            ts = []
            for _ in range(args.calls):
                t0 = time.perf_counter()
                runner.forward(x, cache)
                ts.append(time.perf_counter() - t0)
                cache.rollback(length)
        return statistics.median(ts) * 1e3

    rows = [("target one-token step (eager)", target, 1),
            ("target 8-token verify (eager)", target, 8),
            ("target 9-token verify (eager)", target, 9),
            ("draft one-token step (compiled)", draft_c, 1),
            ("draft one-token step (eager)", draft_e, 1),
            ("draft two-token step (compiled)", draft_c, 2),
            ("draft two-token step (eager)", draft_e, 2)]
    times: dict[str, list[float]] = {r[0]: [] for r in rows}
    for _ in range(args.runs):
        for name, runner, q in rows:
            times[name].append(timed(runner, q))
    base = statistics.median(times[rows[0][0]])
    print(f"\n{args.target} target, {args.draft} draft; {args.threads} threads; median of {args.runs} "
          f"interleaved rounds x {args.calls} calls\n")
    print("| forward | ms | in target steps |")
    print("|---|---|---|")
    out = {}
    for name, *_ in rows:
        ms = statistics.median(times[name])
        out[name] = ms
        print(f"| {name} | {ms:.2f} | {ms / base:.2f} |")
    emit({"target": args.target, "draft": args.draft, "draft_int8_head": args.draft_int8_head,
          "threads": args.threads, "ms": out}, args.json)


if __name__ == "__main__":
    main()

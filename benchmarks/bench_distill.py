"""Knowledge distillation experiments (issue 6), recorded in RESULTS.md "## Distillation (issue 6)".

Quality at equal steps on the same tokens (not wall time), so the runs may go in the background
at low priority; each run writes its own JSON (and can resume from its checkpoint), ``report``
prints the table with ratios and draws PPL vs step.

  # 1. SmolLM2-135M (30 blocks) -> 15-block student, logits KD vs plain LM fine-tune
  python benchmarks/bench_distill.py smollm2 --run kd --steps 150 --json benchmarks/.cache/distill/kd.json
  python benchmarks/bench_distill.py smollm2 --run lm --steps 150 --json benchmarks/.cache/distill/lm.json
  python benchmarks/bench_distill.py report benchmarks/.cache/distill/kd.json benchmarks/.cache/distill/lm.json \
      --plot benchmarks/distill_smollm2.png
  # 2. all-MiniLM-L6 -> 3-block student, hint + attention transfer, STS-B
  python benchmarks/bench_distill.py minilm --steps 400 --json benchmarks/.cache/distill/minilm.json
  # 3. a structured-pruned SmolLM2 recovered with KD vs plain fine-tune
  python benchmarks/bench_distill.py smollm2 --student benchmarks/.cache/smollm2-prune20 --run kd ...

Training text: the detokenized WikiText-2 *validation* split (the train split is not shipped);
evaluation: WikiText-2 *test* — a cheap curve on its first ``--eval-windows`` 2048-token windows
during training and the protocol's quick eval (16 windows) at the start and the end.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit  # noqa: E402

TEACHER_QUICK_PPL_README = 20.71


def _ppl(model, ids, windows):
    from slimformer.eval.ppl import perplexity

    return perplexity(model, ids, 2048, max_windows=windows)["ppl"]


def run_smollm2(a) -> dict:
    import slimformer
    from slimformer.distill import TrainConfig, layer_drop_student, text_batches, train
    from slimformer.eval.ppl import tokenize_wikitext2

    torch.set_num_threads(a.threads)
    teacher = slimformer.load(a.teacher)
    ids = tokenize_wikitext2(teacher.tokenizer)
    if a.student.startswith("layers:"):
        from slimformer.distill.students import parse_student

        n, rule = parse_student(a.student)
        student = layer_drop_student(teacher, n, rule)
    else:
        student = slimformer.load(a.student)
        for p in student.model.parameters():  # a reloaded folder comes back frozen
            p.requires_grad_(p.is_floating_point())
    out = {"experiment": "smollm2", "run": a.run, "teacher": a.teacher, "student": a.student,
           "kept_blocks": student.meta.get("kept_blocks"), "threads": a.threads}
    t0 = time.perf_counter()
    out["teacher_quick_ppl"] = a.teacher_ppl if a.teacher_ppl else _ppl(teacher.model, ids, a.final_windows)
    out["student0_quick_ppl"] = a.student0_ppl if a.student0_ppl else _ppl(student.model, ids, a.final_windows)
    out["eval_seconds_start"] = time.perf_counter() - t0
    print(json.dumps({k: out[k] for k in ("teacher_quick_ppl", "student0_quick_ppl")}), flush=True)
    data = text_batches(teacher.tokenizer, a.batch_size, a.seq_len, source=a.data, seed=a.seed)
    out["train_windows"] = int(data.windows.shape[0])
    cfg = TrainConfig(steps=a.steps, lr=a.lr, batch_size=a.batch_size, seq_len=a.seq_len, warmup=a.warmup,
                      seed=a.seed, eval_every=a.eval_every, kd_loss=a.kd_loss, temperature=a.temperature,
                      beta=a.beta, kd_weight=a.kd_weight, checkpoint_dir=a.checkpoint_dir,
                      checkpoint_every=a.checkpoint_every if a.checkpoint_dir else 0, stop_after=a.stop_after,
                      progress=not a.no_progress)
    tlog = train(student.model, data, cfg, loss="kd" if a.run == "kd" else "lm",
                 teacher=teacher.model if a.run == "kd" else None,
                 eval_fn=lambda m: _ppl(m, ids, a.eval_windows), resume=a.resume)
    out["train"] = tlog.to_dict()
    t1 = time.perf_counter()
    out["final_windows"] = a.final_windows
    out["final_quick_ppl"] = _ppl(student.model, ids, a.final_windows)
    out["eval_seconds_end"] = time.perf_counter() - t1
    gap = out["student0_quick_ppl"] - out["teacher_quick_ppl"]
    out["gap_recovered"] = (out["student0_quick_ppl"] - out["final_quick_ppl"]) / gap if gap > 0 else float("nan")
    if a.save:
        from slimformer.distill import save_student

        save_student(student, a.save)
        out["saved"] = a.save
    return out


def _minilm_batches(tok, a):
    """Sentences from shipped *training* text: SST-2 train (ALPS 90%) + WikiText-2 valid lines."""
    from slimformer.data import sst2, wikitext2_valid_text
    from slimformer.distill import TokenBatches

    sents = [s for s, _ in sst2("train")]
    wiki = [l.strip() for l in wikitext2_valid_text(detokenize=True).split("\n")
            if len(l.strip()) > 40 and not l.strip().startswith("=")]
    g = torch.Generator().manual_seed(a.seed)
    pick = torch.randperm(len(sents), generator=g)[: a.n_sentences].tolist()
    texts = [sents[i] for i in pick] + wiki
    enc = tok(texts, padding="max_length", truncation=True, max_length=a.seq_len, return_tensors="pt")
    return TokenBatches(enc["input_ids"], a.batch_size, seed=a.seed, mask=enc["attention_mask"]), len(texts)


def run_minilm(a) -> dict:
    import slimformer
    from slimformer.distill import (RepresentationLoss, TrainConfig, layer_drop_student, train,
                                    use_eager_attention)
    from slimformer.distill.losses import layer_map
    from slimformer.eval.encoders import stsb

    torch.set_num_threads(a.threads)
    teacher = slimformer.load("minilm-l6")
    n_t = len(teacher.arch.get_blocks(teacher.model))
    student = layer_drop_student(teacher, n_t // 2, "every-other")  # blocks 1, 3, 5
    out = {"experiment": "minilm", "kept_blocks": student.meta["kept_blocks"], "threads": a.threads}
    out["teacher_stsb"] = stsb(teacher, show_progress=False)["spearman"]
    out["student0_stsb"] = stsb(student, show_progress=False)["spearman"]
    print(json.dumps({k: out[k] for k in ("teacher_stsb", "student0_stsb")}), flush=True)
    for m in (teacher.model, student.model):
        use_eager_attention(m)
    pairs = layer_map(n_t // 2, n_t, "every-other")
    heads = teacher.model.config.num_attention_heads
    width = teacher.model.config.hidden_size
    loss = RepresentationLoss(teacher.arch, width, width, pairs, heads, hint_weight=a.hint_weight,
                              attention=a.attention, attn_weight=a.attn_weight, vr_weight=a.vr_weight)
    data, n_texts = _minilm_batches(teacher.tokenizer, a)
    out["train_texts"] = n_texts
    cfg = TrainConfig(steps=a.steps, lr=a.lr, batch_size=a.batch_size, seq_len=a.seq_len, warmup=a.warmup,
                      seed=a.seed, eval_every=a.eval_every, progress=not a.no_progress)
    evalf = lambda m: stsb(student, limit=a.eval_pairs, show_progress=False)["spearman"]
    tlog = train(student.model, data, cfg, loss=loss, teacher=teacher.model, eval_fn=evalf)
    out["train"] = tlog.to_dict()
    out["final_stsb"] = stsb(student, show_progress=False)["spearman"]
    out["within_3_points"] = out["teacher_stsb"] - out["final_stsb"] <= 3.0
    return out


def report(a) -> None:
    allruns = [json.loads(Path(p).read_text()) for p in a.files]
    for r in [r for r in allruns if r["experiment"] == "minilm"]:
        t = r["train"]
        print(f"MiniLM -> blocks {r['kept_blocks']}: STS-B teacher {r['teacher_stsb']:.2f}, student before "
              f"{r['student0_stsb']:.2f}, after {len(t['loss'])} steps {r['final_stsb']:.2f} "
              f"(teacher - student {r['teacher_stsb'] - r['final_stsb']:.2f} points; {t['steps_per_s']:.3f} steps/s); "
              f"curve (step, STS-B on first pairs): {[(s, round(v, 2)) for s, v in t['evals']]}")
    runs = [r for r in allruns if r["experiment"] == "smollm2"]
    if not runs:
        return
    print(f"{'run':34s} {'steps':>5s} {'steps/s':>8s} {'PPL start':>10s} {'PPL end':>8s} "
          f"{'x teacher':>9s} {'gap recovered':>13s} {'log-gap recovered':>17s}")
    for r in runs:
        s0, t0, f = r["student0_quick_ppl"], r["teacher_quick_ppl"], r["final_quick_ppl"]
        log_gap = (math.log(s0) - math.log(f)) / (math.log(s0) - math.log(t0))
        t = r["train"]
        label = f"{r['run']} {Path(r['student']).name} w{r.get('final_windows', 16)} " + (f"{t['config']['kd_loss']} T={t['config']['temperature']}"
                                                 if r["run"] == "kd" else "")
        sps = f"{t['steps_per_s']:8.3f}" if t["seconds"] >= 1 else f"{'n/a':>8s}"  # untimed (pre-fix checkpoint)
        print(f"{label:34s} {len(t['loss']):5d} {sps} {r['student0_quick_ppl']:10.2f} "
              f"{r['final_quick_ppl']:8.2f} {r['final_quick_ppl'] / r['teacher_quick_ppl']:9.3f} "
              f"{100 * r['gap_recovered']:12.1f}% {100 * log_gap:16.1f}%")
    print(f"teacher quick PPL {runs[0]['teacher_quick_ppl']:.2f}")
    if len(runs) >= 2:
        a0, b0 = runs[0], runs[1]
        print(f"final PPL ratio {a0['run']}/{b0['run']}: {a0['final_quick_ppl'] / b0['final_quick_ppl']:.3f}")
    if a.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for r in runs:
            xs = [s for s, _ in r["train"]["evals"]]
            ys = [v for _, v in r["train"]["evals"]]
            ax.plot(xs, ys, marker="o", label=f"{r['run']} (end quick PPL {r['final_quick_ppl']:.1f})")
        ax.axhline(runs[0]["teacher_quick_ppl"], color="gray", ls="--", label="teacher (quick PPL)")
        ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_ylabel("WikiText-2 test PPL (first windows, cheap eval)")
        ax.set_title(f"{runs[0]['student']} student of {runs[0]['teacher']}: KD vs LM fine-tune")
        ax.legend()
        fig.tight_layout()
        fig.savefig(a.plot, dpi=110)
        print(f"plot -> {a.plot}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("smollm2")
    s.add_argument("--run", choices=["kd", "lm"], required=True)
    s.add_argument("--teacher", default="smollm2-135m")
    s.add_argument("--student", default="layers:15")
    s.add_argument("--teacher-ppl", type=float, default=None,
                   help="reuse a measured teacher quick PPL instead of re-measuring it")
    s.add_argument("--student0-ppl", type=float, default=None,
                   help="reuse the untrained student's measured quick PPL (same init in every run)")
    s.add_argument("--data", default="wikitext2-detok")
    s.add_argument("--steps", type=int, default=150)
    s.add_argument("--lr", type=float, default=2e-4)
    s.add_argument("--warmup", type=int, default=10)
    s.add_argument("--batch-size", type=int, default=4)
    s.add_argument("--seq-len", type=int, default=256)
    s.add_argument("--kd-loss", default="forward_kl")
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--beta", type=float, default=0.5)
    s.add_argument("--kd-weight", type=float, default=1.0)
    s.add_argument("--eval-every", type=int, default=25)
    s.add_argument("--eval-windows", type=int, default=4)
    s.add_argument("--final-windows", type=int, default=16,
                   help="windows of the start/end evaluation (16 = the protocol's quick eval); pass "
                        "--teacher-ppl/--student0-ppl measured on the same number of windows")
    s.add_argument("--checkpoint-dir", default=None)
    s.add_argument("--checkpoint-every", type=int, default=25)
    s.add_argument("--resume", action="store_true")
    s.add_argument("--stop-after", type=int, default=None,
                   help="stop after this many steps (schedule still over --steps); with --resume from a "
                        "checkpoint at that step: no training, just the final evaluation")
    s.add_argument("--save", default=None, help="save the trained student here")
    m = sub.add_parser("minilm")
    m.add_argument("--steps", type=int, default=400)
    m.add_argument("--lr", type=float, default=1e-4)
    m.add_argument("--warmup", type=int, default=20)
    m.add_argument("--batch-size", type=int, default=32)
    m.add_argument("--seq-len", type=int, default=64)
    m.add_argument("--n-sentences", type=int, default=20000)
    m.add_argument("--hint-weight", type=float, default=1.0)
    m.add_argument("--attention", default="kl", choices=["kl", "mse", "none"])
    m.add_argument("--attn-weight", type=float, default=1.0)
    m.add_argument("--vr-weight", type=float, default=1.0)
    m.add_argument("--eval-every", type=int, default=100)
    m.add_argument("--eval-pairs", type=int, default=300)
    for q in (s, m):
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--threads", type=int, default=2)
        q.add_argument("--no-progress", action="store_true")
        q.add_argument("--json", default=None)
    r = sub.add_parser("report")
    r.add_argument("files", nargs="+")
    r.add_argument("--plot", default=None)
    a = p.parse_args()
    if a.cmd == "report":
        return report(a)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    res = run_smollm2(a) if a.cmd == "smollm2" else run_minilm(a)
    res["args"] = vars(a)
    emit(res, a.json)


if __name__ == "__main__":
    main()

"""``slimformer distill``: a thin adapter over :mod:`slimformer.distill`.

    slimformer distill --teacher smollm2-135m --student layers:15 --loss kd --steps 300 --out out/s15
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import click

from slimformer.distill.losses import KD_LOSSES
from slimformer.errors import SlimformerError


@click.command("distill")
@click.option("--teacher", "-t", required=True, metavar="M", help="Teacher: bundled name or model folder.")
@click.option("--student", "-s", required=True, metavar="S",
              help="layers:N[:uniform|every-other|first] (drop blocks of the teacher), layers:i,j,k, "
                   "or a model name/folder (e.g. a pruned model) to train as is.")
@click.option("--loss", type=click.Choice(["kd", "lm", "hint"]), default="kd", show_default=True,
              help="kd: logits KD; lm: plain fine-tune (or black-box KD with --teacher-text); "
                   "hint: last hidden state MSE (encoders).")
@click.option("--kd-loss", type=click.Choice(list(KD_LOSSES)), default="forward_kl",
              show_default=True)
@click.option("--temperature", type=float, default=1.0, show_default=True)
@click.option("--beta", type=float, default=0.5, show_default=True, help="Generalized JSD beta.")
@click.option("--kd-weight", type=float, default=1.0, show_default=True, help="KD share; the rest is LM loss.")
@click.option("--steps", type=int, default=100, show_default=True)
@click.option("--lr", type=float, default=1e-4, show_default=True)
@click.option("--batch-size", type=int, default=4, show_default=True)
@click.option("--seq-len", type=int, default=256, show_default=True)
@click.option("--warmup", type=int, default=0, show_default=True)
@click.option("--data", default="wikitext2-detok", show_default=True,
              help="Training text (a calibration source; never the WikiText-2 test split).")
@click.option("--teacher-text", is_flag=True, help="Train on teacher-generated continuations (sequence-level KD).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--grad-accum", type=int, default=1, show_default=True, help="Micro-batches per optimizer step.")
@click.option("--bf16", "autocast_bf16", is_flag=True, help="bf16 autocast for the forwards (fp32 weights and losses).")
@click.option("--gradient-checkpointing", is_flag=True, help="Recompute block activations in the backward.")
@click.option("--on-policy-fraction", type=float, default=0.0, show_default=True,
              help="GKD: chance per micro-batch of training on the student's own continuation.")
@click.option("--prompt-len", type=int, default=32, show_default=True,
              help="Prompt tokens kept by --on-policy-fraction and --teacher-text.")
@click.option("--teacher-cache", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for the teacher's top-k logits, computed once and reused (loss kd, forward_kl).")
@click.option("--cache-k", type=int, default=64, show_default=True, help="Logits kept per token by --teacher-cache.")
@click.option("--checkpoint-dir", type=click.Path(path_type=Path), default=None)
@click.option("--checkpoint-every", type=int, default=0, show_default=True)
@click.option("--resume", is_flag=True, help="Continue from --checkpoint-dir.")
@click.option("--out", "-o", "out_dir", required=True, type=click.Path(path_type=Path))
@click.option("--overwrite", is_flag=True)
@click.option("--eval", "eval_tasks", default=None, metavar="a,b", help="Evaluate teacher and student after training.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the training log (and eval results) as JSON.")
@click.option("--no-progress", is_flag=True)
def distill_cmd(teacher, student, loss, kd_loss, temperature, beta, kd_weight, steps, lr, batch_size, seq_len,
                warmup, data, teacher_text, seed, grad_accum, autocast_bf16, gradient_checkpointing,
                on_policy_fraction, prompt_len, teacher_cache, cache_k, checkpoint_dir, checkpoint_every, resume, out_dir, overwrite,
                eval_tasks, json_path: Optional[Path], no_progress) -> None:
    """Train a student against a teacher (or fine-tune it) and save it as a model folder."""
    from slimformer.compress import check_output_dir
    from slimformer.data import CALIBRATION_SOURCES, token_ids
    from slimformer.distill import TrainConfig, layer_drop_student, save_student, train
    from slimformer.distill.batches import TokenBatches, chunk
    from slimformer.distill.students import parse_student
    from slimformer.models import load

    cfg = TrainConfig(steps=steps, lr=lr, batch_size=batch_size, seq_len=seq_len, warmup=warmup, seed=seed,
                      kd_loss=kd_loss, temperature=temperature, beta=beta, kd_weight=kd_weight,
                      checkpoint_dir=str(checkpoint_dir) if checkpoint_dir else None,
                      checkpoint_every=checkpoint_every, progress=not no_progress, grad_accum=grad_accum,
                      autocast_bf16=autocast_bf16, gradient_checkpointing=gradient_checkpointing,
                      on_policy_fraction=on_policy_fraction, prompt_len=prompt_len)
    if data not in CALIBRATION_SOURCES:
        raise SlimformerError(f"--data {data!r}: allowed: {', '.join(CALIBRATION_SOURCES)}")
    out_dir = out_dir.expanduser().resolve()
    check_output_dir(out_dir, overwrite)
    t_lm = load(teacher)
    if student.startswith("layers:"):
        n, rule = parse_student(student)
        s_lm = layer_drop_student(t_lm, n, rule)
    else:
        s_lm = load(student)
    windows = chunk(token_ids(t_lm.tokenizer, data), seq_len)
    if teacher_text:
        from slimformer.distill.seqkd import teacher_batches

        batches = teacher_batches(t_lm, windows, batch_size, prompt_len, seed=seed, n=max(batch_size, 4 * steps),
                                  progress=not no_progress)
    else:
        batches = TokenBatches(windows, batch_size, seed=seed)
    if loss == "hint":
        from slimformer.distill.representation import last_hidden_hint as loss_fn
    else:
        loss_fn = loss
    cache = None
    if teacher_cache is not None:
        from slimformer.distill.cache import TeacherCache

        if loss != "kd":
            raise SlimformerError("--teacher-cache needs --loss kd")
        cache = TeacherCache.build(t_lm.model, batches, teacher_cache, k=cache_k, progress=not no_progress,
                                   autocast_bf16=autocast_bf16)
    tlog = train(s_lm.model, batches, cfg, loss=loss_fn, teacher=t_lm.model if loss != "lm" else None,
                 resume=resume, teacher_cache=cache)
    s_lm.model.eval()
    if out_dir.exists():
        shutil.rmtree(out_dir)
    save_student(s_lm, out_dir)
    click.echo(f"trained {s_lm.name} for {steps} steps ({tlog.steps_per_s:.3f} steps/s), "
               f"final loss {tlog.loss[-1]:.4f} -> {out_dir}", err=True)
    summary = {"teacher": teacher, "student": student, "loss": loss, "train": tlog.to_dict(), "out": str(out_dir)}
    if eval_tasks:
        from slimformer.eval import evaluate, format_table

        res = [evaluate(t_lm, eval_tasks, progress=not no_progress),
               evaluate(load(out_dir), eval_tasks, progress=not no_progress)]
        click.echo(format_table(res))
        summary["eval"] = res
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(summary, indent=2, default=str) + "\n")


def register(group: click.Group) -> None:
    group.add_command(distill_cmd)

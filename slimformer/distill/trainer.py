"""The one training loop of slimformer: plain fine-tuning, logits KD, and any custom loss.

Every family that trains (distillation, recovery fine-tuning after structured pruning, a
``distill`` recipe stage) calls :func:`train`; nothing else in the library owns an optimizer.

Resumable by construction: a checkpoint holds the trained parameters, the AdamW state, the
scheduler, the torch RNG state, the data position and the log so far, and the data source is a
pure function of the batch index (:class:`~slimformer.distill.batches.TokenBatches`), so a run
that is stopped and resumed computes exactly what an uninterrupted run computes (tested to be
bitwise equal on a tiny model).
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
import torch.nn as nn

from slimformer.distill.batches import TokenBatches, as_batches
from slimformer.distill.losses import KD_LOSSES, kd_loss, lm_loss
from slimformer.engine.stage import check_bool, check_choice, check_float_range, check_int_range
from slimformer.errors import ConfigError, SlimformerError

log = logging.getLogger(__name__)

SCHEDULES = ("cosine", "linear", "constant")
CHECKPOINT_FILE = "train_state.pt"
# loss(student, batch, teacher) -> scalar tensor; batch = {"input_ids", "attention_mask", "index"}
LossFn = Callable[[nn.Module, dict, Optional[nn.Module]], torch.Tensor]


@dataclass(frozen=True)
class TrainConfig:
    """How to train (validated at construction; a bad value names the field).

    ``kd_loss``/``temperature``/``beta``/``kd_weight`` apply to ``loss="kd"``: the step loss is
    ``kd_weight · KD + (1 - kd_weight) · LM`` (the KD term is already ``T²``-scaled, see
    :mod:`slimformer.distill.losses`). ``lr`` decays after ``warmup`` linear steps along
    ``schedule`` to ``min_lr_ratio · lr``. ``eval_every`` 0 = evaluate only at the start and the
    end. ``stop_after``: stop after that many total steps as if interrupted (a checkpoint is
    written first when ``checkpoint_dir`` is set) — for tests and time-sliced runs; the schedule
    still follows ``steps``. ``threads``: torch threads during training (``None``: unchanged).

    ``grad_accum``: micro-batches of ``batch_size`` rows per optimizer step (the step's gradient
    is the mean of the micro-batches' gradients, so ``batch_size=2, grad_accum=2`` trains like
    ``batch_size=4`` on the same data order when every token counts). ``autocast_bf16``: run the
    forwards (student and teacher) under ``torch.autocast("cpu", dtype=torch.bfloat16)``; the
    parameters, optimizer state and the losses (on logits cast back to fp32) stay fp32.
    ``gradient_checkpointing``: Hugging Face ``gradient_checkpointing_enable()`` (non-reentrant)
    while training, disabled again afterwards — recomputes block activations in the backward to
    save memory, same result. ``on_policy_fraction`` (GKD's λ, ``loss="kd"`` only): the chance per
    micro-batch that its continuation after the first ``prompt_len`` tokens is sampled from the
    student and only those generated positions are distilled (see :mod:`slimformer.distill.gkd`).
    """

    steps: int = 100
    lr: float = 1e-4
    batch_size: int = 4
    seq_len: int = 256
    warmup: int = 0
    weight_decay: float = 0.0
    grad_clip: Optional[float] = 1.0
    seed: int = 0
    eval_every: int = 0
    checkpoint_dir: Optional[str] = None
    checkpoint_every: int = 0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    kd_loss: str = "forward_kl"
    temperature: float = 1.0
    beta: float = 0.5
    kd_weight: float = 1.0
    stop_after: Optional[int] = None
    threads: Optional[int] = None
    progress: bool = True
    grad_accum: int = 1
    autocast_bf16: bool = False
    gradient_checkpointing: bool = False
    on_policy_fraction: float = 0.0
    prompt_len: int = 32

    @classmethod
    def for_stage(cls, owner: str, **fields) -> "TrainConfig":
        """Build from a recipe stage's training fields; a bad value names the stage's field
        (``distill.lr``, ``recover.steps``) rather than ``train.*``."""
        try:
            return cls(**fields)
        except ConfigError as e:
            raise ConfigError(str(e).replace("train.", f"{owner}.", 1)) from None

    def __post_init__(self) -> None:
        o = "train"
        check_int_range(o, "steps", self.steps, 1)
        check_float_range(o, "lr", self.lr, 0.0, 10.0)
        check_int_range(o, "batch_size", self.batch_size, 1)
        check_int_range(o, "seq_len", self.seq_len, 2)
        check_int_range(o, "warmup", self.warmup, 0, self.steps)
        check_float_range(o, "weight_decay", self.weight_decay, 0.0, 10.0)
        if self.grad_clip is not None:
            check_float_range(o, "grad_clip", self.grad_clip, 1e-12, 1e12)
        check_int_range(o, "seed", self.seed, 0)
        check_int_range(o, "eval_every", self.eval_every, 0)
        check_int_range(o, "checkpoint_every", self.checkpoint_every, 0)
        if self.checkpoint_every and not self.checkpoint_dir:
            raise ConfigError("train.checkpoint_dir: required when checkpoint_every > 0; allowed: a folder path")
        if self.checkpoint_dir is not None and not isinstance(self.checkpoint_dir, (str, os.PathLike)):
            raise ConfigError(f"train.checkpoint_dir: invalid value {self.checkpoint_dir!r}; allowed: a folder path or null")
        check_choice(o, "schedule", self.schedule, SCHEDULES)
        check_float_range(o, "min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        check_choice(o, "kd_loss", self.kd_loss, KD_LOSSES)
        check_float_range(o, "temperature", self.temperature, 1e-3, 1e3)
        check_float_range(o, "beta", self.beta, 0.0, 1.0)
        check_float_range(o, "kd_weight", self.kd_weight, 0.0, 1.0)
        check_int_range(o, "stop_after", self.stop_after, 1, allow_none=True)
        check_int_range(o, "threads", self.threads, 1, allow_none=True)
        check_bool(o, "progress", self.progress)
        check_int_range(o, "grad_accum", self.grad_accum, 1)
        check_bool(o, "autocast_bf16", self.autocast_bf16)
        check_bool(o, "gradient_checkpointing", self.gradient_checkpointing)
        check_float_range(o, "on_policy_fraction", self.on_policy_fraction, 0.0, 1.0)
        check_int_range(o, "prompt_len", self.prompt_len, 1)
        if self.on_policy_fraction > 0 and self.kd_weight < 1.0:
            raise ConfigError(f"{o}.kd_weight: invalid value {self.kd_weight!r} with on_policy_fraction > 0; "
                              "allowed: 1.0 (student-sampled text has no hard labels to mix in)")

    def lr_factor(self, step: int) -> float:
        """Multiplier of ``lr`` for optimizer step ``step`` (0-based)."""
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.schedule == "constant":
            return 1.0
        t = (step - self.warmup) / max(1, self.steps - self.warmup)
        shape = 0.5 * (1 + math.cos(math.pi * t)) if self.schedule == "cosine" else 1.0 - t
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * shape


@dataclass
class TrainLog:
    """What happened: the loss and lr of every step, the eval curve ``[(step, value)]`` (step 0 =
    before training), wall time and throughput of this process's steps."""

    config: dict
    steps: list = field(default_factory=list)
    loss: list = field(default_factory=list)
    lr: list = field(default_factory=list)
    evals: list = field(default_factory=list)
    seconds: float = 0.0  # wall time of the training steps, evaluations excluded (all processes of a resumed run)
    eval_seconds: float = 0.0
    trained_steps: int = 0  # steps timed in ``seconds``
    tokens_per_step: int = 0
    resumed_from: Optional[int] = None
    stopped_early: bool = False

    @property
    def steps_per_s(self) -> float:
        return self.trained_steps / self.seconds if self.seconds > 0 else float("nan")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["steps_per_s"] = self.steps_per_s
        return d


def autocast(cfg: TrainConfig):
    """The forward context of ``cfg``: bf16 CPU autocast when ``cfg.autocast_bf16``, else a no-op."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.autocast_bf16)


def forward_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   cfg: TrainConfig) -> torch.Tensor:
    """``model``'s logits under ``cfg``'s autocast; fp32 again when they were computed in bf16,
    so every loss is computed in fp32."""
    with autocast(cfg):
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return _fp32(logits)


def _fp32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in fp32 when autocast left it in half precision (fp32/fp64 stay as they are)."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


def _lm_step(student, batch, teacher, cfg, gen=None, cache=None):
    logits = forward_logits(student, batch["input_ids"], batch["attention_mask"], cfg)
    return lm_loss(logits, batch["input_ids"], batch["attention_mask"])


def _kd_step(student, batch, teacher, cfg, gen=None, cache=None):
    if teacher is None and cache is None:
        raise SlimformerError("loss='kd' needs a teacher model")
    mask = batch["attention_mask"]
    if cfg.on_policy_fraction > 0:  # GKD: maybe replace the continuation by the student's own sample
        from slimformer.distill.gkd import on_policy_batch

        batch, mask = on_policy_batch(student, batch, cfg.prompt_len, cfg.on_policy_fraction, gen,
                                      autocast_bf16=cfg.autocast_bf16)
    s_logits = forward_logits(student, batch["input_ids"], batch["attention_mask"], cfg)
    if cache is not None:
        from slimformer.distill.losses import topk_forward_kl

        if "index" not in batch:
            raise SlimformerError("a teacher cache needs batches that carry their window indices (a TokenBatches)")
        values, indices = cache.lookup(batch["index"])
        cache.check_vocab(s_logits.shape[-1])
        kd = topk_forward_kl(s_logits, values, indices, cfg.temperature, mask)
    else:
        with torch.no_grad():
            t_logits = forward_logits(teacher, batch["input_ids"], batch["attention_mask"], cfg)
        if s_logits.shape != t_logits.shape:
            raise SlimformerError(f"student logits {tuple(s_logits.shape)} vs teacher {tuple(t_logits.shape)}: "
                                  "logits KD needs the same vocabulary")
        kd = kd_loss(s_logits, t_logits, cfg.kd_loss, cfg.temperature, cfg.beta, mask)
    loss = cfg.kd_weight * kd
    if cfg.kd_weight < 1.0:
        loss = loss + (1.0 - cfg.kd_weight) * lm_loss(s_logits, batch["input_ids"], batch["attention_mask"])
    return loss


def micro_generator(cfg: TrainConfig, micro: int) -> torch.Generator:
    """The generator of micro-batch number ``micro`` (0-based over the whole run): a pure
    function of the seed and the position, so on-policy samples survive a resume exactly."""
    return torch.Generator().manual_seed(cfg.seed * 1_000_003 + micro)


def _trainable(student: nn.Module, params, loss) -> list[nn.Parameter]:
    ps = list(params) if params is not None else [p for p in student.parameters()
                                                  if p.requires_grad and p.is_floating_point()]
    if isinstance(loss, nn.Module):  # e.g. the learnable projections of a hint loss
        ps += [p for p in loss.parameters() if p.requires_grad]
    seen, out = set(), []
    for p in ps:  # tied weights (embedding = LM head) once
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    if not out:
        raise SlimformerError("nothing to train: no floating-point parameter requires grad")
    return out


def _checkpointing(model: nn.Module, on: bool) -> bool:
    """Switch Hugging Face activation (gradient) checkpointing on/off — transformers 5 names it
    ``activation_checkpointing_*``, 4.x ``gradient_checkpointing_*``; non-reentrant, so the
    gradients do not depend on the inputs requiring grad. ``True`` when this call enabled it
    (not already on, supported)."""
    new = hasattr(model, "activation_checkpointing_enable")
    if not on:
        (model.activation_checkpointing_disable if new else model.gradient_checkpointing_disable)()
        return False
    if not getattr(model, "supports_gradient_checkpointing", False):
        log.warning("gradient_checkpointing: %s does not support it; training without", type(model).__name__)
        return False
    already = getattr(model, "is_activation_checkpointing" if new else "is_gradient_checkpointing", False)
    if already:
        return False
    if new:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return True


def _save(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a crash mid-write leaves the previous checkpoint intact


def train(student: nn.Module, batches: Union[TokenBatches, torch.Tensor], cfg: TrainConfig,
          loss: Union[str, LossFn] = "lm", teacher: Optional[nn.Module] = None, params=None,
          eval_fn: Optional[Callable[[nn.Module], Any]] = None, resume: bool = False,
          teacher_cache=None) -> TrainLog:
    """Train ``student`` in place for ``cfg.steps`` AdamW steps and return the :class:`TrainLog`.

    ``batches``: a :class:`TokenBatches`, ``[N, L]`` token windows or a 1-D token stream (cut
    into ``cfg.seq_len`` windows, drawn in ``cfg.batch_size`` batches under ``cfg.seed``).
    ``loss``: ``"lm"`` (next-token fine-tune), ``"kd"`` (logits KD against ``teacher``, see
    :class:`TrainConfig`) or a callable ``(student, batch, teacher) -> scalar``; a callable that
    is an ``nn.Module`` has its own parameters trained (and checkpointed) too. ``params``: the
    parameters to train (default: every floating-point parameter that requires grad).
    ``eval_fn(student) -> value`` runs (in eval mode, without grad) before the first step, every
    ``cfg.eval_every`` steps and after the last. ``resume``: continue from
    ``cfg.checkpoint_dir`` if it holds a checkpoint. ``teacher_cache``: a
    :class:`~slimformer.distill.cache.TeacherCache` of the teacher's top-k logits on exactly these
    windows; with ``loss="kd"`` (``kd_loss="forward_kl"``) it replaces the teacher forward
    (``teacher`` may then be None). ``cfg.batch_size`` is the micro-batch: each optimizer step
    draws ``cfg.grad_accum`` of them.
    """
    if isinstance(loss, str):
        check_choice("train", "loss", loss, ("lm", "kd"))
        base = _lm_step if loss == "lm" else _kd_step
        step_fn = lambda s, b, t, g: base(s, b, t, cfg, g, teacher_cache)
        if loss == "kd" and teacher is None and teacher_cache is None:
            raise SlimformerError("loss='kd' needs a teacher model")
    elif callable(loss):
        def step_fn(s, b, t, g):
            with autocast(cfg):
                return _fp32(loss(s, b, t))
    else:
        raise ConfigError(f"train.loss: invalid value {loss!r}; allowed: 'lm', 'kd' or a callable")
    if cfg.on_policy_fraction > 0 and loss != "kd":
        raise ConfigError("train.on_policy_fraction: > 0 needs loss 'kd' (the teacher scores the student's samples)")
    data = as_batches(batches, cfg.batch_size, cfg.seq_len, cfg.seed)
    if teacher_cache is not None:
        if loss != "kd" or cfg.kd_loss != "forward_kl":
            raise ConfigError("train.teacher_cache: needs loss 'kd' with kd_loss 'forward_kl' "
                              f"(got loss {loss!r}, kd_loss {cfg.kd_loss!r})")
        if cfg.on_policy_fraction > 0:
            raise ConfigError("train.teacher_cache: cannot score student samples; allowed with on_policy_fraction 0")
        teacher_cache.check(data.windows, data.mask)
    trainable = _trainable(student, params, loss)
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cfg.lr_factor)
    tlog = TrainLog(config=asdict(cfg))
    torch.manual_seed(cfg.seed)
    start = 0
    ckpt = Path(cfg.checkpoint_dir) / CHECKPOINT_FILE if cfg.checkpoint_dir else None
    extra = loss if isinstance(loss, nn.Module) else None

    def state() -> dict:
        return {"step": step, "model": student.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "rng": torch.get_rng_state(), "data": data.state_dict(),
                "loss_module": None if extra is None else extra.state_dict(), "log": tlog.to_dict(),
                "grad_accum": cfg.grad_accum}

    if resume and ckpt is not None and ckpt.exists():
        st = torch.load(ckpt, weights_only=False)
        if st.get("grad_accum", 1) != cfg.grad_accum:
            raise SlimformerError(f"checkpoint {ckpt} was written with grad_accum {st.get('grad_accum', 1)}, "
                                  f"not {cfg.grad_accum}: the data position would not match the step")
        student.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        torch.set_rng_state(st["rng"])
        data.load_state_dict(st["data"])
        if extra is not None and st["loss_module"] is not None:
            extra.load_state_dict(st["loss_module"])
        for k in ("steps", "loss", "lr", "evals"):
            setattr(tlog, k, list(st["log"][k]))
        for k in ("seconds", "eval_seconds", "trained_steps"):
            setattr(tlog, k, st["log"].get(k, 0))
        start = tlog.resumed_from = int(st["step"])
        log.info("resumed from %s at step %d", ckpt, start)
    elif resume:
        log.info("no checkpoint to resume from; starting at step 0")

    if teacher is not None:
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    was_training = student.training
    threads0 = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    checkpointing = cfg.gradient_checkpointing and _checkpointing(student, True)

    def evaluate(at: int) -> None:
        if eval_fn is None or any(s == at for s, _ in tlog.evals):
            return
        t = time.perf_counter()
        student.eval()
        with torch.no_grad():
            v = eval_fn(student)
        student.train()
        tlog.evals.append((at, v))
        tlog.eval_seconds += time.perf_counter() - t
        log.info("step %d eval %s", at, v)

    step = start
    end = cfg.steps if cfg.stop_after is None else min(cfg.steps, cfg.stop_after)
    try:
        student.train()
        if start == 0:
            evaluate(0)
        it = iter(data)
        bar = None
        if cfg.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=end, initial=start, desc="train", unit="step", dynamic_ncols=True)
        t0, e0, s0 = time.perf_counter(), tlog.eval_seconds, tlog.seconds

        def clock() -> None:  # steps' wall time so far, evaluations excluded
            tlog.seconds = s0 + time.perf_counter() - t0 - (tlog.eval_seconds - e0)

        for step in range(start, end):
            opt.zero_grad(set_to_none=True)
            total, tokens = 0.0, 0
            for j in range(cfg.grad_accum):  # micro-batches: gradients add up, each loss / grad_accum
                batch = next(it)
                tokens += int(batch["attention_mask"].sum())
                micro = step * cfg.grad_accum + j
                value = step_fn(student, batch, teacher, micro_generator(cfg, micro) if cfg.on_policy_fraction > 0 else None)
                if not torch.isfinite(value):
                    raise SlimformerError(f"training loss is {float(value)} at step {step}; lower the lr")
                (value if cfg.grad_accum == 1 else value / cfg.grad_accum).backward()
                total += float(value.detach())
            tlog.tokens_per_step = tokens
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
            tlog.lr.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
            tlog.steps.append(step + 1)
            tlog.loss.append(total / cfg.grad_accum)
            tlog.trained_steps += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{tlog.loss[-1]:.4f}")
            step += 1  # ``step`` = number of finished steps from here on
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                evaluate(step)
            if ckpt is not None and cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                clock()
                _save(ckpt, state())
        clock()
        if bar is not None:
            bar.close()
        step = end
        if end < cfg.steps:
            tlog.stopped_early = True
            if ckpt is not None:
                _save(ckpt, state())
        else:
            evaluate(cfg.steps)
    finally:
        if checkpointing:
            _checkpointing(student, False)
        student.train(was_training)
        torch.set_num_threads(threads0)
    return tlog

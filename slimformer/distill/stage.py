"""The ``distill`` recipe stage: recover a compressed model by training it against the model as
it was before the recipe (``ModelContext.teacher``), through the one training loop.

A model-level stage (it trains the whole model), so it can follow structured pruning, layer
dropping or quantization in a recipe::

    stages:
      - method: distill
        loss: kd            # kd (logits), lm (plain fine-tune), hint (last hidden state)
        kd_loss: forward_kl # or reverse_kl / jsd (+ beta)
        temperature: 1.0
        steps: 200
        lr: 5.0e-5

Training text is the recipe's calibration samples (``data: calibration``, cut into ``seq_len``
windows) or a shipped text source by name (never the WikiText-2 test split).
``teacher_text: true`` trains on teacher-generated continuations of those windows instead
(sequence-level KD; with ``loss: lm`` it is black-box KD: only the teacher's text, no logits).
``targets``/``ignore`` choose the trained parameters by module name (default: all).

Trainer options mirror :class:`~slimformer.distill.trainer.TrainConfig`: ``grad_accum``,
``autocast_bf16``, ``gradient_checkpointing``, ``on_policy_fraction`` (GKD; the prompt is the
first ``prompt_len`` tokens of each window). ``teacher_cache: <folder>`` computes the teacher's
top-``cache_k`` logits once into that folder and trains on them (``loss: kd``, ``kd_loss:
forward_kl``; see :mod:`slimformer.distill.cache`). ``quantized: ste`` (after ``rtn``/``gptq``)
trains the packed QuantLinear weights through fake quantization with a straight-through
estimator and re-packs them afterwards (:mod:`slimformer.distill.ste`); the default ``frozen``
leaves them packed and trains only the other parameters.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from slimformer.data import CALIBRATION_SOURCES
from slimformer.distill.losses import KD_LOSSES
from slimformer.engine.stage import (StageConfig, StageMethod, check_bool, check_choice,
                                     check_int_range, compile_pattern, register_stage)
from slimformer.errors import ConfigError, SlimformerError

STAGE_LOSSES = ("kd", "lm", "hint")
DATA_SOURCES = ("calibration",) + CALIBRATION_SOURCES


@dataclass(frozen=True)
class DistillConfig(StageConfig):
    METHOD: ClassVar[str] = "distill"

    loss: str = "kd"
    kd_loss: str = "forward_kl"
    temperature: float = 1.0
    beta: float = 0.5
    kd_weight: float = 1.0
    steps: int = 100
    lr: float = 5e-5
    batch_size: int = 4
    seq_len: int = 256
    warmup: int = 0
    weight_decay: float = 0.0
    grad_clip: Optional[float] = 1.0
    schedule: str = "cosine"
    data: str = "calibration"
    seed: int = 0
    teacher_text: bool = False
    prompt_len: int = 32
    gen_tokens: int = 64
    grad_accum: int = 1
    autocast_bf16: bool = False
    gradient_checkpointing: bool = False
    on_policy_fraction: float = 0.0
    teacher_cache: Optional[str] = None
    cache_k: int = 64
    quantized: str = "frozen"

    def validate(self) -> None:
        o = self.METHOD
        check_choice(o, "loss", self.loss, STAGE_LOSSES)
        check_choice(o, "kd_loss", self.kd_loss, KD_LOSSES)
        check_choice(o, "data", self.data, DATA_SOURCES)
        check_bool(o, "teacher_text", self.teacher_text)
        check_int_range(o, "prompt_len", self.prompt_len, 1)
        check_int_range(o, "gen_tokens", self.gen_tokens, 1)
        from slimformer.distill.ste import QUANTIZED_MODES

        check_choice(o, "quantized", self.quantized, QUANTIZED_MODES)
        check_int_range(o, "cache_k", self.cache_k, 1)
        if self.teacher_cache is not None:
            if not isinstance(self.teacher_cache, str) or not self.teacher_cache:
                raise ConfigError(f"{o}.teacher_cache: invalid value {self.teacher_cache!r}; allowed: a folder path or null")
            if self.loss != "kd" or self.kd_loss != "forward_kl" or self.on_policy_fraction != 0 or self.teacher_text:
                raise ConfigError(f"{o}.teacher_cache: needs loss 'kd', kd_loss 'forward_kl', on_policy_fraction 0 "
                                  "and teacher_text false")
        if self.on_policy_fraction and self.loss != "kd":
            raise ConfigError(f"{o}.on_policy_fraction: invalid value {self.on_policy_fraction!r} with loss "
                              f"{self.loss!r}; allowed: 0 (on-policy needs loss 'kd')")
        if self.overrides:
            raise ConfigError(f"{o}.overrides: not supported by a model-level stage; allowed: {{}}")
        self.train_config()  # validates the training fields with their own messages

    def train_config(self, progress: bool = False):
        from slimformer.distill.trainer import TrainConfig

        return TrainConfig.for_stage(
            self.METHOD, steps=self.steps, lr=self.lr, batch_size=self.batch_size, seq_len=self.seq_len,
            warmup=self.warmup, weight_decay=self.weight_decay, grad_clip=self.grad_clip, seed=self.seed,
            schedule=self.schedule, kd_loss=self.kd_loss, temperature=self.temperature, beta=self.beta,
            kd_weight=self.kd_weight, progress=progress, grad_accum=self.grad_accum,
            autocast_bf16=self.autocast_bf16, gradient_checkpointing=self.gradient_checkpointing,
            on_policy_fraction=self.on_policy_fraction, prompt_len=self.prompt_len)


def _windows(mctx, cfg: DistillConfig) -> torch.Tensor:
    from slimformer.distill.batches import chunk

    if cfg.data == "calibration":
        s = mctx.samples
        if s is None or s.dim() != 2 or s.dtype != torch.long:
            raise SlimformerError("distill: data 'calibration' needs token-id calibration samples [n, seq]")
        if s.shape[1] > cfg.seq_len:  # cut each sample into seq_len windows (a tail is dropped)
            k = s.shape[1] // cfg.seq_len
            return s[:, :k * cfg.seq_len].reshape(-1, cfg.seq_len)
        return s
    from slimformer.data import token_ids

    return chunk(token_ids(mctx.lm.tokenizer, cfg.data), cfg.seq_len)


def _params(model, cfg: DistillConfig) -> list:
    if cfg.targets is None and not cfg.ignore:
        return [p for p in model.parameters() if p.is_floating_point()]
    keep = [compile_pattern(cfg.METHOD, "targets", t) for t in (cfg.targets or ())]
    drop = [compile_pattern(cfg.METHOD, "ignore", t) for t in cfg.ignore]
    out = []
    for name, mod in model.named_modules():
        if (keep and not any(m(name) for m in keep)) or any(m(name) for m in drop):
            continue
        out += [p for p in mod.parameters(recurse=False) if p.is_floating_point()]
    if not out:
        raise ConfigError(f"{cfg.METHOD}.targets: no module with trainable parameters matches")
    return out


def apply_distill(mctx, cfg: DistillConfig) -> None:
    from slimformer.distill.batches import TokenBatches
    from slimformer.distill.trainer import train

    lm = mctx.lm
    windows = _windows(mctx, cfg)
    if cfg.teacher_text:
        from slimformer.distill.seqkd import teacher_batches
        from slimformer.models.loading import LoadedModel

        if lm.kind != "causal-lm":
            raise SlimformerError("distill: teacher_text needs a causal LM teacher")
        t_lm = LoadedModel(model=mctx.teacher, tokenizer=lm.tokenizer, arch=lm.arch, name="teacher", source="")
        data = teacher_batches(t_lm, windows, cfg.batch_size, cfg.prompt_len, cfg.gen_tokens, seed=cfg.seed,
                               progress=bool(getattr(mctx.options, "progress", False)))
    else:
        data = TokenBatches(windows, cfg.batch_size, seed=cfg.seed)
    from slimformer.distill.representation import last_hidden_hint

    loss = last_hidden_hint if cfg.loss == "hint" else cfg.loss
    if cfg.loss == "kd" and lm.kind != "causal-lm":
        raise SlimformerError(f"distill: loss 'kd' needs logits; a {lm.kind} model takes loss 'hint'")
    progress = bool(getattr(mctx.options, "progress", False))
    tcfg = cfg.train_config(progress=progress)
    cache = None
    if cfg.teacher_cache is not None:
        from slimformer.distill.cache import TeacherCache

        cache = TeacherCache.build(mctx.teacher, data, cfg.teacher_cache, k=cfg.cache_k, progress=progress,
                                   autocast_bf16=cfg.autocast_bf16)
    swapped = []
    if cfg.quantized == "ste":
        from slimformer.distill.ste import to_fake_quant

        swapped = to_fake_quant(lm.model)
        if not swapped:
            raise SlimformerError("distill: quantized 'ste' needs a model with QuantLinear modules (run rtn/gptq first)")
    try:
        train(lm.model, data, tcfg, loss=loss, teacher=None if cache is not None else mctx.teacher,
              params=_params(lm.model, cfg), teacher_cache=cache)
    finally:
        if swapped:
            from slimformer.distill.ste import from_fake_quant

            from_fake_quant(lm.model)  # a real packed QuantLinear again, same spec and scales
    lm.model.eval()


def _needs_samples(cfg: DistillConfig) -> bool:
    return cfg.data == "calibration"


def _needs_teacher(cfg: DistillConfig) -> bool:
    return cfg.loss in ("kd", "hint") or cfg.teacher_text


register_stage(StageMethod("distill", DistillConfig, apply=lambda ctx, cfg: None, apply_model=apply_distill,
                           needs_samples=_needs_samples, needs_teacher=_needs_teacher,
                           about="knowledge distillation / fine-tuning recovery (model-level)"))

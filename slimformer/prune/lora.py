"""Recovery after structured pruning: a short LoRA (or full) fine-tune on calibration text.

LoRA (Hu et al., 2022; LLM-Pruner's recovery): each target linear ``y = x Wᵀ + b`` becomes
``y = x Wᵀ + b + s · (x Aᵀ) Bᵀ`` with ``A [r, in]`` (random), ``B [out, r]`` (zeros, so training
starts from the pruned model exactly) and ``s = alpha / r``; only ``A`` and ``B`` train. After
training the update is merged (``W ← W + s · B A``) and the adapters disappear: the saved
model is a plain model of the pruned shape, nothing to load specially.

The optimisation itself is the shared loop :func:`slimformer.distill.trainer.train` (``loss="lm"``);
this module only wraps/merges adapters and is the ``recover`` recipe stage. Training text is the
recipe's calibration windows (WikiText-2 *validation* by default — never the test split).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import ClassVar, Optional, Sequence

import torch
import torch.nn as nn

from slimformer.engine.stage import (ModelContext, StageConfig, StageMethod, check_choice, check_float_range,
                                     check_int_range, register_stage)
from slimformer.models.registry import get_module, set_module

log = logging.getLogger(__name__)

MODES = ("lora", "full")


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update ``s · B A``."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: Optional[torch.Generator] = None):
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=w.dtype, device=w.device))
        # PEFT's init: A ~ kaiming-uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)); B = 0
        bound = 1.0 / math.sqrt(base.in_features)
        with torch.no_grad():
            self.lora_A.uniform_(-bound, bound, generator=generator)
        self.scaling = alpha / rank

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_A.t()) @ self.lora_B.t() * self.scaling

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` with ``W + s · B A`` (same output as this module)."""
        b = self.base
        out = nn.Linear(b.in_features, b.out_features, bias=b.bias is not None, dtype=b.weight.dtype,
                        device=b.weight.device)
        with torch.no_grad():
            out.weight.copy_(b.weight + (self.lora_B @ self.lora_A) * self.scaling)
            if b.bias is not None:
                out.bias.copy_(b.bias)
        return out


def add_lora(model: nn.Module, names: Sequence[str], rank: int, alpha: float, seed: int = 0) -> list[nn.Parameter]:
    """Wrap the named ``nn.Linear`` modules in :class:`LoRALinear` (in place); every other
    parameter of ``model`` is frozen. Returns the adapter parameters (what to train)."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.requires_grad_(False)
    params: list[nn.Parameter] = []
    for n in names:
        m = get_module(model, n)
        if not isinstance(m, nn.Linear):
            raise TypeError(f"LoRA target {n} is a {type(m).__name__}, not an nn.Linear")
        w = LoRALinear(m, rank, alpha, g)
        set_module(model, n, w)
        params += [w.lora_A, w.lora_B]
    return params


def merge_lora(model: nn.Module) -> int:
    """Replace every :class:`LoRALinear` by its merged ``nn.Linear``; returns how many."""
    names = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    for n in names:
        set_module(model, n, get_module(model, n).merged())
    return len(names)


# ---------------------------------------------------------------------------------------------
# the recipe stage


@dataclass(frozen=True)
class RecoverConfig(StageConfig):
    """Fine-tune the (pruned) model on the recipe's calibration windows with the plain LM loss.
    ``mode``: ``lora`` (adapters of ``rank`` / ``alpha`` on ``targets`` — default every block
    linear — merged back at the end) or ``full`` (every parameter). ``steps`` AdamW steps of
    ``batch_size`` windows of ``seq_len`` tokens (calibration windows are cut to that length) at
    ``lr`` (cosine decay after ``warmup``)."""

    METHOD: ClassVar[str] = "recover"
    VERSION: ClassVar[int] = 1

    mode: str = "lora"
    rank: int = 8
    alpha: float = 16.0
    steps: int = 100
    lr: float = 2e-4
    batch_size: int = 4
    seq_len: int = 256
    warmup: int = 0
    seed: int = 0

    def validate(self) -> None:
        o = self.METHOD
        check_choice(o, "mode", self.mode, MODES)
        check_int_range(o, "rank", self.rank, 1)
        check_float_range(o, "alpha", self.alpha, 1e-6, 1e6)
        self.train_config()  # the training fields, checked once by TrainConfig, named recover.*

    def train_config(self, progress: bool = False):
        from slimformer.distill.trainer import TrainConfig

        return TrainConfig.for_stage(self.METHOD, steps=self.steps, lr=self.lr, batch_size=self.batch_size,
                                     seq_len=self.seq_len, warmup=self.warmup, seed=self.seed, progress=progress)


def training_windows(samples: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Calibration windows ``[n, L]`` cut into ``[n · (L // seq_len), seq_len]``."""
    n, length = samples.shape
    k = length // seq_len
    if k == 0:
        from slimformer.errors import ConfigError

        raise ConfigError(f"recover.seq_len: invalid value {seq_len}; allowed: integers 2..{length} "
                          "(the calibration sequence length)")
    return samples[:, :k * seq_len].reshape(n * k, seq_len)


def recover(lm, windows: torch.Tensor, cfg: RecoverConfig, progress: bool = False, eval_fn=None):
    """Fine-tune ``lm.model`` in place on ``windows`` ``[N, seq_len]``; returns the TrainLog.
    LoRA adapters are merged before returning, so the model is plain again."""
    from slimformer.distill.trainer import train
    from slimformer.engine.targets import resolve

    model = lm.model
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        if cfg.mode == "lora":
            names = list(resolve(model, lm.arch, cfg).modules)
            params = add_lora(model, names, cfg.rank, cfg.alpha, cfg.seed)
        else:
            params = [p for p in model.parameters() if p.is_floating_point()]
            for p in params:
                p.requires_grad_(True)
        tlog = train(model, windows, cfg.train_config(progress), loss="lm", params=params, eval_fn=eval_fn)
    finally:
        merge_lora(model)
        for n, p in model.named_parameters():
            p.requires_grad_(flags.get(n, False))
            p.grad = None
        model.eval()
    return tlog


def apply_recover(mctx: ModelContext, cfg: RecoverConfig) -> None:
    lm = mctx.lm
    progress = bool(getattr(mctx.options, "progress", False))
    tlog = recover(lm, training_windows(mctx.samples, cfg.seq_len), cfg, progress=progress)
    lm.meta = {**lm.meta, "recovery": {"mode": cfg.mode, "steps": cfg.steps, "seconds": round(tlog.seconds, 1),
                                       "first_loss": tlog.loss[0], "last_loss": tlog.loss[-1]}}
    log.info("recovery (%s): %d steps in %.0fs, loss %.3f -> %.3f", cfg.mode, cfg.steps, tlog.seconds,
             tlog.loss[0], tlog.loss[-1])


register_stage(StageMethod(name=RecoverConfig.METHOD, config_cls=RecoverConfig, apply=lambda ctx, cfg: None,
                           apply_model=apply_recover, needs_samples=lambda cfg: True,
                           about="recovery fine-tune (LoRA merged back, or full) on calibration text"))

__all__ = ["LoRALinear", "RecoverConfig", "add_lora", "apply_recover", "merge_lora", "recover", "training_windows"]

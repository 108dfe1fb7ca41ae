"""Next-token selection: greedy, temperature, top-k, top-p — as pure functions.

Speculative sampling is lossless only with respect to a *distribution*, so everything that
shapes the distribution (temperature, top-k, top-p) lives in one function,
:func:`target_probs`, used for the plain loop, the draft and the verifier alike.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from slimformer.errors import ConfigError


@dataclass(frozen=True)
class SamplingConfig:
    """``temperature == 0`` means greedy (argmax); otherwise sample from the shaped softmax."""

    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off

    def __post_init__(self):
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


GREEDY = SamplingConfig()


def shape_logits(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus) on the last dim; masked entries -> -inf."""
    x = logits.float() / cfg.temperature
    V = x.shape[-1]
    if cfg.top_k and cfg.top_k < V:
        kth = torch.topk(x, cfg.top_k, dim=-1).values[..., -1:]  # [..., 1]
        x = x.masked_fill(x < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        cum = sorted_x.softmax(-1).cumsum(-1)
        # drop a token when the mass *before* it already reaches top_p (the top token always stays)
        drop_sorted = (cum - sorted_x.softmax(-1)) >= cfg.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        x = x.masked_fill(drop, float("-inf"))
    return x


def target_probs(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """The distribution the generator samples from: [..., V] probabilities (fp32)."""
    return shape_logits(logits, cfg).softmax(-1)


def sample(probs: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """One draw per row of ``probs`` [N, V] -> [N] long."""
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def next_token(logits: torch.Tensor, cfg: SamplingConfig,
               generator: Optional[torch.Generator]) -> torch.Tensor:
    """logits [B, V] -> token [B]."""
    if cfg.greedy:
        return logits.argmax(-1)
    return sample(target_probs(logits, cfg), generator)

"""Speed and peak memory: prefill latency, greedy decode tokens/s, encoder sentences/s.

Timings are medians of several runs after a warm-up (the first call pays allocator and
kernel-selection costs). On a shared CPU absolute numbers drift, so when a baseline model is
given it is timed in the same process, its runs interleaved with the model's, and each speed
is also reported as a ratio to it: the ratio survives load changes that the absolute does not.
"""
from __future__ import annotations

import inspect
import logging
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn

from slimformer.data import stsb as stsb_data
from slimformer.errors import SlimformerError
from slimformer.eval.common import max_positions, progress
from slimformer.eval.encoders import embed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpeedConfig:
    prefill_tokens: int = 512
    decode_prompt_tokens: int = 32
    decode_tokens: int = 128
    encoder_sentences: int = 256
    encoder_batch: int = 32
    runs: int = 3
    warmup: int = 1
    seed: int = 0
    # "last": prefill produces the next-token logits only, as generation does (HF generate
    # passes logits_to_keep=1); "all": logits for every prompt position (a scoring forward)
    prefill_logits: str = "last"

    def __post_init__(self) -> None:
        if self.prefill_logits not in ("last", "all"):
            raise SlimformerError(f"SpeedConfig.prefill_logits must be 'last' or 'all' (got {self.prefill_logits!r})")
        for name in ("prefill_tokens", "decode_prompt_tokens", "decode_tokens", "encoder_sentences",
                     "encoder_batch", "runs"):
            if getattr(self, name) <= 0:
                raise SlimformerError(f"SpeedConfig.{name} must be > 0 (got {getattr(self, name)})")


DEFAULT_CONFIG = SpeedConfig()


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, MiB (ru_maxrss: KiB on Linux, B on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def _vocab_size(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    return int(getattr(cfg, "vocab_size", 256) or 256)


def _prompt(model: nn.Module, n: int, seed: int) -> torch.Tensor:
    """Seeded random token ids ``[1, n]``: content does not change dense compute time."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, _vocab_size(model), (1, n), generator=g)


@torch.inference_mode()
def prefill_seconds(model: nn.Module, ids: torch.Tensor, last_logits_only: bool = True) -> float:
    """Seconds of one forward over the prompt ``ids``; with ``last_logits_only`` (and a model
    whose forward takes ``logits_to_keep``) the head runs for the last position only."""
    kw = {}
    if last_logits_only and "logits_to_keep" in inspect.signature(model.forward).parameters:
        kw["logits_to_keep"] = 1
    t0 = time.perf_counter()
    model(input_ids=ids, use_cache=False, **kw)
    return time.perf_counter() - t0


def _cache_kwarg(model: nn.Module) -> str:
    """The forward's KV-cache argument: ``cache`` (transformers >= 5.2x), ``past_key_values`` before."""
    params = inspect.signature(model.forward).parameters
    return "past_key_values" if "past_key_values" in params and "cache" not in params else "cache"


def _out_cache(out):
    cache = out.get("cache") if hasattr(out, "get") else None
    return cache if cache is not None else out.past_key_values


@torch.inference_mode()
def greedy_decode(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, float]:
    """Greedy tokens ``[1, new_tokens]`` after ``prompt`` with the KV cache, and the seconds the
    ``new_tokens`` single-token steps took (the prompt's prefill is not timed).

    A hand loop rather than ``generate`` so that nothing but the forward is timed (no logits
    processors, stopping criteria or EOS checks) and an early EOS cannot shorten the run.
    """
    kw = _cache_kwarg(model)
    out = model(input_ids=prompt, use_cache=True)
    cache, nxt = _out_cache(out), out.logits[:, -1].argmax(-1, keepdim=True)
    tokens = []
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        tokens.append(nxt)
        out = model(input_ids=nxt, use_cache=True, **{kw: cache})
        cache, nxt = _out_cache(out), out.logits[:, -1].argmax(-1, keepdim=True)
    return torch.cat(tokens, dim=1), time.perf_counter() - t0


def decode_seconds(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> float:
    """Seconds for ``new_tokens`` greedy cached decode steps (see :func:`greedy_decode`)."""
    return greedy_decode(model, prompt, new_tokens)[1]


def _interleaved_medians(fns: list[Callable[[], float]], cfg: SpeedConfig, show: bool,
                         desc: str) -> list[float]:
    """Median seconds of each fn; runs alternate between fns so load drift hits all alike."""
    for _ in range(cfg.warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in progress(range(cfg.runs), show, desc, unit="run"):
        for t, fn in zip(times, fns):
            t.append(fn())
    return [statistics.median(t) for t in times]


def _causal_speed(lms: list, cfg: SpeedConfig, show: bool) -> list[dict]:
    limit = min(max_positions(lm.model) or 10 ** 9 for lm in lms)
    n_prefill = min(cfg.prefill_tokens, limit)
    n_prompt = min(cfg.decode_prompt_tokens, max(1, limit - cfg.decode_tokens))
    n_new = min(cfg.decode_tokens, limit - n_prompt)
    pre = [_prompt(lm.model, n_prefill, cfg.seed) for lm in lms]
    dec = [_prompt(lm.model, n_prompt, cfg.seed + 1) for lm in lms]
    last = cfg.prefill_logits == "last"
    t_pre = _interleaved_medians([lambda m=lm.model, x=x: prefill_seconds(m, x, last) for lm, x in zip(lms, pre)],
                                 cfg, show, "prefill")
    t_dec = _interleaved_medians([lambda m=lm.model, x=x: decode_seconds(m, x, n_new) for lm, x in zip(lms, dec)],
                                 cfg, show, "decode")
    return [{"prefill_ms": 1000 * tp, "prefill_tokens": n_prefill, "prefill_logits": cfg.prefill_logits,
             "decode_tok_s": n_new / td,
             "decode_tokens": n_new} for tp, td in zip(t_pre, t_dec)]


def _encoder_speed(lms: list, cfg: SpeedConfig, show: bool) -> list[dict]:
    sents = [s for pair in stsb_data("test") for s in pair[:2]][:cfg.encoder_sentences]
    fns = []
    for lm in lms:
        def fn(lm=lm) -> float:
            t0 = time.perf_counter()
            embed(lm, sents, batch_size=cfg.encoder_batch)
            return time.perf_counter() - t0
        fns.append(fn)
    t = _interleaved_medians(fns, cfg, show, "encode")
    return [{"sentences_s": len(sents) / ti, "sentences": len(sents)} for ti in t]


RATIO_KEYS = {"prefill_ms": "prefill_speedup", "decode_tok_s": "decode_speedup",
              "sentences_s": "encode_speedup"}


def speed_metrics(lm, baseline=None, config: Optional[SpeedConfig] = None,
                  show_progress: bool = True) -> dict:
    """Speed of ``lm`` (and of ``baseline`` in the same process, with ratios), plus peak RSS.

    Speed-ups are > 1 when ``lm`` is faster: baseline latency / latency, tokens/s / baseline
    tokens/s.
    """
    cfg = config or DEFAULT_CONFIG
    lms = [lm] if baseline is None else [lm, baseline]
    if baseline is not None and baseline.kind != lm.kind:
        raise SlimformerError(f"baseline '{baseline.name}' is a {baseline.kind} model but "
                              f"'{lm.name}' is a {lm.kind} model: speeds do not compare")
    if lm.kind == "causal-lm":
        res = _causal_speed(lms, cfg, show_progress)
    elif lm.kind == "encoder":
        res = _encoder_speed(lms, cfg, show_progress)
    else:
        raise SlimformerError(f"task 'speed' supports causal LMs and encoders, not {lm.kind} models")
    out = dict(res[0])
    if baseline is not None:
        base = res[1]
        out["baseline"] = baseline.name
        for key, ratio in RATIO_KEYS.items():
            if key in base:
                out[f"baseline_{key}"] = base[key]
                a, b = out[key], base[key]
                out[ratio] = b / a if key.endswith("_ms") else a / b
    out["threads"] = torch.get_num_threads()
    out["peak_rss_mb"] = peak_rss_mb()
    return out

"""KV-cache pruning for decoders under a budget (survey §4.1: StreamingLLM attention sinks,
H2O heavy hitters; Dynamic Context Pruning's idea without its training).

A decoder's KV cache grows with the context; with a budget of ``M`` slots, once the cache is
full some cached tokens must go. Two policies:

* ``window``: StreamingLLM — keep the first ``sinks`` tokens (attention sinks: the softmax
  dumps probability mass on them, so dropping them breaks the model) and the most recent ones.
* ``h2o``: heavy-hitter oracle — keep the sinks, a recent window, and, in the rest of the
  budget, the tokens with the largest attention *accumulated* over every query so far (per
  layer and, by default, per KV head: different heads keep different tokens). The sum favours
  old tokens (more queries have seen them); ``normalize`` divides by that number of queries.
  The budget is split between recent window and heavy hitters by ``recent_fraction``, or, with
  ``heavy_fraction``, the heavy hitters get a fixed share of the context (H2O's heavy-budget
  ratio, capped at half the non-sink slots) and the recent window all the rest: at large
  budgets H2O then only swaps the oldest part of StreamingLLM's window for heavy hitters.

Cached keys are stored after the rotary embedding, so an evicted token leaves the kept ones
with their original positions; new tokens continue at their true positions
(``StaticKVCache.position_offset``).

The policies are pure functions (:func:`window_keep`, :func:`heavy_hitter_keep`: which slots
to keep given scores). :class:`KVPruner` is the plumbing: it accumulates scores through the
cache's ``attn_observer`` hook and compacts the kept slots to the front of the static cache
(:mod:`slimformer.decoding.cache`). :func:`kv_pruned_window_nll` scores a text window where
every token is predicted from the pruned cache, fed in chunks of ``chunk`` tokens with eviction
between chunks; no query ever attends to more than ``M`` keys (its own chunk included).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

from slimformer.decoding.cache import StaticKVCache, StepLayout
from slimformer.decoding.runner import CausalRunner
from slimformer.engine.stage import check_bool, check_choice, check_float_range, check_int_range
from slimformer.errors import ConfigError, SlimformerError
from slimformer.eval.common import progress

POLICIES = ("window", "h2o")
OWNER = "kv_pruning"


@dataclass(frozen=True)
class KVPruningConfig:
    """``budget``: kept KV slots as a fraction of the context (1.0 = never evict)."""

    VERSION = 1

    policy: str = "h2o"
    budget: float = 0.5
    sinks: int = 4
    recent_fraction: float = 0.5  # h2o: share of the non-sink budget kept as recent window
    # h2o: heavy-hitter slots as a fraction of the context (H2O's heavy-budget ratio), capped at
    # half the non-sink slots; the recent window gets the rest, so its share grows with the
    # budget. 0 = split the budget by ``recent_fraction`` instead.
    heavy_fraction: float = 0.0
    per_head: bool = True  # h2o: each KV head keeps its own heavy hitters
    normalize: bool = False  # h2o: mean attention per query that saw the token, not the sum
    chunk: int = 16  # tokens fed per forward when scoring a window

    def __post_init__(self) -> None:
        check_choice(OWNER, "policy", self.policy, POLICIES)
        check_float_range(OWNER, "budget", self.budget, 1e-6, 1.0)
        check_int_range(OWNER, "sinks", self.sinks, 0)
        check_float_range(OWNER, "recent_fraction", self.recent_fraction, 0.0, 1.0)
        check_float_range(OWNER, "heavy_fraction", self.heavy_fraction, 0.0, 1.0)
        check_bool(OWNER, "per_head", self.per_head)
        check_bool(OWNER, "normalize", self.normalize)
        check_int_range(OWNER, "chunk", self.chunk, 1)

    def budget_tokens(self, context: int) -> int:
        """Slots kept for a ``context``-token sequence; at least sinks + chunk + 1."""
        m = min(context, math.ceil(self.budget * context))
        need = self.sinks + self.chunk + 1
        if m < context and m < need:
            raise ConfigError(f"{OWNER}.budget: {self.budget} of {context} tokens is {m} slots, fewer "
                              f"than sinks + chunk + 1 = {need}; allowed: a larger budget or smaller chunk")
        return m

    def heavy_recent(self, keep: int, context: Optional[int]) -> tuple[int, int]:
        """h2o: (heavy-hitter, recent) slots when ``keep`` slots stay out of a ``context``-token
        sequence; together with the sinks they fill ``keep``."""
        free = max(0, keep - min(self.sinks, keep - 1))
        if self.heavy_fraction > 0:
            if context is None:
                raise SlimformerError(f"{OWNER}.heavy_fraction needs the context length")
            heavy = min(round(self.heavy_fraction * context), free // 2)
        else:
            heavy = free - round(self.recent_fraction * free)
        return heavy, free - heavy

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "KVPruningConfig":
        from slimformer.engine.stage import config_from_dict

        return config_from_dict(cls, d, OWNER)


# ---------------------------------------------------------------------------------------------
# pure policies: which of ``length`` cached slots to keep (sorted slot indices)


def _check(length: int, keep: int, sinks: int, recent: int) -> None:
    if not 0 < keep <= length:
        raise SlimformerError(f"keep {keep} of {length} slots: need 0 < keep <= length")
    if sinks + recent > keep:
        raise SlimformerError(f"sinks {sinks} + recent {recent} exceed the {keep} slots kept")


def window_keep(length: int, keep: int, sinks: int) -> torch.Tensor:
    """StreamingLLM: the first ``sinks`` slots and the last ``keep - sinks``: [keep] long."""
    sinks = min(sinks, keep - 1)  # the most recent token always stays
    _check(length, keep, sinks, keep - sinks)
    return torch.cat([torch.arange(sinks), torch.arange(length - (keep - sinks), length)])


def heavy_hitter_keep(scores: torch.Tensor, keep: int, sinks: int, recent: int) -> torch.Tensor:
    """H2O: the first ``sinks`` slots, the last ``recent`` (>= 1), and the highest-``scores``
    slots in between, ``keep`` in all.

    ``scores`` [..., length] (accumulated attention per slot) -> sorted slot indices
    [..., keep] long; the leading dims (batch, head) each choose their own slots.
    """
    length = scores.shape[-1]
    sinks = min(sinks, keep - 1)
    recent = max(1, min(recent, keep - sinks))
    _check(length, keep, sinks, recent)
    s = scores.float().clone()
    s[..., :sinks] = float("inf")
    s[..., length - recent:] = float("inf")
    idx = s.topk(keep, dim=-1, sorted=False).indices
    return idx.sort(dim=-1).values


def attention_mass(q: torch.Tensor, K: torch.Tensor, layout: StepLayout, scale: float) -> torch.Tensor:
    """Attention probability each cached key receives, summed over the step's queries and the
    query heads sharing a KV head: ``q`` [B, H, q, D], ``K`` [B, Hkv, kv, D] -> [B, Hkv, kv]."""
    B, H, nq, D = q.shape
    Hkv, kv = K.shape[1], K.shape[2]
    qg = q.reshape(B, Hkv, H // Hkv, nq, D)  # query heads grouped by their KV head
    logits = (qg @ K[:, :, None].transpose(-1, -2)).float() * scale  # [B, Hkv, g, q, kv]
    if layout.mask is not None:
        logits = logits.masked_fill(~layout.mask[:, :, None], float("-inf"))
    elif layout.is_causal or nq > 1:  # queries are the last nq slots
        qpos = torch.arange(kv - nq, kv)[:, None]
        logits = logits.masked_fill(torch.arange(kv)[None, :] > qpos, float("-inf"))
    return logits.softmax(-1).sum(dim=(2, 3))


# ---------------------------------------------------------------------------------------------
# plumbing over the static cache


class KVPruner:
    """Keeps a :class:`StaticKVCache` within ``budget`` slots by the configured policy.

    Call :meth:`make_room` before feeding ``q`` tokens; for ``h2o`` the pruner registers itself
    as the cache's attention observer and accumulates each slot's attention.
    """

    def __init__(self, cfg: KVPruningConfig, cache: StaticKVCache, budget: int,
                 context: Optional[int] = None):
        if budget > cache.capacity:
            raise SlimformerError(f"budget {budget} exceeds the cache capacity {cache.capacity}")
        if bool(cache.start.any()):
            raise SlimformerError("KV eviction needs unpadded rows (start == 0)")
        self.cfg, self.cache, self.budget, self.context = cfg, cache, budget, context
        self.evicted = 0
        if cache.position_offset is None:
            cache.position_offset = torch.zeros_like(cache.length)
        self.scores: Optional[list[torch.Tensor]] = None
        if cfg.policy == "h2o":
            B, Hkv, T, _ = cache.keys[0].shape
            self.scores = [torch.zeros(B, Hkv, T) for _ in cache.keys]
            # position of the token in each slot (per layer and head: heads evict differently)
            self.pos = [torch.arange(T).expand(B, Hkv, T).clone() for _ in cache.keys]
            cache.attn_observer = self.observe

    def observe(self, layer: int, q: torch.Tensor, K: torch.Tensor, layout: StepLayout,
                scale: float) -> None:
        self.scores[layer][:, :, :K.shape[2]] += attention_mass(q, K, layout, scale)

    def make_room(self, q: int) -> None:
        """Evict so that ``q`` new tokens fit within the budget (they count against it)."""
        cache = self.cache
        length = int(cache.length.max())
        if length + q <= self.budget:
            return
        if not bool((cache.length == length).all()):
            raise SlimformerError("KV eviction needs rows of equal length")
        keep = self.budget - q
        if keep <= self.cfg.sinks:
            raise SlimformerError(f"chunk of {q} tokens leaves {keep} slots: not more than the "
                                  f"{self.cfg.sinks} sinks")
        if self.cfg.policy == "window":
            idx = window_keep(length, keep, self.cfg.sinks)
            for layer in range(len(cache.keys)):
                for t in (cache.keys[layer], cache.values[layer]):
                    t[:, :, :keep] = t[:, :, idx]
        else:
            recent = self.cfg.heavy_recent(keep, self.context)[1]
            for layer in range(len(cache.keys)):
                s = self.scores[layer][:, :, :length]  # [B, Hkv, length]
                if self.cfg.normalize:  # queries so far that saw each slot: causal, all of them
                    seen = (self.evicted + length) - self.pos[layer][:, :, :length]
                    s = s / seen.clamp_min(1)
                if not self.cfg.per_head:
                    s = s.sum(1, keepdim=True).expand_as(s)
                idx = heavy_hitter_keep(s, keep, self.cfg.sinks, recent)  # [B, Hkv, keep]
                self.scores[layer][:, :, :keep] = self.scores[layer][:, :, :length].gather(2, idx)
                self.scores[layer][:, :, keep:] = 0
                self.pos[layer][:, :, :keep] = self.pos[layer][:, :, :length].gather(2, idx)
                self.pos[layer][:, :, keep:] = torch.arange(self.evicted + length,
                                                            self.evicted + length + self.pos[layer].shape[2] - keep)
                gi = idx[..., None].expand(-1, -1, -1, cache.keys[layer].shape[-1])
                for t in (cache.keys[layer], cache.values[layer]):
                    t[:, :, :keep] = t[:, :, :length].gather(2, gi)
        cache.length = torch.full_like(cache.length, keep)
        cache.position_offset = cache.position_offset + (length - keep)
        self.evicted += length - keep


@torch.inference_mode()
def kv_pruned_logits(runner: CausalRunner, ids: torch.Tensor, cfg: KVPruningConfig) -> torch.Tensor:
    """Logits [T, V] for every position of ``ids`` [T], each predicted from the pruned cache."""
    T = ids.shape[0]
    budget = cfg.budget_tokens(T)
    cache = runner.new_cache(1, budget)
    pruner = KVPruner(cfg, cache, budget, context=T)
    out = []
    for s in range(0, T, cfg.chunk):
        chunk = ids[s:s + cfg.chunk][None]  # [1, c]
        pruner.make_room(chunk.shape[1])
        out.append(runner.forward(chunk, cache)[0])  # [c, V]
    return torch.cat(out)


def kv_pruned_window_nll(runner: CausalRunner, ids: torch.Tensor, cfg: KVPruningConfig) -> float:
    """Mean next-token NLL over one window [T] (T - 1 predictions), as in eval.ppl."""
    logits = kv_pruned_logits(runner, ids, cfg)
    return float(F.cross_entropy(logits[:-1], ids[1:], reduction="mean"))


def kv_pruned_perplexity(lm, ids: torch.Tensor, cfg: KVPruningConfig, window: int = 2048,
                         max_windows: Optional[int] = None, show_progress: bool = False) -> dict:
    """Perplexity over non-overlapping ``window``-token windows of ``ids`` (the protocol of
    :func:`slimformer.eval.ppl.perplexity`), each scored with the pruned cache."""
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    n = ids.numel() // window
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise SlimformerError(f"text has {ids.numel()} tokens: not one full window of {window}")
    runner = CausalRunner(lm)
    nlls = [kv_pruned_window_nll(runner, ids[i * window:(i + 1) * window], cfg)
            for i in progress(range(n), show_progress, f"kv {cfg.policy} {cfg.budget:g}", unit="win")]
    nll = sum(nlls) / n
    return {"ppl": math.exp(nll), "nll": nll, "window_nlls": nlls, "windows": n, "window": window,
            "budget_tokens": cfg.budget_tokens(window)}

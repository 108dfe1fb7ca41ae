"""Token pruning and token merging for encoders at inference (survey §4.1: EViT / Patch
Slimming, ToMe).

An encoder spends its compute per token; when the later blocks see fewer tokens they cost
less. Two ways to shrink the token set after a block:

* **EViT-style keep rate** (``method="evit"``): score every token by the attention it
  receives — from ``[CLS]`` (``score="cls"``) or averaged over all real queries
  (``score="mean"``) — keep ``[CLS]`` plus the ``ceil(keep_rate * (n - 1))`` best. The rest
  are fused into one token that runs on (``dropped="fuse"``, EViT), dropped (``"drop"``), or
  leave early (``"pool"``): they skip the later blocks but their state when they left still
  counts in the output's mean pooling, as one size-weighted extra token (what a mean-pooled
  sentence encoder needs; it has no effect on a [CLS] classifier).
* **ToMe** (``method="tome"``): bipartite soft matching on the block's keys (averaged over
  heads): tokens alternate into sets A and B, each A token finds its most similar B token,
  and the ``r`` most similar A tokens are merged into their partners by size-weighted
  averaging.

Every token carries a *size* (how many input tokens it stands for; 0 = padding / empty slot).
With ``proportional_attention`` the following blocks add ``log(size)`` to the attention
logits (ToMe's proportional attention: a merged token counts as the tokens it replaced), and
mean pooling weights tokens by size, so the sentence embedding still averages over the input
tokens. The forward returns the sizes as ``token_weights``;
:func:`slimformer.eval.encoders.embed` pools with them.

Reduction happens *between* blocks, using the attention queries/keys of the block just run
(captured by forward hooks on its q/k projections, found through the architecture registry);
EViT and ToMe do it between a block's attention and its MLP, which would need the block split
open. Nothing is reduced after the last block.

The math (:func:`evit_keep`, :func:`tome_merge`, :func:`compact`) is pure functions on
tensors (at inference the EViT reduction with ``score="cls"`` runs as one C++ call,
``evit_reduce``, tested equal to them: ~40 small PyTorch ops between two blocks cost ~1 ms of
op overhead on a sentence batch, about 5% of a MiniLM forward); :class:`TokenPrunedEncoder` is
the plumbing around HF's own embedding and block
modules (the blocks are called as they are, with an additive attention mask — the pattern of
:mod:`slimformer.decoding.early_exit`). :func:`apply_token_pruning` swaps it in as
``lm.model``; :func:`remove_token_pruning` restores the plain model.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
import torch.nn as nn

from slimformer.engine.stage import check_bool, check_choice, check_float_range, check_int_range
from slimformer.errors import ConfigError, SlimformerError
from slimformer.kernels import cpu_kernels
from slimformer.models.registry import ArchSpec, get_module

METHODS = ("evit", "tome")
SCORES = ("cls", "mean")
DROPPED = ("fuse", "drop", "pool")
OWNER = "token_pruning"


# ---------------------------------------------------------------------------------------------
# config


@dataclass(frozen=True)
class TokenPruningConfig:
    """What to reduce after each block.

    ``keep_rate`` (EViT) and ``r`` or ``merge_rate`` (ToMe; a fixed count suits images, a
    share of each row's tokens suits text of mixed lengths) are one value for every block but
    the last, or a
    sequence with one entry per block (entry ``l`` acts on block ``l``'s output; the last
    entry must be the identity, since nothing runs after the last block).
    """

    VERSION = 1

    method: str = "evit"
    keep_rate: Union[float, tuple[float, ...]] = 1.0  # evit: fraction of non-[CLS] tokens kept
    r: Union[int, tuple[int, ...]] = 0  # tome: tokens merged away per block
    merge_rate: Union[float, tuple[float, ...]] = 0.0  # tome: or this fraction of each row's tokens
    score: str = "cls"  # evit: attention from [CLS] or mean over real queries
    dropped: str = "fuse"  # evit: what becomes of pruned tokens: fuse | drop | pool
    proportional_attention: bool = True  # add log(size) to the attention logits
    protect_first: bool = True  # never drop or merge token 0 ([CLS])

    def __post_init__(self) -> None:
        check_choice(OWNER, "method", self.method, METHODS)
        check_choice(OWNER, "score", self.score, SCORES)
        check_choice(OWNER, "dropped", self.dropped, DROPPED)
        for name in ("proportional_attention", "protect_first"):
            check_bool(OWNER, name, getattr(self, name))
        if isinstance(self.keep_rate, (list, tuple)):
            object.__setattr__(self, "keep_rate", tuple(self.keep_rate))
            if not self.keep_rate:
                raise ConfigError(f"{OWNER}.keep_rate: empty list; allowed: a number in (0, 1] "
                                  "or one per block")
            for v in self.keep_rate:
                check_float_range(OWNER, "keep_rate", v, 1e-6, 1.0)
        else:
            check_float_range(OWNER, "keep_rate", self.keep_rate, 1e-6, 1.0)
        if isinstance(self.r, (list, tuple)):
            object.__setattr__(self, "r", tuple(self.r))
            if not self.r:
                raise ConfigError(f"{OWNER}.r: empty list; allowed: an integer >= 0 or one per block")
            for v in self.r:
                check_int_range(OWNER, "r", v, 0)
        else:
            check_int_range(OWNER, "r", self.r, 0)
        if isinstance(self.merge_rate, (list, tuple)):
            object.__setattr__(self, "merge_rate", tuple(self.merge_rate))
            if not self.merge_rate:
                raise ConfigError(f"{OWNER}.merge_rate: empty list; allowed: a number in [0, 0.5] "
                                  "or one per block")
            for v in self.merge_rate:
                check_float_range(OWNER, "merge_rate", v, 0.0, 0.5)
        else:
            check_float_range(OWNER, "merge_rate", self.merge_rate, 0.0, 0.5)
        if self.method == "evit" and self.merge_rate != 0.0:
            raise ConfigError(f"{OWNER}.merge_rate: only method 'tome' uses it (method is 'evit'); "
                              "allowed: 0.0")
        if self.method == "tome" and self.r != 0 and self.merge_rate != 0.0:
            raise ConfigError(f"{OWNER}.merge_rate: set r or merge_rate, not both (r={self.r!r}); "
                              "allowed: 0.0 when r is set")
        if self.method == "tome" and self.keep_rate != 1.0:
            raise ConfigError(f"{OWNER}.keep_rate: only method 'evit' uses it (method is 'tome'); "
                              "allowed: 1.0")
        if self.method == "evit" and self.r != 0:
            raise ConfigError(f"{OWNER}.r: only method 'tome' uses it (method is 'evit'); allowed: 0")

    def schedule(self, num_blocks: int) -> list[Optional[float]]:
        """Per block: the keep rate (evit), r or merge rate (tome) applied to its output, None =
        nothing."""
        name = "keep_rate" if self.method == "evit" else ("merge_rate" if self.merge_rate else "r")
        val = getattr(self, name)
        ident = {"keep_rate": 1.0, "r": 0, "merge_rate": 0.0}[name]
        if isinstance(val, tuple):
            if len(val) != num_blocks:
                raise ConfigError(f"{OWNER}.{name}: {len(val)} entries for a model with {num_blocks} "
                                  f"blocks; allowed: one number or exactly {num_blocks} entries")
            if val[-1] != ident:
                raise ConfigError(f"{OWNER}.{name}: the last block's entry must be {ident} (nothing "
                                  f"runs after it), got {val[-1]}")
            vals = list(val)
        else:
            vals = [val] * (num_blocks - 1) + [ident]
        return [None if v == ident else v for v in vals]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("keep_rate", "r", "merge_rate"):
            if isinstance(d[k], tuple):
                d[k] = list(d[k])
        return {"version": self.VERSION, **d}

    @classmethod
    def from_dict(cls, d: dict) -> "TokenPruningConfig":
        from slimformer.engine.stage import config_from_dict

        return config_from_dict(cls, d, OWNER)


# ---------------------------------------------------------------------------------------------
# pure math: which tokens survive, and what they become


def compact(present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather indices that move the present tokens of each row to the front, in order.

    ``present`` [B, T] bool -> (``idx`` [B, T'] long, ``ok`` [B, T'] bool) with ``T'`` the
    largest count of present tokens in a row; ``ok`` is False on the slots a shorter row pads.
    """
    order = torch.sort((~present).to(torch.uint8), dim=1, stable=True).indices  # present first
    n = present.sum(1)  # [B]
    t = max(int(n.max()), 1)
    idx = order[:, :t]
    ok = torch.arange(t)[None, :] < n[:, None]
    return idx, ok


def evit_keep(scores: torch.Tensor, size: torch.Tensor, keep_rate: float,
              protect_first: bool = True) -> torch.Tensor:
    """Which tokens to keep: [B, T] bool.

    ``scores`` [B, T] (attention received), ``size`` [B, T] (0 = absent). Each row keeps
    token 0 (if ``protect_first``) and the ``ceil(keep_rate * (n - 1))`` highest-scoring
    other present tokens, ``n`` = its present tokens. Absent tokens are never kept.
    """
    present = size > 0
    s = scores.float().masked_fill(~present, float("-inf"))
    n = present.sum(1)  # [B]
    n_keep = torch.ceil(keep_rate * (n - 1).clamp_min(0).float()).long()
    if protect_first:
        s[:, 0] = torch.where(present[:, 0], torch.tensor(float("inf")), s[:, 0])
        n_keep = n_keep + present[:, 0].long()
    else:
        n_keep = torch.ceil(keep_rate * n.float()).long()
    n_keep = torch.minimum(n_keep, n)
    order = s.argsort(dim=1, descending=True, stable=True)  # [B, T]
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1]).expand_as(order).contiguous())
    return (rank < n_keep[:, None]) & present


def fuse_tokens(x: torch.Tensor, size: torch.Tensor, weight: torch.Tensor,
                dropped: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """EViT's fused token per row: the ``weight``-weighted mean of the dropped tokens.

    ``x`` [B, T, H], ``size``/``weight`` [B, T], ``dropped`` [B, T] bool ->
    (``fused`` [B, H], ``fused_size`` [B]: the summed sizes of the dropped tokens, 0 when a
    row dropped nothing).
    """
    w = (weight.float().clamp_min(0) * dropped).to(x.dtype)  # [B, T]
    # all-zero weights (e.g. scores underflowed) fall back to the size-weighted mean
    w = torch.where(w.sum(1, keepdim=True) > 0, w, (size * dropped).to(x.dtype))
    fused = (w[..., None] * x).sum(1) / w.sum(1, keepdim=True).clamp_min(1e-12)
    return fused, (size * dropped).sum(1)


def tome_merge(x: torch.Tensor, metric: torch.Tensor, size: torch.Tensor,
               r: Union[int, torch.Tensor], protect_first: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """ToMe bipartite soft matching: merge up to ``r`` tokens per row away (``r`` an int, or
    a [B] tensor of per-row counts).

    ``x`` [B, T, H] features, ``metric`` [B, T, C] similarity features (keys), ``size``
    [B, T] (0 = absent). Even positions form set A, odd ones set B; every present A token
    (but token 0 with ``protect_first``) is matched to its most cosine-similar present B token
    and the ``r`` best-matched A tokens are averaged into their partners, weighted by size.
    Returns (``x``, ``size``) of the same shape, the merged A tokens with size 0; so
    ``sum(size)`` and ``sum(size * x)`` are unchanged. Absent tokens never merge or receive.
    """
    r = torch.as_tensor(r).reshape(-1)  # [1] or [B]
    if int(r.max()) <= 0:
        return x, size
    m = metric.float()
    m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    a, b = m[:, ::2], m[:, 1::2]  # [B, Ta, C], [B, Tb, C]
    sa, sb = size[:, ::2], size[:, 1::2]
    sim = a @ b.transpose(1, 2)  # [B, Ta, Tb]
    sim = sim.masked_fill(~(sb > 0)[:, None, :], float("-inf"))
    can = sa > 0
    if protect_first:
        can = can.clone()
        can[:, 0] = False
    sim = sim.masked_fill(~can[:, :, None], float("-inf"))
    best, dst = sim.max(dim=-1)  # [B, Ta]
    ok = torch.isfinite(best)
    order = best.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1]).expand_as(order).contiguous())
    merged = ok & (rank < r[:, None])  # [B, Ta]
    mw = (sa * merged).to(x.dtype)  # sizes moving from A to B
    xa, xb = x[:, ::2], x[:, 1::2]
    num = (xb * sb[..., None].to(x.dtype)).scatter_add(1, dst[..., None].expand(-1, -1, x.shape[-1]),
                                                      xa * mw[..., None])
    den = sb.to(x.dtype).scatter_add(1, dst, mw)  # [B, Tb]
    xb_new = torch.where(den[..., None] > 0, num / den.clamp_min(1e-12)[..., None], xb)
    out, new_size = x.clone(), size.clone()
    out[:, 1::2] = xb_new
    new_size[:, 1::2] = den.to(size.dtype)
    new_size[:, ::2] = torch.where(merged, torch.zeros_like(sa), sa)
    return out, new_size


def attention_received(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor, size: torch.Tensor,
                       mode: str, scale: float) -> torch.Tensor:
    """Attention each token receives, averaged over heads: [B, T].

    ``q``, ``k`` [B, heads, T, D]; ``bias`` [B, 1, 1, T] the additive mask the block used.
    ``mode="cls"``: from query 0; ``"mean"``: mean over present queries.
    """
    if mode == "cls":  # one query: a broadcast product, not B * h one-row matmuls (~5x faster)
        logits = (q[:, :, :1] * k).sum(-1) * scale + bias[:, :, 0]  # [B, h, T]
        return logits.float().softmax(-1).mean(1)
    logits = (q @ k.transpose(-1, -2)) * scale + bias  # [B, h, T, T]
    p = logits.float().softmax(-1).mean(1)  # [B, T, T]
    w = (size > 0).float()  # queries that are real
    return (p * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp_min(1)


def additive_mask(size: torch.Tensor, dtype: torch.dtype, proportional: bool) -> torch.Tensor:
    """[B, T] sizes -> [B, 1, 1, T] additive attention mask: very negative where absent,
    ``log(size)`` on present tokens with proportional attention, else 0."""
    neg = torch.finfo(dtype).min
    present = size > 0
    if proportional:
        val = torch.where(present, size.clamp_min(1e-12).log().to(dtype), torch.full_like(size, neg, dtype=dtype))
    else:
        val = torch.where(present, torch.zeros((), dtype=dtype), torch.full((), neg, dtype=dtype))
    return val[:, None, None, :]


# ---------------------------------------------------------------------------------------------
# plumbing: run HF's modules with a shrinking token set


@dataclass
class TokenPrunedOutput:
    """What the wrapper returns: HF-like attribute names, plus per-token pooling weights."""

    last_hidden_state: torch.Tensor  # [B, T', H]
    token_weights: torch.Tensor  # [B, T'] sizes (0 = padding / empty slot)
    hidden_states: Optional[tuple[torch.Tensor, ...]] = None  # embeddings, then each block
    logits: Optional[torch.Tensor] = None  # vision classifier on token 0, if the model has one

    def __getitem__(self, i: int):
        return (self.last_hidden_state, self.token_weights)[i]


class TokenPrunedEncoder(nn.Module):
    """An encoder (``bert``/``vit`` registry entries) whose token set shrinks between blocks.

    Holds the original model as ``inner`` (weights shared, nothing copied or modified).
    """

    def __init__(self, model: nn.Module, spec: ArchSpec, cfg: TokenPruningConfig):
        super().__init__()
        if spec.kind not in ("encoder", "vision"):
            raise SlimformerError(f"token pruning needs an encoder or a vision transformer; "
                                  f"architecture '{spec.name}' is a {spec.kind} model")
        self.inner, self.spec, self.cfg = model, spec, cfg
        # plain attributes (a tuple / object.__setattr__), not registered submodules: the
        # weights belong to ``inner`` alone (no duplicate names in state_dict or size counts)
        fn = spec.resolve(model, spec.final_norm)
        head = spec.resolve(model, spec.head) if spec.kind == "vision" else None
        for name, mod in (("embeddings", get_module(model, spec.resolve(model, spec.embeddings[0]))),
                          ("final_norm", get_module(model, fn) if fn else None),
                          ("head", get_module(model, head) if head else None)):
            object.__setattr__(self, name, mod)
        self.blocks = tuple(spec.get_blocks(model))
        a = spec.attention
        if a.q is None or a.k is None:
            raise SlimformerError(f"token pruning needs separate q/k projections; '{spec.name}' fuses them")
        self.q_proj = [get_module(b, a.q) for b in self.blocks]
        self.k_proj = [get_module(b, a.k) for b in self.blocks]
        layout = spec.head_layout(model.config)
        self.num_heads, self.head_dim = layout["num_heads"], layout["head_dim"]
        self.plan = cfg.schedule(len(self.blocks))

    @property
    def config(self):
        return self.inner.config

    def forward(self, input_ids: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None,
                pixel_values: Optional[torch.Tensor] = None,
                output_hidden_states: bool = False, **_: Any) -> TokenPrunedOutput:
        if self.spec.kind == "vision":
            if pixel_values is None:
                raise SlimformerError("a vision model needs pixel_values")
            h = self.embeddings(pixel_values)
        else:
            if input_ids is None:
                raise SlimformerError("an encoder needs input_ids")
            h = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        B, T = h.shape[:2]
        size = (attention_mask.to(h.dtype) if attention_mask is not None
                else torch.ones(B, T, dtype=h.dtype))
        hidden = [h] if output_hidden_states else None
        # tokens that left early under dropped="pool": size-weighted sum of their states, sizes
        exit_sum, exit_size = torch.zeros(B, h.shape[-1], dtype=h.dtype), torch.zeros(B, dtype=h.dtype)
        for l, blk in enumerate(self.blocks):
            bias = additive_mask(size, h.dtype, self.cfg.proportional_attention)
            amount = self.plan[l]
            if amount is None:
                h = _out(blk(h, attention_mask=bias))
            else:
                h, q, k = self._run_capturing(l, blk, h, bias)
                h, size, left = self._reduce(h, size, q, k, bias, amount)
                if left is not None:
                    exit_sum += left[0]
                    exit_size += left[1]
            if hidden is not None:
                hidden.append(h)
        if bool((exit_size > 0).any()):  # the early leavers join the output as one token per row
            h = torch.cat([h, (exit_sum / exit_size.clamp_min(1e-12)[:, None])[:, None]], 1)
            size = torch.cat([size, exit_size[:, None]], 1)
        if self.final_norm is not None:
            h = self.final_norm(h)
        logits = self.head(h[:, 0]) if self.head is not None else None
        return TokenPrunedOutput(h, size, tuple(hidden) if hidden is not None else None, logits)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        B, T = t.shape[:2]
        return t.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # [B, h, T, D]

    def _run_capturing(self, l: int, blk: nn.Module, h: torch.Tensor, bias: torch.Tensor):
        """Run block ``l`` and keep its q/k projections (the hooks live for this call only)."""
        got: dict[str, torch.Tensor] = {}
        hooks = [self.k_proj[l].register_forward_hook(lambda m, i, o: got.__setitem__("k", o))]
        if self.cfg.method == "evit":
            hooks.append(self.q_proj[l].register_forward_hook(lambda m, i, o: got.__setitem__("q", o)))
        try:
            out = _out(blk(h, attention_mask=bias))
        finally:
            for hk in hooks:
                hk.remove()
        return out, got.get("q"), got["k"]

    def _reduce(self, h, size, q, k, bias, amount):
        """Tokens after one block's reduction: (h, size, leavers or None)."""
        cfg = self.cfg
        if cfg.method == "tome":
            metric = self._heads(k).mean(1)  # [B, T, D] keys averaged over heads
            if isinstance(amount, float):  # merge_rate: a share of each row's present tokens
                r = torch.floor(amount * (size > 0).sum(1).float()).long()
            else:
                r = int(amount)
            h, size = tome_merge(h, metric, size, r, cfg.protect_first)
            return (*self._compact(h, size), None)
        fast = self._kernel_reduce(h, size, q, k, float(amount))
        if fast is not None:
            return fast
        left = None
        scores = self._scores(q, k, bias, size)
        keep = evit_keep(scores, size, float(amount), cfg.protect_first)
        dropped = (size > 0) & ~keep
        if cfg.dropped == "fuse":  # the fused token joins the row after its last token
            fused, fsize = fuse_tokens(h, size, scores, dropped)
            size = torch.cat([size * keep, fsize[:, None].to(size.dtype)], 1)
            return (*self._compact(h, size, fused), None)
        if cfg.dropped == "pool":  # [B, H] size-weighted sum and [B] size of the leavers
            w = size * dropped
            left = ((w[..., None] * h).sum(1), w.sum(1))
        return (*self._compact(h, size * keep), left)

    def _kernel_reduce(self, h, size, q, k, keep_rate: float):
        """The EViT reduction (``score="cls"``) in one C++ call (``evit_reduce``: the same scores,
        keep set, fused token and compaction as the functions above, to float rounding), or None
        where it does not apply: no kernels, not fp32, autograd (recovery trains through the
        PyTorch ops), ``torch.compile``."""
        cfg = self.cfg
        if cfg.score != "cls" or h.dtype != torch.float32 or size.dtype != torch.float32:
            return None
        if torch.is_grad_enabled() and (h.requires_grad or q.requires_grad or k.requires_grad):
            return None
        kern = cpu_kernels()
        if kern is None or torch.compiler.is_compiling():
            return None
        h2, size2, _, lsum, lsize = kern.evit_reduce(h, q, k, size, self.num_heads, self.head_dim ** -0.5,
                                                     cfg.proportional_attention, keep_rate, cfg.protect_first,
                                                     DROPPED.index(cfg.dropped))
        return h2, size2, ((lsum, lsize) if cfg.dropped == "pool" else None)

    def _scores(self, q, k, bias, size) -> torch.Tensor:
        return attention_received(self._heads(q), self._heads(k), bias, size, self.cfg.score,
                                  self.head_dim ** -0.5)

    @staticmethod
    def _compact(h, size, extra: Optional[torch.Tensor] = None):
        """Move the tokens with size > 0 to the front; cut the slots no row needs.

        ``extra`` [B, H]: one more token per row, standing after the last of ``h`` (``size`` then
        has ``T + 1`` columns): EViT's fused token, placed without copying ``h`` to append it."""
        B, T, H = h.shape
        idx, ok = compact(size > 0)
        # whole rows by flat index (index_select copies rows; gather would index every element)
        flat = (idx.clamp_max(T - 1) + torch.arange(B)[:, None] * T).reshape(-1)
        out = h.reshape(B * T, H).index_select(0, flat).view(B, idx.shape[1], H)
        if extra is not None:
            out = torch.where((idx == T)[..., None], extra[:, None, :], out)
        return out, size.gather(1, idx) * ok


def _out(o):
    return o[0] if isinstance(o, tuple) else o


def apply_token_pruning(lm, cfg: TokenPruningConfig):
    """Make ``lm`` reduce tokens at inference: ``lm.model`` becomes a
    :class:`TokenPrunedEncoder` around the original model (re-applying replaces the config).
    Returns ``lm``."""
    if not isinstance(cfg, TokenPruningConfig):
        raise ConfigError(f"{OWNER}: expected a TokenPruningConfig, got {type(cfg).__name__}")
    base = lm.model.inner if isinstance(lm.model, TokenPrunedEncoder) else lm.model
    lm.model = TokenPrunedEncoder(base, lm.arch, cfg)
    return lm


def recovery_sentences(limit: Optional[int] = None) -> list[str]:
    """Unlabelled training text for :func:`recover_token_pruning`: the STS-B *dev* sentences and
    the SST-2 train sentences shipped with slimformer; any sentence that also occurs in STS-B
    test (the eval) is left out."""
    from slimformer.data import sst2, stsb

    seen = {t for a, b, _ in stsb("test") for t in (a, b)}  # never train on an eval sentence
    out = []
    for a, b, _ in stsb("dev"):
        for t in (a, b):
            if t not in seen:
                seen.add(t)
                out.append(t)
    for t, _ in sst2("train"):
        if t not in seen:
            seen.add(t)
            out.append(t)
    return out[:limit] if limit else out


def recover_token_pruning(lm, sentences: list[str], steps: int = 300, lr: float = 2e-5,
                          batch_size: int = 32, max_len: int = 64, seed: int = 0,
                          progress: bool = False):
    """Fine-tune a token-pruned sentence encoder so that its pooled embeddings match those of the
    unpruned model (representation distillation from the model itself, no labels). EViT and ToMe
    report their accuracy after fine-tuning with the reduction in place; an off-the-shelf
    mean-pooled text encoder loses points at any keep rate that saves compute (see
    ``benchmarks/RESULTS.md``). Loss: ``1 - cos(student, teacher)`` per sentence, through the
    shared training loop (:func:`slimformer.distill.trainer.train`); every weight trains.

    ``lm.model`` must be a :class:`TokenPrunedEncoder` (see :func:`apply_token_pruning`); its
    weights change in place, the teacher is a frozen copy taken first. Returns the TrainLog."""
    import copy

    from slimformer.distill.batches import TokenBatches
    from slimformer.distill.trainer import TrainConfig, train
    from slimformer.eval.encoders import mean_pool

    student = lm.model
    if not isinstance(student, TokenPrunedEncoder) or student.spec.kind != "encoder":
        raise SlimformerError("recover_token_pruning needs a text encoder with token pruning applied "
                              "(apply_token_pruning first)")
    if len(sentences) < batch_size:
        raise SlimformerError(f"recover_token_pruning: {len(sentences)} sentences, fewer than "
                              f"batch_size {batch_size}")
    teacher = copy.deepcopy(student.inner).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    enc = lm.tokenizer(list(sentences), padding="max_length", truncation=True, max_length=max_len,
                       return_tensors="pt")
    data = TokenBatches(enc["input_ids"], batch_size, seed=seed, mask=enc["attention_mask"])

    def loss(s: nn.Module, batch: dict, t: nn.Module) -> torch.Tensor:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        width = int(mask.sum(1).max())  # drop the columns that are padding in every row
        ids, mask = ids[:, :width], mask[:, :width]
        with torch.no_grad():
            want = mean_pool(t(input_ids=ids, attention_mask=mask).last_hidden_state, mask)
        out = s(input_ids=ids, attention_mask=mask)
        got = mean_pool(out.last_hidden_state, out.token_weights)
        return (1 - torch.nn.functional.cosine_similarity(got, want, dim=-1)).mean()

    params = [p for p in student.inner.parameters() if p.is_floating_point()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    cfg = TrainConfig(steps=steps, lr=lr, batch_size=batch_size, seq_len=max_len, seed=seed,
                      warmup=max(1, steps // 10), progress=progress)
    try:
        student.train()
        tlog = train(student, data, cfg, loss=loss, teacher=teacher, params=params)
    finally:
        student.eval()
        for p, f in zip(params, flags):
            p.requires_grad_(f)
            p.grad = None
    return tlog


def remove_token_pruning(lm):
    """Undo :func:`apply_token_pruning` (no-op on a plain model). Returns ``lm``."""
    if isinstance(lm.model, TokenPrunedEncoder):
        lm.model = lm.model.inner
    return lm

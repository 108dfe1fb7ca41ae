"""Lossless speculative decoding (Leviathan et al. 2023; Chen et al. 2023; survey §5).

Each step a cheap *draft* proposes ``k`` tokens ``d_1..d_k`` with probabilities ``q``; the target
scores ``[last, d_1..d_k]`` in ONE forward, giving ``p_1..p_{k+1}``. Draft ``j`` is accepted
with probability ``min(1, p_j(d_j) / q_j(d_j))``; at the first rejection the replacement is
drawn from the residual ``norm(max(p_j - q_j, 0))``, and if all ``k`` are accepted a bonus token
is drawn from ``p_{k+1}``. This makes every emitted token distributed exactly as the target's
(sampling); in greedy mode it reduces to "accept while the draft equals the target's argmax",
which emits exactly the target's greedy tokens.

Bookkeeping. All rows share a slot layout with the plain loop (left padded prompts). ``N[b]``
counts the committed slots of row ``b`` (pads + prompt + generated). Caches hold *some prefix*
of the committed slots; every forward first re-feeds the committed slots a cache lacks
("pending": normally one token, two after a fully accepted step, the whole prompt at the
start), so prefill, catch-up and rollback are one mechanism: rolling back a rejected draft is
lowering a cache length.

Drafts: another model with the same vocabulary (:class:`ModelDraft`, e.g. a compressed or
depth-pruned copy), the target's own first ``k`` blocks (:func:`early_exit_draft`), or n-gram
*prompt lookup* (:class:`PromptLookupDraft`), whose proposals are deterministic (``q`` one-hot).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Optional, Protocol, Sequence

import torch
import torch.nn as nn

from slimformer.decoding.cache import StaticKVCache, step_layout
from slimformer.decoding.generate import (GenerationResult, Prompts, decode_texts, prepare_batch,
                                          trim)
from slimformer.decoding.runner import CausalRunner
from slimformer.decoding.sampling import GREEDY, SamplingConfig, sample, target_probs
from slimformer.errors import SlimformerError

log = logging.getLogger(__name__)


# ---- proposals ------------------------------------------------------------------------------
@dataclass
class Proposal:
    tokens: torch.Tensor  # [B, k] draft tokens (padding past each row's length)
    lengths: torch.Tensor  # [B] how many of the k are real proposals
    probs: Optional[torch.Tensor]  # [B, k, V] draft distributions; None = deterministic (one-hot)


class Draft(Protocol):
    """What the speculative loop needs from a draft."""

    cost: float  # cost of one proposed token relative to one target forward (for adaptive k)

    def reset(self, batch: int, start: torch.Tensor, capacity: int) -> None: ...

    def propose(self, seq: torch.Tensor, n: torch.Tensor, k: int, sampling: SamplingConfig,
                generator: torch.Generator) -> Proposal: ...

    def commit(self, n: torch.Tensor) -> None: ...


def feed_pending(runner: CausalRunner, cache: StaticKVCache, seq: torch.Tensor, n: torch.Tensor,
                 extra: Optional[torch.Tensor] = None, keep_last: int = 1) -> torch.Tensor:
    """Feed the committed slots ``[cache.length, n)`` of every row (+ ``extra`` [B, k] tokens).

    Rows with fewer pending slots than the most-behind row are rolled back so every row feeds
    the same count (they recompute a few cached slots; the results are the same). Returns the
    logits of the last ``keep_last`` positions: [B, keep_last, V].
    """
    m = int((n - cache.length).max())
    cache.length = n - m
    idx = (n - m)[:, None] + torch.arange(m)  # [B, m] slots to re-feed
    ids = seq.gather(1, idx)
    if extra is not None:
        ids = torch.cat([ids, extra], dim=1)  # [B, m + k]
    if ids.shape[1] == 1 or (runner.compile and ids.shape[1] <= runner.COMPILED_MAX_TOKENS):
        # a draft catching up (one token after a rejection, two after a fully accepted round):
        # the runner's step, compiled if it compiles
        return runner.forward(ids, cache)[:, -keep_last:]
    layout = step_layout(cache, ids.shape[1])
    x = runner.hidden(ids, cache, layout)  # [B, m + k, hidden]
    return runner.logits(x[:, -keep_last:])


class ModelDraft:
    """Autoregressive proposals from a (smaller or compressed) causal LM with the same vocabulary."""

    def __init__(self, runner: CausalRunner, cost: Optional[float] = None, name: str = "model"):
        self.runner, self.name = runner, name
        self.cost = cost if cost is not None else 0.3
        self.cache: Optional[StaticKVCache] = None

    def reset(self, batch: int, start: torch.Tensor, capacity: int) -> None:
        self.cache = self.runner.new_cache(batch, capacity)
        self.cache.start = start.clone()

    def propose(self, seq, n, k, sampling, generator) -> Proposal:
        B = seq.shape[0]
        toks, probs = [], []
        logits = feed_pending(self.runner, self.cache, seq, n)[:, -1]  # [B, V]
        for j in range(k):
            if sampling.greedy:
                t = logits.argmax(-1)
            else:
                pr = target_probs(logits, sampling)  # [B, V]
                t = sample(pr, generator)
                probs.append(pr)
            toks.append(t)
            if j < k - 1:
                logits = self.runner.forward(t[:, None], self.cache)[:, -1]
        return Proposal(torch.stack(toks, 1), torch.full((B,), k, dtype=torch.long),
                        torch.stack(probs, 1) if probs else None)

    def commit(self, n: torch.Tensor) -> None:
        # keep the accepted drafts; the last committed token is re-fed next step
        self.cache.rollback(n - 1)


class PromptLookupDraft:
    """Prompt lookup decoding (Saxena 2023; survey [282]): find the most recent earlier
    occurrence of the last ``ngram`` tokens (longest first, down to ``min_ngram``) in the
    prompt + generated text and propose the tokens that followed it. Free to compute, and
    strong whenever the output quotes the input (summaries, edits, "continue/repeat this")."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, cost: float = 0.0):
        if not 1 <= min_ngram <= max_ngram:
            raise SlimformerError(f"prompt lookup needs 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram, self.cost = max_ngram, min_ngram, cost
        self.start: Optional[torch.Tensor] = None

    def reset(self, batch, start, capacity) -> None:
        self.start = start.clone()

    def propose(self, seq, n, k, sampling, generator) -> Proposal:
        B = seq.shape[0]
        out = torch.zeros(B, k, dtype=torch.long)
        lengths = torch.zeros(B, dtype=torch.long)
        for b in range(B):
            row = seq[b, int(self.start[b]):int(n[b])]
            cont = lookup_continuation(row, self.max_ngram, self.min_ngram, k)
            out[b, :len(cont)] = cont
            lengths[b] = len(cont)
        return Proposal(out, lengths, None)

    def commit(self, n) -> None:
        pass


def lookup_continuation(row: torch.Tensor, max_ngram: int, min_ngram: int, k: int) -> torch.Tensor:
    """Up to ``k`` tokens that followed the most recent earlier match of ``row``'s last n-gram."""
    L = row.shape[0]
    for ng in range(min(max_ngram, L - 1), min_ngram - 1, -1):
        tail = row[L - ng:]
        windows = row[:L - 1].unfold(0, ng, 1)  # [L - ng, ng]: windows that end before the tail
        hits = (windows == tail).all(1).nonzero().flatten()
        if len(hits):
            s = int(hits[-1]) + ng
            return row[s:s + k]
    return row[:0]


def early_exit_draft(lm, layers: int) -> ModelDraft:
    """Self-speculative draft: the target's first ``layers`` blocks + final norm + LM head."""
    r = CausalRunner(lm, exit_layer=layers)
    full = len(lm.arch.get_blocks(lm.model))
    if layers >= full:
        raise SlimformerError(f"self-draft layers must be < the model's {full} blocks, got {layers}")
    return ModelDraft(r, cost=layers / full, name=f"early-exit-{layers}")


def model_draft(target_lm, draft_lm, compile: bool = False, int8_head: bool = False) -> ModelDraft:
    """A draft model; its vocabulary must equal the target's (else prompt lookup is suggested).

    ``compile``: the draft's one-token steps run compiled (see :class:`CausalRunner`); a
    draft proposes several tokens per round, so its per-step overhead is what a fast draft
    must cut. Batches whose rows accept different counts fall back to eager steps.

    ``int8_head``: the draft's runner uses a W8A8 copy of its LM head (the vocabulary
    projection is the largest matrix a small model reads per token; a W4/W8A8 checkpoint
    keeps it fp32 or int8 weight-only, for quality). Only proposals change: the target
    verifies every token, so the output is exactly the target's either way. The draft model
    itself is not modified."""
    from slimformer.decoding.speed import weight_bytes_per_token

    check_same_vocab(target_lm, draft_lm)
    r = CausalRunner(draft_lm, compile=compile)
    if int8_head:
        r.head = _int8_head(r.head)
    # a decode step streams its weights: bytes read per token (packed storage counted, so a W4
    # draft is cheap) is the draft's cost relative to a target step, for the adaptive k
    tb = weight_bytes_per_token(CausalRunner(target_lm))
    return ModelDraft(r, cost=min(1.0, weight_bytes_per_token(r) / max(tb, 1)), name=draft_lm.name)


def _int8_head(head: nn.Module) -> nn.Module:
    """A W8A8 (per-channel int8 weights, per-token int8 activations) copy of the head: an fp32
    head by the ``w8a8`` recipe's own conversion; an int8 weight-only head (a ``head: int8``
    folder) keeps its codes and scales and only gains int8 activations (the W8A8 kernel's int8
    products: 0.46 vs 1.18 ms for SmolLM2's head in one-token steps, ``benchmarks/RESULTS.md``
    "Stop 17"). Any other head is kept as it is."""
    from slimformer.formats import Int8Linear, QuantLinear
    from slimformer.quant.config import W8A8Config
    from slimformer.quant.w8a8 import w8a8_linear

    if isinstance(head, QuantLinear):
        try:
            return Int8Linear.from_quantized(head.quantized(), head.bias)
        except ValueError:
            return head  # not symmetric 8-bit per row (a W4 head, say)
    try:
        return w8a8_linear(head, W8A8Config())
    except TypeError:
        return head  # already W8A8, or not a plain linear: keep it


def check_same_vocab(target_lm, draft_lm) -> None:
    tv = _vocab(target_lm)
    dv = _vocab(draft_lm)
    th = CausalRunner(target_lm).vocab_size
    dh = CausalRunner(draft_lm).vocab_size
    if tv != dv or th != dh:
        raise SlimformerError(
            f"draft '{draft_lm.name}' has a different vocabulary from target '{target_lm.name}' "
            f"(sizes {len(dv) if dv else dh} vs {len(tv) if tv else th}); speculative decoding needs "
            "the same tokenizer: use a draft of the same family, or prompt lookup (--prompt-lookup)")


def _vocab(lm) -> Optional[dict]:
    tok = lm.tokenizer
    return tok.get_vocab() if tok is not None and hasattr(tok, "get_vocab") else None


# ---- acceptance ---------------------------------------------------------------------------
def accept_greedy(logits: torch.Tensor, prop: Proposal) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, k+1, V] -> (accepted count n [B], next token [B]): the target's argmax path."""
    tgt = logits.argmax(-1)  # [B, k+1]
    k = prop.tokens.shape[1]
    ok = (prop.tokens == tgt[:, :k]) & (torch.arange(k) < prop.lengths[:, None])
    n = ok.long().cumprod(1).sum(1)  # leading matches
    return n, tgt.gather(1, n[:, None]).squeeze(1)


def accept_sample(logits: torch.Tensor, prop: Proposal, sampling: SamplingConfig,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling: accept ``d_j`` w.p. ``min(1, p/q)``; resample from the residual."""
    p = target_probs(logits, sampling)  # [B, k+1, V]
    B, k = prop.tokens.shape
    d = prop.tokens[:, :, None]  # [B, k, 1]
    px = p[:, :k].gather(2, d).squeeze(2)  # [B, k]
    if prop.probs is None:  # deterministic draft: q(d) = 1
        qx = torch.ones_like(px)
    else:
        qx = prop.probs.gather(2, d).squeeze(2)
    r = torch.rand(B, k, generator=generator)
    ok = (r * qx < px) & (torch.arange(k) < prop.lengths[:, None])
    n = ok.long().cumprod(1).sum(1)  # [B]
    rows = torch.arange(B)
    pn = p[rows, n]  # [B, V] target distribution at the first non-accepted position
    rejected = n < prop.lengths  # a real draft was rejected there: sample the residual
    if bool(rejected.any()):
        nq = n.clamp_max(k - 1)
        if prop.probs is None:
            qn = torch.zeros_like(pn).scatter_(1, prop.tokens[rows, nq][:, None], 1.0)
        else:
            qn = prop.probs[rows, nq]
        res = (pn - qn).clamp_min(0)
        mass = res.sum(-1, keepdim=True)
        # mass == 0 only if p == q numerically, where any rejection has probability ~0: use p
        res = torch.where(mass > 0, res / mass.clamp_min(1e-30), pn)
        pn = torch.where(rejected[:, None], res, pn)
    return n, sample(pn, generator)


# ---- adaptive draft length --------------------------------------------------------------
def best_draft_length(alpha: float, draft_cost: float, verify_cost: float, k_max: int) -> int:
    """The ``k`` maximizing expected tokens per unit time for per-token acceptance ``alpha``.

    A step emits ``(1 - alpha^(k+1)) / (1 - alpha)`` tokens on average (Leviathan et al., eq. 1)
    and costs ``1 + k * (draft_cost + verify_cost)`` target forwards (``verify_cost``: the extra
    cost of one more token in the verifying forward, small but not zero on a CPU).
    """
    alpha = min(max(alpha, 0.0), 0.999)
    best, best_rate = 1, -1.0
    for k in range(1, k_max + 1):
        tokens = (1 - alpha ** (k + 1)) / (1 - alpha)
        rate = tokens / (1 + k * (draft_cost + verify_cost))
        if rate > best_rate + 1e-12:
            best, best_rate = k, rate
    return best


# ---- the loop ---------------------------------------------------------------------------------
def speculative_generate(lm, prompts: Prompts, max_new_tokens: int = 128, *,
                         draft: Any, num_draft: int = 4, adaptive: bool = False,
                         max_draft: Optional[int] = None, verify_cost: float = 0.05,
                         sampling: SamplingConfig = GREEDY, seed: int = 0, stop_on_eos: bool = True,
                         eos_token_ids: Optional[Sequence[int]] = None,
                         runner: Optional[CausalRunner] = None) -> GenerationResult:
    """Generate with a draft; the tokens follow the target's distribution exactly.

    ``draft`` is a :class:`Draft` (:class:`ModelDraft`, :class:`PromptLookupDraft`,
    :func:`early_exit_draft`) or a LoadedModel (wrapped with :func:`model_draft`).
    ``num_draft`` is the draft length ``k`` (the start value when ``adaptive``, which then picks
    ``k`` in ``1..max_draft`` from an exponential moving average of the acceptance rate).
    """
    if num_draft <= 0:
        raise SlimformerError(f"draft length must be >= 1, got {num_draft}")
    if hasattr(draft, "model") and hasattr(draft, "arch"):
        draft = model_draft(lm, draft)
    k_max = max_draft or (2 * num_draft if adaptive else num_draft)
    if k_max < num_draft:
        raise SlimformerError(f"max_draft ({k_max}) must be >= num_draft ({num_draft})")
    runner = runner or CausalRunner(lm)
    rows, ids, start, eos, pad = prepare_batch(lm, runner, prompts, max_new_tokens, eos_token_ids, stop_on_eos)
    B, P = ids.shape
    capacity = P + max_new_tokens + k_max + 1
    seq = torch.full((B, capacity), pad, dtype=torch.long)
    seq[:, :P] = ids
    n = torch.full((B,), P, dtype=torch.long)  # committed slots per row
    produced = [0] * B
    done = [False] * B
    gen = torch.Generator().manual_seed(seed)
    k, alpha = num_draft, 0.5
    steps = proposed = accepted = 0
    with torch.inference_mode():
        t0 = time.perf_counter()
        cache = runner.new_cache(B, capacity)
        cache.start = start.clone()
        draft.reset(B, start, capacity)
        while not all(done):
            prop = draft.propose(seq, n, k, sampling, gen)
            logits = feed_pending(runner, cache, seq, n, extra=prop.tokens, keep_last=k + 1)  # [B, k+1, V]
            if sampling.greedy:
                acc, nxt = accept_greedy(logits, prop)
            else:
                acc, nxt = accept_sample(logits, prop, sampling, gen)
            steps += 1
            live = [b for b in range(B) if not done[b]]
            proposed += int(prop.lengths[live].sum())
            accepted += int(acc[live].sum())
            for b in live:
                new = prop.tokens[b, :int(acc[b])].tolist() + [int(nxt[b])]
                new = new[: max_new_tokens - produced[b]]
                cut = trim(new, eos)
                if len(cut) < len(new) or (cut and cut[-1] in eos):
                    done[b] = True
                new = cut
                seq[b, int(n[b]):int(n[b]) + len(new)] = torch.tensor(new, dtype=torch.long)
                n[b] += len(new)
                produced[b] += len(new)
                if produced[b] >= max_new_tokens:
                    done[b] = True
            cache.rollback(n - 1)
            draft.commit(n)
            if adaptive and live:
                # per-token acceptance: accepted / (accepted + rejections) over this step's rows
                a = int(acc[live].sum())
                rejections = int((acc[live] < prop.lengths[live]).sum())
                if a + rejections:
                    alpha = 0.7 * alpha + 0.3 * a / (a + rejections)
                k = best_draft_length(alpha, draft.cost, verify_cost, k_max)
        t1 = time.perf_counter()
    tokens = [seq[b, P:int(n[b])].tolist() for b in range(B)]
    stats = {"steps": steps, "proposed": proposed, "accepted": accepted,
             "acceptance": accepted / max(proposed, 1),
             "tokens_per_step": sum(produced) / max(steps * B, 1), "final_k": k}
    log.info("speculative: %d steps, acceptance %.2f, %.2f tokens/step", steps,
             stats["acceptance"], stats["tokens_per_step"])
    return GenerationResult(tokens=tokens, texts=decode_texts(lm, tokens), prompt_tokens=rows,
                            prefill_s=0.0, decode_s=t1 - t0, stats=stats)

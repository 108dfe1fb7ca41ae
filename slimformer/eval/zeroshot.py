"""Zero-shot multiple choice (PIQA, ARC, BoolQ, COPA) and LAMBADA by log-likelihood.

Scoring follows lm-eval-harness so numbers compare with published ones:

* the prompt is lm-eval's (``Question: ...\\nAnswer:`` for PIQA/ARC, ``Passage ... Question ...?
  \\nAnswer:`` for BoolQ, the premise + connective for COPA) and each choice is scored as the
  continuation ``" " + choice``;
* context and context+continuation are tokenized separately and the continuation tokens are
  the tail of the joint encoding past the context's length (so merges across the boundary
  are scored the way lm-eval scores them);
* ``acc`` picks the highest summed log-probability, ``acc_norm`` the highest log-probability
  per character of the choice.

Requests are sorted by length and run several per forward with right padding: with causal
attention the padding after a sequence cannot change its logits, so batching is exact up to
float rounding (tested).
"""
from __future__ import annotations

import inspect
import logging
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from slimformer.data import LAMBADA, ZERO_SHOT_TASKS, load_jsonl
from slimformer.errors import SlimformerError
from slimformer.eval.common import check_limit, max_positions, need_tokenizer, progress
from slimformer.eval.metrics import argmax_accuracy

log = logging.getLogger(__name__)

# lm-eval's prompt per task, applied to the shipped query (which has trailing whitespace
# stripped first; the shipped PIQA query ends in "\n")
PROMPTS: dict[str, str] = {
    "piqa": "{query}\nAnswer:",
    "arc_easy": "{query}\nAnswer:",
    "arc_challenge": "{query}\nAnswer:",
    "boolq": "{query}\nAnswer:",
    "copa": "{query}",
}
assert set(PROMPTS) == set(ZERO_SHOT_TASKS)

MAX_BATCH_TOKENS = 4096  # padded tokens per forward: bounds activation memory
MAX_BATCH = 32


@dataclass(frozen=True)
class Request:
    """One continuation to score: token ids of the context and of the continuation."""

    context: tuple[int, ...]
    continuation: tuple[int, ...]


@dataclass(frozen=True)
class Score:
    logprob: float  # sum of log p(continuation token | everything before), nats
    greedy: bool  # every continuation token is the argmax of its prediction


def encode_pair(tokenizer, context: str, continuation: str) -> Request:
    """Token ids of (context, continuation) the lm-eval way.

    Trailing spaces of the context move to the continuation (a BPE tokenizer attaches a space
    to the following word); the continuation is the joint encoding past the context length.
    """
    n_space = len(context) - len(context.rstrip(" "))
    if n_space:
        continuation = context[-n_space:] + continuation
        context = context[:-n_space]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    cont = whole[len(ctx):]
    if not ctx:  # nothing to condition on: start from the BOS/EOS token as lm-eval does
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        ctx = [start if start is not None else 0]
    if not cont:
        raise SlimformerError(f"continuation {continuation!r} encodes to no tokens")
    return Request(tuple(ctx), tuple(cont))


def _batches(order: list[int], lengths: list[int], max_tokens: int, max_batch: int) -> list[list[int]]:
    """Group request indices (already sorted longest first) so padded size stays bounded."""
    batches, cur = [], []
    for i in order:
        # the first request of a batch is its longest: padded size = len(batch) * that length
        width = lengths[cur[0]] if cur else lengths[i]
        if cur and ((len(cur) + 1) * width > max_tokens or len(cur) >= max_batch):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


@torch.inference_mode()
def score_requests(model: nn.Module, requests: list[Request], pad_id: int = 0,
                   max_len: Optional[int] = None, max_batch_tokens: int = MAX_BATCH_TOKENS,
                   max_batch: int = MAX_BATCH, show_progress: bool = False) -> list[Score]:
    """Log-likelihood and greediness of each request's continuation under a causal LM.

    The model sees ``(context + continuation)[-(max_len + 1):][:-1]`` (left-truncated to fit
    the positions); the logits at the last ``len(continuation)`` positions score it.
    """
    max_len = max_len or max_positions(model) or 2048
    inputs, n_cont = [], []
    for r in requests:
        full = (r.context + r.continuation)[-(max_len + 1):]
        inputs.append(full[:-1])
        n_cont.append(min(len(r.continuation), len(full) - 1))
    lengths = [len(x) for x in inputs]
    order = sorted(range(len(requests)), key=lambda i: -lengths[i])
    out: list[Optional[Score]] = [None] * len(requests)
    batches = _batches(order, lengths, max_batch_tokens, max_batch)
    keep_arg = "logits_to_keep" in inspect.signature(model.forward).parameters
    for batch in progress(batches, show_progress, "log-likelihood", unit="batch"):
        width = max(lengths[i] for i in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, :lengths[i]] = torch.tensor(inputs[i])
            mask[row, :lengths[i]] = 1
        # only the positions that score a continuation need the [*, vocab] head: ask for
        # their union (a few per row) instead of all B*T logits when the model allows it
        spans = {i: range(lengths[i] - n_cont[i], lengths[i]) for i in batch}
        keep = sorted({p for r in spans.values() for p in r})
        if keep_arg:
            logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=torch.tensor(keep)).logits
            col = {p: j for j, p in enumerate(keep)}  # position -> column of the kept logits
        else:
            logits = model(input_ids=ids, attention_mask=mask).logits  # [B, T, V]
            col = {p: p for p in keep}
        for row, i in enumerate(batch):
            cols = torch.tensor([col[p] for p in spans[i]])
            logp = torch.log_softmax(logits[row, cols].float(), dim=-1)  # [k, V]
            target = torch.tensor(requests[i].continuation[-n_cont[i]:])
            ll = float(logp.gather(1, target[:, None]).sum())
            greedy = bool((logp.argmax(-1) == target).all())
            out[i] = Score(ll, greedy)
    return out  # type: ignore[return-value]


def _pad_id(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id", "bos_token_id"):
        v = getattr(tokenizer, attr, None)
        if v is not None:
            return int(v)
    return 0


def multiple_choice(lm, task: str, limit: Optional[int] = None, show_progress: bool = True) -> dict:
    """acc and acc_norm of a causal LM on one of the shipped multiple-choice tasks."""
    if task not in PROMPTS:
        raise SlimformerError(f"unknown multiple-choice task '{task}'; known: {', '.join(PROMPTS)}")
    check_limit(limit)
    tok = need_tokenizer(lm, task)
    items = load_jsonl(task)[:limit]
    requests, spans = [], []
    for it in items:
        context = PROMPTS[task].format(query=it["query"].rstrip())
        spans.append((len(requests), len(it["choices"])))
        requests += [encode_pair(tok, context, " " + c) for c in it["choices"]]
    scores = score_requests(lm.model, requests, pad_id=_pad_id(tok), show_progress=show_progress)
    ll = [[scores[s + j].logprob for j in range(n)] for s, n in spans]
    ll_norm = [[v / max(len(c), 1) for v, c in zip(row, it["choices"])] for row, it in zip(ll, items)]
    gold = [int(it["gold"]) for it in items]
    return {"acc": argmax_accuracy(ll, gold), "acc_norm": argmax_accuracy(ll_norm, gold),
            "n": len(items)}


def lambada(lm, limit: Optional[int] = None, show_progress: bool = True) -> dict:
    """LAMBADA (OpenAI version): greedy last-word accuracy and the last word's perplexity."""
    check_limit(limit)
    tok = need_tokenizer(lm, "lambada")
    items = load_jsonl(LAMBADA)[:limit]
    requests = [encode_pair(tok, it["context"], " " + it["continuation"].strip()) for it in items]
    scores = score_requests(lm.model, requests, pad_id=_pad_id(tok), show_progress=show_progress)
    acc = sum(s.greedy for s in scores) / len(scores)
    ppl = math.exp(-sum(s.logprob for s in scores) / len(scores))
    return {"acc": acc, "ppl": ppl, "n": len(items)}

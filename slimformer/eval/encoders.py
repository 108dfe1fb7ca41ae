"""Sentence-encoder quality: STS-B Spearman and an SST-2 linear probe.

Embeddings are the attention-mask-weighted mean of the last hidden states (sentence-
transformers' pooling for all-MiniLM-L6-v2), so a compressed encoder is judged on the
vectors its users actually consume.
"""
from __future__ import annotations

import logging
import random
from typing import Optional, Sequence

import torch
import torch.nn as nn

from slimformer.data import sst2 as sst2_data
from slimformer.data import stsb as stsb_data
from slimformer.errors import SlimformerError
from slimformer.eval.common import check_limit, max_positions, need_tokenizer, progress
from slimformer.eval.metrics import spearman

log = logging.getLogger(__name__)

ENCODE_BATCH = 64
MAX_SEQ_LEN = 256  # sentence-transformers' max_seq_length for all-MiniLM-L6-v2
SST2_TRAIN_SIZE = 8000
PROBE_L2 = 1e-3


def hidden_and_weights(model: nn.Module, input_ids: torch.Tensor,
                       attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Last hidden states ``[B, T', H]`` and their pooling weights ``[B, T']``.

    The weights are the attention mask, unless the model returns ``token_weights`` (a
    token-reducing encoder, :mod:`slimformer.prune.tokens`: ``T' < T`` and each surviving token
    weighs as many input tokens as it stands for).
    """
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    hs = getattr(out, "last_hidden_state", None)
    hs = hs if hs is not None else out.hidden_states[-1]
    w = getattr(out, "token_weights", None)
    return hs, (attention_mask if w is None else w)


def last_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Last hidden states ``[B, T, H]`` of an encoder (bare or wrapped in a task head)."""
    return hidden_and_weights(model, input_ids, attention_mask)[0]


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens: ``[B, T, H]``, ``[B, T]`` -> ``[B, H]``."""
    m = mask.to(hidden.dtype)[..., None]  # [B, T, 1]
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


@torch.inference_mode()
def embed(lm, sentences: Sequence[str], batch_size: int = ENCODE_BATCH,
          show_progress: bool = False, desc: str = "embed") -> torch.Tensor:
    """Mean-pooled float32 embeddings ``[N, H]`` of ``sentences``.

    Sentences are encoded longest-first so each batch pads little; results come back in the
    input order.
    """
    tok = need_tokenizer(lm, "embedding")
    max_len = min(MAX_SEQ_LEN, max_positions(lm.model) or MAX_SEQ_LEN)
    order = sorted(range(len(sentences)), key=lambda i: -len(sentences[i]))
    out = torch.empty(0)
    starts = list(range(0, len(order), batch_size))
    for s in progress(starts, show_progress, desc, unit="batch"):
        idx = order[s:s + batch_size]
        enc = tok([sentences[i] for i in idx], padding=True, truncation=True, max_length=max_len,
                  return_tensors="pt")
        pooled = mean_pool(*hidden_and_weights(lm.model, enc["input_ids"], enc["attention_mask"])).float()
        if out.numel() == 0:
            out = torch.empty(len(sentences), pooled.shape[1])
        out[torch.tensor(idx)] = pooled
    return out


def stsb(lm, limit: Optional[int] = None, show_progress: bool = True) -> dict:
    """STS-B test: Spearman x 100 between gold scores and cosine of the two embeddings."""
    check_limit(limit)
    pairs = stsb_data("test")[:limit]
    a = embed(lm, [p[0] for p in pairs], show_progress=show_progress, desc="stsb a")
    b = embed(lm, [p[1] for p in pairs], show_progress=show_progress, desc="stsb b")
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    return {"spearman": 100.0 * spearman(cos, [p[2] for p in pairs]), "n": len(pairs)}


def train_logistic_probe(x: torch.Tensor, y: torch.Tensor, l2: float = PROBE_L2,
                         max_iter: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary logistic regression ``p(y=1|x) = sigmoid(x @ w + b)`` by full-batch L-BFGS.

    Loss = mean BCE + ``l2`` * ||w||^2 (bias not regularised). The problem is convex and
    starts from zero, so the solution is deterministic for fixed inputs. Features are
    standardised first (mean/std folded back into ``w, b``) so one ``l2`` fits any encoder.
    Returns ``(w [H], b [])`` acting on raw features.
    """
    x = x.double()
    y = y.double()
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-8)
    z = (x - mu) / sd
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9,
                            tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    w_raw = (w / sd).detach()
    return w_raw, (b - (mu * w_raw).sum()).detach()


def predict_logistic(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((x.double() @ w + b) > 0).long()


def sst2(lm, limit: Optional[int] = None, train_size: Optional[int] = None, seed: int = 0,
         show_progress: bool = True) -> dict:
    """SST-2 dev accuracy of a logistic-regression probe on frozen mean-pooled embeddings.

    The probe trains on ``train_size`` (default ``SST2_TRAIN_SIZE``) rows drawn with ``random.Random(seed)`` from the shipped
    train split (the full 60k adds little to a linear probe and costs minutes). ``limit`` caps
    the dev rows scored.
    """
    check_limit(limit)
    train_size = SST2_TRAIN_SIZE if train_size is None else train_size
    if train_size <= 1:
        raise SlimformerError(f"sst2 train_size must be > 1 (got {train_size})")
    train = sst2_data("train")
    if train_size < len(train):
        train = random.Random(seed).sample(train, train_size)
    dev = sst2_data("dev")[:limit]
    xtr = embed(lm, [s for s, _ in train], show_progress=show_progress, desc="sst2 train")
    xdev = embed(lm, [s for s, _ in dev], show_progress=show_progress, desc="sst2 dev")
    ytr = torch.tensor([l for _, l in train])
    ydev = torch.tensor([l for _, l in dev])
    w, b = train_logistic_probe(xtr, ytr)
    acc = float((predict_logistic(xdev, w, b) == ydev).double().mean())
    return {"acc": acc, "n": len(dev), "train_n": len(train)}

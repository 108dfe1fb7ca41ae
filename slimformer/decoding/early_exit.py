"""Encoder early exit (DeeBERT-style, survey §5): stop at the first block whose exit head is
confident.

Each block ``l`` gets a linear head on the mean-pooled hidden state, trained by *distillation*:
its target is the final layer's probe probability (a soft label), not the gold label, so the
early heads learn to agree with the full model — which is what makes a confidence threshold
a knob between speed and agreement. At inference the batch shrinks as rows exit, so the
saving is real compute, not a mask.

The task head here is binary logistic (the SST-2 probe of slimformer's encoder evaluation).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from slimformer.errors import SlimformerError

log = logging.getLogger(__name__)

# (pooled features [N, H], soft or hard targets [N]) -> (w [H], b [])
ProbeTrainer = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class ExitHeads:
    """Logistic heads per block: ``heads[l]`` acts on the mean-pooled output of block ``l``
    (0-based); the last one is the full model's probe."""

    w: list[torch.Tensor]  # per block [H]
    b: list[torch.Tensor]  # per block []

    def prob(self, layer: int, pooled: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(pooled.double() @ self.w[layer] + self.b[layer])


def _mean_pool(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(h.dtype)[..., None]  # [B, T, 1]
    return (h * m).sum(1) / m.sum(1).clamp_min(1e-9)


def _encoder_parts(lm):
    if lm.arch.kind != "encoder":
        raise SlimformerError(f"encoder early exit needs an encoder; '{lm.name}' is {lm.arch.kind}")
    spec = lm.arch
    from slimformer.models import get_module

    embeddings = get_module(lm.model, spec.resolve(lm.model, spec.embeddings[0]))
    blocks = list(spec.get_blocks(lm.model))
    return embeddings, blocks


def _additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, T] 1/0 -> [B, 1, 1, T] 0/-inf-ish, what the blocks' attention adds to scores."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


@torch.inference_mode()
def pooled_layer_states(lm, sentences: Sequence[str], batch_size: int = 64,
                        max_len: int = 256) -> torch.Tensor:
    """Mean-pooled output of every block: [L, N, H] (fp32)."""
    embeddings, blocks = _encoder_parts(lm)
    out: Optional[torch.Tensor] = None
    for s in range(0, len(sentences), batch_size):
        enc = lm.tokenizer(list(sentences[s:s + batch_size]), padding=True, truncation=True,
                           max_length=max_len, return_tensors="pt")
        h = embeddings(input_ids=enc["input_ids"])
        am = _additive_mask(enc["attention_mask"], h.dtype)
        for l, blk in enumerate(blocks):
            h = _block_out(blk(h, attention_mask=am))
            p = _mean_pool(h, enc["attention_mask"]).float()
            if out is None:
                out = torch.empty(len(blocks), len(sentences), p.shape[1])
            out[l, s:s + len(p)] = p
    return out


def _block_out(o):
    return o[0] if isinstance(o, tuple) else o


def distill_exit_heads(states: torch.Tensor, final_w: torch.Tensor, final_b: torch.Tensor,
                       train_probe: ProbeTrainer) -> ExitHeads:
    """Heads for blocks 0..L-2 trained on the final probe's probabilities (soft labels)."""
    soft = torch.sigmoid(states[-1].double() @ final_w + final_b)  # [N]
    ws, bs = [], []
    for l in range(states.shape[0] - 1):
        w, b = train_probe(states[l], soft)
        ws.append(w)
        bs.append(b)
    return ExitHeads(ws + [final_w], bs + [final_b])


@torch.inference_mode()
def early_exit_predict(lm, heads: ExitHeads, sentences: Sequence[str], threshold: float,
                       batch_size: int = 64, max_len: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted labels [N] and exit block [N] (0-based) with confidence ``threshold``.

    A row exits after the first block whose head gives ``max(p, 1 - p) >= threshold``; the
    rest continue with a smaller batch. ``threshold > 1`` never exits early (the full model).
    """
    if not 0.5 <= threshold:
        raise SlimformerError(f"exit threshold must be >= 0.5 (a binary confidence), got {threshold}")
    embeddings, blocks = _encoder_parts(lm)
    L = len(blocks)
    preds = torch.empty(len(sentences), dtype=torch.long)
    exits = torch.empty(len(sentences), dtype=torch.long)
    order = sorted(range(len(sentences)), key=lambda i: -len(sentences[i]))  # little padding
    for s in range(0, len(order), batch_size):
        idx = torch.tensor(order[s:s + batch_size])
        enc = lm.tokenizer([sentences[i] for i in idx], padding=True, truncation=True,
                           max_length=max_len, return_tensors="pt")
        mask = enc["attention_mask"]
        h = embeddings(input_ids=enc["input_ids"])
        for l, blk in enumerate(blocks):
            h = _block_out(blk(h, attention_mask=_additive_mask(mask, h.dtype)))
            p = heads.prob(l, _mean_pool(h, mask).float())  # [b]
            leave = (torch.maximum(p, 1 - p) >= threshold) if l < L - 1 else torch.ones_like(p, dtype=torch.bool)
            if bool(leave.any()):
                preds[idx[leave]] = (p[leave] > 0.5).long()
                exits[idx[leave]] = l
                keep = ~leave
                idx, h, mask = idx[keep], h[keep], mask[keep]
                if len(idx) == 0:
                    break
                if getattr(lm.tokenizer, "padding_side", "right") == "right":
                    t = int(mask.sum(1).max())  # drop pad columns no remaining row needs
                    h, mask = h[:, :t], mask[:, :t]
    return preds, exits

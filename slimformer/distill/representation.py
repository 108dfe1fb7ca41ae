"""Intermediate-representation distillation (FitNets hints, TinyBERT, MiniLM) as a training loss.

:class:`RepresentationLoss` is a ``loss`` for :func:`~slimformer.distill.trainer.train`
(``(student, batch, teacher) -> scalar``). It runs both models with hidden states (and attention
probabilities / values when asked), pairs student block ``s`` with teacher block ``t`` from a
layer map given as data, and sums the pure losses of :mod:`slimformer.distill.losses`. It is an
``nn.Module`` so the learnable width projections (when student and teacher widths differ) are
trained and checkpointed with the student. Values are read with forward hooks on the ``v``
projection the architecture registry names — no per-model code.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn

from slimformer.distill.losses import attention_kl, attention_mse, hint_loss, value_relation_kl
from slimformer.errors import SlimformerError

ATTENTION_LOSSES = ("none", "kl", "mse")


def use_eager_attention(model: nn.Module) -> None:
    """Attention probabilities are only materialised by the eager kernels (SDPA fuses them)."""
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    else:  # pragma: no cover - older transformers
        model.config._attn_implementation = "eager"


def last_hidden_hint(student: nn.Module, batch: dict, teacher: Optional[nn.Module]) -> torch.Tensor:
    """Hint loss on the last hidden state only (any architecture, same width): a ``train`` loss."""
    if teacher is None:
        raise SlimformerError("hint distillation needs a teacher model")
    kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    with torch.no_grad():
        t = teacher(**kw).hidden_states[-1]
    return hint_loss(student(**kw).hidden_states[-1], t, mask=batch["attention_mask"])


class _Values:
    """Forward hooks capturing the ``v`` projection output of chosen blocks."""

    def __init__(self, model: nn.Module, arch, blocks: Sequence[int]):
        from slimformer.models.registry import get_module

        if arch.attention.v is None:
            raise SlimformerError(f"value relation needs a separate v projection (architecture {arch.name})")
        self.out: dict[int, torch.Tensor] = {}
        all_blocks = arch.get_blocks(model)
        self.handles = [get_module(all_blocks[b], arch.attention.v).register_forward_hook(self._hook(b))
                        for b in blocks]

    def _hook(self, b):
        def f(_m, _a, o):
            self.out[b] = o
        return f

    def remove(self):
        for h in self.handles:
            h.remove()


class RepresentationLoss(nn.Module):
    """``hint_weight · Σ hint(h_s, h_t) + attn_weight · Σ attn(A_s, A_t) + vr_weight · Σ VR(v_s, v_t)``
    over the ``pairs`` ``((student_block, teacher_block), ...)`` (0-based; the block's output hidden
    state). ``hint_embeddings`` adds the embedding outputs (TinyBERT). Attention and value
    relation are applied on ``relation_pairs`` (default: the last pair only, as in MiniLM).
    ``logits_weight`` > 0 adds a forward-KL term on logits for models that have them.
    """

    def __init__(self, arch, student_width: int, teacher_width: int, pairs: Sequence[tuple[int, int]],
                 n_heads: int, hint_weight: float = 1.0, attention: str = "kl", attn_weight: float = 1.0,
                 vr_weight: float = 0.0, relation_pairs: Optional[Sequence[tuple[int, int]]] = None,
                 hint_embeddings: bool = False, logits_weight: float = 0.0, temperature: float = 1.0):
        super().__init__()
        if attention not in ATTENTION_LOSSES:
            raise SlimformerError(f"attention loss {attention!r}; allowed: {', '.join(ATTENTION_LOSSES)}")
        self.arch, self.pairs = arch, tuple((int(s), int(t)) for s, t in pairs)
        if not self.pairs:
            raise SlimformerError("representation loss needs at least one (student, teacher) layer pair")
        self.relation_pairs = tuple(relation_pairs) if relation_pairs is not None else self.pairs[-1:]
        self.n_heads, self.attention = n_heads, attention
        self.hint_weight, self.attn_weight, self.vr_weight = hint_weight, attn_weight, vr_weight
        self.hint_embeddings, self.logits_weight, self.temperature = hint_embeddings, logits_weight, temperature
        # one learnable projection per hinted layer when the widths differ (FitNets regressor)
        n_proj = len(self.pairs) + int(hint_embeddings)
        self.proj = nn.ModuleList([nn.Linear(student_width, teacher_width, bias=False) for _ in range(n_proj)]) \
            if student_width != teacher_width else None

    def _run(self, model, batch, blocks_for_values, attentions: bool):
        vals = _Values(model, self.arch, blocks_for_values) if blocks_for_values else None
        try:
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        output_hidden_states=True, output_attentions=attentions)
        finally:
            if vals is not None:
                vals.remove()
        return out, (vals.out if vals is not None else {})

    def forward(self, student: nn.Module, batch: dict, teacher: Optional[nn.Module]) -> torch.Tensor:
        if teacher is None:
            raise SlimformerError("representation distillation needs a teacher model")
        mask = batch["attention_mask"]
        want_attn = self.attention != "none" and self.attn_weight > 0
        want_vr = self.vr_weight > 0
        with torch.no_grad():
            t_out, t_vals = self._run(teacher, batch, [t for _, t in self.relation_pairs] if want_vr else [], want_attn)
        s_out, s_vals = self._run(student, batch, [s for s, _ in self.relation_pairs] if want_vr else [], want_attn)
        hs_s, hs_t = s_out.hidden_states, t_out.hidden_states  # (embeddings, block 0, block 1, ...)
        total = torch.zeros((), dtype=torch.float32)
        pairs = ([(-1, -1)] if self.hint_embeddings else []) + list(self.pairs)
        if self.hint_weight > 0:
            for i, (s, t) in enumerate(pairs):
                proj = self.proj[i] if self.proj is not None else None
                total = total + self.hint_weight * hint_loss(hs_s[s + 1], hs_t[t + 1], proj, mask)
        if want_attn:
            if s_out.attentions is None or t_out.attentions is None:
                raise SlimformerError("attention transfer needs attention probabilities: call "
                                      "use_eager_attention() on both models")
            fn = attention_kl if self.attention == "kl" else attention_mse
            for s, t in self.relation_pairs:
                total = total + self.attn_weight * fn(s_out.attentions[s], t_out.attentions[t], mask)
        if want_vr:
            for s, t in self.relation_pairs:
                total = total + self.vr_weight * value_relation_kl(s_vals[s], t_vals[t], self.n_heads, mask)
        if self.logits_weight > 0:
            from slimformer.distill.losses import forward_kl

            total = total + self.logits_weight * forward_kl(s_out.logits, t_out.logits, self.temperature, mask)
        return total

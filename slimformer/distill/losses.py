"""Distillation losses: pure functions of tensors (survey §3.2, Eq. 6-8).

Shapes: logits ``[..., V]`` (usually ``[B, T, V]``), hidden states ``[B, T, H]``, attention
probabilities ``[B, heads, T, T]``; ``mask`` has the leading shape of the token axis (``[B, T]``,
1 = count this token). Every token loss is *summed over the vocabulary / features of a token and
averaged over the counted tokens* (masked token averaging), so the value does not depend on the
batch size or on how much padding a batch holds.

Temperature. Hinton et al. soften both distributions with ``softmax(z / T)``. The gradient of
``KL(p_T || q_T)`` with respect to the student logits ``z_s`` is ``(q_T - p_T) / T`` per token,
and for large ``T`` (zero-mean logits) ``q_T - p_T ≈ (z_s - z_t) / (T V)``: the raw gradient
shrinks like ``1/T²``. Every divergence here is therefore multiplied by ``T²`` so its gradient
keeps the same scale whatever ``T`` is (``T · (q_T - p_T)`` per token, ``→ (z_s - z_t) / V`` as
``T → ∞`` for zero-mean logits) and mixing it with the hard-label LM loss needs no retuning
when ``T`` changes. At ``T = 1`` the factor is 1.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from slimformer.errors import SlimformerError

KD_LOSSES = ("forward_kl", "reverse_kl", "jsd", "mse", "hard")


def masked_token_mean(per_token: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean of ``per_token`` (any shape) over the tokens where ``mask`` is 1 (all if None)."""
    if mask is None:
        return per_token.mean()
    m = mask.to(per_token.dtype)
    return (per_token * m).sum() / m.sum().clamp_min(1.0)


def _log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    if temperature <= 0:
        raise SlimformerError(f"temperature must be > 0 (got {temperature})")
    # fp32 at least (bf16/fp16 logits lose the tail of the distribution); fp64 stays fp64
    return F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature, dim=-1)


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per token, summed over the last axis: Σ p (log p - log q)."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
               mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``T² · KL(p_teacher || q_student)`` (Hinton KD, Eq. 6): mean-seeking — the student must
    cover every token the teacher gives mass to."""
    lt, ls = _log_probs(teacher_logits, temperature), _log_probs(student_logits, temperature)
    return temperature ** 2 * masked_token_mean(_kl(lt, ls), mask)


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
               mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``T² · KL(q_student || p_teacher)`` (MiniLLM): mode-seeking — the student is punished
    for mass where the teacher has little, not for missing some of the teacher's modes."""
    lt, ls = _log_probs(teacher_logits, temperature), _log_probs(student_logits, temperature)
    return temperature ** 2 * masked_token_mean(_kl(ls, lt), mask)


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float = 0.5,
                    temperature: float = 1.0, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Generalized Jensen-Shannon divergence (GKD, Agarwal et al. 2024), times ``T²``:

    ``JSD(β) = β KL(p || m) + (1-β) KL(q || m)``, ``m = β p + (1-β) q``, with ``p`` the teacher and
    ``q`` the student. At ``β = 0.5`` it is the symmetric JSD, bounded by ``log 2``. At ``β = 0``
    and ``β = 1`` the formula is identically 0, but ``JSD(β)/β → KL(p||q)`` as ``β → 0`` and
    ``JSD(β)/(1-β) → KL(q||p)`` as ``β → 1``; following GKD/TRL those two end points are defined as
    their limits: ``β = 0`` is the forward KL, ``β = 1`` the reverse KL.
    """
    if not 0.0 <= beta <= 1.0:
        raise SlimformerError(f"jsd beta must be in [0, 1] (got {beta})")
    if beta == 0.0:
        return forward_kl(student_logits, teacher_logits, temperature, mask)
    if beta == 1.0:
        return reverse_kl(student_logits, teacher_logits, temperature, mask)
    lt, ls = _log_probs(teacher_logits, temperature), _log_probs(student_logits, temperature)
    # log m = logsumexp(log β + log p, log(1-β) + log q), stable in log space
    lm = torch.logsumexp(torch.stack([lt + math.log(beta), ls + math.log(1.0 - beta)]), dim=0)
    per_token = beta * _kl(lt, lm) + (1.0 - beta) * _kl(ls, lm)
    return temperature ** 2 * masked_token_mean(per_token, mask)


def topk_forward_kl(student_logits: torch.Tensor, teacher_values: torch.Tensor, teacher_indices: torch.Tensor,
                    temperature: float = 1.0, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``T² · KL(p̃_teacher || q_student)`` against a *sparse* teacher kept as its top-k logits
    per token (``teacher_values`` / ``teacher_indices`` ``[..., k]``, e.g. a
    :class:`~slimformer.distill.cache.TeacherCache`).

    The approximation: ``p̃ = softmax(values / T)`` over the k cached tokens only — the teacher's
    tail mass outside its top k is dropped and the k probabilities renormalised — while the
    student's log-probabilities are the full-vocabulary ``log_softmax(z_s / T)`` gathered at the
    k indices (not renormalised). So the student is pulled towards the teacher's k most likely
    tokens in the teacher's relative proportions; whatever it puts on the rest of the vocabulary
    is only penalised through its normaliser. With ``k = V`` this is exactly :func:`forward_kl`
    on the (fp16-rounded) cached logits.
    """
    lp = _log_probs(teacher_values, temperature)  # [..., k], renormalised over the k
    ls = _log_probs(student_logits, temperature).gather(-1, teacher_indices.long())
    return temperature ** 2 * masked_token_mean(_kl(lp, ls), mask)


def logit_mse(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
              mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Squared error between the logits, per token the mean over the vocabulary (the
    ``T → ∞`` limit of forward KL for zero-mean logits, up to a constant factor)."""
    d = student_logits.float() - teacher_logits.float()
    return masked_token_mean(d.pow(2).mean(-1), mask)


def hard_label_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                  mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """DeiT's hard distillation: cross-entropy of the student against the teacher's argmax
    token at each position (the teacher's distribution beyond its top-1 is discarded)."""
    target = teacher_logits.argmax(-1)  # [...]
    logp = _log_probs(student_logits, 1.0)
    return masked_token_mean(-logp.gather(-1, target[..., None])[..., 0], mask)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str = "forward_kl",
            temperature: float = 1.0, beta: float = 0.5, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One of :data:`KD_LOSSES` by name."""
    if kind == "forward_kl":
        return forward_kl(student_logits, teacher_logits, temperature, mask)
    if kind == "reverse_kl":
        return reverse_kl(student_logits, teacher_logits, temperature, mask)
    if kind == "jsd":
        return generalized_jsd(student_logits, teacher_logits, beta, temperature, mask)
    if kind == "mse":
        return logit_mse(student_logits, teacher_logits, mask)
    if kind == "hard":
        return hard_label_kd(student_logits, teacher_logits, mask)
    raise SlimformerError(f"unknown KD loss {kind!r}; allowed: {', '.join(KD_LOSSES)}")


def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Next-token cross-entropy: position t predicts token t+1; a prediction counts when both
    tokens are real (``mask``). ``logits [B, T, V]``, ``input_ids [B, T]``."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, input_ids[:, 1:, None])[..., 0]  # [B, T-1]
    m = None if mask is None else mask[:, 1:] * mask[:, :-1]
    return masked_token_mean(nll, m)


# ---- intermediate representations (TinyBERT / MiniLM / FitNets) ---------------------------


def layer_map(n_student: int, n_teacher: int, rule: str = "every-other") -> tuple[tuple[int, int], ...]:
    """Which teacher layer each student layer learns from, as data: ``((s, t), ...)``, 0-based
    block indices. ``every-other``: student ``i`` ← teacher ``2i+1`` (needs ``n_teacher ==
    2 n_student``); ``uniform``: student ``i`` ← teacher ``round((i+1) n_t / n_s) - 1`` (the last
    student layer always maps to the last teacher layer); ``last``: only the last layers."""
    if n_student < 1 or n_teacher < n_student:
        raise SlimformerError(f"layer map needs 1 <= n_student <= n_teacher (got {n_student}, {n_teacher})")
    if rule == "every-other":
        if n_teacher != 2 * n_student:
            raise SlimformerError(f"every-other layer map needs n_teacher = 2 n_student (got {n_student}, {n_teacher})")
        return tuple((i, 2 * i + 1) for i in range(n_student))
    if rule == "uniform":
        return tuple((i, round((i + 1) * n_teacher / n_student) - 1) for i in range(n_student))
    if rule == "last":
        return ((n_student - 1, n_teacher - 1),)
    raise SlimformerError(f"unknown layer map rule {rule!r}; allowed: every-other, uniform, last")


def hint_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
              proj: Optional[nn.Module] = None, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """FitNets/TinyBERT hint: ``mean_tokens mean_features (W h_s - h_t)²``; ``proj`` (a learnable
    ``Linear(d_s, d_t)``) maps the student's width onto the teacher's when they differ."""
    hs = student_hidden.float() if proj is None else proj(student_hidden.float())
    if hs.shape != teacher_hidden.shape:
        raise SlimformerError(f"hint loss: student {tuple(hs.shape)} vs teacher {tuple(teacher_hidden.shape)}; "
                              "give a projection when the widths differ")
    return masked_token_mean(((hs - teacher_hidden.float()) ** 2).mean(-1), mask)


def attention_kl(student_attn: torch.Tensor, teacher_attn: torch.Tensor,
                 mask: Optional[torch.Tensor] = None, eps: float = 1e-12) -> torch.Tensor:
    """MiniLM self-attention transfer: ``KL(A_teacher || A_student)`` per query row ``[B, h, T, T]``
    (rows already softmax-normalised), averaged over heads and real query tokens."""
    per_row = (teacher_attn * (torch.log(teacher_attn + eps) - torch.log(student_attn + eps))).sum(-1)
    return masked_token_mean(per_row.mean(1), mask)  # [B, T] after the head mean


def attention_mse(student_attn: torch.Tensor, teacher_attn: torch.Tensor,
                  mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """TinyBERT attention transfer: MSE between attention matrices, per query row."""
    return masked_token_mean(((student_attn - teacher_attn) ** 2).sum(-1).mean(1), mask)


def relation(x: torch.Tensor, n_heads: int, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """MiniLM relation ``softmax(x_h x_hᵀ / √d_h)`` per head: ``[B, T, H]`` -> ``[B, h, T, T]``
    (the value relation when ``x`` are the values). Padded keys get no mass."""
    B, T, H = x.shape
    d = H // n_heads
    xh = x.float().view(B, T, n_heads, d).transpose(1, 2)  # [B, h, T, d]
    scores = xh @ xh.transpose(-1, -2) / math.sqrt(d)  # [B, h, T, T]
    if mask is not None:
        scores = scores.masked_fill(mask[:, None, None, :] == 0, torch.finfo(scores.dtype).min)
    return scores.softmax(-1)


def value_relation_kl(student_values: torch.Tensor, teacher_values: torch.Tensor, n_heads: int,
                      mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """MiniLM value-relation transfer: ``KL(VR_teacher || VR_student)``; the two models may differ
    in width as long as both split into ``n_heads`` heads."""
    return attention_kl(relation(student_values, n_heads, mask), relation(teacher_values, n_heads, mask), mask)

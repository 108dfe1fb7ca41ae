"""On-policy distillation (GKD, Agarwal et al. 2024): the student also learns on its own samples.

Off-policy KD only shows the student prefixes from the data (or the teacher); at generation time
it conditions on its *own* tokens, and its mistakes compound (exposure bias). GKD mixes in
student-generated sequences: with probability ``λ`` (``TrainConfig.on_policy_fraction``) per
micro-batch, the first ``prompt_len`` tokens of each window are kept, the remaining
``L - prompt_len`` are sampled from the student (temperature 1, no gradient, its KV cache), the
teacher scores that sequence and the KD loss (``kd_loss="jsd"``: the generalized JSD of GKD) is
averaged over the generated positions only — the positions ``prompt_len - 1 .. L - 2`` whose
next-token distributions produced the sampled tokens. With ``λ = 0`` it is plain off-policy KD.

Deterministic: the coin and the samples come from a ``torch.Generator`` that the trainer seeds
from ``(seed, micro-batch index)`` (:func:`slimformer.distill.trainer.micro_generator`), so a
resumed run samples exactly what an uninterrupted one does.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from slimformer.errors import SlimformerError


def _cache_kwargs(model: nn.Module, out) -> dict:
    """The KV cache of ``out`` as the keyword ``model.forward`` takes: ``cache`` (transformers >= 5.x)
    or ``past_key_values`` (older)."""
    import inspect

    kv = out.get("cache") if "cache" in out else out.get("past_key_values")
    params = inspect.signature(model.forward).parameters
    return {"cache": kv} if "cache" in params else {"past_key_values": kv}


@torch.no_grad()
def sample_continuation(model: nn.Module, prompt: torch.Tensor, n_new: int,
                        generator: Optional[torch.Generator] = None, temperature: float = 1.0,
                        autocast_bf16: bool = False) -> torch.Tensor:
    """``n_new`` tokens ``[B, n_new]`` sampled from ``model`` after ``prompt`` ``[B, P]`` (all
    real tokens), ancestral sampling at ``temperature`` with the model's KV cache, in eval mode
    (restored afterwards), without gradient."""
    if prompt.dim() != 2 or prompt.shape[1] < 1 or n_new < 1:
        raise SlimformerError(f"sample_continuation needs a prompt [B, P>=1] and n_new >= 1 "
                              f"(got {tuple(prompt.shape)}, {n_new})")
    was = model.training
    model.eval()
    try:
        mask = torch.ones_like(prompt)
        new = []
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast_bf16):
            out = model(input_ids=prompt, attention_mask=mask, use_cache=True)
            for i in range(n_new):
                probs = (out.logits[:, -1].float() / temperature).softmax(-1)
                tok = torch.multinomial(probs, 1, generator=generator)  # [B, 1]
                new.append(tok)
                if i + 1 < n_new:
                    mask = torch.cat([mask, torch.ones_like(tok)], dim=1)
                    out = model(input_ids=tok, attention_mask=mask, use_cache=True, **_cache_kwargs(model, out))
    finally:
        model.train(was)
    return torch.cat(new, dim=1)


def generated_positions_mask(batch_size: int, seq_len: int, prompt_len: int) -> torch.Tensor:
    """``[B, L]`` loss mask of an on-policy batch: 1 at the positions ``prompt_len - 1 .. L - 2``,
    whose next-token distributions produced the generated tokens ``prompt_len .. L - 1``."""
    m = torch.zeros(batch_size, seq_len, dtype=torch.long)
    m[:, prompt_len - 1:seq_len - 1] = 1
    return m


def on_policy_batch(student: nn.Module, batch: dict, prompt_len: int, fraction: float,
                    generator: Optional[torch.Generator], autocast_bf16: bool = False) -> tuple[dict, torch.Tensor]:
    """GKD's data step: ``(batch, loss_mask)``.

    One uniform draw from ``generator`` decides: below ``fraction`` the continuation after
    ``prompt_len`` tokens is replaced by the student's sample and the loss mask covers only the
    generated positions (:func:`generated_positions_mask`); otherwise the batch is returned as
    it is with its own attention mask (off-policy). The batch's other keys (``index``) are kept
    only off-policy: an on-policy batch is not a training window any more.
    """
    draw = float(torch.rand((), generator=generator))
    if not draw < fraction:
        return batch, batch["attention_mask"]
    ids, mask = batch["input_ids"], batch["attention_mask"]
    B, L = ids.shape
    if not 1 <= prompt_len < L:
        raise SlimformerError(f"on-policy distillation needs 1 <= prompt_len < window length (got prompt_len "
                              f"{prompt_len}, windows of {L} tokens)")
    if not bool(mask[:, :prompt_len].all()):
        raise SlimformerError("on-policy distillation needs prompts of real tokens (padding inside the first "
                              f"{prompt_len} tokens of a window)")
    prompt = ids[:, :prompt_len]
    new = sample_continuation(student, prompt, L - prompt_len, generator, 1.0, autocast_bf16)
    ids2 = torch.cat([prompt, new], dim=1)
    return ({"input_ids": ids2, "attention_mask": torch.ones_like(ids2)},
            generated_positions_mask(B, L, prompt_len))

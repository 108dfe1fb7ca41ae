"""Sequence-level and black-box KD data: the student trains on text the *teacher* wrote.

Kim & Rush (2016) sequence-level KD replaces the reference text by the teacher's own outputs;
with only those outputs (no logits) it is black-box KD (the setting of API-only teachers,
survey §3.2). :func:`teacher_corpus` continues prompts (prefixes of the shipped training
windows) with :func:`slimformer.decoding.generate` and returns right-padded rows plus their
mask, ready for :class:`~slimformer.distill.batches.TokenBatches`:

* black-box KD: ``train(student, batches, cfg, loss="lm")`` — next-token CE on teacher text;
* sequence-level + word-level KD: ``loss="kd"`` on the same batches (teacher logits on its own
  samples, as in GKD's on-teacher-policy data).
"""
from __future__ import annotations

from typing import Optional

import torch

from slimformer.decoding.sampling import SamplingConfig
from slimformer.distill.batches import TokenBatches
from slimformer.errors import SlimformerError

DEFAULT_SAMPLING = SamplingConfig(temperature=1.0)  # sample from the teacher's distribution


def teacher_corpus(teacher_lm, prompts: torch.Tensor, max_new_tokens: int = 64,
                   sampling: SamplingConfig = DEFAULT_SAMPLING, seed: int = 0, batch_size: int = 8,
                   progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``prompt + teacher continuation`` ``[N, P + max_new_tokens]`` and their mask (1 = real
    token; a row that ends at EOS is right-padded). ``prompts`` ``[N, P]`` token ids. Seeded:
    batch ``i`` samples under ``seed + i``."""
    from slimformer.decoding import generate
    from slimformer.decoding.generate import pad_id

    prompts = torch.as_tensor(prompts, dtype=torch.long)
    if prompts.dim() != 2 or prompts.shape[0] == 0:
        raise SlimformerError(f"teacher_corpus needs prompts [N, P], got shape {tuple(prompts.shape)}")
    if max_new_tokens < 1:
        raise SlimformerError(f"teacher_corpus needs max_new_tokens >= 1 (got {max_new_tokens})")
    N, P = prompts.shape
    pad = pad_id(teacher_lm)
    rows = torch.full((N, P + max_new_tokens), pad, dtype=torch.long)
    mask = torch.zeros_like(rows)
    rows[:, :P], mask[:, :P] = prompts, 1
    starts = list(range(0, N, batch_size))
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="teacher text", unit="batch")
    for i, s in enumerate(starts):
        chunk = prompts[s:s + batch_size]
        res = generate(teacher_lm, chunk.tolist(), max_new_tokens, sampling=sampling, seed=seed + i)
        for j, new in enumerate(res.tokens):
            rows[s + j, P:P + len(new)] = torch.tensor(new, dtype=torch.long)
            mask[s + j, P:P + len(new)] = 1
    return rows, mask


def teacher_batches(teacher_lm, windows: torch.Tensor, batch_size: int, prompt_len: int = 32,
                    max_new_tokens: int = 64, sampling: SamplingConfig = DEFAULT_SAMPLING,
                    seed: int = 0, n: Optional[int] = None, progress: bool = False) -> TokenBatches:
    """Training batches of teacher text: the first ``prompt_len`` tokens of (the first ``n``)
    ``windows`` continued by the teacher for ``max_new_tokens``."""
    windows = torch.as_tensor(windows, dtype=torch.long)
    if windows.dim() != 2 or windows.shape[1] < prompt_len:
        raise SlimformerError(f"teacher_batches: windows [N, L] with L >= prompt_len {prompt_len} needed")
    prompts = windows[:n, :prompt_len]
    rows, mask = teacher_corpus(teacher_lm, prompts, max_new_tokens, sampling, seed, progress=progress)
    return TokenBatches(rows, batch_size, seed=seed, mask=mask)

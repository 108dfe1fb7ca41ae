"""Seeded, resumable sources of token-id training batches.

A :class:`TokenBatches` is a *pure function of the batch index*: batch ``k`` is drawn from the
epoch ``e = k // batches_per_epoch`` permutation of the windows (``torch.randperm`` under
``seed + e``), so a run resumed at position ``k`` sees exactly the batches an uninterrupted run
would have seen, and the only state to checkpoint is one integer.

Training text is the shipped WikiText-2 *validation* split (the train split is not shipped, see
``slimformer/data/files/PROVENANCE.md``) or another calibration source — never the test split
that :mod:`slimformer.eval.ppl` scores.
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch

from slimformer.errors import SlimformerError


class TokenBatches:
    """Batches of ``batch_size`` rows from ``windows`` ``[N, L]`` (int64).

    ``mask`` ``[N, L]`` (1 = real token) marks padding for ragged text (teacher generations);
    ``None`` means every token is real. Iterating yields ``{"input_ids", "attention_mask"}``
    dicts (plus ``"index"``: the rows' window indices, e.g. for a
    :class:`~slimformer.distill.cache.TeacherCache`) from the current :attr:`position` on, forever (epochs reshuffle); the trainer decides
    how many steps to take.
    """

    def __init__(self, windows: torch.Tensor, batch_size: int, seed: int = 0,
                 mask: Optional[torch.Tensor] = None, shuffle: bool = True) -> None:
        windows = torch.as_tensor(windows, dtype=torch.long)
        if windows.dim() != 2:
            raise SlimformerError(f"training windows must be [N, L] token ids, got shape {tuple(windows.shape)}")
        if batch_size < 1 or windows.shape[0] < batch_size:
            raise SlimformerError(f"training data has {windows.shape[0]} windows, fewer than batch_size {batch_size}")
        if mask is not None and tuple(mask.shape) != tuple(windows.shape):
            raise SlimformerError("training mask must have the windows' shape")
        self.windows, self.mask = windows, (None if mask is None else mask.to(torch.long))
        self.batch_size, self.seed, self.shuffle = int(batch_size), int(seed), bool(shuffle)
        self.position = 0

    @property
    def batches_per_epoch(self) -> int:
        return self.windows.shape[0] // self.batch_size  # a partial last batch is dropped

    def batch(self, k: int) -> dict:
        """Batch number ``k`` (0-based, any epoch): a pure function of ``k`` and the seed."""
        epoch, i = divmod(int(k), self.batches_per_epoch)
        n = self.windows.shape[0]
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch))
        else:
            order = torch.arange(n)
        idx = order[i * self.batch_size:(i + 1) * self.batch_size]
        ids = self.windows[idx]
        mask = torch.ones_like(ids) if self.mask is None else self.mask[idx]
        return {"input_ids": ids, "attention_mask": mask, "index": idx}

    def __iter__(self) -> Iterator[dict]:
        while True:
            b = self.batch(self.position)
            self.position += 1
            yield b

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed, "batch_size": self.batch_size,
                "n": int(self.windows.shape[0])}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for k in ("seed", "batch_size", "n"):
            if state.get(k) != mine[k]:
                raise SlimformerError(f"checkpoint was written for other training data ({k}: "
                                      f"{state.get(k)!r} != {mine[k]!r})")
        self.position = int(state["position"])


def chunk(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping windows ``[N, seq_len]`` of a 1-D token stream (the tail is dropped)."""
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    n = ids.numel() // seq_len
    if n == 0:
        raise SlimformerError(f"training text has {ids.numel()} tokens: not one window of {seq_len}")
    return ids[:n * seq_len].view(n, seq_len)


def text_batches(tokenizer, batch_size: int, seq_len: int, source: str = "wikitext2-detok",
                 seed: int = 0) -> TokenBatches:
    """Batches of non-overlapping ``seq_len`` windows of a shipped training text
    (:data:`slimformer.data.CALIBRATION_SOURCES`; default: the detokenized WikiText-2
    validation split, whose style matches the raw test text the evaluation scores)."""
    from slimformer.data import token_ids

    return TokenBatches(chunk(token_ids(tokenizer, source), seq_len), batch_size, seed=seed)


def as_batches(batches, batch_size: int, seq_len: int, seed: int) -> TokenBatches:
    """Whatever :func:`~slimformer.distill.trainer.train` was given, as a TokenBatches:
    a TokenBatches (used as is), ``[N, L]`` windows (e.g. the recipe's calibration samples),
    or a 1-D token stream (cut into ``seq_len`` windows)."""
    if isinstance(batches, TokenBatches):
        return batches
    t = torch.as_tensor(batches)
    if t.dim() == 1:
        t = chunk(t, seq_len)
    return TokenBatches(t, batch_size, seed=seed)

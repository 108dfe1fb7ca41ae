"""The plain generation loop: prefill once, then one token per forward from a static KV cache.

Batches of prompts with different lengths are left padded so every row's *next* token lands in
the same cache slot; per-row position ids (slot minus padding) keep rotary and learned
positions exactly as if each prompt ran alone.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch

from slimformer.decoding.runner import CausalRunner
from slimformer.decoding.sampling import GREEDY, SamplingConfig, next_token
from slimformer.errors import SlimformerError

log = logging.getLogger(__name__)

Prompts = Union[str, Sequence[str], Sequence[int], Sequence[Sequence[int]]]


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # new tokens per prompt (a final EOS included)
    texts: list[str]  # the new tokens decoded
    prompt_tokens: list[list[int]]
    prefill_s: float
    decode_s: float
    stats: dict = field(default_factory=dict)  # e.g. speculative acceptance

    @property
    def num_new_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def seconds(self) -> float:
        return self.prefill_s + self.decode_s

    @property
    def tokens_per_s(self) -> float:
        return self.num_new_tokens / max(self.seconds, 1e-9)


# ---- input handling (shared with speculative decoding) -----------------------------------
def encode_prompts(lm, prompts: Prompts) -> list[list[int]]:
    """Text or token ids -> one token list per prompt; an empty prompt is an error."""
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise SlimformerError("no prompts given")
    if all(isinstance(p, int) for p in prompts):
        prompts = [prompts]
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if lm.tokenizer is None:
                raise SlimformerError(f"model '{lm.name}' has no tokenizer; give token ids")
            ids = list(lm.tokenizer(p)["input_ids"])
        else:
            ids = [int(t) for t in p]
        if not ids:
            raise SlimformerError(f"prompt {i} is empty: give at least one token of text")
        out.append(ids)
    return out


def check_lengths(runner: CausalRunner, prompts: list[list[int]], max_new_tokens: int) -> None:
    if max_new_tokens < 1:
        raise SlimformerError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    ctx = runner.max_positions
    longest = max(len(p) for p in prompts)
    if ctx is not None and longest >= ctx:
        raise SlimformerError(f"prompt of {longest} tokens does not fit the model's context of {ctx} tokens")
    if ctx is not None and longest + max_new_tokens > ctx:
        raise SlimformerError(
            f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"context of {ctx} tokens; lower max_new_tokens to {ctx - longest}")


def pad_id(lm) -> int:
    tok = lm.tokenizer
    for cand in (getattr(tok, "pad_token_id", None), getattr(tok, "eos_token_id", None),
                 getattr(lm.model.config, "pad_token_id", None)):
        if isinstance(cand, int):
            return cand
    return 0


def eos_ids(lm) -> list[int]:
    """EOS ids the model's generation config stops on (as HF ``generate`` does)."""
    gc = getattr(lm.model, "generation_config", None)
    for src in (gc, lm.model.config):
        e = getattr(src, "eos_token_id", None) if src is not None else None
        if e is not None:
            return [e] if isinstance(e, int) else list(e)
    e = getattr(lm.tokenizer, "eos_token_id", None)
    return [e] if isinstance(e, int) else []


def left_pad(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> ids [B, P] (left padded with ``pad``), start [B] (pad count per row)."""
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, P - len(p):] = torch.tensor(p, dtype=torch.long)
    start = torch.tensor([P - len(p) for p in prompts], dtype=torch.long)
    return ids, start


def prepare_batch(lm, runner: CausalRunner, prompts: Prompts, max_new_tokens: int,
                  eos_token_ids: Optional[Sequence[int]], stop_on_eos: bool, extra: int = 0):
    """Encode, check and left-pad prompts; resolve EOS and pad ids (shared by plain and
    speculative generation). ``extra``: further positions the caller needs in the context.
    -> (token rows, ids [B, P], start [B], eos list, pad id)."""
    rows = encode_prompts(lm, prompts)
    check_lengths(runner, rows, max_new_tokens + extra)
    eos = list(eos_token_ids) if eos_token_ids is not None else (eos_ids(lm) if stop_on_eos else [])
    pad = pad_id(lm)
    ids, start = left_pad(rows, pad)
    return rows, ids, start, eos, pad


def hit_stop(lm, tokens: list[int], stop: Sequence[str]) -> bool:
    if not stop or lm.tokenizer is None:
        return False
    tail = lm.tokenizer.decode(tokens[-32:])
    return any(s in tail for s in stop)


def decode_texts(lm, tokens: list[list[int]]) -> list[str]:
    if lm.tokenizer is None:
        return ["" for _ in tokens]
    return [lm.tokenizer.decode(t, skip_special_tokens=True) for t in tokens]


def trim(row: list[int], eos: Sequence[int]) -> list[int]:
    """Cut a row after its first EOS."""
    for i, t in enumerate(row):
        if t in eos:
            return row[: i + 1]
    return row


# ---- the loop -------------------------------------------------------------------------------
def generate(lm, prompts: Prompts, max_new_tokens: int = 128, *,
             sampling: SamplingConfig = GREEDY, seed: int = 0, stop_on_eos: bool = True,
             eos_token_ids: Optional[Sequence[int]] = None, stop: Sequence[str] = (),
             runner: Optional[CausalRunner] = None, compile: bool = False) -> GenerationResult:
    """Generate up to ``max_new_tokens`` for each prompt (text or token ids).

    ``compile``: decode steps through ``torch.compile`` (see :class:`CausalRunner`); pass a
    ``runner`` built with ``compile=True`` instead to reuse its compiled step across calls.

    Greedy when ``sampling.temperature == 0``; otherwise seeded sampling (the same ``seed``
    gives the same tokens). A row stops at an EOS of the model (unless ``stop_on_eos`` is off)
    or when its text contains one of ``stop``.
    """
    runner = runner or CausalRunner(lm, compile=compile)
    rows, ids, start, eos, pad = prepare_batch(lm, runner, prompts, max_new_tokens, eos_token_ids, stop_on_eos)
    B, P = ids.shape
    gen = torch.Generator().manual_seed(seed)
    eos_t = torch.tensor(eos, dtype=torch.long)
    out = torch.full((B, max_new_tokens), pad, dtype=torch.long)
    done = torch.zeros(B, dtype=torch.bool)
    n = 0
    with torch.inference_mode():
        t0 = time.perf_counter()
        cache = runner.new_cache(B, P + max_new_tokens)
        logits = runner.prefill(ids, start, cache)[:, -1]  # [B, V]
        t1 = time.perf_counter()
        for t in range(max_new_tokens):
            tok = next_token(logits, sampling, gen)  # [B]
            tok = torch.where(done, pad, tok)
            out[:, t] = tok
            n = t + 1
            if len(eos):
                done |= torch.isin(tok, eos_t)
            if stop:
                for b in range(B):
                    if not done[b] and hit_stop(lm, out[b, :n].tolist(), stop):
                        done[b] = True
            if t == max_new_tokens - 1 or bool(done.all()):
                break
            logits = runner.forward(tok[:, None], cache)[:, -1]
        t2 = time.perf_counter()
    tokens = [trim(r, eos) for r in out[:, :n].tolist()]
    if stop:
        tokens = [_cut_stop(lm, r, stop) for r in tokens]
    return GenerationResult(tokens=tokens, texts=decode_texts(lm, tokens), prompt_tokens=rows,
                            prefill_s=t1 - t0, decode_s=t2 - t1)


def _cut_stop(lm, row: list[int], stop: Sequence[str]) -> list[int]:
    """Shortest prefix of ``row`` whose text contains a stop string (the row itself if none)."""
    for i in range(1, len(row) + 1):
        if hit_stop(lm, row[:i], stop):
            return row[:i]
    return row

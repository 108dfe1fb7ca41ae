"""A preallocated (static) key/value cache with per-row lengths.

Why our own cache instead of HF's ``DynamicCache``/``StaticCache``: decoding a 135M model on a
CPU is dominated by per-step Python and allocation overhead, and speculative decoding with a
batch needs every row to be able to *roll back* a different number of rejected draft tokens.
Both are easy when the cache is one preallocated tensor per layer plus two small integer vectors:

- ``start[b]``  — the first real slot of row ``b`` (rows are left padded to a common prompt end),
- ``length[b]`` — the number of slots row ``b`` has filled (its next write index).

Rolling back is then just lowering ``length``: stale entries past it are masked out and later
overwritten, never copied.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch


@dataclass
class StaticKVCache:
    keys: list[torch.Tensor]  # per layer [B, H_kv, T, D]
    values: list[torch.Tensor]  # per layer [B, H_kv, T, D]
    start: torch.Tensor  # [B] long, first valid slot (number of left pad slots)
    length: torch.Tensor  # [B] long, slots filled so far
    # KV-cache eviction (slimformer.prune.kv) compacts kept slots to the front, so slot and
    # position part ways: ``position_offset[b]`` = tokens of row ``b`` evicted so far, added to
    # every new position. None = never evicted (slot index minus left padding is the position).
    position_offset: Optional[torch.Tensor] = None
    # called by the runner after each layer's attention as ``observer(layer, q [B, H, q, D],
    # K [B, H_kv, kv_len, D], layout, scale)`` — how an eviction policy sees attention scores
    attn_observer: Optional[Callable[..., None]] = None

    @classmethod
    def allocate(cls, num_layers: int, batch: int, num_kv_heads: int, head_dim: int,
                 capacity: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> "StaticKVCache":
        shape = (batch, num_kv_heads, capacity, head_dim)
        return cls(
            keys=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)],
            values=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)],
            start=torch.zeros(batch, dtype=torch.long),
            length=torch.zeros(batch, dtype=torch.long),
        )

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    @property
    def batch(self) -> int:
        return self.keys[0].shape[0]

    def rollback(self, new_length: torch.Tensor) -> None:
        """Forget every slot at or past ``new_length[b]`` (rejected draft tokens)."""
        self.length = torch.minimum(self.length, new_length.to(self.length))


@dataclass(frozen=True)
class StepLayout:
    """Where the ``q`` new tokens of one forward go, computed once and shared by every layer.

    ``uniform_at`` is the common write index when all rows have the same length (the plain
    decode loop): writes are then one slice copy instead of a scatter.
    """

    q: int
    kv_len: int  # keys attended to: slots [0, kv_len)
    positions: torch.Tensor  # [B, q] position ids (slot index minus left padding)
    write_idx: torch.Tensor  # [B, q] slot of each new token
    mask: Optional[torch.Tensor]  # [B, 1, q, kv_len] bool (True = attend) or None
    is_causal: bool  # prefill of an unpadded batch into an empty cache: SDPA's causal flag
    uniform_at: Optional[int]
    # static layout (compiled decoding): the q write slots as a tensor, the same for every row;
    # attention then always spans the whole cache (kv_len = capacity), masked past each query
    slots: Optional[torch.Tensor] = None


def step_layout(cache: StaticKVCache, q: int) -> StepLayout:
    """Positions, write slots and the attention mask for ``q`` new tokens per row.

    A query at slot ``s`` of row ``b`` sees keys in ``[start[b], s]``. Pad queries (``s <
    start[b]``) would see nothing, which makes SDPA return NaN; they are allowed to see
    themselves instead — their outputs are never used and their keys are masked for real rows.
    """
    length, start = cache.length, cache.start
    B = length.shape[0]
    if int(length.max()) + q > cache.capacity:
        raise RuntimeError(f"KV cache overflow: {int(length.max())} + {q} > {cache.capacity}")
    ar = torch.arange(q)
    write_idx = length[:, None] + ar  # [B, q]
    positions = (write_idx - start[:, None]).clamp_min(0)
    if cache.position_offset is not None:
        positions = positions + cache.position_offset[:, None]
    kv_len = int(write_idx.max()) + 1
    uniform = bool((length == length[0]).all())
    uniform_at = int(length[0]) if uniform else None
    padded = bool(start.any())
    if uniform and not padded and q == 1:
        return StepLayout(q, kv_len, positions, write_idx, None, False, uniform_at)
    if uniform and not padded and uniform_at == 0:
        return StepLayout(q, kv_len, positions, write_idx, None, True, uniform_at)
    key = torch.arange(kv_len)  # [kv_len]
    qs = write_idx[:, :, None]  # [B, q, 1]
    mask = (key >= start[:, None, None]) & (key <= qs)  # [B, q, kv_len]
    mask |= key == qs
    return StepLayout(q, kv_len, positions, write_idx, mask[:, None], False, uniform_at)


def static_step_layout(cache: StaticKVCache, slot: torch.Tensor, q: int) -> StepLayout:
    """The layout of ``q`` new tokens per row written at slots ``slot .. slot + q - 1`` (``slot``:
    a one-element long tensor, the same for every row), with tensor ops only.

    Shapes depend on (batch, q, capacity) alone, never on how full the cache is, so one
    compiled graph serves every decode step (see ``CausalRunner(compile=True)``). Every query
    attends over the whole cache; slots before ``start[b]`` or after the query are masked.
    """
    write = slot + torch.arange(q)  # [q]
    positions = (write[None, :] - cache.start[:, None]).clamp_min(0)  # [B, q]
    if cache.position_offset is not None:
        positions = positions + cache.position_offset[:, None]
    key = torch.arange(cache.capacity)  # [T]
    qs = write[None, :, None]  # [1, q, 1]
    mask = ((key >= cache.start[:, None, None]) & (key <= qs)) | (key == qs)  # [B, q, T]
    B = cache.start.shape[0]
    return StepLayout(q, cache.capacity, positions, write.expand(B, q), mask[:, None], False, None,
                      slots=write)


def write_kv(cache: StaticKVCache, layer: int, k: torch.Tensor, v: torch.Tensor,
             layout: StepLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Store ``k, v`` ([B, H_kv, q, D]) and return the keys/values to attend to ([B, H_kv, kv_len, D])."""
    K, V = cache.keys[layer], cache.values[layer]
    if layout.slots is not None:
        K.index_copy_(2, layout.slots, k)
        V.index_copy_(2, layout.slots, v)
        return K, V
    if layout.uniform_at is not None:
        s = layout.uniform_at
        K[:, :, s:s + layout.q] = k
        V[:, :, s:s + layout.q] = v
    else:
        rows = torch.arange(K.shape[0])[:, None]  # [B, 1]
        # advanced indices on dims 0 and 2 put the indexed dims first: target is [B, q, H, D]
        K[rows, :, layout.write_idx] = k.transpose(1, 2)
        V[rows, :, layout.write_idx] = v.transpose(1, 2)
    return K[:, :, :layout.kv_len], V[:, :, :layout.kv_len]


def advance(cache: StaticKVCache, q: int) -> None:
    """Mark ``q`` more slots filled in every row (after a forward wrote them)."""
    cache.length = cache.length + q

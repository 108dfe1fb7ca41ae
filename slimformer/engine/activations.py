"""The activation cache: the hidden states flowing between blocks, one tensor per
calibration batch, kept in memory or offloaded to disk.

For SmolLM2 with the protocol's 128 x 512 tokens the cache is 128*512*576*4 B = 150 MB; for a
3B model it is 840 MB, more than the rest of a streamed compression needs. Offloading writes
each batch with ``torch.save`` into a private temporary folder and reads it back when the
next block needs it, so only one batch is in memory at a time.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Optional

import torch


class ActivationCache:
    """An ordered list of tensors (one per batch), in memory or on disk."""

    def __init__(self, offload_dir: Optional[str | Path] = None) -> None:
        self._mem: list[torch.Tensor] = []
        self._dir: Optional[Path] = None
        self._n = 0
        if offload_dir is not None:
            Path(offload_dir).mkdir(parents=True, exist_ok=True)
            self._dir = Path(tempfile.mkdtemp(prefix="acts-", dir=offload_dir))

    @property
    def offloaded(self) -> bool:
        return self._dir is not None

    def _path(self, i: int) -> Path:
        assert self._dir is not None
        return self._dir / f"batch-{i:06d}.pt"

    def append(self, t: torch.Tensor) -> None:
        t = t.detach().contiguous()
        if self._dir is None:
            self._mem.append(t)
        else:
            torch.save(t, self._path(self._n))
        self._n += 1

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < self._n:
            raise IndexError(i)
        if self._dir is None:
            return self._mem[i]
        return torch.load(self._path(i), weights_only=True)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in range(self._n):
            yield self[i]

    def nbytes(self) -> int:
        if self._dir is None:
            return sum(t.numel() * t.element_size() for t in self._mem)
        return sum(self._path(i).stat().st_size for i in range(self._n))

    def close(self) -> None:
        """Free memory / delete the offload folder (idempotent)."""
        self._mem.clear()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        self._n = 0

    def __del__(self) -> None:  # a crashed run must not leave GBs in /tmp
        try:
            self.close()
        except Exception:
            pass

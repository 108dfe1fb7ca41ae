"""The activation cache: the hidden states flowing between blocks, one tensor per
calibration batch, kept in memory or offloaded to disk.

For SmolLM2 with the protocol's 128 x 512 tokens the cache is 128*512*576*4 B = 150 MB; for a
3B model it is 840 MB, more than the rest of a streamed compression needs. Offloading writes
each batch with ``torch.save`` into a private temporary folder and reads it back when the
next block needs it, so only a few batches are in memory at a time.

Writing is slow next to the block forwards (~25 MB per batch of an MLP activation at
~0.4-0.6 GB/s into the page cache here: ~1 s per block for the true-sequential pass's
caches), so offloaded tensors are written by one background thread while the caller goes
on computing; at most ``MAX_PENDING`` writes wait at a time (bounding the extra memory), and
reading a batch waits for its own write. An appended tensor must not be modified afterwards.
"""
from __future__ import annotations

import shutil
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Optional

import torch

MAX_PENDING = 2  # offloaded batches queued for writing at most (memory bound)


class ActivationCache:
    """An ordered list of tensors (one per batch), in memory or on disk."""

    def __init__(self, offload_dir: Optional[str | Path] = None) -> None:
        self._mem: list[torch.Tensor] = []
        self._dir: Optional[Path] = None
        self._n = 0
        self._writer: Optional[ThreadPoolExecutor] = None
        self._pending: dict[int, Future] = {}
        if offload_dir is not None:
            Path(offload_dir).mkdir(parents=True, exist_ok=True)
            self._dir = Path(tempfile.mkdtemp(prefix="acts-", dir=offload_dir))
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slimformer-offload")

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
            while len(self._pending) >= MAX_PENDING:
                self._wait(min(self._pending))
            self._pending[self._n] = self._writer.submit(torch.save, t, self._path(self._n))
        self._n += 1

    def _wait(self, i: int) -> None:
        fut = self._pending.pop(i, None)
        if fut is not None:
            fut.result()  # re-raises a failed write (e.g. disk full) here

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < self._n:
            raise IndexError(i)
        if self._dir is None:
            return self._mem[i]
        self._wait(i)
        return torch.load(self._path(i), weights_only=True)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in range(self._n):
            yield self[i]

    def nbytes(self) -> int:
        if self._dir is None:
            return sum(t.numel() * t.element_size() for t in self._mem)
        for i in sorted(self._pending):
            self._wait(i)
        return sum(self._path(i).stat().st_size for i in range(self._n))

    def close(self) -> None:
        """Free memory / delete the offload folder (idempotent)."""
        self._mem.clear()
        if self._writer is not None:
            for fut in self._pending.values():
                fut.cancel()
            self._writer.shutdown(wait=True)  # a write in progress finishes before the rmtree
            self._writer = None
            self._pending.clear()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        self._n = 0

    def __del__(self) -> None:  # a crashed run must not leave GBs in /tmp
        try:
            self.close()
        except Exception:
            pass

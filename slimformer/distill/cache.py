"""Teacher logits computed once, stored top-k compressed (TinyViT's saved teacher logits,
DistillKit's sparse logits): later epochs and later runs train without a teacher forward.

:meth:`TeacherCache.build` runs the teacher once over the training windows ``[N, L]`` and keeps,
per token, the ``k`` largest logits (fp16 values + int32 vocabulary indices) in one safetensors
file ``teacher_topk.safetensors`` in the given folder, keyed by *window index*: a
:class:`~slimformer.distill.batches.TokenBatches` batch carries its rows' indices
(``batch["index"]``), so every epoch's shuffled order finds its windows. A second
:meth:`~TeacherCache.build` on the same folder and windows loads the file and never calls the
teacher. The file records a fingerprint (SHA-256 of the windows and their mask), the vocabulary
size and ``k``; a cache written for other windows, another vocabulary or another ``k``, or an
unreadable file, is refused with an error that names the file.

The KD loss on the cache is :func:`~slimformer.distill.losses.topk_forward_kl` (a sparse,
renormalised top-k teacher distribution — see its docstring for the approximation). Storage is
``6 k`` bytes per token: 384 B at ``k = 64`` instead of ``4 V`` (196 KB for a 49k vocabulary).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn

from slimformer.errors import SlimformerError

CACHE_FILE = "teacher_topk.safetensors"
FORMAT = "slimformer-teacher-topk-1"


def fingerprint(windows: torch.Tensor, mask: Optional[torch.Tensor] = None) -> str:
    """SHA-256 of the windows (int64, with their shape) and of their mask (if any)."""
    h = hashlib.sha256()
    w = torch.as_tensor(windows, dtype=torch.long).contiguous()
    h.update(repr(tuple(w.shape)).encode())
    h.update(w.numpy().tobytes())
    if mask is not None:
        h.update(b"mask")
        h.update(torch.as_tensor(mask, dtype=torch.long).contiguous().numpy().tobytes())
    return h.hexdigest()


def _output_vocab(model: nn.Module) -> Optional[int]:
    get = getattr(model, "get_output_embeddings", None)
    emb = get() if callable(get) else None
    w = getattr(emb, "weight", None)
    return int(w.shape[0]) if isinstance(w, torch.Tensor) and w.dim() == 2 else None


class TeacherCache:
    """The teacher's top-k logits per token of ``N`` windows of ``L`` tokens.

    ``values`` ``[N, L, k]`` fp16 (the raw logits, temperature is applied by the loss),
    ``indices`` ``[N, L, k]`` int32, sorted by decreasing logit. Build or re-open with
    :meth:`build`; open an existing file with :meth:`load`.
    """

    def __init__(self, values: torch.Tensor, indices: torch.Tensor, vocab: int, fingerprint: str,
                 path: Optional[Path] = None) -> None:
        if values.shape != indices.shape or values.dim() != 3:
            raise SlimformerError(f"teacher cache: values {tuple(values.shape)} and indices {tuple(indices.shape)} "
                                  "must both be [N, L, k]")
        self.values, self.indices = values, indices
        self.vocab, self.fingerprint, self.path = int(vocab), str(fingerprint), path

    @property
    def k(self) -> int:
        return int(self.values.shape[-1])

    @property
    def n_windows(self) -> int:
        return int(self.values.shape[0])

    # ---- building / loading ------------------------------------------------------------------
    @classmethod
    def build(cls, teacher: Optional[nn.Module], windows, directory: Union[str, Path], k: int = 64,
              mask: Optional[torch.Tensor] = None, batch_size: int = 8, progress: bool = True,
              autocast_bf16: bool = False) -> "TeacherCache":
        """The cache of ``teacher`` on ``windows`` (``[N, L]`` token ids or a TokenBatches, whose
        mask is used) in ``directory``: loaded when the folder already holds one for exactly these
        windows and ``k`` (the teacher is not called), else computed — ``batch_size`` windows per
        teacher forward, with a progress bar — and written atomically."""
        from slimformer.distill.batches import TokenBatches

        if isinstance(windows, TokenBatches):
            windows, mask = windows.windows, windows.mask
        windows = torch.as_tensor(windows, dtype=torch.long)
        if windows.dim() != 2 or windows.shape[0] == 0:
            raise SlimformerError(f"teacher cache needs windows [N, L], got shape {tuple(windows.shape)}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise SlimformerError(f"teacher cache k must be an integer >= 1 (got {k!r})")
        path = Path(directory) / CACHE_FILE
        if path.exists():
            cache = cls.load(directory)
            cache.check(windows, mask)
            if cache.k != k:
                raise SlimformerError(f"teacher cache {path} holds the top {cache.k} logits, not {k}; "
                                      "delete it or choose another folder")
            if teacher is not None and _output_vocab(teacher) not in (None, cache.vocab):
                raise SlimformerError(f"teacher cache {path} was written for a vocabulary of {cache.vocab}, "
                                      f"this teacher has {_output_vocab(teacher)}")
            return cache
        if teacher is None:
            raise SlimformerError(f"no teacher cache in {Path(directory)} and no teacher to build one")
        values, indices, vocab = cls._compute(teacher, windows, mask, k, batch_size, progress, autocast_bf16)
        cache = cls(values, indices, vocab, fingerprint(windows, mask), path)
        cache.save(path)
        return cache

    @staticmethod
    @torch.no_grad()
    def _compute(teacher, windows, mask, k, batch_size, progress, autocast_bf16):
        was = teacher.training
        teacher.eval()
        N, L = windows.shape
        values = indices = None
        vocab = None
        starts = range(0, N, batch_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="teacher top-k", unit="batch", dynamic_ncols=True)
        try:
            for s in starts:
                ids = windows[s:s + batch_size]
                m = torch.ones_like(ids) if mask is None else mask[s:s + batch_size].to(torch.long)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast_bf16):
                    logits = teacher(input_ids=ids, attention_mask=m).logits
                if vocab is None:
                    vocab = int(logits.shape[-1])
                    if k > vocab:
                        raise SlimformerError(f"teacher cache k = {k} exceeds the vocabulary ({vocab})")
                    values = torch.empty(N, L, k, dtype=torch.float16)
                    indices = torch.empty(N, L, k, dtype=torch.int32)
                v, i = logits.float().topk(k, dim=-1)
                values[s:s + len(ids)] = v.to(torch.float16)
                indices[s:s + len(ids)] = i.to(torch.int32)
        finally:
            teacher.train(was)
        return values, indices, vocab

    def save(self, path: Union[str, Path]) -> Path:
        """Write the cache to ``path`` (atomically: a crash leaves no half-written file)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"values": self.values.contiguous(), "indices": self.indices.contiguous()}, str(tmp),
                  metadata={"format": FORMAT, "vocab": str(self.vocab), "fingerprint": self.fingerprint})
        os.replace(tmp, path)
        self.path = path
        return path

    @classmethod
    def load(cls, directory: Union[str, Path]) -> "TeacherCache":
        """Open the cache file in ``directory``; an unreadable or foreign file is an error."""
        from safetensors import safe_open

        path = Path(directory) / CACHE_FILE
        if not path.exists():
            raise SlimformerError(f"no teacher cache at {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                values, indices = f.get_tensor("values"), f.get_tensor("indices")
        except Exception as e:  # safetensors raises its own types for truncated / garbled files
            raise SlimformerError(f"teacher cache {path} is unreadable ({type(e).__name__}: {e}); "
                                  "delete it to rebuild") from None
        if meta.get("format") != FORMAT or "vocab" not in meta or "fingerprint" not in meta:
            raise SlimformerError(f"teacher cache {path} is not a slimformer teacher cache (format "
                                  f"{meta.get('format')!r}); delete it to rebuild")
        if values.dtype != torch.float16 or indices.dtype != torch.int32 or values.shape != indices.shape \
                or values.dim() != 3:
            raise SlimformerError(f"teacher cache {path} is corrupt: values {values.dtype} {tuple(values.shape)}, "
                                  f"indices {indices.dtype} {tuple(indices.shape)}; delete it to rebuild")
        vocab = int(meta["vocab"])
        if values.numel() and (int(indices.min()) < 0 or int(indices.max()) >= vocab):
            raise SlimformerError(f"teacher cache {path} is corrupt: token indices outside 0..{vocab - 1}")
        return cls(values, indices, vocab, meta["fingerprint"], path)

    # ---- use ---------------------------------------------------------------------------------
    def check(self, windows: torch.Tensor, mask: Optional[torch.Tensor] = None) -> None:
        """Refuse training windows other than the ones the cache was built on."""
        windows = torch.as_tensor(windows, dtype=torch.long)
        if tuple(windows.shape) != tuple(self.values.shape[:2]) or fingerprint(windows, mask) != self.fingerprint:
            raise SlimformerError(f"teacher cache {self.path or ''} was written for other training windows "
                                  f"({self.n_windows} x {self.values.shape[1]} tokens, fingerprint "
                                  f"{self.fingerprint[:12]}); these are {tuple(windows.shape)}, fingerprint "
                                  f"{fingerprint(windows, mask)[:12]}: delete it or choose another folder")

    def check_vocab(self, vocab: int) -> None:
        if int(vocab) != self.vocab:
            raise SlimformerError(f"teacher cache {self.path or ''} was written for a vocabulary of {self.vocab}; "
                                  f"the student has {vocab}: logits KD needs the same vocabulary")

    def lookup(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values fp16, indices int64)`` ``[B, L, k]`` of the windows ``index`` ``[B]``."""
        index = torch.as_tensor(index, dtype=torch.long)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.n_windows):
            raise SlimformerError(f"teacher cache holds {self.n_windows} windows; asked for index {index.tolist()}")
        return self.values[index], self.indices[index].long()

"""Model size: parameters, bytes in memory, bytes on disk.

Memory bytes count every parameter and buffer as stored (a packed int4 buffer counts its
packed bytes), each storage once, so tied embeddings or shared buffers are not double counted.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def _unique_tensors(model: nn.Module) -> list[torch.Tensor]:
    seen, out = set(), []
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type == "meta":
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if key in seen:
            continue
        seen.add(key)
        out.append(t)
    return out


def _packed_modules(model: nn.Module) -> list[nn.Module]:
    """Compressed linears (slimformer.formats): they hold weights as packed buffers or in a
    kernel's own handle (fbgemm), which ``parameters()`` / ``buffers()`` do not show."""
    from slimformer.formats.serialize import quantized_modules

    return list(quantized_modules(model).values())


def parameter_count(model: nn.Module) -> int:
    """Number of distinct weight elements (tied weights once). A compressed linear counts its
    logical in x out weights (+ bias): quantizing a model does not remove parameters."""
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    for m in _packed_modules(model):
        n += m.in_features * m.out_features + (m.out_features if m.bias is not None else 0)
    return n


def memory_bytes(model: nn.Module) -> int:
    """Bytes held by the model's tensors, each distinct tensor once; compressed linears count
    what they really hold (``nbytes()``: packed codes, scales and any kernel-side copy)."""
    packed = _packed_modules(model)
    inside = {id(t) for m in packed for t in m.buffers()}
    plain = sum(t.numel() * t.element_size() for t in _unique_tensors(model) if id(t) not in inside)
    return plain + sum(m.nbytes() for m in packed)


def folder_bytes(folder: Path) -> tuple[int, int]:
    """(all files, weight files only) bytes under ``folder``."""
    total = weights = 0
    for f in folder.rglob("*"):
        if f.is_file():
            size = f.stat().st_size
            total += size
            if f.name.endswith(WEIGHT_SUFFIXES):
                weights += size
    return total, weights


def disk_bytes(lm) -> dict:
    """Bytes on disk: the source folder's files, or a fresh ``save_pretrained`` when the model
    did not come from a folder (a GGUF file we dequantized, a model built in memory).

    The GGUF case must not report the GGUF's size: the model in memory is fp32 and the
    comparison that matters is against what slimformer would save.
    """
    src = Path(str(lm.source))
    if src.is_dir():
        total, weights = folder_bytes(src)
        return {"disk_bytes": total, "disk_weight_bytes": weights, "disk_from": "source folder"}
    with tempfile.TemporaryDirectory(prefix="slimformer-size-") as tmp:
        lm.model.save_pretrained(tmp)
        total, weights = folder_bytes(Path(tmp))
    return {"disk_bytes": total, "disk_weight_bytes": weights, "disk_from": "save_pretrained"}


def size_metrics(lm) -> dict:
    """Parameter count, in-memory bytes and on-disk bytes of a loaded model."""
    return {"params": parameter_count(lm.model), "memory_bytes": memory_bytes(lm.model),
            **disk_bytes(lm)}

"""Weight streaming: compress a model larger than RAM.

The model is built on ``meta`` from its Hugging Face config (parameters take no memory;
buffers such as rotary ``inv_freq`` are computed for real because they are not in the
checkpoint). Everything outside the blocks (embeddings, final norm, head: small) is read at
once; each block's tensors are read from the safetensors shards (``safe_open`` through the
index json, so only the needed bytes are touched) when the engine reaches that block, and
dropped back to ``meta`` after it has been compressed and handed to the sink.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from slimformer.errors import SlimformerError

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class SafetensorsSource:
    """Tensor name -> shard file of a Hugging Face folder; reads single tensors on demand."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        idx = self.folder / INDEX_NAME
        if idx.exists():
            try:
                weight_map = json.loads(idx.read_text())["weight_map"]
            except Exception as e:
                raise SlimformerError(f"'{idx}' is not a valid safetensors index: {type(e).__name__}: {e}")
            self.files = {k: self.folder / v for k, v in weight_map.items()}
        elif (self.folder / SINGLE_NAME).exists():
            from safetensors import safe_open

            with safe_open(str(self.folder / SINGLE_NAME), framework="pt") as f:
                self.files = {k: self.folder / SINGLE_NAME for k in f.keys()}
        else:
            raise SlimformerError(f"folder '{folder}' has no {SINGLE_NAME} or {INDEX_NAME} to stream from")

    def key_for(self, name: str) -> Optional[str]:
        """The checkpoint key of a model tensor name (HF checkpoints of task heads may omit
        the base-model prefix, e.g. ``bert.``)."""
        if name in self.files:
            return name
        parts = name.split(".", 1)
        if len(parts) == 2 and parts[1] in self.files:
            return parts[1]
        return None

    def get_many(self, names: list[str], dtype: Optional[torch.dtype] = torch.float32) -> dict[str, torch.Tensor]:
        """Read tensors by model name, opening each shard once and closing it right after:
        ``safe_open`` memory-maps the file and the pages it touched would otherwise stay
        resident (and count in RSS) for the whole run."""
        from safetensors import safe_open

        by_file: dict[Path, list[tuple[str, str]]] = {}
        for n in names:
            key = self.key_for(n)
            if key is None:
                raise SlimformerError(f"tensor '{n}' is not in the checkpoint at '{self.folder}'")
            by_file.setdefault(self.files[key], []).append((n, key))
        out: dict[str, torch.Tensor] = {}
        for path in sorted(by_file):
            if not path.exists():
                raise SlimformerError(f"shard '{path}' named in the index is missing")
            with safe_open(str(path), framework="pt") as f:
                for n, key in by_file[path]:
                    t = f.get_tensor(key)
                    # a private copy, so nothing keeps the mapping alive after close
                    out[n] = t.to(dtype, copy=True) if t.is_floating_point() and dtype is not None else t.clone()
                    del t
            del f
        return out

    def get(self, name: str, dtype: Optional[torch.dtype] = torch.float32) -> torch.Tensor:
        return self.get_many([name], dtype)[name]

    def close(self) -> None:  # kept for symmetry: no handle outlives a read
        pass


def _assign(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Replace a (meta) parameter or buffer at dotted ``name`` under ``module``."""
    owner_path, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_path) if owner_path else module
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    else:
        owner._buffers[leaf] = tensor


def materialize(module: nn.Module, prefix: str, source: SafetensorsSource,
                dtype: torch.dtype = torch.float32) -> None:
    """Load every ``meta`` parameter/buffer of ``module`` (full names ``prefix + name``)."""
    names = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    loaded = source.get_many([prefix + n for n in names], dtype)
    for n in names:
        _assign(module, n, loaded.pop(prefix + n))


def release(module: nn.Module) -> None:
    """Drop a module's tensors back to ``meta`` so their memory is freed."""
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if not t.is_meta:
            _assign(module, name, torch.empty_like(t, device="meta"))


def trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    A streamed run frees a block's worth of mid-sized buffers (weights, codes, packed kernel
    layouts) per block; glibc keeps such freed chunks in its arenas, and on a 3B model RSS
    crept up ~80 MB per block (peak 4.9 GB) until this call after each block held it flat
    (0.85 GB between blocks, peak 1.8 GB)."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # musl or another libc: nothing to do
        pass


def build_meta_model(folder: str | Path, dtype: torch.dtype = torch.float32):
    """A :class:`LoadedModel` whose blocks are on ``meta`` and everything else is loaded.

    Returns ``(lm, source)``; the engine materialises block ``i`` with
    ``materialize(block, f"{block_path}.{i}.", source)``.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    from slimformer.models.loading import LoadedModel, _quiet_transformers
    from slimformer.models.registry import arch_for_config

    folder = Path(folder)
    cfg = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    arch = arch_for_config(cfg)
    if arch.kind == "vision":
        raise SlimformerError("weight streaming supports text models (causal-lm, encoder) only")
    source = SafetensorsSource(folder)
    with _quiet_transformers(), init_empty_weights(include_buffers=False):
        auto = AutoModelForCausalLM if arch.kind == "causal-lm" else AutoModel
        model = auto.from_config(cfg, dtype=dtype)
    model.eval()
    block_path = arch.block_path(model)
    wanted = [n for n, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers())
              if t.is_meta and not n.startswith(block_path + ".")
              and source.key_for(n) is not None]  # a tied head is absent: tied below
    for n, t in source.get_many(wanted, dtype).items():
        _assign(model, n, t)
    if getattr(cfg, "tie_word_embeddings", False) and arch.head:
        head = model.get_submodule(arch.resolve(model, arch.head))
        emb = model.get_input_embeddings()
        if head.weight.is_meta:
            head.weight = emb.weight
    left = [n for n, t in model.named_parameters()
            if t.is_meta and not n.startswith(block_path + ".")]
    if left:
        raise SlimformerError(f"checkpoint at '{folder}' lacks tensor '{left[0]}'")
    tok = None
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception:
        log.info("no tokenizer in %s", folder)
    lm = LoadedModel(model=model, tokenizer=tok, arch=arch, name=folder.name, source=str(folder),
                     meta={"streamed": True})
    return lm, source

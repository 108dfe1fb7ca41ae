"""Incremental output for streamed runs: each compressed block goes to its own safetensors
shard the moment it is done and is then dropped from memory, so peak memory stays about one
block (plus the embeddings) however large the model.

The folder is the formats package's layout (``slimformer.json`` + ``config.json`` +
tokenizer) with the weights split into ``model-XXXXX-of-YYYYY.safetensors`` shards and a
``model.safetensors.index.json`` weight map (the Hugging Face convention), instead of one
``model.safetensors``. Per-module tensors and module records come from
:mod:`slimformer.formats.serialize` so both writers stay byte-compatible.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from slimformer.engine.streaming import INDEX_NAME, trim_heap

log = logging.getLogger(__name__)


class BlockShardWriter:
    """``add(i, name, block)`` after each block; ``finish(lm, meta)`` once at the end."""

    def __init__(self, folder: Path, n_blocks: int) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=False)
        self.n_shards = n_blocks + 1  # one per block + everything else
        self.weight_map: dict[str, str] = {}
        self.modules: dict[str, Any] = {}
        self.total_bytes = 0

    def _shard_name(self, k: int) -> str:
        return f"model-{k + 1:05d}-of-{self.n_shards:05d}.safetensors"

    def _write(self, k: int, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        from slimformer.formats.serialize import _readable

        name = self._shard_name(k)
        save_file({n: tensors[n].contiguous() for n in sorted(tensors)}, str(self.folder / name),
                  metadata={"format": "pt"})
        _readable(self.folder / name)
        for n, t in tensors.items():
            self.weight_map[n] = name
            self.total_bytes += t.numel() * t.element_size()

    def add(self, index: int, name: str, block: nn.Module) -> None:
        """Write block ``index`` (full module name ``name``) and release its memory."""
        from slimformer.formats.serialize import _module_tensors, packed_types

        tensors: dict[str, torch.Tensor] = {}
        qnames = []
        for rel, m in block.named_modules():
            if isinstance(m, packed_types()):
                t, info = _module_tensors(f"{name}.{rel}", m)
                tensors.update(t)
                self.modules[f"{name}.{rel}"] = info
                qnames.append(rel)
        for n, t in list(block.named_parameters()) + list(block.named_buffers()):
            if t is None or any(n.startswith(q + ".") for q in qnames):
                continue
            tensors[f"{name}.{n}"] = t.detach()
        self._write(index, tensors)
        del tensors
        _drop(block)
        trim_heap()

    def finish(self, lm, meta: dict) -> None:
        """Everything outside the blocks, the configs and (last) the marker file."""
        from slimformer.formats.serialize import (CONFIG_NAME, FORMAT_VERSION, _all_tensors,
                                                  _config_for_save, _dedupe, quantized_modules)

        model = lm.model
        block_path = lm.arch.block_path(model)
        outside_q = {n: m for n, m in quantized_modules(model).items() if not n.startswith(block_path + ".")}
        tensors: dict[str, torch.Tensor] = {}
        from slimformer.formats.serialize import _module_tensors

        for n, m in outside_q.items():
            t, info = _module_tensors(n, m)
            tensors.update(t)
            self.modules[n] = info
        rest = {n: t for n, t in _all_tensors(model, set(outside_q)).items()
                if not n.startswith(block_path + ".")}
        kept, aliases = _dedupe(rest)
        tensors.update(kept)
        self._write(self.n_shards - 1, tensors)
        index = {"metadata": {"total_size": self.total_bytes},
                 "weight_map": {k: self.weight_map[k] for k in sorted(self.weight_map)}}
        (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        _config_for_save(model, outside_q).to_json_file(str(self.folder / "config.json"), use_diff=False)
        if lm.tokenizer is not None:
            lm.tokenizer.save_pretrained(str(self.folder))
        doc = {"format_version": FORMAT_VERSION, "arch": lm.arch.name, "kind": lm.arch.kind,
               "model_class": type(model).__name__,
               "modules": {k: self.modules[k] for k in sorted(self.modules)},
               "aliases": aliases, "meta": meta or {}}
        (self.folder / CONFIG_NAME).write_text(json.dumps(doc, sort_keys=True, indent=2) + "\n")


def _drop(block: nn.Module) -> None:
    """Free a written block: every submodule's tensors go to ``meta``; packed kernel handles
    (which are not tensors) are cleared too."""
    for m in block.modules():
        for k, t in list(m._parameters.items()):
            if t is not None:
                m._parameters[k] = nn.Parameter(torch.empty_like(t, device="meta"), requires_grad=False)
        for k, t in list(m._buffers.items()):
            if t is not None:
                m._buffers[k] = torch.empty_like(t, device="meta")
        if hasattr(m, "_packed"):
            m._packed = None

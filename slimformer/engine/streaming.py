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
        self._handles: dict[Path, object] = {}

    def _handle(self, path: Path):
        from safetensors import safe_open

        if path not in self._handles:
            if not path.exists():
                raise SlimformerError(f"shard '{path}' named in the index is missing")
            self._handles[path] = safe_open(str(path), framework="pt")
        return self._handles[path]

    def key_for(self, name: str) -> Optional[str]:
        """The checkpoint key of a model tensor name (HF checkpoints of task heads may omit
        the base-model prefix, e.g. ``bert.``)."""
        if name in self.files:
            return name
        parts = name.split(".", 1)
        if len(parts) == 2 and parts[1] in self.files:
            return parts[1]
        return None

    def get(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        key = self.key_for(name)
        if key is None:
            raise SlimformerError(f"tensor '{name}' is not in the checkpoint at '{self.folder}'")
        t = self._handle(self.files[key]).get_tensor(key)
        return t.to(dtype) if t.is_floating_point() else t

    def close(self) -> None:
        self._handles.clear()


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
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if t.is_meta:
            _assign(module, name, source.get(prefix + name, dtype))


def release(module: nn.Module) -> None:
    """Drop a module's tensors back to ``meta`` so their memory is freed."""
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if not t.is_meta:
            _assign(module, name, torch.empty_like(t, device="meta"))


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
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers()):
        if t.is_meta and not name.startswith(block_path + "."):
            key = source.key_for(name)
            if key is None:
                continue  # tied head: filled by tie_weights below
            _assign(model, name, source.get(name, dtype))
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

